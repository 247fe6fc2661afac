"""Types and image helpers shared by every input source.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Protocol

import numpy as np
from PIL import Image


class DataError(ValueError):
  """Bad input data or data configuration.

  The message names the offending file, array key or option.
  """


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset split looks like as the pipeline yields it.

  Attributes:
    num_examples: Examples in the split, counted over all hosts.
    image_shape: (H, W, C) of every yielded image.
    num_classes: Labels lie in [0, num_classes); 1 for unlabelled data.
    steps_per_epoch: Batches each host yields per epoch (per pass when
      `repeat=False`). Equal on all hosts.
  """

  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  steps_per_epoch: int


class DatasetIterator(Protocol):
  """Iterator of batches with a resumable position.

  Batches are dicts: 'image' float32 [B, H, W, C] in [-1, 1], 'label'
  int32 [B]; one-pass iterators (`repeat=False`) add 'mask' bool [B], False
  on padding examples.
  """

  spec: DatasetSpec

  def __iter__(self) -> DatasetIterator:
    ...

  def __next__(self) -> dict[str, np.ndarray]:
    ...

  def get_state(self) -> dict[str, int]:
    ...

  def set_state(self, state: dict[str, Any]) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class ImageArrays:
  """A whole split decoded into memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N], in [0, num_classes).
    num_classes: Number of classes (1 for unlabelled data).
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int


def check_positive_int(value: Any, field: str) -> None:
  """Raises DataError unless `value` is an int >= 1."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or
      value < 1):
    raise DataError(f"{field} must be a positive integer, got {value!r}")


def check_options(*, batch_size: int, image_size: int | None,
                  channels: int | None, resize: bool, seed: int,
                  process_index: int, process_count: int,
                  num_classes: int | None) -> None:
  """Validates the source-independent options of `create_dataset`.

  Raises:
    DataError: naming the first bad option.
  """
  check_positive_int(batch_size, "batch_size")
  check_positive_int(process_count, "process_count")
  if image_size is not None:
    check_positive_int(image_size, "image_size")
  if num_classes is not None:
    check_positive_int(num_classes, "num_classes")
  if channels not in (None, 1, 3):
    raise DataError(f"channels must be 1, 3 or None, got {channels!r}")
  if resize and image_size is None:
    raise DataError("resize=True needs image_size")
  if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or
      seed < 0):
    raise DataError(f"seed must be a non-negative integer, got {seed!r}")
  if not (isinstance(process_index,
                     (int, np.integer)) and 0 <= process_index < process_count):
    raise DataError(f"process_index must lie in [0, process_count="
                    f"{process_count}), got {process_index!r}")


def check_num_classes(found: int, num_classes: int | None, where: str) -> int:
  """Returns the class count, checking it against a configured one.

  Args:
    found: Classes the data needs (largest label + 1, or class folders).
    num_classes: Configured class count, or None to use `found`.
    where: Names the data in the error message.

  Raises:
    DataError: if the data has more classes than configured.
  """
  if num_classes is None:
    return found
  if found > num_classes:
    raise DataError(f"{where}: labels need {found} classes but num_classes="
                    f"{num_classes}; labels must lie in [0, {num_classes})")
  return num_classes


def fit_image(image: Image.Image, *, image_size: int | None,
              resize: bool) -> Image.Image:
  """Center-crops to a square and resizes (bilinear, antialiased) if asked.

  Args:
    image: A decoded PIL image.
    image_size: Target side length, or None to keep the size.
    resize: Crop and resize to `image_size`; else return `image` unchanged.

  Returns:
    The image, `image_size` x `image_size` when `resize`.
  """
  if not resize:
    return image
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def fit_arrays(images: np.ndarray, *, where: str, image_size: int | None,
               channels: int | None, resize: bool) -> np.ndarray:
  """Checks channels and size of a uint8 image array; resizes if asked.

  Args:
    images: uint8 [N, H, W, C].
    where: Names the array in error messages, e.g. "mnist.npz: x_train".
    image_size: Configured side length, or None for the stored size.
    channels: Configured channel count, or None for the stored count.
    resize: Center-crop and resize to `image_size` instead of requiring it.

  Returns:
    uint8 [N, S, S, C] with S = image_size when it is set.

  Raises:
    DataError: on a channel mismatch, or a size mismatch without `resize`.
  """
  _, height, width, depth = images.shape
  if channels is not None and depth != channels:
    raise DataError(f"{where}: images have {depth} channel(s) but channels="
                    f"{channels}")
  if image_size is None or (height, width) == (image_size, image_size):
    return images
  if not resize:
    raise DataError(f"{where}: images are {height}x{width} but image_size="
                    f"{image_size}; pass resize=True to center-crop and "
                    f"resize them")

  def resize_one(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(image[..., 0] if depth == 1 else image)
    out = np.asarray(fit_image(pil, image_size=image_size, resize=True))
    return out.reshape(image_size, image_size, depth)

  def resize_chunk(chunk: np.ndarray) -> np.ndarray:
    return np.stack([resize_one(image) for image in chunk])

  chunks = np.array_split(images, max(1, len(images) // 512))
  with concurrent.futures.ThreadPoolExecutor() as pool:
    return np.concatenate(list(pool.map(resize_chunk, chunks)))


def ceil_div(a: int, b: int) -> int:
  """Returns ceil(a / b) for non-negative a and positive b."""
  return -(-a // b)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels to float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
  return (images.astype(np.float32) - 127.5) / 127.5
