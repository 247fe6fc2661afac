"""Tests of the MNIST quality benchmark's pieces (benchmarks/digit_quality.py,
benchmarks/mnist_quality.py, benchmarks/first_command.py) on synthetic
arrays: closed forms of the scores, the calibration sets, the classifier
cache, the recipes and samplers. The benchmark's figures are in
BENCHMARKS.md, never asserted here."""

import json
import math

import numpy as np
import pytest

from benchmarks import digit_quality as dq
from benchmarks import first_command, mnist_quality
from ddpm_jax import metrics
from ddpm_jax.diffusion import schedules


def _splits(n_train=120, n_test=2100, seed=0):
  rng = np.random.default_rng(seed)
  return dq.MnistSplits(
      rng.integers(0, 256, (n_train, 28, 28, 1), dtype=np.uint8),
      np.arange(n_train, dtype=np.int32) % 10,
      rng.integers(0, 256, (n_test, 28, 28, 1), dtype=np.uint8),
      np.arange(n_test, dtype=np.int32) % 10)


def test_class_entropy_closed_forms():
  assert dq.class_entropy(np.ones(10)) == pytest.approx(math.log(10))
  assert dq.class_entropy([5, 5, 0, 0]) == pytest.approx(math.log(2))
  assert dq.class_entropy([0, 7, 0]) == 0.0


def test_scores_of_counts_confidence_and_identical_features():
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(100, 8))
  logits = np.full((100, 10), -1e9)
  labels = np.arange(100) % 4  # Four classes, 25 each, fully confident.
  logits[np.arange(100), labels] = 0.0
  scores = dq.scores_of(metrics.Features(pool=pool, logits=logits), pool)
  assert scores.class_counts == (25, 25, 25, 25, 0, 0, 0, 0, 0, 0)
  assert scores.class_entropy == pytest.approx(math.log(4))
  assert scores.confidence == pytest.approx(1.0)
  assert abs(scores.fid) < 1e-6 and scores.num_images == 100
  shifted = dq.scores_of(metrics.Features(pool=pool + 3.0, logits=logits), pool)
  assert shifted.fid == pytest.approx(8 * 9.0, rel=1e-6)  # ||mu shift||^2


def test_gaussian_blur_of_a_point_is_the_normalized_kernel():
  image = np.zeros((1, 15, 15, 1), np.uint8)
  image[0, 7, 7] = 255
  blurred = dq.gaussian_blur(image, sigma=1.0)[0, ..., 0].astype(float)
  offsets = np.arange(-3, 4)
  kernel = np.exp(-0.5 * offsets**2)
  kernel /= kernel.sum()
  np.testing.assert_allclose(blurred[4:11, 4:11],
                             255 * np.outer(kernel, kernel), atol=0.5)
  assert blurred.sum() == pytest.approx(255, abs=25)  # rounding only


def test_calibration_sets_draw_from_held_out_digits():
  data = _splits()
  sets = dq.calibration_sets(data, num_images=50)
  assert list(sets) == [
      "real test digits", "real training digits", "blurred digits (sigma 1)",
      "blurred digits (sigma 2)", "digits 0-4 only", "uniform noise"
  ]
  assert all(
      x.shape == (50, 28, 28, 1) and x.dtype == np.uint8 for x in sets.values())
  held_out = dq.test_order(len(data.x_test))[:dq.HELD_OUT]
  np.testing.assert_array_equal(sets["real test digits"],
                                data.x_test[held_out[:50]])
  # Only digits of classes 0-4, from the held-out test digits first.
  first = data.x_test[held_out[data.y_test[held_out] < 5]][:50]
  np.testing.assert_array_equal(sets["digits 0-4 only"], first)
  with pytest.raises(ValueError, match="num_images must be in"):
    dq.calibration_sets(data, num_images=dq.HELD_OUT + 1)


def test_classifier_is_trained_once_then_loaded(tmp_path):
  data = _splits(n_train=256, n_test=64)
  path = tmp_path / "mnist.npz"
  np.savez(path, x_train=data.x_train[..., 0], y_train=data.y_train,
           x_test=data.x_test[..., 0], y_test=data.y_test)
  logged = []
  recipe = dict(epochs=1, batch_size=64)
  params, accuracy = dq.load_or_train_classifier(path,
                                                 cache_dir=tmp_path / "cache",
                                                 log=logged.append, **recipe)
  assert len(logged) == 1 and 0.0 <= accuracy <= 1.0
  again, accuracy_again = dq.load_or_train_classifier(
      path, cache_dir=tmp_path / "cache", log=logged.append, **recipe)
  assert len(logged) == 1 and accuracy_again == accuracy
  np.testing.assert_array_equal(again["Dense_0"]["kernel"],
                                params["Dense_0"]["kernel"])
  features = dq.classify(again, data.x_test[:7])
  assert features.pool.shape == (7, dq.FEATURE_DIM)
  assert features.logits.shape == (7, 10)
  with pytest.raises(ValueError, match=r"uint8 \[N, 28, 28, 1\]"):
    dq.classify(again, data.x_test[:2, :14])


def test_seed_recipe_is_the_tutorials(tmp_path):
  path = tmp_path / "mnist.npz"
  path.touch()  # The config check wants the file to exist.
  config = mnist_quality.recipe_config("seed", mnist_path=path)
  assert config.data.source == f"npz:{path}"
  diff = config.diffusion
  assert (diff.schedule, diff.num_timesteps, diff.loss_type) == ("linear", 200,
                                                                 "huber")
  assert config.train.ema_decay == 0.0 and config.optimizer.lr == 1e-3
  # Short of noise, as the issue found.
  sched = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.02,
                                  warn=False)
  assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.1322, abs=1e-4)


def test_overrides_and_sampler_specs(tmp_path):
  (tmp_path / "mnist.npz").touch()
  config = mnist_quality.recipe_config(
      "cpu:tiny", mnist_path=tmp_path / "mnist.npz",
      overrides=["optimizer.lr=0.001", "diffusion.schedule=linear"])
  assert config.optimizer.lr == 1e-3 and config.diffusion.schedule == "linear"
  assert config.model.base_channels == 8  # the :tiny variant
  assert mnist_quality.config_sampler_spec(config) == "dpmpp_2m:5"
  _, calls = mnist_quality.build_sample_fn("heun:10", config)
  assert calls == 19  # 2 * 10 - 1
  _, calls = mnist_quality.build_sample_fn("ddpm:0", config)
  assert calls == config.diffusion.num_timesteps
  _, calls = mnist_quality.build_sample_fn("ddpm:5", config)
  assert calls == 5
  # The run's config is left as it was.
  assert (config.sample.sampler, config.sample.num_steps) == ("dpmpp_2m", 5)
  for bad in ("dpmpp_2m", "euler:x", "plms:10"):
    with pytest.raises(ValueError, match="NAME:STEPS"):
      mnist_quality.build_sample_fn(bad, config)
  with pytest.raises(ValueError, match="GROUP.FIELD=VALUE"):
    mnist_quality.apply_overrides(config, ["optimizer.lr"])


def test_to_8x8_averages_blocks():
  x = np.arange(16 * 16, dtype=np.uint8).reshape(1, 16, 16, 1)
  expected = x[0, ..., 0].reshape(8, 2, 8, 2).mean(axis=(1, 3))
  np.testing.assert_array_equal(
      first_command.to_8x8(x)[0],
      np.round(expected).astype(np.uint8))
  with pytest.raises(ValueError, match="multiple of 8"):
    first_command.to_8x8(np.zeros((1, 12, 12), np.uint8))


@pytest.mark.slow  # ~1 min: trains a tiny recipe, a classifier, samples.
def test_tiny_benchmark_run(tmp_path, capsys):
  data = _splits(n_train=256)
  path = tmp_path / "mnist.npz"
  np.savez(path, x_train=data.x_train[..., 0], y_train=data.y_train,
           x_test=data.x_test[..., 0], y_test=data.y_test)
  common = [
      "--recipe", "cpu:tiny", "--mnist",
      str(path), "--workdir",
      str(tmp_path / "run")
  ]
  mnist_quality.main(["train", *common, "--checkpoint-every", "2"])
  record = json.loads(
      (tmp_path / "run" / mnist_quality.TRAIN_RECORD).read_text())
  assert record["steps_done"] == 4 and record["seconds"] > 0
  out = tmp_path / "rows.jsonl"
  mnist_quality.main([
      "evaluate", *common, "--cache-dir",
      str(tmp_path / "cache"), "--num-images", "16", "--sample-batch", "8",
      "--sampler", "dpmpp_2m:2", "--sampler", "ddim:3", "--grid-dir",
      str(tmp_path / "grids"), "--out",
      str(out)
  ])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["step"], r["sampler"], r["network_calls"]) for r in rows
         ] == [(2, "dpmpp_2m:2", 2), (2, "ddim:3", 3), (4, "dpmpp_2m:2", 2),
               (4, "ddim:3", 3)]
  assert all(sum(r["class_counts"]) == 16 and r["minutes"] > 0 for r in rows)
  assert (tmp_path / "grids" / "cpu_tiny_step_000004_ddim3.png").is_file()
  assert "| dpmpp_2m:2 | 2 |" in capsys.readouterr().out
