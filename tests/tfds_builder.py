"""A tiny TFDS dataset whose download goes through tfds' real download
manager, from a local HTTP server (no network), for tests/test_tfds.py.

Imported as `tests.tfds_builder`: a builder in a package module makes tfds
look up its code path, which needs `importlib_resources` (a dependency tfds
does not declare on Python >= 3.9, as `tfds.builder('mnist')` does).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN, NUM_TEST, SIZE = 12, 4, 8


def arrays() -> dict[str, np.ndarray]:
  """The dataset's contents: 8x8 grey images with 2 classes."""
  images = np.random.default_rng(0).integers(
      0, 256, (NUM_TRAIN + NUM_TEST, SIZE, SIZE, 1), dtype=np.uint8)
  labels = np.arange(NUM_TRAIN + NUM_TEST) % 2
  return dict(x_train=images[:NUM_TRAIN], y_train=labels[:NUM_TRAIN],
              x_test=images[NUM_TRAIN:], y_test=labels[NUM_TRAIN:])


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves a directory and counts the GET requests."""
  requests: list[str]

  def do_GET(self):  # pylint: disable=invalid-name
    self.requests.append(self.path)
    super().do_GET()

  def log_message(self, *args):  # Quiet.
    del args


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[tuple[str, list[str]]]:
  """(base URL, list of requested paths) of an HTTP server of `directory`."""
  requests: list[str] = []
  handler = type("Handler", (_Handler,), {"requests": requests})
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


class DdpmJaxTestDigits(tfds.core.GeneratorBasedBuilder):
  """tfds name 'ddpm_jax_test_digits': `arrays()`, downloaded from `url`."""

  VERSION = tfds.core.Version("1.0.0")
  url = ""  # Set by the test to the served .npz.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 1)),
            "label": tfds.features.ClassLabel(num_classes=2)
        }))

  def _split_generators(self, dl_manager):
    path = dl_manager.download(self.url)
    return {
        split: self._generate_examples(path, split)
        for split in ("train", "test")
    }

  def _generate_examples(self, path, split):
    with path.open("rb") as f, np.load(f) as data:
      for i, (image,
              label) in enumerate(zip(data[f"x_{split}"], data[f"y_{split}"])):
        yield i, {"image": image, "label": int(label)}
