"""The README's first command, timed end to end, and its samples scored.

Run from the repository root (under the machine's CPU lock when shared):

  python -m benchmarks.first_command --workdir /tmp/fc \
      [--set train.num_steps=2000 ...]

It runs `python -m ddpm_jax.main --config=configs/digits.py --workdir=DIR`
(plus the `--set` overrides as `--config.FIELD=VALUE`) in a fresh process and
times it from start to exit (start-up, compilation, training, the final grid
and GIF), then samples `--num-images` from the last checkpoint's EMA
parameters with the config's sampler and scores them with a classifier of
scikit-learn's 8x8 digits (`DigitsScorer`): the Fréchet distance and KID on
its hidden features against the 1,500 training digits, its mean confidence
and the entropy of the predicted classes (ln 10 = 2.303). Samples of another
size are resized to 8x8 (area averaging) first. `--calibrate` prints the
same scores of real digits and of noise.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn import neural_network

from benchmarks import digit_quality, mnist_quality
from ddpm_jax import metrics
from ddpm_jax.engine import builders, generation, inference
from ddpm_jax.engine import config as config_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
#: sklearn's digits: the first 1,500 are the library's 'train' split.
TRAIN_SIZE = 1500


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 digits as uint8 [N, 8, 8] (0..16 -> 0..255) and
  their labels."""
  data = sklearn_datasets.load_digits()
  x = np.round(data.images / 16.0 * 255.0).astype(np.uint8)
  return x, data.target.astype(np.int32)


def to_8x8(images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S(, 1)] -> uint8 [N, 8, 8] by area averaging (S = 8k)."""
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[..., 0]
  n, size = images.shape[0], images.shape[1]
  if size % 8:
    raise ValueError(f"Image size {size} is not a multiple of 8.")
  k = size // 8
  blocks = images.reshape(n, 8, k, 8, k).astype(np.float64).mean(axis=(2, 4))
  return np.round(blocks).astype(np.uint8)


class DigitsScorer(NamedTuple):
  """An MLP classifier of 8x8 digits (one hidden layer of 64 ReLUs)."""
  weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
  test_accuracy: float
  reference: np.ndarray  # hidden features of the 1,500 training digits

  @classmethod
  def create(cls) -> DigitsScorer:
    x, y = load_digits_uint8()
    flat = x.reshape(len(x), -1) / 255.0
    clf = neural_network.MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000,
                                       random_state=0)
    clf.fit(flat[:TRAIN_SIZE], y[:TRAIN_SIZE])
    accuracy = float(clf.score(flat[TRAIN_SIZE:], y[TRAIN_SIZE:]))
    weights = (clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1],
               clf.intercepts_[1])
    scorer = cls(weights, accuracy, np.zeros((0, 64)))
    return scorer._replace(reference=scorer.features(x[:TRAIN_SIZE]).pool)

  def features(self, images: np.ndarray) -> metrics.Features:
    w0, b0, w1, b1 = self.weights
    flat = to_8x8(images).reshape(len(images), -1) / 255.0
    hidden = np.maximum(flat @ w0 + b0, 0.0)
    return metrics.Features(pool=hidden, logits=hidden @ w1 + b1)

  def score(self, images: np.ndarray) -> digit_quality.DigitScores:
    return digit_quality.scores_of(self.features(images), self.reference)


def run_first_command(workdir: str, overrides: list[str]) -> float:
  """Runs the README's first command; returns its wall-clock seconds."""
  command = [
      sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py",
      f"--workdir={workdir}", *[f"--config.{o}" for o in overrides]
  ]
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True,
                        check=False)
  seconds = time.perf_counter() - start
  log = pathlib.Path(workdir) / "first_command.log"
  log.write_text(proc.stderr)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
  return seconds


def sample_from_workdir(workdir: str, overrides: list[str], *,
                        num_images: int) -> tuple[np.ndarray, float]:
  """`num_images` uint8 samples of the workdir's EMA parameters with the
  config's sampler, and the seconds they took (compilation included)."""
  config = mnist_quality.apply_overrides(
      config_lib.load_config(str(_ROOT / "configs" / "digits.py")), overrides)
  trained = inference.load_trained(config, workdir)
  start = time.perf_counter()
  out = generation.generate(
      inference.make_model_fn(trained.model), trained.params, trained.schedule,
      sample_fn=builders.build_sampler(config).fn, num_images=num_images,
      batch_size=min(num_images, 500), image_shape=builders.image_shape(config),
      key=jax.random.PRNGKey(1), mesh=trained.mesh)
  return out, time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir")
  parser.add_argument("--set", action="append", default=[],
                      help="FIELD=VALUE passed as --config.FIELD=VALUE")
  parser.add_argument("--num-images", type=int, default=500)
  parser.add_argument("--calibrate", action="store_true")
  parser.add_argument("--label", default="")
  args = parser.parse_args(argv)
  scorer = DigitsScorer.create()
  if args.calibrate:
    x, y = load_digits_uint8()
    rng = np.random.default_rng(0)
    test = x[TRAIN_SIZE:]
    sets = {
        "real test digits (297)":
            test,
        "real training digits (297)":
            x[rng.choice(TRAIN_SIZE, len(test), replace=False)],
        "digits 0-4 only (297)":
            x[y < 5][:len(test)],
        "uniform noise (297)":
            rng.integers(0, 256, test.shape, dtype=np.uint8),
    }
    print(f"MLP test accuracy {scorer.test_accuracy:.4f}")
    print(digit_quality.MARKDOWN_HEADER)
    for name, imgs in sets.items():
      print(digit_quality.markdown_row(name, scorer.score(imgs)))
    return
  os.makedirs(args.workdir, exist_ok=False)
  load = os.getloadavg()[0]
  seconds = run_first_command(args.workdir, args.set)
  samples, sample_s = sample_from_workdir(args.workdir, args.set,
                                          num_images=args.num_images)
  scores = scorer.score(samples)
  print(
      digit_quality.markdown_row(
          f"{args.label or ' '.join(args.set) or 'configs/digits.py'} "
          f"({len(samples)})", scores, f"{seconds:.0f} s",
          f"load {load:.1f}->{os.getloadavg()[0]:.1f}",
          f"sampling {sample_s:.0f} s",
          " ".join(str(c) for c in scores.class_counts)), flush=True)


if __name__ == "__main__":
  sys.exit(main())
