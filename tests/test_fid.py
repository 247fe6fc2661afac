"""`python -m ddpm_jax.tools.fid` and `ddpm_jax.tools.convert_inception`: inputs, scores,
errors. In-process tests use a stand-in extractor; the command runs end to
end with synthetic Inception weights."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import metrics
from ddpm_jax.metrics import inception
from ddpm_jax.tools import fid

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stand_in(images):
  """Features: per-channel means and stds; logits: 3 class scores."""
  x = images.astype(np.float32)
  pool = np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)
  return pool, pool[:, :3]


def _images(n, seed=0, size=8):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              np.uint8)


def _set(spec, **kwargs):
  options = dict(split="train", num_images=0, batch_size=4,
                 preprocessing="tensorflow")
  return fid.image_set(spec, _stand_in, **{**options, **kwargs})


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("key", ["images", "arr_0", "samples"])
def test_images_npz_keys(tmp_path, key):
  images = _images(5)
  np.savez(tmp_path / "s.npz", **{key: images})
  np.testing.assert_array_equal(
      fid.read_images_npz(str(tmp_path / "s.npz"), num_images=3), images[:3])


def test_images_npz_grey_and_integer_pixels(tmp_path):
  grey = _images(4)[..., :1].astype(np.int64)
  np.savez(tmp_path / "g.npz", images=grey)
  out = fid.read_images_npz(str(tmp_path / "g.npz"), num_images=0)
  assert out.dtype == np.uint8 and out.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(out, np.repeat(grey, 3, axis=-1))


@pytest.mark.parametrize("arrays, num_images, message", [
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), 0,
     "dtype float32; expected uint8"),
    (dict(images=np.full((2, 8, 8, 3), 300)), 0, r"span \[300, 300\]"),
    (dict(images=np.zeros((2, 8, 8, 4), np.uint8)), 0, r"shape \(2, 8, 8, 4\)"),
    (dict(images=np.zeros((8, 8, 3), np.uint8)), 0, r"shape \(8, 8, 3\)"),
    (dict(a=np.zeros(2), b=np.zeros(2)), 0, r"no image array .*\['a', 'b'\]"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), 5,
     "has 2 images; asked for 5"),
])
def test_images_npz_errors_name_the_problem(tmp_path, arrays, num_images,
                                            message):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message):
    fid.read_images_npz(str(tmp_path / "bad.npz"), num_images=num_images)


def test_image_set_from_npz_folder_and_source_agree(tmp_path):
  images = _images(6)
  np.savez(tmp_path / "s.npz", images=images)
  folder = tmp_path / "pngs"
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:02d}.png")
  from_npz = _set(str(tmp_path / "s.npz"))
  from_folder = _set(str(folder))
  from_source = _set(f"folder:{folder}", num_images=5)
  expected = _stand_in(images)
  np.testing.assert_allclose(from_npz.stats.features, expected[0], rtol=1e-6)
  np.testing.assert_allclose(from_folder.stats.features, expected[0], rtol=1e-6)
  np.testing.assert_allclose(from_source.stats.features, expected[0][:5],
                             rtol=1e-6)
  np.testing.assert_allclose(from_npz.logits, expected[1], rtol=1e-6)
  mu, sigma = metrics.feature_statistics(expected[0])
  np.testing.assert_allclose(from_folder.stats.mu, mu, rtol=1e-6)
  np.testing.assert_allclose(from_folder.stats.sigma, sigma, rtol=1e-5)


def test_image_set_from_a_grey_source():
  digits = _set("digits", num_images=10)
  assert digits.stats.features.shape == (10, 6)
  # Grey repeated to RGB: the three channel means are equal.
  means = digits.stats.features[:, :3]
  np.testing.assert_array_equal(means, np.repeat(means[:, :1], 3, axis=1))


def test_image_set_from_statistics(tmp_path):
  f = np.random.default_rng(1).normal(size=(5, 6))
  mu, sigma = metrics.feature_statistics(f)
  np.savez(tmp_path / "published.npz", mu=mu, sigma=sigma)
  side = _set(str(tmp_path / "published.npz"))
  assert side.logits is None and side.stats.features is None
  np.testing.assert_array_equal(side.stats.mu, mu)


@pytest.mark.parametrize("spec, error, message", [
    ("no/such.npz", FileNotFoundError, "no/such.npz"),
    ("weights.h5", ValueError, "neither a data set source"),
    ("folder:/no/such/dir", ValueError, "no such directory"),
    ("npz:/no/such.npz", ValueError, "npz:/no/such.npz: file not found"),
])
def test_image_set_errors(spec, error, message):
  with pytest.raises(error, match=message):
    _set(spec)


def test_image_set_needs_two_images(tmp_path):
  np.savez(tmp_path / "one.npz", images=_images(1))

  def no_network(images):
    raise AssertionError("the check comes before any Inception work")

  with pytest.raises(ValueError, match="Too few images: .*one.npz gives 1"):
    fid.image_set(str(tmp_path / "one.npz"), no_network, split="train",
                  num_images=0, batch_size=2, preprocessing="tensorflow")
  with pytest.raises(ValueError, match="Too few images: digits:train gives "
                     "1"):
    fid.image_set("digits", no_network, split="train", num_images=1,
                  batch_size=2, preprocessing="tensorflow")


# ------------------------------------------------------------------ scores


def test_scores_use_what_each_side_has(tmp_path):
  samples = _set("digits", num_images=12)
  reference = _set("digits", split="test", num_images=10)
  result = fid.scores(samples, reference, kid_subsets=3, kid_subset_size=50,
                      inception_score_splits=4)
  a, b = samples.stats, reference.stats
  assert result["fid"] == metrics.frechet_distance_from_features(
      a.features, b.mu, b.sigma)
  np.testing.assert_allclose(
      result["fid"], metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma),
      rtol=1e-9)
  kid = metrics.kernel_inception_distance(a.features, b.features, subsets=3,
                                          subset_size=10)
  assert (result["kid"], result["kid_std"]) == tuple(kid)
  score = metrics.inception_score(samples.logits, splits=4)
  assert result["inception_score"] == score.mean
  assert (result["num_samples"], result["num_reference"]) == (12, 10)

  np.savez(tmp_path / "stats.npz", mu=b.mu, sigma=b.sigma)
  from_stats = fid.scores(samples, _set(str(tmp_path / "stats.npz")),
                          kid_subsets=3, kid_subset_size=50,
                          inception_score_splits=4)
  assert from_stats["fid"] == result["fid"]
  assert from_stats["kid"] is None and from_stats["num_reference"] is None
  no_logits = samples._replace(logits=None)
  assert fid.scores(no_logits, reference, kid_subsets=3, kid_subset_size=50,
                    inception_score_splits=4)["inception_score"] is None


# ----------------------------------------------------------------- the CLI


def _run(module, args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _one_error_line(out, message):
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1, out.stderr[-3000:]
  assert re.search(message, lines[0]), lines[0]


@pytest.fixture(scope="module")
def synthetic_weights(tmp_path_factory):
  """Random weights under the real TorchScript file's tensor names and shapes
  (recorded in the fixture) plus an output layer, converted to .npz."""
  ref = np.load(ROOT / "tests" / "fixtures" /
                "inception_reference_features.npz")
  rng = np.random.default_rng(0)
  nvidia = {}
  for name, shape in zip(ref["tensor_names"], ref["tensor_shapes"]):
    shape = tuple(int(d) for d in str(shape).split(","))
    if str(name).endswith("weight"):
      value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif str(name).endswith("var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    nvidia[str(name)] = value.astype(np.float32)
  nvidia["net.output.weight"] = rng.normal(0, 0.05, (1008, 2048))
  nvidia["net.output.bias"] = np.zeros(1008)
  path = tmp_path_factory.mktemp("weights") / "fid_inception.npz"
  np.savez(path, **inception.nvidia_to_pytorch_fid(nvidia))
  return path


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, synthetic_weights):
  np.savez(tmp_path / "samples.npz", images=_images(4))  # 8x8 as digits
  saved = tmp_path / "ref.npz"
  out = _run("ddpm_jax.tools.fid", [
      f"--weights={synthetic_weights}", f"--samples={tmp_path}/samples.npz",
      "--reference=digits", "--num_reference=5", "--batch_size=4",
      f"--save_reference={saved}", "--kid_subsets=2"
  ])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["num_samples"] == 4 and result["num_reference"] == 5
  assert result["preprocessing"] == "tensorflow"
  assert np.isfinite(result["fid"]) and result["fid"] > 0
  assert np.isfinite(result["kid"]) and result["inception_score"] >= 1.0
  assert "Only 4 sample images: FID is biased" in out.stderr
  stats = metrics.load_statistics(saved, preprocessing="tensorflow")
  assert stats.features.shape == (5, 2048)
  mu, sigma = metrics.feature_statistics(stats.features)
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, synthetic_weights):
  np.savez(tmp_path / "samples.npz", images=_images(4))
  np.savez(tmp_path / "floats.npz", images=np.zeros((4, 8, 8, 3)))
  (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04 truncated")
  base = [
      f"--weights={synthetic_weights}", "--reference=digits", "--batch_size=2"
  ]
  for args, message in [
      ([
          f"--weights={tmp_path}/weights.npz", "--reference=digits",
          f"--samples={tmp_path}/samples.npz"
      ], "weights.npz.*truncated"),
      ([
          f"--weights={tmp_path}/samples.npz", "--reference=digits",
          f"--samples={tmp_path}/samples.npz"
      ], "not an FID Inception state dict"),
      (base + [f"--samples={tmp_path}/floats.npz", "--num_reference=2"],
       "dtype float64; expected uint8"),
      (base + [f"--samples={tmp_path}/samples.npz", "--num_reference=1"],
       "Too few images"),
  ]:
    _one_error_line(_run("ddpm_jax.tools.fid", args), message)


def test_convert_cli_errors_are_one_line(tmp_path):
  (tmp_path / "x.npz").write_bytes(b"")
  _one_error_line(
      _run("ddpm_jax.tools.convert_inception",
           [f"--source={tmp_path}/x.npz", f"--output={tmp_path}/out.npz"]),
      "x.npz.*truncated or corrupt")
  _one_error_line(
      _run("ddpm_jax.tools.convert_inception",
           [f"--source={tmp_path}/absent.whl", f"--output={tmp_path}/out.npz"]),
      "not found: .*absent.whl")
