"""Image outputs: float [-1, 1] to uint8, PNG grids and GIFs of trajectories.

Grids follow torchvision's `make_grid` (2 px of padding around and between
the images) and, when written to PNG or GIF, small images are scaled up by
an integer factor with nearest neighbour (`display_scale`), so a 16x16 or
28x28 sample is at least 64 px wide on screen. Pillow is imported inside the
writers only, so `to_uint8` (which the samplers' batch driver uses) does not
need it.

Example:
  >>> out = sampling.ddpm_sample(model_fn, sched, shape=(16, 32, 32, 3),
  ...                            key=key, trajectory_every=50)
  >>> save_image_grid(out.images, "samples.png", nrow=4)
  >>> save_gif(out.trajectory, "denoising.gif", nrow=4, duration=80)
  >>> save_png(data_grid(batch["image"]), "data.png")  # real data, same look
"""

from __future__ import annotations

import contextlib
import math
import os

import jax.numpy as jnp
import numpy as np

from ddpm_jax.infra import storage

# Channel counts a PNG/GIF frame can hold, and the Pillow mode of each.
_MODES = {1: "L", 3: "RGB"}
# The padding of the grids, and its grey level: mid grey separates white
# digits on black as well as dark objects on white.
PADDING = 2
PAD_VALUE = 128
# Written grids scale images up until each is at least this many pixels wide
# and high.
MIN_DISPLAY_SIZE = 64


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


def _check_int(name: str, value, *, low: int) -> None:
  if isinstance(
      value, bool) or not isinstance(value, (int, np.integer)) or (value < low):
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def _as_uint8(images) -> np.ndarray:
  """uint8 arrays pass through; floats are read as [-1, 1] images."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.asarray(to_uint8(images))


def grid_nrow(num_images: int) -> int:
  """Images per row of the sample and data grids: ceil(sqrt(N)).

  Example:
    >>> grid_nrow(64), grid_nrow(12)
    (8, 4)
  """
  _check_int("num_images", num_images, low=1)
  return math.isqrt(num_images - 1) + 1


def display_scale(height: int, width: int, *,
                  min_size: int = MIN_DISPLAY_SIZE) -> int:
  """The smallest integer factor that makes an image >= `min_size` on a side.

  Args:
    height: image height in pixels, >= 1.
    width: image width in pixels, >= 1.
    min_size: the smallest side wanted, >= 1; 1 never scales.

  Returns:
    ceil(min_size / min(height, width)), at least 1.

  Example:
    >>> display_scale(16, 16), display_scale(28, 28), display_scale(32, 32)
    (4, 3, 2)
  """
  _check_int("height", height, low=1)
  _check_int("width", width, low=1)
  _check_int("min_size", min_size, low=1)
  return max(1, -(-min_size // min(height, width)))


def make_grid(images, *, nrow: int, padding: int = PADDING,
              pad_value: int = PAD_VALUE, scale: int = 1) -> np.ndarray:
  """Tiles images row by row into one image, `nrow` images per row.

  As torchvision's `make_grid`: `padding` pixels of `pad_value` around and
  between the cells; cells after the last image are black. Each image is
  first scaled up `scale` times with nearest neighbour (every pixel becomes a
  scale x scale block); the padding is not scaled.

  Args:
    images: [N, H, W, C], uint8 or floats in [-1, 1]; C is 1 or 3.
    nrow: images per grid row (as torchvision's `make_grid`).
    padding: pixels between cells and around the grid, >= 0.
    pad_value: grey level of the padding, 0..255.
    scale: integer nearest-neighbour upscaling of each image, >= 1.

  Returns:
    uint8 [rows * (s H + p) + p, cols * (s W + p) + p, C] with s = scale,
    p = padding, cols = min(N, nrow), rows = ceil(N / cols); image i fills
    rows p + r (s H + p) ... + s H - 1 and columns p + c (s W + p) ... + s W - 1
    for r, c = divmod(i, nrow).

  Example:
    >>> make_grid(np.zeros((5, 8, 8, 3), np.uint8), nrow=2).shape
    (32, 22, 3)
    >>> make_grid(np.zeros((4, 16, 16, 1), np.uint8), nrow=2, scale=4).shape
    (134, 134, 1)
  """
  images = np.asarray(images)
  _check_images(images, "images")
  _check_int("nrow", nrow, low=1)
  _check_int("padding", padding, low=0)
  _check_int("scale", scale, low=1)
  _check_int("pad_value", pad_value, low=0)
  if pad_value > 255:
    raise ValueError(f"pad_value must be in [0, 255], got {pad_value!r}.")
  images = _as_uint8(images)
  if scale > 1:
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  n, h, w, c = images.shape
  cols = min(n, nrow)
  rows = math.ceil(n / cols)
  cells = np.zeros((rows * cols, h, w, c), np.uint8)
  cells[:n] = images
  cells = np.pad(cells.reshape(rows, cols, h, w, c),
                 ((0, 0), (0, 0), (padding, 0), (padding, 0), (0, 0)),
                 constant_values=pad_value)
  grid = cells.transpose(0, 2, 1, 3, 4).reshape(rows * (h + padding),
                                                cols * (w + padding), c)
  return np.pad(grid, ((0, padding), (0, padding), (0, 0)),
                constant_values=pad_value)


def render_grid(images, *, nrow: int, padding: int = PADDING,
                min_size: int = MIN_DISPLAY_SIZE) -> np.ndarray:
  """The grid the PNG and GIF writers draw: `make_grid` with each image
  scaled by `display_scale(H, W, min_size=min_size)`.

  Args:
    images: [N, H, W, C], uint8 or floats in [-1, 1]; C is 1 or 3.
    nrow: images per grid row.
    padding: pixels between cells and around the grid.
    min_size: the smallest image side wanted on screen; 1 keeps the size.

  Returns:
    uint8 [grid height, grid width, C].

  Example:
    >>> render_grid(np.zeros((64, 28, 28, 1), np.uint8), nrow=8).shape
    (690, 690, 1)
  """
  images = np.asarray(images)
  _check_images(images, "images")
  scale = display_scale(images.shape[1], images.shape[2], min_size=min_size)
  return make_grid(images, nrow=nrow, padding=padding, scale=scale)


def data_grid(images, *, num_images: int = 64) -> np.ndarray:
  """Real images drawn exactly as the sample grids are, for comparison.

  The first `num_images` images in rows of `grid_nrow(num_images)`, scaled
  and padded as by `render_grid`: the same layout as the training loop's
  sample PNGs of that many images. Write it with `save_png`.

  Args:
    images: a data batch [N, H, W, C], uint8 or floats in [-1, 1] (the input
      pipeline's 'image'); C is 1 or 3.
    num_images: how many to show, >= 1; all N when N is smaller.

  Returns:
    uint8 [grid height, grid width, C].

  Example:
    >>> save_png(data_grid(next(dataset)["image"]), "samples/data.png")
  """
  images = np.asarray(images)
  _check_images(images, "images")
  _check_int("num_images", num_images, low=1)
  shown = images[:num_images]
  return render_grid(shown, nrow=grid_nrow(shown.shape[0]))


def _binary_file(path):
  """A writable binary file for a path (local or gs://, via epath); a file
  object is passed through, left open."""
  if isinstance(path, (str, os.PathLike)):
    return storage.as_path(path).open("wb")
  return contextlib.nullcontext(path)


def _to_pil(grid: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_png(grid, path) -> None:
  """Writes one uint8 image [H, W, C] (C = 1 or 3), e.g. a grid, as PNG, to a
  file path (local or gs://) or binary file object.

  Example:
    >>> save_png(data_grid(batch["image"]), "data.png")
  """
  grid = np.asarray(grid)
  if grid.ndim != 3 or grid.dtype != np.uint8 or grid.shape[-1] not in _MODES:
    raise ValueError("grid must be uint8 [H, W, C] with C in "
                     f"{sorted(_MODES)}, got {grid.dtype} {grid.shape}.")
  with _binary_file(path) as f:
    _to_pil(grid).save(f, format="PNG")


def save_image_grid(images, path, *, nrow: int, padding: int = PADDING,
                    min_size: int = MIN_DISPLAY_SIZE) -> None:
  """Writes a batch of images as one PNG grid (see `render_grid`).

  Args:
    images: [N, H, W, C], uint8 or floats in [-1, 1]; C is 1 (grayscale PNG)
      or 3 (RGB PNG).
    path: file path (local or gs://) or binary file object; written as PNG.
    nrow: images per grid row.
    padding: pixels between cells and around the grid.
    min_size: images are scaled up (nearest neighbour, integer factor) to at
      least this many pixels a side; 1 writes them at their own size.

  Example:
    >>> save_image_grid(out.images, "samples.png", nrow=8)
  """
  save_png(render_grid(images, nrow=nrow, padding=padding, min_size=min_size),
           path)


def save_gif(trajectory, path, *, nrow: int, duration: int = 100,
             padding: int = PADDING, min_size: int = MIN_DISPLAY_SIZE) -> None:
  """Writes a denoising trajectory as an animated GIF, one grid per frame.

  As in the Annotated Diffusion tutorial, each frame shows the batch at one
  step of the reverse process; the GIF loops forever. Frames are drawn by
  `render_grid`, like the PNG grids. GIF frames hold at most 256 colours, so
  Pillow quantizes RGB frames, and it merges a frame identical to the one
  before it into that frame (adding the durations).

  Args:
    trajectory: [F, N, H, W, C], uint8 or floats in [-1, 1] (for example
      `SampleOutput.trajectory`); C is 1 or 3.
    path: file path (local or gs://) or binary file object; written as GIF.
    nrow: images per grid row in every frame.
    duration: display time of each frame in milliseconds, >= 1.
    padding: pixels between cells and around the grid.
    min_size: the smallest image side on screen (see `save_image_grid`).

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
  _check_int("nrow", nrow, low=1)
  _check_int("duration", duration, low=1)
  frames = [
      _to_pil(render_grid(frame, nrow=nrow, padding=padding, min_size=min_size))
      for frame in _as_uint8(trajectory)
  ]
  with _binary_file(path) as f:
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(duration), loop=0)
