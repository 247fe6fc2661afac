"""Array sources: Keras-layout .npz files and scikit-learn's digits."""

from __future__ import annotations

import zipfile

import numpy as np
from etils import epath

from ddpm_jax.data import common

# sklearn's 1797 digits have no official split: the first 1500 are 'train'
# and the remaining 297 'test'.
_DIGITS_TRAIN_SIZE = 1500
_DIGITS_GREY_LEVELS = 16  # pixel values are 0..16


def _pixels_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
  """Checks the dtype and value range of pixels and returns them as uint8.

  Integers must lie in [0, 255]; floats in [0, 1] (scaled by 255 and rounded,
  which is exact for data saved as uint8 / 255).

  Raises:
    common.DataError: on another dtype, non-finite values or values out of
      range.
  """
  if x.dtype == np.uint8:
    return x
  if x.size == 0:
    return x.astype(np.uint8)
  if np.issubdtype(x.dtype, np.integer):
    low, high = int(x.min()), int(x.max())
    if low < 0 or high > 255:
      raise common.DataError(f"{where}: integer pixels span [{low}, {high}]; "
                             f"expected values in [0, 255]")
    return x.astype(np.uint8)
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)):
      raise common.DataError(f"{where}: pixels contain NaN or infinity")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
      raise common.DataError(
          f"{where}: float pixels span [{low:g}, {high:g}]; expected values "
          f"in [0, 1] (or uint8 in [0, 255])")
    return np.round(x * 255).astype(np.uint8)
  raise common.DataError(f"{where}: pixels have dtype {x.dtype}; expected "
                         f"uint8, integers in [0, 255] or floats in [0, 1]")


def _check_labels(y: np.ndarray, where: str, num_images: int) -> np.ndarray:
  """Checks a label array and returns it as int32 [N].

  Raises:
    common.DataError: if labels are not 1-D integers >= 0, one per image.
  """
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise common.DataError(f"{where}: labels must be a 1-D integer array, got "
                           f"dtype {y.dtype} and shape {y.shape}")
  if len(y) != num_images:
    raise common.DataError(f"{where}: {len(y)} labels for {num_images} images")
  if len(y) and y.min() < 0:
    raise common.DataError(f"{where}: labels must be >= 0, found "
                           f"{int(y.min())}")
  if len(y) and y.max() > np.iinfo(np.int32).max:
    raise common.DataError(f"{where}: label {int(y.max())} does not fit in "
                           f"int32")
  return y.astype(np.int32)


def load_npz(path: epath.Path, *, split: str, image_size: int | None,
             channels: int | None, resize: bool,
             num_classes: int | None) -> common.ImageArrays:
  """Loads one split of a Keras-layout .npz file.

  The file holds `x_<split>` (uint8 [N, H, W] or [N, H, W, C], C in {1, 3})
  and `y_<split>` (integer [N]), e.g. x_train, y_train, x_test, y_test.
  Without `num_classes`, the class count is the largest label over all
  `y_*` arrays of the file plus one, so that splits agree.

  Args:
    path: The .npz file (local or gs://).
    split: Split name, selecting the `x_<split>` / `y_<split>` arrays.
    image_size: Configured side length, or None for the stored one.
    channels: Configured channel count, or None for the stored one.
    resize: Center-crop and resize to `image_size` instead of requiring it.
    num_classes: Configured class count, or None to infer it.

  Returns:
    The split, uint8 images [N, S, S, C] and int32 labels [N].

  Raises:
    common.DataError: naming the file and array on any problem.
  """
  if not path.is_file():
    raise common.DataError(f"npz:{path}: file not found")
  with path.open("rb") as f:
    try:
      npz = np.load(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise common.DataError(
          f"npz:{path}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise common.DataError(f"npz:{path}: holds a single array, not an .npz "
                             f"archive of x_<split> / y_<split> arrays")
    with npz:
      x_key, y_key = f"x_{split}", f"y_{split}"
      for key in (x_key, y_key):
        if key not in npz.files:
          raise common.DataError(
              f"npz:{path}: missing key {key!r} (keys present: "
              f"{', '.join(sorted(npz.files)) or 'none'})")
      try:
        arrays = {
            key: npz[key]
            for key in npz.files
            if key == x_key or key.startswith("y_")
        }
      except ValueError as e:  # object arrays need pickle
        raise common.DataError(f"npz:{path}: cannot read arrays ({e})") from e
  x = arrays[x_key]
  where = f"{path.name}: {x_key}"
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise common.DataError(f"{where}: shape {x.shape}; expected [N, H, W] or "
                           f"[N, H, W, C] with C in (1, 3)")
  images = _pixels_to_uint8(x, where)
  labels = {
      key:
          _check_labels(y, f"{path.name}: {key}",
                        len(x) if key == y_key else len(y))
      for key, y in arrays.items()
      if key.startswith("y_")
  }
  found = max((int(y.max()) + 1 for y in labels.values() if len(y)), default=1)
  num_classes = common.check_num_classes(found, num_classes, f"npz:{path}")
  images = common.fit_arrays(images, where=where, image_size=image_size,
                             channels=channels, resize=resize)
  return common.ImageArrays(images, labels[y_key], num_classes)


def load_digits(*, split: str, image_size: int | None, channels: int | None,
                resize: bool, num_classes: int | None) -> common.ImageArrays:
  """Loads scikit-learn's bundled 8x8 handwritten digits (no download).

  17 grey levels (0..16) are mapped to uint8 0..255. 'train' is the first
  1500 images, 'test' the remaining 297.

  Args:
    split: 'train' or 'test'.
    image_size: Configured side length (8 unless `resize`), or None for 8.
    channels: 1 or None.
    resize: Resize the 8x8 images to `image_size` (e.g. 16).
    num_classes: Configured class count (>= 10), or None for 10.

  Returns:
    The split, uint8 images [N, S, S, 1] and int32 labels [N].

  Raises:
    common.DataError: on an unknown split or options the digits cannot meet.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  if split not in ("train", "test"):
    raise common.DataError(f"digits: unknown split {split!r}; use 'train' "
                           f"or 'test'")
  digits = datasets.load_digits()
  pixels = np.round(digits.images * (255 / _DIGITS_GREY_LEVELS))
  images = pixels.astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  part = (slice(None, _DIGITS_TRAIN_SIZE) if split == "train" else slice(
      _DIGITS_TRAIN_SIZE, None))
  num_classes = common.check_num_classes(10, num_classes, "digits")
  images = common.fit_arrays(images[part], where="digits",
                             image_size=image_size, channels=channels,
                             resize=resize)
  return common.ImageArrays(images, labels[part], num_classes)
