"""TFDS image datasets through tf.data. Imports TensorFlow lazily.

Each host reads its own `tfds.split_for_jax_process` sub-split, unshuffled
files in a fixed order, with images left encoded. Epoch e shuffles that stream
with a buffer of `_SHUFFLE_BUFFER` examples and a seed drawn from
(seed, e); the example at position j of the epoch is decoded, center-cropped
and resized when asked, flipped by a stateless op seeded from (seed, e, j),
and scaled to [-1, 1]. The batches therefore depend only on (seed, epoch,
step). `set_state` rebuilds the epoch and skips the step * batch_size
encoded examples before it: exact, at the cost of re-reading (not decoding)
them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddpm_jax.data import common, memory

_SHUFFLE_BUFFER = 50_000  # encoded examples held for shuffling


class TfdsIterator:
  """Batches of a TFDS image dataset; see the module docstring.

  With `repeat=True` each host's sub-split has an equal size and an epoch has
  floor(size / batch_size) steps. With `repeat=False` there is one pass over
  the whole sub-split: every host yields ceil(ceil(N / P) / B) batches, the
  last ones padded with zeros, and batches carry 'mask' (False on padding).

  Attributes:
    spec: The DatasetSpec of the yielded batches.
  """

  def __init__(self, name: str, *, split: str, batch_size: int,
               image_size: int | None, channels: int | None, resize: bool,
               random_flip: bool, seed: int, shuffle: bool, repeat: bool,
               process_index: int, process_count: int, num_classes: int | None,
               data_dir: str | None = None):
    """Opens the dataset (preparing it if needed); see `create_dataset`.

    `data_dir` (local or gs://; None: tfds's default) is where the dataset
    is downloaded and prepared.

    Raises:
      DataError: without TensorFlow, on an unknown dataset or split, a
        dataset without an 'image' feature, images that do not match
        `image_size` / `channels`, labels beyond `num_classes`, or too few
        examples.
    """
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise common.DataError(
          f"tfds:{name} needs TensorFlow and tensorflow-datasets, which are "
          f"not installed ({e}): pip install -e \".[tf]\"") from None

    where = f"tfds:{name}:{split}"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      # TFDS raises many unrelated types for unknown or unavailable data.
      raise common.DataError(f"tfds:{name}: cannot load the dataset "
                             f"({type(e).__name__}: {e})") from e
    features = builder.info.features
    if "image" not in features:
      raise common.DataError(f"tfds:{name}: no 'image' feature (features: "
                             f"{', '.join(features)})")
    height, width, depth = features["image"].shape
    if channels is not None and depth != channels:
      raise common.DataError(f"tfds:{name}: 'image' has {depth} channel(s) "
                             f"but channels={channels}")
    if resize:
      height = width = image_size
    elif height is None or width is None:
      raise common.DataError(f"tfds:{name}: images vary in size; pass "
                             f"image_size and resize=True")
    elif image_size is not None and (height, width) != (image_size,) * 2:
      raise common.DataError(f"tfds:{name}: images are {height}x{width} but "
                             f"image_size={image_size}; pass resize=True to "
                             f"center-crop and resize them")
    has_label = ("label" in features and
                 isinstance(features["label"], tfds.features.ClassLabel))
    found = features["label"].num_classes if has_label else 1
    num_classes = common.check_num_classes(found, num_classes, f"tfds:{name}")

    host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count,
                                            drop_remainder=repeat)
    try:
      total = int(builder.as_dataset(split=split).cardinality())
      encoded = builder.as_dataset(
          split=host_split, shuffle_files=False,
          decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise common.DataError(f"tfds:{name}: cannot read split {split!r} "
                             f"({type(e).__name__}: {e})") from e
    host_examples = int(encoded.cardinality())
    if total <= 0:
      raise common.DataError(f"{where}: the split has no examples")
    if repeat:
      steps = host_examples // batch_size
      if steps == 0:
        raise common.DataError(
            f"{where}: host {process_index} of {process_count} gets "
            f"{host_examples} examples, fewer than one batch of {batch_size}")
    else:
      steps = common.ceil_div(common.ceil_div(total, process_count), batch_size)
    self.spec = common.DatasetSpec(num_examples=total,
                                   image_shape=(height, width, depth),
                                   num_classes=num_classes,
                                   steps_per_epoch=steps)
    self._encoded = encoded.map(lambda ex:
                                (ex["image"], tf.cast(ex["label"], tf.int32)
                                 if has_label else tf.constant(0, tf.int32)))
    self._host_examples = host_examples
    self._batch_size = batch_size
    self._resize = resize
    self._depth = depth
    self._random_flip = random_flip
    self._seed = seed
    self._shuffle = shuffle
    self._repeat = repeat
    self._position = (0, 0)  # (epoch, step) of the next batch to return
    self._batches = None  # numpy iterator of the current epoch from _position

  def __iter__(self) -> TfdsIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, step = self._position
    if epoch > 0 and not self._repeat:
      raise StopIteration
    if self._batches is None:
      self._batches = self._epoch(epoch, step).as_numpy_iterator()
    batch = next(self._batches)
    if step + 1 < self.spec.steps_per_epoch:
      self._position = (epoch, step + 1)
    else:
      self._position, self._batches = (epoch + 1, 0), None
    return batch

  def get_state(self) -> dict[str, int]:
    """Returns {'epoch', 'step'} of the next batch; JSON-serializable."""
    epoch, step = self._position
    return {"epoch": epoch, "step": step}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` result, exactly as the run that saved it.

    Costs reading (not decoding) step * batch_size examples of the epoch.

    Raises:
      DataError: if `state` lacks a field or is out of range.
    """
    self._position = memory.read_state(state, self.spec.steps_per_epoch)
    self._batches = None

  def _epoch(self, epoch: int, step: int):
    """The tf.data.Dataset of this host's batches `step`, ... of `epoch`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    epoch_seed = int(np.random.default_rng([self._seed, epoch]).integers(2**31))
    ds = self._encoded
    if self._shuffle:
      ds = ds.shuffle(min(_SHUFFLE_BUFFER, self._host_examples),
                      seed=epoch_seed, reshuffle_each_iteration=False)
    start = step * self._batch_size
    ds = ds.skip(start).enumerate(start)
    ds = ds.map(
        lambda index, example: self._preprocess(epoch_seed, index, *example),
        num_parallel_calls=tf.data.AUTOTUNE)
    if not self._repeat:
      padded = self.spec.steps_per_epoch * self._batch_size
      padding = {
          "image": tf.zeros(self.spec.image_shape, tf.float32),
          "label": tf.constant(0, tf.int32),
          "mask": tf.constant(False)
      }
      ds = ds.concatenate(
          tf.data.Dataset.from_tensors(padding).repeat(padded -
                                                       self._host_examples))
    ds = ds.batch(self._batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def _preprocess(self, epoch_seed: int, index, encoded, label):
    """Decodes one example to float32 [H, W, C] in [-1, 1]."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    image = tf.io.decode_image(encoded, channels=self._depth,
                               expand_animations=False)
    if self._resize:
      shape = tf.shape(image)
      side = tf.minimum(shape[0], shape[1])
      image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2,
                                            (shape[1] - side) // 2, side, side)
      size = self.spec.image_shape[:2]
      image = tf.image.resize(image, size, antialias=True)
      image = tf.clip_by_value(tf.round(image), 0, 255)
    if self._random_flip:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=tf.stack([tf.constant(epoch_seed, tf.int64), index]))
    image = (tf.cast(image, tf.float32) - 127.5) / 127.5
    example = {
        "image": tf.ensure_shape(image, self.spec.image_shape),
        "label": label
    }
    if not self._repeat:
      example["mask"] = tf.constant(True)
    return example
