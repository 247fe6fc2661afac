"""Tests of the training engine (ddpm_jax/train_step.py, ddpm_jax/train.py,
ddpm_jax/checkpoint.py).

CPU only, a ~3k-parameter conv denoiser (tests/train_helpers.py) on 256 of
scikit-learn's bundled 8x8 digits (no data folder needed). Multi-device and
multi-process runs are subprocesses running tests/train_helpers.py (slow
tier); JAX's compilation cache (tests/conftest.py) lets the module's
identical runs share compiled programs.
"""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax.diffusion import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.engine import builders, inference, optim, train, train_step
from ddpm_jax.engine import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import images as image_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.infra import parallel

HELPER = str(Path(helpers.__file__).resolve())
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def images():
  return helpers.load_digits()


# ---------------------------------------------------------------------------
# Config validation, optimizer, EMA.


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", 0, "config.train.batch_size must be an integer >= 1"),
    ("train.ema_decay", 1.0, r"config.train.ema_decay must be a number in "
     r"[0.0, 1.0)"),
    ("optimizer.lr", -1e-4, "config.optimizer.lr must be a number in (0.0"),
    ("optimizer.decay", "linear", "config.optimizer.decay must be one of"),
    ("diffusion.target", "score", "config.diffusion.target must be one of"),
    ("train.ema_warmup", 1, "config.train.ema_warmup must be True or False"),
    ("seed", -1, "config.seed must be an integer"),
])
def test_config_validation_names_field(field, value, message):
  config = helpers.make_config().to_dict()  # Plain dicts: no type safety.
  config_lib.validate_config(config, num_devices=1)
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate_config(config)
  assert message in str(err.value)


def test_config_validation_batch_divisible_by_devices():
  config = helpers.make_config(batch_size=12)
  with pytest.raises(
      ValueError, match=r"batch_size \(12\) must be divisible "
      r"by the number of devices \(8\)"):
    config_lib.validate_config(config, num_devices=8)


def test_learning_rate_warmup_cosine_and_ema_decay():
  lr = optim.learning_rate_schedule(lr=2e-4, warmup_steps=10, num_steps=110,
                                    decay="cosine")
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110, 200)],
                             [0.0, 1e-4, 2e-4, 1e-4, 0.0, 0.0], atol=1e-9)
  lr = optim.learning_rate_schedule(lr=2e-4, warmup_steps=10, num_steps=110,
                                    decay="constant")
  np.testing.assert_allclose([float(lr(s)) for s in (5, 10, 1000)],
                             [1e-4, 2e-4, 2e-4], atol=1e-9)
  assert float(optim.ema_decay_at(0, ema_decay=0.9999,
                                  ema_warmup=True)) == (pytest.approx(0.1))
  assert float(optim.ema_decay_at(10**6, ema_decay=0.9999,
                                  ema_warmup=True)) == pytest.approx(0.9999)
  assert float(optim.ema_decay_at(0, ema_decay=0.9999,
                                  ema_warmup=False)) == pytest.approx(0.9999)


# ---------------------------------------------------------------------------
# The jitted step on one device.


def _step_setup(images):
  """A jitted step on a 1-device mesh for `images`' shape."""
  config = helpers.make_config(batch_size=16, num_steps=40)
  config.optimizer.update(lr=3e-3, warmup_steps=0, decay="constant")
  mesh = parallel.create_mesh(jax.devices()[:1])
  model = helpers.tiny_model()
  tx = builders.build_optimizer(config)
  rng = jax.random.PRNGKey(0)
  state0 = train_step.create_train_state(model, tx, rng,
                                         image_shape=images.shape[1:],
                                         mesh=mesh)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, state0)
  schedule = builders.build_schedule(config)

  @jax.jit
  def eval_loss(params, x0):
    # Fixed t and noise: a deterministic estimate of the training loss.
    key = jax.random.PRNGKey(123)
    t = jax.random.randint(key, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    fn = lambda x, s: model.apply({"params": params}, x, s, train=False)
    return losses.denoising_loss(fn, schedule, x0, t, noise).mean()

  return dict(config=config, state0=state0, step=step, rng=rng,
              eval_loss=eval_loss)


@pytest.fixture(scope="module")
def step_setup(images):
  """The digits' step, compiled once for the module."""
  return _step_setup(images)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _lowers_loss(s, images):
  state = jax.tree.map(jnp.array, s["state0"])
  before = float(s["eval_loss"](state.params, images[:64]))
  for i in range(40):
    batch = {"image": images[(i % 12) * 16:(i % 12 + 1) * 16]}
    state, metrics = s["step"](state, batch, s["rng"])
  after = float(s["eval_loss"](state.params, images[:64]))
  assert int(state.step) == 40
  assert after < 0.7 * before, (before, after)
  assert math.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["lr"]) == pytest.approx(3e-3)
  assert set(metrics) >= {
      "loss", "grad_norm", "lr", "skipped", "nonfinite_count"
  }
  # The EMA trails the parameters.
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params,
                      state.ema_params)
  assert max(jax.tree.leaves(diff)) > 0


def test_train_step_lowers_loss_on_digits(step_setup, images):
  _lowers_loss(step_setup, images)


@pytest.mark.real_data("mnist.npz")
def test_train_step_lowers_loss_on_mnist():
  with np.load(helpers.REPO.parent / "shared" / "data" / "mnist.npz") as f:
    images = (f["x_train"][:256].astype(np.float32) / 127.5 - 1.0)[..., None]
  _lowers_loss(_step_setup(images), images)


def test_nonfinite_step_is_skipped(step_setup, images):
  s = step_setup
  state = jax.tree.map(jnp.array, s["state0"])
  state, _ = s["step"](state, {"image": images[:16]}, s["rng"])
  before = _copy(state)
  bad = images[16:32].copy()
  bad[0, 0, 0, 0] = np.nan
  state, metrics = s["step"](state, {"image": bad}, s["rng"])
  assert int(metrics["skipped"]) == 1 and int(state.nonfinite_count) == 1
  assert int(state.step) == 2
  chex.assert_trees_all_equal(
      (before.params, before.ema_params, before.opt_state),
      _copy((state.params, state.ema_params, state.opt_state)))
  state, metrics = s["step"](state, {"image": bad}, s["rng"])
  assert int(state.nonfinite_count) == 2
  state, metrics = s["step"](state, {"image": images[:16]}, s["rng"])
  assert int(metrics["skipped"]) == 0 and int(state.nonfinite_count) == 0


def test_bfloat16_compute_keeps_float32_state(images):
  config = helpers.make_config(batch_size=4)
  model = helpers.tiny_model(dtype="bfloat16")
  tx = builders.build_optimizer(config)
  mesh = parallel.create_mesh(jax.devices()[:1])
  rng = jax.random.PRNGKey(1)
  state = train_step.create_train_state(model, tx, rng,
                                        image_shape=images.shape[1:], mesh=mesh)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, state)
  for i in range(3):
    state, metrics = step(state, {"image": images[4 * i:4 * i + 4]}, rng)
  assert math.isfinite(float(metrics["loss"]))
  for leaf in jax.tree.leaves(
      (state.params, state.ema_params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype


# ---------------------------------------------------------------------------
# train_and_evaluate: compile once, checkpoints, exact resume.


def _run(workdir, images, monkeypatch=None, config=None, **data_kwargs):
  config = config or helpers.make_config()
  if monkeypatch is not None:
    # A fresh counter per run: a second trace of the step raises.
    monkeypatch.setattr(train_step, "train_step",
                        chex.assert_max_traces(train_step.train_step, n=1))
  try:
    return train.train_and_evaluate(
        config, str(workdir), model=helpers.tiny_model(),
        dataset_factory=helpers.dataset_factory(images, **data_kwargs))
  finally:
    if monkeypatch is not None:
      monkeypatch.undo()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, images):
  """6 steps without interruption; the step may be traced only once."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  with pytest.MonkeyPatch.context() as mp:
    state = _run(workdir, images, monkeypatch=mp)
  return workdir, state


def test_train_and_evaluate_traces_once_and_checkpoints(uninterrupted):
  workdir, state = uninterrupted
  assert int(state.step) == 6
  # keep_checkpoints=2 of the saves at 2, 4, 6.
  assert sorted(p.name
                for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["4", "6"]
  assert list(workdir.glob("events.out.tfevents.*"))  # tensorboardX


class _SigtermAt(helpers.ArrayDataset):
  """Sends SIGTERM to this process when asked for batch `at` (preemption)."""
  at = 3

  def __next__(self):
    if self.position == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_checkpoints_and_resume_is_exact(uninterrupted, images,
                                                 tmp_path):
  _, reference = uninterrupted
  config = helpers.make_config()

  def factory(config, *, batch_size, process_index, process_count):
    del config
    return _SigtermAt(images, batch_size, process_index, process_count)

  interrupted = train.train_and_evaluate(config, str(tmp_path),
                                         model=helpers.tiny_model(),
                                         dataset_factory=factory)
  k = int(interrupted.step)
  # SIGTERM while batch 4 is fetched: step 4 runs, is saved, the loop stops.
  assert k == 4

  # The checkpoint holds the whole state, the rng and the data position.
  ckpt = checkpoint_lib.CheckpointManager(tmp_path / "checkpoints")
  assert ckpt.latest_step() == k
  restored, rng, data_state = ckpt.restore(
      checkpoint_lib.abstract_like(interrupted),
      checkpoint_lib.abstract_like(jax.random.PRNGKey(0)))
  ckpt.close()
  chex.assert_trees_all_equal(_copy(restored), _copy(interrupted))
  assert int(restored.step) == k and data_state == {"position": k}
  np.testing.assert_array_equal(
      np.asarray(rng),
      np.asarray(jax.random.split(jax.random.PRNGKey(config.seed))[1]))
  # EMA and Adam moments moved, so restoring them (not just params) matters.
  assert not np.array_equal(*[
      np.asarray(jax.tree.leaves(t)[0])
      for t in (restored.params, restored.ema_params)
  ])

  # The uninterrupted run's step-4 checkpoint was written asynchronously
  # while later steps reused (donated) the state buffers: still intact.
  ckpt = checkpoint_lib.CheckpointManager(uninterrupted[0] / "checkpoints")
  at4, _, data4 = ckpt.restore(checkpoint_lib.abstract_like(interrupted),
                               checkpoint_lib.abstract_like(rng), step=4)
  ckpt.close()
  chex.assert_trees_all_equal(_copy(at4), _copy(interrupted))
  assert data4 == {"position": 4}

  resumed = _run(tmp_path, images, config=config)
  assert int(resumed.step) == 6
  # Bit for bit: params, EMA, optimizer state, step.
  chex.assert_trees_all_equal(_copy(resumed), _copy(reference))


def test_time_budget_stops_with_a_checkpoint_and_samples(
    images, tmp_path, caplog):
  config = helpers.make_config(num_steps=6, sample_every=100)
  config.train.max_time = 1e-6  # Used up before the first step ends.
  config.sample.update(num_images=4, batch_size=4, sampler="ddim", num_steps=2,
                       gif=False)
  with caplog.at_level("WARNING"):
    state = _run(tmp_path, images, config=config)
  assert int(state.step) == 1
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  # Unlike SIGTERM, the budget leaves time for the final samples.
  assert (tmp_path / "samples" / "step_00000001.png").is_file()
  assert "time budget of 0:00:00 used up: saved checkpoint at step 1" \
      in caplog.text


def test_a_fresh_run_draws_its_first_batch_once(images, tmp_path):
  config = helpers.make_config(num_steps=1, sample_every=1)
  config.sample.update(num_images=4, batch_size=4, sampler="ddim", ddim_steps=2,
                       gif=False)
  _run(tmp_path, images, config=config)
  data_png = tmp_path / "samples" / "data.png"
  with Image.open(data_png) as png:
    drawn = np.asarray(png)
  # The first batch (8 images), laid out as an 8-image sample grid.
  np.testing.assert_array_equal(drawn[..., None],
                                image_lib.data_grid(images[:8]))
  data_png.unlink()
  config.train.num_steps = 2
  _run(tmp_path, images, config=config)  # Resumes: no second data grid.
  assert (tmp_path / "samples" / "step_00000002.png").is_file()
  assert not data_png.exists()


def test_load_trained_needs_no_optimizer(uninterrupted):
  """Only the EMA parameters are read: a config with another optimizer (a
  differently shaped optimizer state) loads the same parameters."""
  workdir, reference = uninterrupted
  config = helpers.make_config()
  config.optimizer.update(weight_decay=0.1, grad_clip_norm=0.0)
  trained = inference.load_trained(config, workdir, model=helpers.tiny_model())
  assert trained.step == 6
  chex.assert_trees_all_equal(_copy(trained.params),
                              _copy(reference.ema_params))
  for leaf in jax.tree.leaves(trained.params):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(trained.mesh),
                                          leaf.ndim)


def test_load_trained_at_a_chosen_step(uninterrupted):
  workdir, reference = uninterrupted
  config = helpers.make_config()
  ckpt = checkpoint_lib.CheckpointManager(workdir / "checkpoints",
                                          writable=False)
  at4, _, _ = ckpt.restore(checkpoint_lib.abstract_like(reference),
                           checkpoint_lib.abstract_like(jax.random.PRNGKey(0)),
                           step=4)
  ckpt.close()
  trained = inference.load_trained(config, workdir, model=helpers.tiny_model(),
                                   step=4)
  assert trained.step == 4
  chex.assert_trees_all_equal(_copy(trained.params), _copy(at4.ema_params))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"checkpoints/3 is unusable: no such step"):
    inference.load_trained(config, workdir, model=helpers.tiny_model(), step=3)


def test_nonfinite_steps_stop_training(images, tmp_path):
  config = helpers.make_config(checkpoint_every=1, max_nonfinite_steps=2)
  with pytest.raises(train.NonFiniteError) as err:
    _run(tmp_path, images, config=config, nan_from=3)
  message = str(err.value)
  assert "non-finite for 2 steps in a row" in message
  assert "Stopping at step 5" in message
  assert "Last good checkpoint: step 3" in message


# ---------------------------------------------------------------------------
# 1 device vs 8 devices, jit-with-mesh vs pmap.


@pytest.mark.slow
def test_one_vs_eight_devices_and_pmap(tmp_path, images):
  out = tmp_path / "devices8.npz"
  env = helpers.subprocess_env(devices=8, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, HELPER, "devices8",
                         str(out)], env=env, capture_output=True, text=True,
                        timeout=SUBPROCESS_TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  config = helpers.make_config(batch_size=16)
  losses1, params1 = helpers.run_mesh(config, images, 3,
                                      devices=jax.devices()[:1])
  with np.load(out) as f:
    np.testing.assert_allclose(f["mesh_losses"], losses1, rtol=1e-5)
    np.testing.assert_allclose(f["pmap_losses"], losses1, rtol=1e-5)
    for k, v in params1.items():
      np.testing.assert_allclose(f["mesh" + k], v, rtol=1e-4, atol=1e-6,
                                 err_msg=k)
      np.testing.assert_allclose(f["pmap" + k], v, rtol=1e-4, atol=1e-6,
                                 err_msg=k)


# ---------------------------------------------------------------------------
# Two processes with jax.distributed (gloo CPU collectives).


@pytest.mark.slow
def test_two_processes_agree_with_one(uninterrupted, tmp_path):
  _, reference = uninterrupted
  port = host_helpers.free_port()
  workdir = tmp_path / "workdir"
  results = host_helpers.run_processes([[
      sys.executable, HELPER, "distributed",
      str(i),
      str(port),
      str(workdir),
      str(tmp_path / f"out{i}.npz")
  ] for i in range(2)], [helpers.subprocess_env(JAX_PLATFORMS="cpu")] * 2)
  for result in results:
    assert result.returncode == 0, result.stderr[-4000:]
  ref_params = helpers.flat(reference.params)
  ref_ema = helpers.flat(reference.ema_params)
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz") as f:
      assert int(f["step"]) == 6
      for k, v in ref_params.items():
        np.testing.assert_allclose(f["params" + k], v, rtol=1e-4, atol=1e-6)
      for k, v in ref_ema.items():
        np.testing.assert_allclose(f["ema" + k], v, rtol=1e-4, atol=1e-6)
  # Written collectively: one checkpoint directory with both steps kept.
  assert sorted(p.name
                for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["4", "6"]


# ---------------------------------------------------------------------------
# The real pieces: the U-Net (tiny width, dropout on) and the npz pipeline.


def _unet_config(npz_path):
  """The U-Net on the digits, read back from an npz file by the pipeline."""
  x = np.round((helpers.load_digits()[..., 0] + 1.0) * 127.5)
  np.savez(npz_path, x_train=x.astype(np.uint8), y_train=np.zeros((len(x),),
                                                                  np.int64))
  config = helpers.make_config(num_steps=4, batch_size=4, log_every=1,
                               checkpoint_every=10)
  config.data.source = f"npz:{npz_path}"
  config.model = dict(preset="tutorial", layout="ddpm", in_channels=1,
                      base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                      block_type="resnet", attention=("none", "none"),
                      mid_attention="none", num_groups=4, dropout=0.1)
  return config


@pytest.mark.slow  # ~25 s of CPU: three runs of the U-Net
def test_unet_and_npz_pipeline_resume_exactly(tmp_path):
  config = _unet_config(tmp_path / "digits.npz")
  reference = train.train_and_evaluate(config, str(tmp_path / "a"))
  assert int(reference.step) == 4

  class SigtermAfter2:
    """The real iterator; SIGTERM when batch 3 is requested."""

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      if self.count == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      self.count += 1
      return next(self.inner)

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)

  def factory(config, **kwargs):
    return SigtermAfter2(builders.build_dataset(config, **kwargs))

  interrupted = train.train_and_evaluate(config, str(tmp_path / "b"),
                                         dataset_factory=factory)
  assert int(interrupted.step) == 3  # SIGTERM while batch 3 is fetched
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
  chex.assert_trees_all_equal(_copy(resumed), _copy(reference))
