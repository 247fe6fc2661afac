"""Measures input pipeline throughput (images/s) per source.

Run from the project root:

  PYTHONPATH=. python benchmarks/pipeline.py [--batch_size=128] [--runs=5]

For each source it reports the one-off load time (decoding into memory for
npz, folder and digits; opening the dataset for tfds) and the median
images/s over `--runs` runs of `--steps` batches each, after a warm-up run.
Real data comes from ../shared/data; tfds runs on `tfds.testing.mock_data`
because this benchmark must not download anything.
"""

import contextlib
import pathlib
import statistics
import time

from absl import app, flags

from ddpm_jax.data import pipeline

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Per-host batch size.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per source.")
_STEPS = flags.DEFINE_integer("steps", 50, "Batches per timed run.")
_SHARED_DATA = pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"


def _mock_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.testing.mock_data(num_examples=10_000)


# (source, create_dataset options, context to run in)
_SOURCES = (
    ("digits", dict(image_size=16, resize=True), contextlib.nullcontext),
    (f"npz:{_SHARED_DATA / 'mnist.npz'}", {}, contextlib.nullcontext),
    (f"npz:{_SHARED_DATA / 'mnist.npz'}", dict(image_size=32, resize=True),
     contextlib.nullcontext),
    (f"folder:{_SHARED_DATA / 'cifar10_jpg.tar.gz'}", {},
     contextlib.nullcontext),
    ("tfds:cifar10", {}, _mock_tfds),
    ("tfds:mnist", dict(image_size=32, resize=True), _mock_tfds),
)


def _images_per_second(iterator, steps: int, batch_size: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  batch_size = _BATCH_SIZE.value
  print(f"batch_size={batch_size}, median of {_RUNS.value} runs x "
        f"{_STEPS.value} batches, random_flip=True")
  print(f"{'source':58} {'options':34} {'load s':>7} {'images/s':>10}")
  for source, options, context in _SOURCES:
    with context():
      start = time.perf_counter()
      iterator = pipeline.create_dataset(
          source, batch_size=batch_size, random_flip=True, seed=0, **{
              "image_size": None,
              "channels": None,
              **options
          })
      load = time.perf_counter() - start
      _images_per_second(iterator, _STEPS.value, batch_size)  # warm-up
      rates = [
          _images_per_second(iterator, _STEPS.value, batch_size)
          for _ in range(_RUNS.value)
      ]
    shown = source.replace(str(_SHARED_DATA), "shared/data")
    print(
        f"{shown:58} {str(options):34} {load:7.1f} "
        f"{statistics.median(rates):10,.0f}", flush=True)


if __name__ == "__main__":
  app.run(main)
