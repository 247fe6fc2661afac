"""Only the builders (ddpm_jax/engine/builders.py) and the schema
(ddpm_jax/engine/config.py) read a run config: training, sampling and
evaluation run on a config that records the module of every field read, and
no module but those two and the command lines reads `config.GROUP.FIELD`.
"""

import ast
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from ddpm_jax.engine import builders, evaluation, generation, inference, train
from ddpm_jax.engine import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
READERS = {"ddpm_jax.engine.builders", "ddpm_jax.engine.config"}
# The command lines: they load, check and hash whole configs.
EDGES = ("ddpm_jax/main.py", "ddpm_jax/tools/")


class RecordingConfig:
  """A `ConfigDict` that records (module, field) for each field read, the
  module being the reader's (its caller's `__name__`)."""

  def __init__(self, node: ml_collections.ConfigDict, reads: set, path=""):
    object.__setattr__(self, "_node", node)
    object.__setattr__(self, "_reads", reads)
    object.__setattr__(self, "_path", path)

  def _read(self, name: str, caller_globals: dict):
    path = f"{self._path}.{name}" if self._path else name
    self._reads.add((caller_globals.get("__name__"), path))
    value = getattr(self._node, name)
    if isinstance(value, ml_collections.ConfigDict):
      return RecordingConfig(value, self._reads, path)
    return value

  def __getattr__(self, name: str):
    return self._read(name, sys._getframe(1).f_globals)  # pylint: disable=protected-access

  def __getitem__(self, name: str):
    return self._read(name, sys._getframe(1).f_globals)  # pylint: disable=protected-access

  def __setattr__(self, name, value):
    raise AttributeError(f"config.{name} was set during the run.")


def _tiny_config() -> ml_collections.ConfigDict:
  """digits at 8x8 with a one-level U-Net, T = 20, 2 steps, a grid with a
  GIF at the end, 4 sampled images and 8 evaluated ones."""
  config = config_lib.base_config()
  config.data.update(image_size=8, resize=False)
  config.model.update(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                      attention=("none",), mid_attention="none",
                      block_type="resnet")
  config.diffusion.update(schedule="cosine", num_timesteps=20)
  config.optimizer.warmup_steps = 1
  config.train.update(batch_size=4, num_steps=2, log_every=1,
                      checkpoint_every=2, sample_every=2)
  config.sample.update(sampler="ddim", num_steps=3, num_images=4, batch_size=4,
                       gif_frames=2)
  config.eval.update(num_images=8, batch_size=8)
  config_lib.validate_config(config, num_devices=1)
  return config


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
  """The reads of training, --mode=sample's files, load_trained and eval."""
  workdir = tmp_path_factory.mktemp("reads")
  config = _tiny_config()
  reads = set()
  recording = RecordingConfig(config, reads)
  train.train_and_evaluate(recording, workdir)
  trained = inference.load_trained(recording, workdir)
  run = builders.build_run(recording)
  generation.sample_to_files(trained, run.sampling, seed=run.seed,
                             workdir=workdir)
  evaluation.evaluate(recording, workdir)
  with np.load(workdir / "samples" / "sample_step_00000002.npz") as f:
    assert f["images"].shape == (4, 8, 8, 1)
  assert (workdir / "samples" / "step_00000002.gif").exists()
  assert (workdir / "eval" / "step_00000002.json").exists()
  return reads


def test_only_the_builders_read_the_run_config(reads):
  readers = {module for module, _ in reads}
  assert readers <= READERS, sorted(
      (module, path) for module, path in reads if module not in READERS)


@pytest.mark.parametrize("field", [
    "seed", "train.num_steps", "train.sample_every", "train.max_time",
    "sample.sampler", "sample.gif", "sample.class_id", "eval.num_samples",
    "data.source", "diffusion.target", "optimizer.lr"
])
def test_the_recorder_sees_the_builders_read(reads, field):
  assert ("ddpm_jax.engine.builders", field) in reads


def test_the_recorder_names_a_reader_outside_the_builders():
  reads = set()
  recording = RecordingConfig(_tiny_config(), reads)
  assert recording.train.num_steps == 2
  assert (__name__, "train") in reads and (__name__, "train.num_steps") in reads


def _field_reads(tree: ast.AST) -> list[str]:
  """`X.GROUP.FIELD` and `X.seed` of the run config's schema in `tree`."""
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    inner = node.value
    if (isinstance(inner, ast.Attribute) and
        isinstance(inner.value, ast.Name) and
        isinstance(config_lib.SCHEMA.get(inner.attr), dict) and
        node.attr in config_lib.SCHEMA[inner.attr]):
      found.append(f"{inner.value.id}.{inner.attr}.{node.attr}")
    elif (isinstance(inner, ast.Name) and inner.id == "config" and
          node.attr in config_lib.SCHEMA):
      found.append(f"config.{node.attr}")
  return found


def test_no_module_but_the_builders_reads_config_fields():
  modules = sorted((ROOT / "ddpm_jax").rglob("*.py"))
  assert len(modules) > 40
  readers = {}
  for path in modules:
    name = path.relative_to(ROOT).as_posix()
    found = _field_reads(ast.parse(path.read_text()))
    if found and not name.startswith(EDGES):
      readers[name] = found
  assert "ddpm_jax/engine/builders.py" in readers
  assert set(readers) <= {
      "ddpm_jax/engine/builders.py", "ddpm_jax/engine/config.py"
  }, readers


def test_the_static_check_finds_a_read():
  tree = ast.parse("n = int(cfg.train.num_steps)\nconfig.seed\nrun.seed")
  assert sorted(_field_reads(tree)) == ["cfg.train.num_steps", "config.seed"]
