"""Input pipelines: one entry point, `create_dataset`, for every source.

Sources, chosen by a string:

* `tfds:NAME[:SPLIT]`: a TFDS image dataset (mnist, fashion_mnist, cifar10,
  celeb_a, ...) through tf.data; see `ddpm_jax.data.tfds_source`. The colon
  form cannot carry a TFDS version.
* `npz:PATH`: a Keras-layout .npz (x_train, y_train, x_test, y_test); see
  `ddpm_jax.data.arrays.load_npz`.
* `folder:PATH`: a directory of images or a .tar / .tar.gz of one, labels
  from class folders; see `ddpm_jax.data.folder` for the layout rule.
* `digits`: scikit-learn's bundled 8x8 handwritten digits, for machines with
  no internet; use `resize=True` to scale them up (e.g. image_size=16).

The last three are decoded once into memory as uint8 and batched by
`ddpm_jax.data.memory.MemoryIterator` with a background prefetch thread.

Only the `tfds:` source imports TensorFlow, and only when used.
"""

from __future__ import annotations

from ddpm_jax.data import arrays, common, folder, memory
from ddpm_jax.infra import storage

DataError = common.DataError
DatasetIterator = common.DatasetIterator
DatasetSpec = common.DatasetSpec

_SCHEMES = ("tfds:NAME[:SPLIT]", "npz:PATH", "folder:PATH", "digits")


def create_dataset(source: str, *, split: str | None = None, batch_size: int,
                   image_size: int | None, channels: int | None,
                   resize: bool = False, random_flip: bool, seed: int,
                   shuffle: bool = True, repeat: bool = True,
                   process_index: int = 0, process_count: int = 1,
                   num_classes: int | None = None, skip_bad_files: bool = False,
                   data_dir: str | None = None) -> DatasetIterator:
  """Creates this host's iterator of image batches.

  Batches are dicts with 'image' float32 [batch_size, H, W, C] in [-1, 1] and
  'label' int32 [batch_size]. With `repeat=False` the iterator makes one pass
  over the split, yields every example exactly once over all hosts, pads the
  last batches with zeros and adds 'mask' bool [batch_size] (False on
  padding); all hosts yield the same number of batches. With `repeat=True`
  it runs forever and each epoch drops the remainder that does not fill a
  global batch.

  A fixed `seed` gives the same batches; `get_state()` returns
  {'epoch': int, 'step': int} of the next batch and `set_state(state)`
  continues exactly where that state was taken.

  Args:
    source: 'tfds:NAME[:SPLIT]', 'npz:PATH', 'folder:PATH' or 'digits'.
    split: Split to read, e.g. 'train' or 'test'. Defaults to the split in
      `source` or 'train'; must agree with a split given in `source`.
    batch_size: Examples per batch on this host.
    image_size: Side length S of the yielded images, or None to keep the
      stored size. Without `resize`, images of another size are an error.
    channels: 1 or 3, or None to keep the stored count. Folder images are
      converted (3 when None); for other sources a mismatch is an error.
    resize: Center-crop to a square and resize (bilinear, antialiased) to
      `image_size`.
    random_flip: Mirror each image left-right with probability 1/2.
    seed: Non-negative seed for shuffling and flips.
    shuffle: Shuffle the examples, differently every epoch.
    repeat: Run forever (training) rather than one padded pass (evaluation).
    process_index: This host's index, e.g. `jax.process_index()`.
    process_count: Number of hosts, e.g. `jax.process_count()`.
    num_classes: Expected number of classes; labels must lie below it.
      Defaults to the number found in the data.
    skip_bad_files: For folders, skip undecodable files with a logged warning
      instead of failing.
    data_dir: For tfds sources, where datasets are downloaded and prepared
      (local or gs://); None for tfds's default.

  Returns:
    An iterator with `.spec` (a DatasetSpec), `get_state()` and `set_state()`.

  Raises:
    DataError: with a message naming the bad option, file or field.
  """
  common.check_options(batch_size=batch_size, image_size=image_size,
                       channels=channels, resize=resize, seed=seed,
                       process_index=process_index, process_count=process_count,
                       num_classes=num_classes)
  scheme, _, rest = source.partition(":")
  if scheme == "tfds":
    name, _, source_split = rest.partition(":")
  else:
    source_split = ""
  if source_split and split is not None and split != source_split:
    raise DataError(f"split={split!r} disagrees with the split in source "
                    f"{source!r}")
  split = source_split or split or "train"
  image_options = dict(split=split, image_size=image_size, channels=channels,
                       resize=resize, num_classes=num_classes)
  batch_options = dict(batch_size=batch_size, random_flip=random_flip,
                       seed=seed, shuffle=shuffle, repeat=repeat,
                       process_index=process_index, process_count=process_count)
  if skip_bad_files and scheme != "folder":
    raise DataError(f"skip_bad_files applies to folder: sources only, not "
                    f"{source!r}")
  if data_dir is not None and scheme != "tfds":
    raise DataError(f"data_dir applies to tfds: sources only, not "
                    f"{source!r}")
  if scheme == "tfds":
    if not name:
      raise DataError(f"source {source!r} names no TFDS dataset")
    from ddpm_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsIterator(name, **image_options, **batch_options,
                                    data_dir=data_dir)
  if scheme in ("npz", "folder") and not rest:
    raise DataError(f"source {source!r} names no path")
  if scheme == "npz":
    data = arrays.load_npz(storage.as_path(rest), **image_options)
  elif scheme == "folder":
    data = folder.load_folder(storage.as_path(rest), **image_options,
                              skip_bad_files=skip_bad_files)
  elif source == "digits":
    data = arrays.load_digits(**image_options)
  else:
    raise DataError(f"unknown source {source!r}; expected one of "
                    f"{', '.join(_SCHEMES)}")
  return memory.MemoryIterator(data, where=f"{source}:{split}", **batch_options)
