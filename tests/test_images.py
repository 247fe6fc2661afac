"""Tests of ddpm_jax.images: uint8 conversion, PNG grids, GIFs."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images


def test_to_uint8_exact_points_and_clipping():
  x = jnp.array([-1.0, 0.0, 1.0, -3.0, 2.5, -1.0 + 2 / 255, 1.0 - 2 / 255])
  out = images.to_uint8(x)
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out), [0, 128, 255, 0, 255, 1, 254])


def test_to_uint8_round_trips_every_level():
  levels = np.arange(256, dtype=np.uint8)
  floats = levels.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(np.asarray(images.to_uint8(floats)), levels)


def _distinct_images(n, h, w, c):
  """uint8 [n, h, w, c]: image i has pixel values 10 i + (row * w + col)."""
  base = np.arange(h * w, dtype=np.uint8).reshape(1, h, w, 1)
  return np.broadcast_to(base + 10 * np.arange(n, dtype=np.uint8).reshape(
      n, 1, 1, 1), (n, h, w, c)).copy()


def _read_png(buf):
  buf.seek(0)
  img = Image.open(buf)
  assert img.format == "PNG"
  return img.mode, np.asarray(img)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_png_grid_layout(channels, mode):
  imgs = _distinct_images(5, 2, 3, channels)
  buf = io.BytesIO()
  images.save_image_grid(imgs, buf, nrow=2)
  got_mode, pixels = _read_png(buf)
  assert got_mode == mode
  if channels == 1:
    pixels = pixels[..., None]
  assert pixels.shape == (3 * 2, 2 * 3, channels)  # 3 rows of 2 images.
  for i in range(5):
    row, col = divmod(i, 2)
    np.testing.assert_array_equal(pixels[2 * row:2 * row + 2,
                                         3 * col:3 * col + 3], imgs[i])
  np.testing.assert_array_equal(pixels[4:6, 3:6], 0)  # The empty cell.


def test_png_grid_from_floats_and_nrow_above_n(tmp_path):
  imgs = np.stack([np.full((4, 4, 3), -1.0), np.full((4, 4, 3), 1.0)])
  path = tmp_path / "grid.png"
  images.save_image_grid(imgs, path, nrow=8)  # One row of the 2 images.
  pixels = np.asarray(Image.open(path))
  assert pixels.shape == (4, 8, 3)
  np.testing.assert_array_equal(pixels[:, :4], 0)
  np.testing.assert_array_equal(pixels[:, 4:], 255)


def test_gif_frames_and_durations():
  # 4 distinct frames of a batch of 3 grayscale images (floats in [-1, 1]).
  trajectory = np.stack([
      np.full((3, 4, 4, 1), value, np.float32)
      for value in (-1.0, -0.5, 0.5, 1.0)
  ])
  trajectory[:, 1] *= -1  # Second image differs from the first.
  buf = io.BytesIO()
  images.save_gif(trajectory, buf, nrow=2, duration=70)
  buf.seek(0)
  gif = Image.open(buf)
  assert gif.format == "GIF" and gif.n_frames == 4
  assert gif.size == (2 * 4, 2 * 4)
  gif.seek(0)
  assert gif.info["duration"] == 70
  first = np.asarray(gif.convert("L"))
  np.testing.assert_array_equal(first[:4, :4], 0)  # Image 0 at -1.
  np.testing.assert_array_equal(first[:4, 4:], 255)  # Image 1 at +1.
  gif.seek(3)
  last = np.asarray(gif.convert("L"))
  np.testing.assert_array_equal(last[:4, :4], 255)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 4, 4)), "must have shape [N, H, W, C]"),
    (np.zeros((2, 4, 4, 2)), "C in [1, 3]"),
    (np.zeros((0, 4, 4, 3)), "N >= 1"),
])
def test_grid_bad_shapes(bad, message):
  with pytest.raises(ValueError) as info:
    images.save_image_grid(bad, io.BytesIO(), nrow=2)
  assert message in str(info.value)


@pytest.mark.parametrize("nrow", [0, -1, 1.5, True])
def test_grid_bad_nrow(nrow):
  with pytest.raises(ValueError, match="nrow must be an integer >= 1"):
    images.save_image_grid(np.zeros((2, 4, 4, 1)), io.BytesIO(), nrow=nrow)


@pytest.mark.parametrize("bad,kwargs,message", [
    (np.zeros((3, 4, 4, 1)), {}, "trajectory must have shape [F, N, H, W, C]"),
    (np.zeros((0, 2, 4, 4, 1)), {}, "at least one frame"),
    (np.zeros((2, 2, 4, 4, 4)), {}, "each trajectory frame must have shape"),
    (np.zeros((2, 2, 4, 4, 1)), dict(duration=0), "duration must be an"),
    (np.zeros((2, 2, 4, 4, 1)), dict(nrow=0), "nrow must be an integer"),
])
def test_gif_bad_arguments(bad, kwargs, message):
  args = dict(nrow=2)
  args.update(kwargs)
  with pytest.raises(ValueError) as info:
    images.save_gif(bad, io.BytesIO(), **args)
  assert message in str(info.value)
