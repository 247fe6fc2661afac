"""Tests of the export to diffusers folders (ddpm_jax.models.pretrained.export
and python -m ddpm_jax.tools.export): bitwise round trips through the
importer, the source fixtures of tests/fixtures/ reproduced, the command line
on a tiny workdir, bad input, and (with torch and diffusers, the fixtures
extra) diffusers loading an export."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from ddpm_jax.diffusion import schedules
from ddpm_jax.engine import config as config_lib
from ddpm_jax.engine import train
from ddpm_jax.engine.config import base_config
from ddpm_jax.infra import storage
from ddpm_jax.models import PRESETS, UNet, count_params, pretrained
from ddpm_jax.models.pretrained import DiffusionSettings, PretrainedError
from ddpm_jax.models.pretrained.common import flax_shapes
from ddpm_jax.tools import export, pretrained_workdir

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "diffusers_tiny"
TINY_CLASSES = FIXTURES / "diffusers_tiny_classes"
WEIGHTS = pretrained.SAFETENSORS_FILE
FILES = ("README.md", "model_index.json", "scheduler/scheduler_config.json",
         "unet/config.json", f"unet/{WEIGHTS}")
SETTINGS = DiffusionSettings(schedule="linear", num_timesteps=1000,
                             beta_start=1e-4, beta_end=0.02,
                             var_type="fixed_large", clip_x0=True, target="eps",
                             mean_form="x0")


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _listing(path):
  return sorted(
      os.path.relpath(os.path.join(d, f), path)
      for d, _, files in os.walk(path)
      for f in files)


def _random_params(config, seed=0):
  """Random float32 numbers in the parameter tree of `config` (no init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                      flax_shapes(config))


# --- round trips --------------------------------------------------------------

EXPORTABLE = {
    "ddpm_cifar10":
        PRESETS["ddpm_cifar10"],
    "ddpm_256":
        PRESETS["ddpm_256"],
    "cifar10_classes_learned_variance":
        dataclasses.replace(PRESETS["ddpm_cifar10"], num_classes=11,
                            learned_variance=True, dropout=0.0),
    "cifar10_no_mid_attention_wide_temb":
        dataclasses.replace(PRESETS["ddpm_cifar10"], mid_attention="none",
                            time_embed_dim=384, num_groups=16),
}


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_import_of_an_export_is_bitwise_the_same_network(name):
  config = EXPORTABLE[name]
  params = _random_params(config)
  fields, tensors = pretrained.to_diffusers(config, params, image_size=32)
  assert all(
      t.dtype == np.float32 and t.flags.c_contiguous for t in tensors.values())
  assert sum(t.size for t in tensors.values()) == count_params(params)
  assert pretrained.unet_config_from_diffusers(fields) == (config, 32)
  imported = pretrained.params_from_diffusers(tensors, config)
  chex.assert_trees_all_equal(imported, params)
  chex.assert_trees_all_equal_dtypes(imported, params)


def test_every_preset_but_the_tutorial_exports():
  exportable = []
  for name, config in sorted(PRESETS.items()):
    try:
      pretrained.unet_config_to_diffusers(config)
      exportable.append(name)
    except PretrainedError as e:
      assert re.match(r"UNetConfig: layout='tutorial' cannot be exported",
                      str(e)), e
  assert exportable == ["ddpm_256", "ddpm_cifar10"]


@pytest.mark.parametrize("folder", [TINY, TINY_CLASSES],
                         ids=["ddpm_blocks", "classes_learned_range"])
def test_export_of_an_imported_folder_is_the_source(folder):
  net = pretrained.load_diffusers(folder)
  fields, tensors = pretrained.to_diffusers(net.config, net.params,
                                            image_size=net.image_size)
  source = safetensors_numpy.load_file(folder / WEIGHTS)
  assert sorted(tensors) == sorted(source)
  for key, value in source.items():  # the fixtures are float16
    np.testing.assert_array_equal(tensors[key], value.astype(np.float32),
                                  strict=True)
  source_fields = _json(folder / "config.json")
  if folder == TINY_CLASSES:  # written by diffusers 0.42.1: every field
    assert fields == source_fields
  else:
    assert {k: fields[k] for k in source_fields} == source_fields
  scheduler = pretrained.scheduler_config_to_diffusers(net.diffusion)
  assert scheduler == _json(folder / "scheduler_config.json")


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "sigmoid"])
@pytest.mark.parametrize("var_type",
                         ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_scheduler_config_round_trip(schedule, var_type, target):
  settings = SETTINGS._replace(schedule=schedule, var_type=var_type,
                               target=target, num_timesteps=400,
                               beta_start=2e-4, beta_end=0.03, clip_x0=target
                               != "v")
  fields = pretrained.scheduler_config_to_diffusers(settings)
  assert pretrained.diffusion_settings_from_diffusers(fields) == settings


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(layout="tutorial", block_type="convnext", num_groups=8,
          attention=("linear",) * 4), r"layout='tutorial'"),
    (dict(block_type="convnext"), r"block_type='convnext'"),
    (dict(attention=("none", "linear", "none", "none")),
     r"attention=\('none', 'linear', 'none', 'none'\)"),
    (dict(mid_attention="linear"), r"mid_attention='linear'"),
])
def test_unexportable_network_is_refused_naming_the_field(change, message):
  config = dataclasses.replace(PRESETS["ddpm_cifar10"], **change)
  with pytest.raises(PretrainedError,
                     match=f"^UNetConfig: {message} cannot be exported"):
    pretrained.to_diffusers(config, {})


def test_params_of_another_network_are_named():
  config = PRESETS["ddpm_cifar10"]
  params = _random_params(dataclasses.replace(config, learned_variance=True))
  with pytest.raises(
      PretrainedError, match=r"^params: 2 parameter\(s\) do not fit the "
      r"network of the config: params/Conv_1/bias has shape \(6,\), the "
      r"network needs \(3,\); params/Conv_1/kernel"):
    pretrained.to_diffusers(config, params)
  params = _random_params(config)
  del params["Attention_0"]
  with pytest.raises(
      PretrainedError, match=r"parameter\(s\) of the network "
      r"are missing of the config: Attention_0/"):
    pretrained.to_diffusers(config, params)


@pytest.mark.parametrize("change, message", [
    (dict(schedule="cosine"), r"schedule='cosine'"),
    (dict(var_type="learned"), r"var_type='learned'"),
    (dict(mean_form="eps"), r"mean_form='eps'"),
    (dict(target="score"), r"target='score'"),
    (dict(beta_end=1.5), r"beta_end=1.5"),
    (dict(num_timesteps=0), r"num_timesteps=0"),
])
def test_unmappable_diffusion_settings_are_refused(change, message):
  with pytest.raises(PretrainedError,
                     match=f"^config.diffusion: {message} cannot be exported"):
    pretrained.scheduler_config_to_diffusers(SETTINGS._replace(**change))


# --- writing a folder ---------------------------------------------------------


def test_save_diffusers_writes_a_pipeline_folder_that_imports(tmp_path):
  net = pretrained.load_diffusers(TINY_CLASSES)
  out = pretrained.save_diffusers(tmp_path / "out", net.config, net.params,
                                  net.diffusion, image_size=net.image_size,
                                  model_card="# card\n")
  assert _listing(out) == sorted(FILES)
  assert _listing(tmp_path) == [os.path.join("out", f) for f in sorted(FILES)]
  assert _json(out / "model_index.json") == {
      "_class_name": "DDPMPipeline",
      "_diffusers_version": pretrained.DIFFUSERS_VERSION,
      "scheduler": ["diffusers", "DDPMScheduler"],
      "unet": ["diffusers", "UNet2DModel"]
  }
  again = pretrained.load_diffusers(out)
  chex.assert_trees_all_equal(again.params, net.params)
  assert again._replace(params=None) == net._replace(params=None)


def test_save_diffusers_leaves_nothing_on_failure(tmp_path, monkeypatch):
  net = pretrained.load_diffusers(TINY)
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(PretrainedError, match=r"existing: exists"):
    pretrained.save_diffusers(existing, net.config, net.params, net.diffusion)
  with pytest.raises(PretrainedError, match=r"schedule='cosine'"):
    pretrained.save_diffusers(tmp_path / "cosine", net.config, net.params,
                              net.diffusion._replace(schedule="cosine"))

  def broken_move(source, target):
    del source
    os.makedirs(target)  # half a copy, as a failed gs:// move leaves
    raise OSError("disk full")

  monkeypatch.setattr(storage, "move_tree", broken_move)
  with pytest.raises(OSError, match="disk full"):
    pretrained.save_diffusers(tmp_path / "out", net.config, net.params,
                              net.diffusion)
  assert _listing(tmp_path) == [] and os.listdir(tmp_path) == ["existing"]


# --- python -m ddpm_jax.tools.export ------------------------------------------


def _workdir(tmp_path):
  """A step-0 workdir of the tiny fixture (tools/pretrained_workdir) with an
  eval result; returns (workdir, its config)."""
  config = base_config()
  config.train.update(batch_size=4, num_steps=2, checkpoint_every=2,
                      log_every=1, sample_every=0)
  workdir = tmp_path / "run"
  run = pretrained_workdir.import_to_workdir(TINY, workdir, config=config)
  (workdir / "eval").mkdir()
  (workdir / "eval" / "step_00000000.json").write_text(
      json.dumps({
          "total_bpd": 3.25,
          "ode_bpd": 3.125,
          "num_images": 100,
          "fid": 12.5,
          "inception_score": None,
          "kid": 0.0125,
          "kid_std": 0.0025,
          "num_samples": 50,
          "step": 0
      }))
  return workdir, run


def test_export_run_reproduces_the_source_with_a_model_card(tmp_path):
  workdir, run = _workdir(tmp_path)
  out = export.export_run(run, workdir, tmp_path / "out")
  assert _listing(out) == sorted(FILES)
  fields, source_fields = (_json(out / "unet" / "config.json"),
                           _json(TINY / "config.json"))
  assert {k: fields[k] for k in source_fields} == source_fields
  assert _json(out / "scheduler" / "scheduler_config.json") == _json(
      TINY / "scheduler_config.json")
  tensors = safetensors_numpy.load_file(out / "unet" / WEIGHTS)
  source = safetensors_numpy.load_file(TINY / WEIGHTS)
  assert sorted(tensors) == sorted(source)
  assert all(
      np.array_equal(tensors[k], v.astype(np.float32))
      for k, v in source.items())
  card = (out / "README.md").read_text()
  num_params = count_params(pretrained.load_diffusers(TINY).params)
  assert f"A {num_params:,}-parameter DDPM U-Net" in card
  assert "| training images seen | 0 (batch 4) |" in card
  assert "| data set | `digits`, split `train` |" in card
  assert "| 0 | 12.5 | 0.0125 ± 0.0025 | - | 3.25 | 3.125 | 50 | 100 |" in card
  assert json.loads(card.split("```json\n")[1].split("```")[0]) == run.to_dict()


def test_export_run_writes_the_ema_or_the_trained_parameters(tmp_path):
  workdir, run = _workdir(tmp_path)
  rng = np.random.default_rng(0)

  def dataset(config, *, batch_size, process_index, process_count):
    del config, process_index, process_count
    while True:
      yield {
          "image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32)
      }

  # Two steps from the import: the trained parameters and the EMA differ.
  state = jax.device_get(
      train.train_and_evaluate(run, workdir, dataset_factory=dataset))
  ema = export.export_run(run, workdir, tmp_path / "ema")
  trained = export.export_run(run, workdir, tmp_path / "trained", ema=False)
  chex.assert_trees_all_equal(
      pretrained.load_diffusers(ema).params, state.ema_params)
  chex.assert_trees_all_equal(
      pretrained.load_diffusers(trained).params, state.params)
  assert not all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                           jax.tree.leaves(state.ema_params)))
  assert "the EMA parameters of step\n2." in (ema / "README.md").read_text()
  assert "the trained parameters (not the EMA) of step\n2." in (
      trained / "README.md").read_text()


def _replace_field(config, path, value):
  copy = config.copy_and_resolve_references()
  group, field = path.split(".")
  copy[group][field] = value
  return copy


def test_export_run_bad_input_writes_nothing(tmp_path):
  workdir, run = _workdir(tmp_path)
  before = _listing(tmp_path)
  tutorial = run.copy_and_resolve_references()
  tutorial.model = ml_collections.ConfigDict({
      "preset": "tutorial",
      "in_channels": 3
  })
  with pytest.raises(PretrainedError, match=r"layout='tutorial'"):
    export.export_run(tutorial, workdir, tmp_path / "out")
  cosine = _replace_field(run, "diffusion.schedule", "cosine")
  with pytest.raises(PretrainedError, match=r"schedule='cosine'"):
    export.export_run(cosine, workdir, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in"):
    export.export_run(run, tmp_path / "empty", tmp_path / "out")
  with pytest.raises(PretrainedError, match=r"eval: exists"):
    export.export_run(run, workdir, workdir / "eval")
  with pytest.raises(config_lib.ConfigError, match="batch_size"):
    export.export_run(_replace_field(run, "train.batch_size", 0), workdir,
                      tmp_path / "out")
  assert _listing(tmp_path) == before


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "ddpm_jax.tools.export", *args],
                        cwd=ROOT, env=dict(env or os.environ,
                                           JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.slow
def test_cli_exports_the_workdir(tmp_path):
  workdir, _ = _workdir(tmp_path)
  out = tmp_path / "out"
  result = _cli(f"--config={workdir}/config.py", f"--workdir={workdir}",
                f"--output={out}", "--step=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _listing(out) == sorted(FILES)
  tensors = safetensors_numpy.load_file(out / "unet" / WEIGHTS)
  source = safetensors_numpy.load_file(TINY / WEIGHTS)
  assert all(
      np.array_equal(tensors[k], v.astype(np.float32))
      for k, v in source.items())


@pytest.mark.slow
@pytest.mark.parametrize("how, message", [
    ("tutorial", r"layout='tutorial' cannot be exported"),
    ("no-checkpoint", r"No checkpoint in"),
    ("output-exists", r"exists: export into a new folder"),
    ("no-step", r"checkpoints/7 is unusable"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, how, message):
  workdir, _ = _workdir(tmp_path)
  args = [f"--config={workdir}/config.py", f"--workdir={workdir}"]
  out = tmp_path / "out"
  if how == "tutorial":
    args[0] = f"--config={ROOT}/configs/digits.py"
  elif how == "no-checkpoint":
    args[1] = f"--workdir={tmp_path / 'empty'}"
  elif how == "output-exists":
    out.mkdir()
  else:
    args.append("--step=7")
  before = _listing(tmp_path)
  result = _cli(*args, f"--output={out}")
  assert result.returncode == 1 and "Traceback" not in result.stderr, (
      result.stderr[-3000:])
  lines = [l for l in result.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
  assert _listing(tmp_path) == before
  assert os.listdir(tmp_path) == sorted(
      ["run"] + (["out"] if how == "output-exists" else []))


_COPY_BACK = """
import pathlib, sys
from ddpm_jax.infra import storage
source, target = storage.as_path(sys.argv[1]), pathlib.Path(sys.argv[2])
for root, _, files in storage.walk(source):
  for name in files:
    relative = (root / name).relative_to(source)
    (target / relative).parent.mkdir(parents=True, exist_ok=True)
    (target / relative).write_bytes((root / name).read_bytes())
print(sorted(p.name for p in source.parent.iterdir()))
"""


@pytest.mark.slow
def test_cli_exports_to_gs(tmp_path):
  sys.path.insert(0, str(ROOT / "tests"))
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  if gcs_emulator.installed() is None:
    pytest.skip("no Cloud Storage emulator package installed")
  workdir, _ = _workdir(tmp_path)
  args = [f"--config={workdir}/config.py", f"--workdir={workdir}"]
  with gcs_emulator.running() as server:
    env = dict(os.environ, **gcs_emulator.client_env(server.url))
    gcs_emulator.create_bucket(server.url, "exports")
    result = _cli(*args, "--output=gs://exports/tiny", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    again = _cli(*args, "--output=gs://exports/tiny", env=env)
    assert again.returncode == 1 and "exists" in again.stderr, again.stderr
    copy = subprocess.run([
        sys.executable, "-c", _COPY_BACK, "gs://exports/tiny",
        str(tmp_path / "copy")
    ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=True)
  assert copy.stdout.strip() == "['tiny']"  # no temporary folder left
  assert _listing(tmp_path / "copy") == sorted(FILES)
  net = pretrained.load_diffusers(tmp_path / "copy")
  chex.assert_trees_all_equal(net.params,
                              pretrained.load_diffusers(TINY).params)


# --- diffusers itself (the fixtures extra: torch and diffusers) ---------------


@pytest.mark.parametrize("folder", [TINY, TINY_CLASSES],
                         ids=["ddpm_blocks", "classes_learned_range"])
def test_diffusers_loads_an_export_with_the_same_outputs(tmp_path, folder):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  net = pretrained.load_diffusers(folder)
  # New weights: the fixture's, moved by noise, so the export is not a copy.
  params = jax.tree.map(lambda p, n: p + 0.05 * n, net.params,
                        _random_params(net.config, seed=1))
  out = pretrained.save_diffusers(tmp_path / "out", net.config, params,
                                  net.diffusion, image_size=net.image_size)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 8, 3), np.float32)
  t = np.array([0, 500, 999])
  y = None if net.config.num_classes is None else np.array([0, 2, 3])
  unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
  with torch.no_grad():
    theirs = unet(torch.from_numpy(x.transpose(0, 3, 1,
                                               2)), torch.from_numpy(t),
                  class_labels=None if y is None else torch.from_numpy(y))
  theirs = theirs.sample.numpy().transpose(0, 2, 3, 1)
  ours = UNet(config=net.config).apply({"params": params}, jnp.asarray(x),
                                       jnp.asarray(t),
                                       y=None if y is None else jnp.asarray(y),
                                       train=False)
  chex.assert_shape(ours, theirs.shape)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
  pipe = diffusers.DDPMPipeline.from_pretrained(out)
  assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
  schedule = schedules.make_schedule(net.diffusion.schedule,
                                     net.diffusion.num_timesteps,
                                     beta_start=net.diffusion.beta_start,
                                     beta_end=net.diffusion.beta_end)
  np.testing.assert_allclose(pipe.scheduler.alphas_cumprod.numpy(),
                             schedule.alphas_cumprod, rtol=1e-5)
  if y is None:  # DDPMPipeline passes no class labels
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.manual_seed(0)).images
    chex.assert_shape(images, (2, 8, 8, 3))
    assert np.all((images >= 0) & (images <= 1))
