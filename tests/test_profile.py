"""train.profile_start / profile_steps: a jax.profiler trace of chosen train
steps lands in <workdir>/profile, readable by TensorBoard and Perfetto."""

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax.engine import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.engine import train

pytestmark = pytest.mark.slow  # Two short training runs in this process.


def _config(**train_fields):
  config = config_lib.load_config("configs/digits.py:tiny")
  config.train.update(
      dict(num_steps=3, sample_every=0, checkpoint_every=10, **train_fields))
  return config


def test_trace_of_chosen_steps_is_written_to_the_workdir(tmp_path):
  # The digits data with a ~3k-parameter network: seconds, not minutes.
  train.train_and_evaluate(_config(), tmp_path / "plain",
                           model=helpers.tiny_model())
  assert not (tmp_path / "plain" / "profile").exists()  # Off by default.
  workdir = tmp_path / "profiled"
  train.train_and_evaluate(_config(profile_start=2, profile_steps=1), workdir,
                           model=helpers.tiny_model())
  runs = list((workdir / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1  # One trace: TensorBoard's profile tab reads it.
  assert list(runs[0].glob("*.xplane.pb"))
  with gzip.open(next(runs[0].glob("perfetto_trace.json.gz"))) as f:
    trace = json.load(f)
  assert trace["traceEvents"]  # Perfetto's JSON trace format.
