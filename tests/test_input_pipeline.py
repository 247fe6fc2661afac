"""Tests for ddpm_jax.data.pipeline."""

import io
import logging
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.data import pipeline as ip

SHARED_DATA = pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"
MNIST = SHARED_DATA / "mnist.npz"
CIFAR = SHARED_DATA / "cifar10_jpg.tar.gz"

OPTIONS = dict(batch_size=4, image_size=None, channels=None, random_flip=False,
               seed=0)


def _options(**overrides):
  return {**OPTIONS, **overrides}


def _indexed_npz(path, num=50, size=6):
  """Writes an npz whose image i has pixel [0, 0] = i (asymmetric images)."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (num, size, size), dtype=np.uint8)
  x[:, 0, 0] = np.arange(num)
  x[:, 0, -1] = 255 - np.arange(num)  # so no image is its own mirror
  y = np.arange(num) % 5
  np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
  return path


def _index_of(images):
  """Recovers the indices written by _indexed_npz from [-1, 1] images.

  Works on mirrored images too: the index is the smaller top corner.
  """
  corners = np.round(images[:, 0, [0, -1], 0] * 127.5 + 127.5).astype(int)
  return corners.min(axis=1)


def _png(color, size=8):
  pixels = np.zeros((size, size, 3), np.uint8)
  pixels[...] = color
  pixels[0, 0] = 255 - np.asarray(color)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _image_tree(root, *, sizes=None, extra=None):
  """Writes root/data/{train,test}/{cat,dog}/NN.png (6 + 6 train, 2 + 2 test).

  Args:
    root: Directory to create the tree in.
    sizes: Maps a relative path to a non-default image size.
    extra: Maps a relative path to raw file bytes to add.
  """
  sizes = sizes or {}
  files = {}
  for split, count in (("train", 6), ("test", 2)):
    for label, name in enumerate(("cat", "dog")):
      for i in range(count):
        rel = f"data/{split}/{name}/{i:02d}.png"
        files[rel] = _png((40 * label + i, 100, 200), sizes.get(rel, 8))
  files.update(extra or {})
  for rel, data in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  return root / "data"


def _tar(directory, path):
  with tarfile.open(path, "w:gz") as archive:
    archive.add(directory, arcname=directory.name)
  return path


def _collect(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _check_batch(batch, batch_size, image_shape, num_classes):
  assert batch["image"].shape == (batch_size, *image_shape)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["label"].shape == (batch_size,)
  assert batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < num_classes


# Sources that load in memory; each is (source, options, spec image_shape).
@pytest.fixture(params=["npz", "digits", "folder", "tar"])
def memory_source(request, tmp_path):
  if request.param == "npz":
    return f"npz:{_indexed_npz(tmp_path / 'x.npz')}", {}, (6, 6, 1)
  if request.param == "digits":
    return "digits", dict(image_size=16, resize=True), (16, 16, 1)
  tree = _image_tree(tmp_path)
  if request.param == "folder":
    return f"folder:{tree}", {}, (8, 8, 3)
  return f"folder:{_tar(tree, tmp_path / 'data.tar.gz')}", {}, (8, 8, 3)


def test_memory_source_batches(memory_source):
  source, options, image_shape = memory_source
  iterator = ip.create_dataset(source, **_options(**options))
  assert iterator.spec.image_shape == image_shape
  for batch in _collect(iterator, 5):
    _check_batch(batch, 4, image_shape, iterator.spec.num_classes)
    assert batch.keys() == {"image", "label"}


@pytest.mark.real_data("mnist.npz")
def test_mnist_npz_matches_file():
  iterator = ip.create_dataset(
      f"npz:{MNIST}",
      **_options(split="test", batch_size=1000, shuffle=False, repeat=False))
  assert iterator.spec == ip.DatasetSpec(10000, (28, 28, 1), 10, 10)
  batches = list(iterator)
  with np.load(MNIST) as mnist:
    x_test, y_test = mnist["x_test"], mnist["y_test"]
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(np.round(images[..., 0] * 127.5 + 127.5),
                                x_test)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                y_test)
  assert all(b["mask"].all() for b in batches)


@pytest.mark.real_data("cifar10_jpg.tar.gz")
def test_cifar_tarball_test_split():
  iterator = ip.create_dataset(
      f"folder:{CIFAR}",
      **_options(split="test", batch_size=500, channels=3, image_size=32,
                 repeat=False))
  assert iterator.spec == ip.DatasetSpec(10000, (32, 32, 3), 10, 20)
  labels = []
  for batch in iterator:
    _check_batch(batch, 500, (32, 32, 3), 10)
    labels.append(batch["label"])
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels)),
                                [1000] * 10)


@pytest.mark.parametrize("split, counts", [("train", [6, 6]), ("test", [2, 2])])
def test_folder_split_and_class_rule(tmp_path, split, counts):
  tree = _image_tree(tmp_path)
  iterator = ip.create_dataset(
      f"folder:{tree.parent}",
      **_options(split=split, shuffle=False, repeat=False))
  labels = np.concatenate([b["label"][b["mask"]] for b in iterator])
  # 'cat' < 'dog', and files come in sorted path order.
  np.testing.assert_array_equal(labels, np.repeat([0, 1], counts))


def test_folder_without_split_or_classes_is_unlabelled_train(tmp_path):
  for i in range(5):
    (tmp_path / f"{i}.png").write_bytes(_png((i, i, i)))
  iterator = ip.create_dataset(f"folder:{tmp_path}", **_options(repeat=False))
  assert iterator.spec.num_classes == 1
  assert sum(int(b["mask"].sum()) for b in iterator) == 5


def test_digits_splits():
  train = ip.create_dataset("digits", **_options(image_size=8))
  test = ip.create_dataset("digits", **_options(split="test", channels=1))
  assert train.spec == ip.DatasetSpec(1500, (8, 8, 1), 10, 375)
  assert test.spec.num_examples == 297


@pytest.mark.parametrize("random_flip", [False, True])
def test_flips_only_when_asked(tmp_path, random_flip):
  path = _indexed_npz(tmp_path / "x.npz")
  with np.load(path) as data:
    originals = data["x_train"]
  iterator = ip.create_dataset(
      f"npz:{path}", **_options(random_flip=random_flip, batch_size=10))
  flipped = kept = 0
  for batch in _collect(iterator, 10):
    pixels = np.round(batch["image"][..., 0] * 127.5 + 127.5)
    for image, index in zip(pixels, _index_of(batch["image"])):
      if np.array_equal(image, originals[index]):
        kept += 1
      else:
        np.testing.assert_array_equal(image, originals[index, :, ::-1])
        flipped += 1
  assert kept > 0
  assert (flipped > 0) == random_flip


@pytest.mark.parametrize("process_count", [2, 4])
def test_one_pass_shards_cover_data_once(tmp_path, process_count):
  path = _indexed_npz(tmp_path / "x.npz", num=50)
  seen, steps = [], set()
  for process_index in range(process_count):
    iterator = ip.create_dataset(
        f"npz:{path}",
        **_options(batch_size=3, seed=5, repeat=False,
                   process_index=process_index, process_count=process_count))
    batches = list(iterator)
    steps.add(len(batches))
    seen.extend(i for b in batches for i in _index_of(b["image"][b["mask"]]))
  assert len(steps) == 1  # every host yields the same number of batches
  assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("process_count", [2, 4])
def test_training_shards_are_disjoint_slices_of_global_batch(
    tmp_path, process_count):
  path = f"npz:{_indexed_npz(tmp_path / 'x.npz', num=50)}"
  steps = 50 // (3 * process_count)
  single = ip.create_dataset(
      path, **_options(batch_size=3 * process_count, seed=5, random_flip=True))
  hosts = [
      ip.create_dataset(
          path,
          **_options(batch_size=3, seed=5, random_flip=True, process_index=i,
                     process_count=process_count)) for i in range(process_count)
  ]
  for _ in range(2 * steps):  # two epochs
    expected = next(single)
    parts = [next(host) for host in hosts]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    expected[key])
    indices = np.concatenate([_index_of(p["image"]) for p in parts])
    assert len(set(indices)) == len(indices)


def _memory_iterator(memory_source, seed, **overrides):
  source, options, _ = memory_source
  return ip.create_dataset(
      source, **_options(**options, seed=seed, random_flip=True, **overrides))


def test_memory_determinism_and_resume(memory_source):
  reference = _collect(_memory_iterator(memory_source, seed=1), 12)
  _assert_batches_equal(_collect(_memory_iterator(memory_source, seed=1), 12),
                        reference)
  other = _collect(_memory_iterator(memory_source, seed=2), 12)
  assert any(not np.array_equal(a["image"], b["image"])
             for a, b in zip(reference, other))
  for stop in (3, 7):  # mid-epoch (and, for small data, past an epoch end)
    interrupted = _memory_iterator(memory_source, seed=1)
    _collect(interrupted, stop)
    state = interrupted.get_state()
    resumed = _memory_iterator(memory_source, seed=1)
    resumed.set_state(state)
    _assert_batches_equal(_collect(resumed, 12 - stop), reference[stop:])


def test_state_is_epoch_and_step(tmp_path):
  iterator = ip.create_dataset(f"npz:{_indexed_npz(tmp_path / 'x.npz')}",
                               **_options(batch_size=8))
  _collect(iterator, 8)  # 6 steps per epoch
  assert iterator.get_state() == {"epoch": 1, "step": 2}


# ---------------------------------------------------------------- tfds (mock)


@pytest.fixture(scope="module")
def tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    yield tfds


@pytest.mark.parametrize("source, options, image_shape, num_classes", [
    ("tfds:mnist", {}, (28, 28, 1), 10),
    ("tfds:cifar10:test", dict(random_flip=True), (32, 32, 3), 10),
    ("tfds:celeb_a", dict(image_size=16, resize=True), (16, 16, 3), 1),
])
def test_tfds_batches(tfds, source, options, image_shape, num_classes):
  del tfds
  iterator = ip.create_dataset(source, **_options(**options))
  assert iterator.spec == ip.DatasetSpec(24, image_shape, num_classes, 6)
  for batch in _collect(iterator, 8):  # crosses an epoch end
    _check_batch(batch, 4, image_shape, num_classes)


def test_tfds_flips_only_when_asked(tfds):
  del tfds
  plain, flipped = (_collect(
      ip.create_dataset("tfds:mnist", **_options(random_flip=flip, seed=3)), 6)
                    for flip in (False, True))
  mirrored = 0
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a["label"], b["label"])
    for x, y in zip(a["image"], b["image"]):
      if not np.array_equal(x, y):
        np.testing.assert_array_equal(x[:, ::-1], y)
        mirrored += 1
  assert 0 < mirrored < 24


def test_tfds_determinism_and_resume(tfds):
  del tfds
  make = lambda seed: ip.create_dataset("tfds:mnist",
                                        **_options(seed=seed, random_flip=True))
  reference = _collect(make(1), 9)
  _assert_batches_equal(_collect(make(1), 9), reference)
  assert not np.array_equal(
      _collect(make(2), 1)[0]["image"], reference[0]["image"])
  interrupted = make(1)
  _collect(interrupted, 4)
  resumed = make(1)
  resumed.set_state(interrupted.get_state())
  _assert_batches_equal(_collect(resumed, 5), reference[4:])


def test_tfds_one_pass_pads_with_mask(tfds):
  del tfds
  iterator = ip.create_dataset("tfds:mnist",
                               **_options(batch_size=5, repeat=False))
  batches = list(iterator)
  assert len(batches) == iterator.spec.steps_per_epoch == 5
  assert [int(b["mask"].sum()) for b in batches] == [5, 5, 5, 5, 4]
  assert not batches[-1]["image"][-1].any()


@pytest.mark.parametrize("source, options, message", [
    ("tfds:mnist", dict(image_size=32),
     r"28x28 but image_size=32; pass resize"),
    ("tfds:mnist", dict(channels=3), r"1 channel\(s\) but channels=3"),
    ("tfds:celeb_a", dict(image_size=64), r"218x178 but image_size=64"),
    ("tfds:mnist", dict(num_classes=5), r"need 10 classes but num_classes=5"),
    ("tfds:mnist", dict(batch_size=25), r"fewer than one batch of 25"),
    ("tfds:no_such_dataset", {}, r"tfds:no_such_dataset: cannot load"),
])
def test_tfds_bad_input(tfds, source, options, message):
  del tfds
  with pytest.raises(ip.DataError, match=message):
    ip.create_dataset(source, **_options(**options))


# ----------------------------------------------------------------- bad input


def _npz(tmp_path, **arrays):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


X = np.zeros((10, 6, 6), np.uint8)
Y = np.arange(10) % 3


@pytest.mark.parametrize("arrays, options, message", [
    (dict(x_train=X), {}, r"bad.npz: missing key 'y_train' \(keys present: "
     r"x_train\)"),
    (dict(x_train=X, y_train=Y), dict(split="test"), r"missing key 'x_test'"),
    (dict(x_train=X * 1.0 + 2, y_train=Y), {}, r"x_train: float pixels span "
     r"\[2, 2\]"),
    (dict(x_train=X - 1.0 * (X == 0), y_train=Y), {}, r"float pixels span"),
    (dict(x_train=X.astype(np.int64) + 300,
          y_train=Y), {}, r"integer pixels span \[300, 300\]"),
    (dict(x_train=X.astype(np.complex64), y_train=Y), {}, r"dtype complex64"),
    (dict(x_train=np.zeros(
        (10, 6), np.uint8), y_train=Y), {}, r"shape \(10, 6\)"),
    (dict(x_train=X, y_train=Y - 1), {}, r"y_train: labels must be >= 0"),
    (dict(x_train=X, y_train=Y * 1.0), {}, r"y_train: labels must be a 1-D "
     r"integer array"),
    (dict(x_train=X, y_train=Y[:5]), {}, r"5 labels for 10 images"),
    (dict(x_train=X, y_train=Y + 2), dict(num_classes=4),
     r"labels need 5 classes but num_classes=4"),
    (dict(x_train=X, y_train=Y), dict(image_size=8),
     r"x_train: images are 6x6 but image_size=8; pass resize=True"),
    (dict(x_train=X, y_train=Y), dict(channels=3),
     r"x_train: images have 1 channel\(s\) but channels=3"),
    (dict(x_train=X[:0], y_train=Y[:0]), {}, r"the split has no examples"),
    (dict(x_train=X, y_train=Y),
     dict(batch_size=3, process_count=4,
          process_index=1), r"host 1 of 4 fewer than one batch of 3"),
])
def test_bad_npz(tmp_path, arrays, options, message):
  with pytest.raises(ip.DataError, match=message):
    ip.create_dataset(_npz(tmp_path, **arrays), **_options(**options))


@pytest.mark.parametrize("content, message", [
    (b"plain text", r"not a readable .npz file"),
    (None, r"holds a single array, not an .npz archive"),
])
def test_unreadable_npz(tmp_path, content, message):
  path = tmp_path / "bad.npz"
  if content is None:
    with open(path, "wb") as f:
      np.save(f, X)
  else:
    path.write_bytes(content)
  with pytest.raises(ip.DataError, match=rf"npz:\S*bad.npz: {message}"):
    ip.create_dataset(f"npz:{path}", **_options())


def test_float_npz_in_unit_range_is_accepted(tmp_path):
  source = _npz(tmp_path, x_train=np.full((8, 6, 6), 1.0), y_train=Y[:8])
  batch = next(ip.create_dataset(source, **_options()))
  np.testing.assert_array_equal(batch["image"], 1.0)


@pytest.mark.parametrize("source, options, message", [
    ("imagenet:x", {}, r"unknown source 'imagenet:x'; expected one of tfds:"),
    ("npz:/no/such.npz", {}, r"npz:/no/such.npz: file not found"),
    ("folder:/no/such", {}, r"folder:/no/such: no such directory or archive"),
    ("npz:", {}, r"names no path"),
    ("tfds:", {}, r"names no TFDS dataset"),
    ("tfds:mnist:train", dict(split="test"), r"split='test' disagrees"),
    ("digits", dict(split="valid"), r"digits: unknown split 'valid'"),
    ("digits", dict(image_size=16), r"digits: images are 8x8 but image_size"),
    ("digits", dict(channels=3), r"digits: images have 1 channel"),
    ("digits", dict(batch_size=0), r"batch_size must be a positive integer"),
    ("digits", dict(seed=-1), r"seed must be a non-negative integer"),
    ("digits", dict(channels=2), r"channels must be 1, 3 or None"),
    ("digits", dict(resize=True), r"resize=True needs image_size"),
    ("digits", dict(process_index=2, process_count=2), r"process_index must"),
    ("digits", dict(skip_bad_files=True), r"skip_bad_files applies to folder"),
])
def test_bad_source_or_option(source, options, message):
  with pytest.raises(ip.DataError, match=message):
    ip.create_dataset(source, **_options(**options))


@pytest.mark.parametrize("extra, bad_name, reason", [
    ({
        "data/train/cat/notes.txt": b"not an image"
    }, "notes.txt", "not an image Pillow can read"),
    ({
        "data/train/dog/cut.png": _png((1, 2, 3))[:60]
    }, "cut.png", r"\w+Error: "),
    ({
        "data/train/README": b"hello"
    }, "README", "not inside a class folder"),
])
@pytest.mark.parametrize("archive", [False, True])
def test_bad_files_named_or_skipped(tmp_path, caplog, extra, bad_name, reason,
                                    archive):
  tree = _image_tree(tmp_path, extra=extra)
  path = _tar(tree, tmp_path / "data.tar") if archive else tree.parent
  with pytest.raises(
      ip.DataError, match=rf"'data/train/\S*{bad_name}' "
      rf"\({reason}.*; 1 bad file\(s\).*skip_bad_files=True"):
    ip.create_dataset(f"folder:{path}", **_options())
  with caplog.at_level(logging.WARNING):
    iterator = ip.create_dataset(f"folder:{path}",
                                 **_options(skip_bad_files=True, repeat=False))
  assert iterator.spec.num_examples == 12
  assert "skipped 1 bad file(s), e.g. 'data/train/" in caplog.text
  assert bad_name in caplog.text


def test_folder_size_mismatch_names_file(tmp_path):
  tree = _image_tree(tmp_path, sizes={"data/train/dog/03.png": 9})
  with pytest.raises(
      ip.DataError, match=r"'data/train/dog/03.png' is 9x9 but "
      r"expected 8x8 \(the size of the first image\)"):
    ip.create_dataset(f"folder:{tree.parent}", **_options())
  iterator = ip.create_dataset(f"folder:{tree.parent}",
                               **_options(image_size=4, resize=True))
  assert next(iterator)["image"].shape == (4, 4, 4, 3)


def test_folder_missing_split(tmp_path):
  tree = _image_tree(tmp_path)
  with pytest.raises(ip.DataError, match=r"no 'valid' folder .*\['test', "
                     r"'train'\]"):
    ip.create_dataset(f"folder:{tree}", **_options(split="valid"))


def test_folder_of_only_bad_files(tmp_path):
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(ip.DataError, match=r"no images in split 'train'"):
    ip.create_dataset(f"folder:{tmp_path}", **_options(skip_bad_files=True))


@pytest.mark.parametrize("state, message", [
    ({
        "epoch": 0
    }, r"lacks field 'step'"),
    ({
        "epoch": 0,
        "step": 375
    }, r"out of range"),
    ({
        "epoch": -1,
        "step": 0
    }, r"out of range"),
])
def test_bad_state(state, message):
  iterator = ip.create_dataset("digits", **_options())
  with pytest.raises(ip.DataError, match=message):
    iterator.set_state(state)


@pytest.mark.slow
def test_memory_sources_work_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; "
          "sys.modules['tensorflow_datasets'] = None; "
          "from ddpm_jax.data import pipeline as ip; "
          "b = next(ip.create_dataset('digits', batch_size=2, image_size=None,"
          " channels=None, random_flip=True, seed=0)); "
          "print(b['image'].shape)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=False,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "(2, 8, 8, 1)"
