"""Tests of ddpm_jax.tools.pretrained_workdir: a diffusers model imported into a
workdir restores, samples and fine-tunes as an ordinary run."""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest

from ddpm_jax.engine import config as config_lib
from ddpm_jax.engine import inference, train
from ddpm_jax.engine.config import base_config
from ddpm_jax.models import pretrained, unet_config
from ddpm_jax.tools import pretrained_workdir

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                    "diffusers_tiny")


def _config():
  config = base_config()
  config.train.update(batch_size=4, num_steps=2, checkpoint_every=2,
                      log_every=1, sample_every=0)
  config.optimizer.warmup_steps = 0
  config.sample.update(num_images=4, batch_size=4)
  return config


def _listing(path):
  return sorted(
      os.path.relpath(os.path.join(d, f), path)
      for d, _, files in os.walk(path)
      for f in files)


def test_model_fields_pick_the_closest_preset():
  assert pretrained_workdir.model_fields(
      unet_config("ddpm_cifar10", dropout=0.0)) == {
          "preset": "ddpm_cifar10",
          "dropout": 0.0
      }
  assert pretrained_workdir.model_fields(unet_config("ddpm_256")) == {
      "preset": "ddpm_256"
  }
  tiny = pretrained.load_diffusers(TINY).config
  fields = pretrained_workdir.model_fields(tiny)
  assert config_lib.model_config(
      ml_collections.ConfigDict({
          "model": fields,
          "data": {
              "num_classes": 0
          }
      })) == tiny


def test_imported_workdir_restores_the_weights_and_config(tmp_path):
  workdir = tmp_path / "run"
  run = pretrained_workdir.import_to_workdir(TINY, workdir, config=_config())
  net = pretrained.load_diffusers(TINY)
  assert (run.data.image_size, run.data.channels) == (8, 3)
  assert run.diffusion.var_type == "fixed_large"
  assert run.train.batch_size == 4  # the rest of the config is kept
  written = runpy.run_path(str(workdir / "config.py"))["get_config"]()
  assert written.to_dict() == run.to_dict()
  config_lib.validate_config(written, mode="sample")
  trained = inference.load_trained(written, workdir)
  assert trained.step == 0
  chex.assert_trees_all_equal(jax.device_get(trained.params), net.params)


def test_class_conditional_import_sets_the_data_classes(tmp_path):
  source = os.path.join(os.path.dirname(TINY), "diffusers_tiny_classes")
  net = pretrained.load_diffusers(source)
  run = pretrained_workdir.import_to_workdir(source, tmp_path / "run",
                                             config=_config())
  # C classes and the null class of guidance: C + 1 embeddings.
  assert run.data.num_classes == net.config.num_classes - 1
  assert "num_classes" not in run.model
  assert config_lib.model_config(run) == net.config
  trained = inference.load_trained(run, tmp_path / "run")
  assert trained.num_classes == run.data.num_classes
  chex.assert_trees_all_equal(jax.device_get(trained.params), net.params)


@pytest.mark.slow
def test_fine_tuning_continues_from_the_imported_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  run = pretrained_workdir.import_to_workdir(TINY, workdir, config=_config())
  rng = np.random.default_rng(0)

  def dataset(config, *, batch_size, process_index, process_count):
    del config, process_index, process_count
    while True:
      yield {
          "image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32)
      }

  train.train_and_evaluate(run, os.fspath(workdir), dataset_factory=dataset)
  trained = inference.load_trained(run, workdir)
  params, step = trained.params, trained.step
  assert step == 2
  imported = pretrained.load_diffusers(TINY).params
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(params), imported)
  assert 0 < max(jax.tree.leaves(moved)) < 0.1  # EMA 0.9999 of two steps


def test_bad_model_writes_nothing(tmp_path):
  source = shutil.copytree(TINY, tmp_path / "model")
  os.remove(os.path.join(source, "config.json"))
  with pytest.raises(pretrained.PretrainedError, match=r"no config\.json"):
    pretrained_workdir.import_to_workdir(source, tmp_path / "run",
                                         config=_config())
  assert not os.path.exists(tmp_path / "run")


def test_invalid_run_config_writes_nothing(tmp_path):
  config = _config()
  config.train.batch_size = 0
  with pytest.raises(config_lib.ConfigError, match="batch_size"):
    pretrained_workdir.import_to_workdir(TINY, tmp_path / "run", config=config)
  assert not os.path.exists(tmp_path / "run")


def test_existing_run_is_not_overwritten(tmp_path):
  workdir = tmp_path / "run"
  pretrained_workdir.import_to_workdir(TINY, workdir, config=_config())
  before = _listing(workdir)
  with pytest.raises(pretrained.PretrainedError, match=r"checkpoints exists"):
    pretrained_workdir.import_to_workdir(TINY, workdir, config=_config())
  assert _listing(workdir) == before


def _cli(*args, platforms="cpu"):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS=platforms)
  return subprocess.run(
      [sys.executable, "-m", "ddpm_jax.tools.pretrained_workdir", *args],
      cwd=root, env=env, capture_output=True, text=True, timeout=600,
      check=False)


def _break(source, how):
  if how == "no-config":
    os.remove(os.path.join(source, "config.json"))
  elif how == "truncated-weights":
    path = os.path.join(source, "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
      f.truncate(1000)
  elif how == "unsupported-value":
    path = os.path.join(source, "config.json")
    with open(path) as f:
      fields = json.load(f)
    fields["act_fn"] = "gelu"
    with open(path, "w") as f:
      json.dump(fields, f)
  elif how == "other-network":
    shutil.copy(
        os.path.join(os.path.dirname(TINY), "diffusers_tiny_classes",
                     "diffusion_pytorch_model.safetensors"), source)


@pytest.mark.slow
@pytest.mark.parametrize("how, message", [
    ("no-config", r"no config\.json"),
    ("truncated-weights", "safetensors"),
    ("unsupported-value", "act_fn"),
    ("other-network", "tensor"),
])
def test_cli_bad_model_is_one_line_and_writes_nothing(tmp_path, how, message):
  source = shutil.copytree(TINY, tmp_path / "model")
  _break(source, how)
  out = _cli(f"--source={source}", f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1 and re.search(message, lines[0]), out.stderr
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_cli_error_is_the_only_line_without_jax_platforms(tmp_path):
  """JAX choosing its platform itself probes for a TPU; that INFO line
  (`Unable to initialize backend 'tpu'`) is kept off stderr (issue 30)."""
  source = shutil.copytree(TINY, tmp_path / "model")
  _break(source, "other-network")
  out = _cli(f"--source={source}", f"--workdir={tmp_path / 'run'}",
             platforms="")
  assert out.returncode == 1, out.stderr
  assert [l for l in out.stderr.splitlines() if l.strip()] == [
      l for l in out.stderr.splitlines() if l.startswith("ddpm_jax: error: ")
  ] and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.slow
def test_cli_imports_and_main_samples(tmp_path):
  workdir = tmp_path / "run"
  out = _cli(f"--source={TINY}", f"--workdir={workdir}",
             "--config=configs/digits.py")
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "checkpoints" / "0").is_dir()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sample = subprocess.run([
      sys.executable, "-m", "ddpm_jax.main", f"--config={workdir}/config.py",
      f"--workdir={workdir}", "--mode=sample", "--config.sample.num_images=4",
      "--config.sample.batch_size=4", "--config.sample.sampler=ddim",
      "--config.sample.num_steps=3", "--config.sample.gif=False"
  ], cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=600, check=False)
  assert sample.returncode == 0, sample.stderr[-3000:]
  with np.load(workdir / "samples" / "sample_step_00000000.npz") as f:
    assert f["images"].shape == (4, 8, 8, 3)
