"""Tests of ddpm_jax.infra.images: uint8 conversion, PNG grids, GIFs."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax.infra import images


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
  return np.broadcast_to(
      base + 10 * np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1),
      (n, h, w, c)).copy()


def _read_png(buf):
  buf.seek(0)
  img = Image.open(buf)
  assert img.format == "PNG"
  return img.mode, np.asarray(img)


def _cell(pixels, i, *, nrow, h, w, scale=1, padding=images.PADDING):
  """The pixels of grid cell i (the layout of `make_grid`'s docstring)."""
  row, col = divmod(i, nrow)
  top = padding + row * (scale * h + padding)
  left = padding + col * (scale * w + padding)
  return pixels[top:top + scale * h, left:left + scale * w]


def _padding_mask(shape, *, rows, cols, h, w, padding):
  """True on the padding lines of a grid of rows x cols cells of h x w."""
  mask = np.zeros(shape[:2], bool)
  for r in range(rows + 1):
    mask[r * (h + padding):r * (h + padding) + padding] = True
  for c in range(cols + 1):
    mask[:, c * (w + padding):c * (w + padding) + padding] = True
  return mask


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_png_grid_layout(channels, mode):
  imgs = _distinct_images(5, 2, 3, channels)
  buf = io.BytesIO()
  images.save_image_grid(imgs, buf, nrow=2, min_size=1)
  got_mode, pixels = _read_png(buf)
  assert got_mode == mode
  if channels == 1:
    pixels = pixels[..., None]
  # 3 rows of 2 cells of 2x3, 2 px of padding around and between them.
  assert pixels.shape == (3 * (2 + 2) + 2, 2 * (3 + 2) + 2, channels)
  for i in range(5):
    np.testing.assert_array_equal(_cell(pixels, i, nrow=2, h=2, w=3), imgs[i])
  np.testing.assert_array_equal(_cell(pixels, 5, nrow=2, h=2, w=3), 0)
  mask = _padding_mask(pixels.shape, rows=3, cols=2, h=2, w=3, padding=2)
  np.testing.assert_array_equal(pixels[mask], images.PAD_VALUE)
  # Every pixel is padding, an image pixel or the empty cell: nothing else.
  assert mask.sum() + 6 * 2 * 3 == pixels.shape[0] * pixels.shape[1]


def test_make_grid_exact_pixels_with_scale_and_padding():
  imgs = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], np.uint8)[..., None]
  grid = images.make_grid(imgs, nrow=2, padding=1, pad_value=9, scale=2)
  expected = np.array([
      [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
      [9, 1, 1, 2, 2, 9, 5, 5, 6, 6, 9],
      [9, 1, 1, 2, 2, 9, 5, 5, 6, 6, 9],
      [9, 3, 3, 4, 4, 9, 7, 7, 8, 8, 9],
      [9, 3, 3, 4, 4, 9, 7, 7, 8, 8, 9],
      [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
  ], np.uint8)[..., None]
  np.testing.assert_array_equal(grid, expected)
  assert grid.dtype == np.uint8


def test_make_grid_without_padding_tiles_edge_to_edge():
  imgs = _distinct_images(4, 3, 2, 1)
  grid = images.make_grid(imgs, nrow=2, padding=0)
  top = np.concatenate([imgs[0], imgs[1]], axis=1)
  bottom = np.concatenate([imgs[2], imgs[3]], axis=1)
  np.testing.assert_array_equal(grid, np.concatenate([top, bottom]))


@pytest.mark.parametrize("size,scale", [(8, 8), (16, 4), (28, 3), (32, 2),
                                        (63, 2), (64, 1), (256, 1)])
def test_display_scale_reaches_64_pixels(size, scale):
  assert images.display_scale(size, size) == scale
  assert (scale * size >= 64) and ((scale - 1) * size < 64)


def test_display_scale_uses_the_smaller_side():
  assert images.display_scale(16, 40) == 4
  assert images.display_scale(16, 16, min_size=1) == 1


@pytest.mark.parametrize("n,nrow", [(1, 1), (2, 2), (4, 2), (5, 3), (12, 4),
                                    (64, 8), (65, 9)])
def test_grid_nrow_is_ceil_sqrt(n, nrow):
  assert images.grid_nrow(n) == nrow


@pytest.mark.parametrize("size,scale", [(16, 4), (28, 3)])
def test_saved_png_scales_small_images_with_nearest_neighbour(size, scale):
  imgs = _distinct_images(3, size, size, 1)
  buf = io.BytesIO()
  images.save_image_grid(imgs, buf, nrow=2)
  _, pixels = _read_png(buf)
  cell = scale * size + 2
  assert pixels.shape == (2 * cell + 2, 2 * cell + 2)
  for i in range(3):
    block = _cell(pixels[..., None], i, nrow=2, h=size, w=size, scale=scale)
    # Every scale x scale block is one source pixel.
    np.testing.assert_array_equal(block[::scale, ::scale], imgs[i])
    for dy in range(scale):
      for dx in range(scale):
        np.testing.assert_array_equal(block[dy::scale, dx::scale], imgs[i])


def test_data_grid_matches_the_sample_grid_layout():
  batch = np.linspace(-1.0, 1.0, 70 * 28 * 28,
                      dtype=np.float32).reshape(70, 28, 28, 1)
  grid = images.data_grid(batch, num_images=64)
  expected = images.render_grid(batch[:64], nrow=8)
  np.testing.assert_array_equal(grid, expected)
  assert grid.shape == (8 * (3 * 28 + 2) + 2,) * 2 + (1,)
  np.testing.assert_array_equal(
      _cell(grid, 63, nrow=8, h=28, w=28, scale=3)[::3, ::3],
      np.asarray(images.to_uint8(batch[63])))
  # Fewer images than asked for: all of them, in rows of ceil(sqrt(N)).
  assert images.data_grid(batch[:5],
                          num_images=64).shape == (2 * 86 + 2, 3 * 86 + 2, 1)


def test_save_png_round_trips(tmp_path):
  grid = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  images.save_png(grid, tmp_path / "g.png")
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")),
                                grid)
  with pytest.raises(ValueError, match="grid must be uint8"):
    images.save_png(grid.astype(np.float32), tmp_path / "h.png")


def test_png_grid_from_floats_and_nrow_above_n(tmp_path):
  imgs = np.stack([np.full((4, 4, 3), -1.0), np.full((4, 4, 3), 1.0)])
  path = tmp_path / "grid.png"
  images.save_image_grid(imgs, path, nrow=8, padding=0, min_size=1)
  pixels = np.asarray(Image.open(path))
  assert pixels.shape == (4, 8, 3)  # One row of the 2 images.
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
  cell = 16 * 4 + 2  # 4x4 images scaled 16 times to 64x64, 2 px padding.
  assert gif.size == (2 * cell + 2, 2 * cell + 2)
  gif.seek(0)
  assert gif.info["duration"] == 70
  first = np.asarray(gif.convert("L"))[..., None]
  np.testing.assert_array_equal(_cell(first, 0, nrow=2, h=4, w=4, scale=16), 0)
  np.testing.assert_array_equal(_cell(first, 1, nrow=2, h=4, w=4, scale=16),
                                255)
  np.testing.assert_array_equal(first[:2], images.PAD_VALUE)
  gif.seek(3)
  last = np.asarray(gif.convert("L"))[..., None]
  np.testing.assert_array_equal(_cell(last, 0, nrow=2, h=4, w=4, scale=16), 255)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 4, 4)), "must have shape [N, H, W, C]"),
    (np.zeros((2, 4, 4, 2)), "C in [1, 3]"),
    (np.zeros((0, 4, 4, 3)), "N >= 1"),
])
def test_grid_bad_shapes(bad, message):
  with pytest.raises(ValueError) as info:
    images.save_image_grid(bad, io.BytesIO(), nrow=2)
  assert message in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding=-1), "padding must be an integer >= 0"),
    (dict(scale=0), "scale must be an integer >= 1"),
    (dict(pad_value=256), "pad_value must be in [0, 255]"),
])
def test_make_grid_bad_options(kwargs, message):
  with pytest.raises(ValueError) as info:
    images.make_grid(np.zeros((2, 4, 4, 1)), nrow=2, **kwargs)
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
