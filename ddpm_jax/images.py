"""Image outputs: float [-1, 1] to uint8, PNG grids and GIFs of trajectories.

Pillow is imported inside the two writers only, so `to_uint8` (which the
samplers' batch driver uses) does not need it.

Example:
  >>> out = sampling.ddpm_sample(model_fn, sched, shape=(16, 32, 32, 3),
  ...                            key=key, trajectory_every=50)
  >>> save_image_grid(out.images, "samples.png", nrow=4)
  >>> save_gif(out.trajectory, "denoising.gif", nrow=4, duration=80)
"""

from __future__ import annotations

import contextlib
import math
import os

import jax.numpy as jnp
import numpy as np
from etils import epath

# Channel counts a PNG/GIF frame can hold, and the Pillow mode of each.
_MODES = {1: "L", 3: "RGB"}


def to_uint8(images) -> jnp.ndarray:
  """Maps floats in [-1, 1] to uint8 in [0, 255], rounding to nearest.

  -1 -> 0, 0 -> 128 (127.5 rounds half to even), 1 -> 255; values outside
  [-1, 1] are clipped. Works under `jit`.

  Args:
    images: float array of any shape, nominally in [-1, 1].

  Returns:
    uint8 array of the same shape.

  Example:
    >>> to_uint8(jnp.array([-1.0, 0.0, 1.0, 7.0]))
    Array([  0, 128, 255, 255], dtype=uint8)
  """
  images = jnp.asarray(images, jnp.float32)
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _check_images(images, name: str) -> None:
  if images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] not in _MODES:
    raise ValueError(
        f"{name} must have shape [N, H, W, C] with N >= 1 and C in "
        f"{sorted(_MODES)}, got shape {images.shape}.")


def _check_nrow(nrow) -> None:
  if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or (
      nrow < 1):
    raise ValueError(f"nrow must be an integer >= 1, got {nrow!r}.")


def _as_uint8(images) -> np.ndarray:
  """uint8 arrays pass through; floats are read as [-1, 1] images."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.asarray(to_uint8(images))


def make_grid(images, *, nrow: int) -> np.ndarray:
  """Tiles images row by row into one image, `nrow` images per row.

  Cells after the last image are black. There is no padding between cells.

  Args:
    images: [N, H, W, C], uint8 or floats in [-1, 1]; C is 1 or 3.
    nrow: images per grid row (as torchvision's `make_grid`).

  Returns:
    uint8 [ceil(N / nrow) * H, min(N, nrow) * W, C]; image i sits at grid
    row i // nrow, column i % nrow.

  Example:
    >>> make_grid(np.zeros((5, 8, 8, 3), np.uint8), nrow=2).shape
    (24, 16, 3)
  """
  images = np.asarray(images)
  _check_images(images, "images")
  _check_nrow(nrow)
  images = _as_uint8(images)
  n, h, w, c = images.shape
  cols = min(n, nrow)
  rows = math.ceil(n / cols)
  padded = np.zeros((rows * cols, h, w, c), np.uint8)
  padded[:n] = images
  return padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, cols * w, c)


def _binary_file(path):
  """A writable binary file for a path (local or gs://, via epath); a file
  object is passed through, left open."""
  if isinstance(path, (str, os.PathLike)):
    return epath.Path(path).open("wb")
  return contextlib.nullcontext(path)


def _to_pil(grid: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_image_grid(images, path, *, nrow: int) -> None:
  """Writes a batch of images as one PNG grid (see `make_grid`).

  Args:
    images: [N, H, W, C], uint8 or floats in [-1, 1]; C is 1 (grayscale PNG)
      or 3 (RGB PNG).
    path: file path (local or gs://) or binary file object; written as PNG.
    nrow: images per grid row.

  Example:
    >>> save_image_grid(out.images, "samples.png", nrow=8)
  """
  image = _to_pil(make_grid(images, nrow=nrow))
  with _binary_file(path) as f:
    image.save(f, format="PNG")


def save_gif(trajectory, path, *, nrow: int, duration: int = 100) -> None:
  """Writes a denoising trajectory as an animated GIF, one grid per frame.

  As in the Annotated Diffusion tutorial, each frame shows the batch at one
  step of the reverse process; the GIF loops forever. GIF frames hold at
  most 256 colours, so Pillow quantizes RGB frames, and it merges a frame
  identical to the one before it into that frame (adding the durations).

  Args:
    trajectory: [F, N, H, W, C], uint8 or floats in [-1, 1] (for example
      `SampleOutput.trajectory`); C is 1 or 3.
    path: file path (local or gs://) or binary file object; written as GIF.
    nrow: images per grid row in every frame.
    duration: display time of each frame in milliseconds, >= 1.

  Example:
    >>> save_gif(out.trajectory, "denoising.gif", nrow=4, duration=80)
  """
  trajectory = np.asarray(trajectory)
  if trajectory.ndim != 5:
    raise ValueError("trajectory must have shape [F, N, H, W, C], got shape "
                     f"{trajectory.shape}.")
  if trajectory.shape[0] < 1:
    raise ValueError("trajectory must hold at least one frame.")
  _check_images(trajectory[0], "each trajectory frame")
  _check_nrow(nrow)
  if isinstance(duration, bool) or not isinstance(
      duration, (int, np.integer)) or duration < 1:
    raise ValueError(f"duration must be an integer >= 1 (milliseconds), got "
                     f"{duration!r}.")
  frames = [_to_pil(make_grid(frame, nrow=nrow)) for frame in
            _as_uint8(trajectory)]
  with _binary_file(path) as f:
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(duration), loop=0)
