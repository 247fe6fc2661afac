"""Training engine: train state, optimizer, pure train step and the train loop.

Parallelism. The default path jits `train_step` over a 1-D
`jax.sharding.Mesh` with axis 'data' spanning every device of every host:
the global batch is sharded along 'data', the train state is replicated and
donated. The same `train_step` also runs under `jax.pmap` with
`axis_name=...` (gradients and loss averaged with `lax.pmean`).

Randomness. The step key is `fold_in(rng, state.step)`. From it each example
of the *global* batch gets its own key (`split(key, global_batch)`), which
draws its t and noise. Under pmap each device takes its slice of those keys
(by `lax.axis_index`), so the jit-over-mesh path, the pmap path and any
device or host count draw exactly the same t and noise for the same example.
Dropout draws from `fold_in(step key, 1)` over the whole batch on the mesh
path (device-count independent) and additionally folds in the device index
under pmap (so pmap and mesh agree only without dropout).

Multi-host. Call `initialize_distributed()` first thing in the program (main
does); `train_and_evaluate` then builds the mesh over `jax.devices()`, each
host reads batch_size / process_count examples of its own shard and the
global batch is assembled with `jax.make_array_from_process_local_data`.
Only process 0 logs and writes TensorBoard scalars; checkpoints are written
by all processes together.

Example:
  >>> initialize_distributed()
  >>> state = train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import struct
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint as checkpoint_lib
from ddpm_jax import config_validation, generation, losses
from ddpm_jax.schedules import Schedule, make_schedule

PyTree = Any
DATA_AXIS = "data"


class NonFiniteError(RuntimeError):
  """Training stopped after too many consecutive non-finite steps."""


@struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree of arrays).

  The model and optimizer are not part of it: `train_step` gets them bound
  (see `make_train_step`), so the state checkpoints as plain arrays.
  """
  step: jax.Array  # int32 [], steps taken so far (skipped steps included).
  params: PyTree  # model parameters (param_dtype, float32 by default).
  ema_params: PyTree  # float32 EMA of params, same tree; used for sampling.
  opt_state: optax.OptState  # optimizer state (float32 moments, int counts).
  nonfinite_count: jax.Array  # int32 [], consecutive skipped steps now.


# ---------------------------------------------------------------------------
# Optimizer and EMA.


def learning_rate_schedule(opt_config, *, num_steps: int) -> optax.Schedule:
  """lr(step): linear warm-up from 0, then constant or cosine decay to 0.

  As in DDPM, lr(step) = lr * min(1, step / warmup_steps) during warm-up
  (lr(0) = 0 when warmup_steps > 0); cosine decay runs from the end of the
  warm-up to `num_steps`.

  Args:
    opt_config: `config.optimizer` (lr, warmup_steps, decay).
    num_steps: total training steps (the end of the cosine).

  Returns:
    An optax schedule (jittable function of the int step).
  """
  lr = float(opt_config.lr)
  warmup = int(opt_config.warmup_steps)
  decay = opt_config.decay
  if decay not in config_validation.DECAYS:
    raise ValueError(f"config.optimizer.decay must be one of "
                     f"{', '.join(config_validation.DECAYS)}; got {decay!r}.")
  decay_steps = max(1, num_steps - warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.ones((), jnp.float32)
    if warmup > 0:
      factor = jnp.minimum(1.0, step / warmup)
    if decay == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return lr * factor

  return schedule


def create_optimizer(opt_config, *,
                     num_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer`.

  Global-norm clipping (when grad_clip_norm > 0), then Adam (weight_decay ==
  0) or AdamW (decoupled weight decay > 0) with `learning_rate_schedule`.
  DDPM: lr 2e-4, warmup_steps 5000, grad_clip_norm 1.0, Adam.

  Args:
    opt_config: `config.optimizer` (lr, warmup_steps, grad_clip_norm,
      weight_decay, decay, b1, b2, eps).
    num_steps: total training steps.

  Returns:
    An `optax.GradientTransformation`.
  """
  lr_fn = learning_rate_schedule(opt_config, num_steps=num_steps)
  kwargs = dict(b1=float(opt_config.b1), b2=float(opt_config.b2),
                eps=float(opt_config.eps))
  if float(opt_config.weight_decay) > 0:
    opt = optax.adamw(lr_fn, weight_decay=float(opt_config.weight_decay),
                      **kwargs)
  else:
    opt = optax.adam(lr_fn, **kwargs)
  if float(opt_config.grad_clip_norm) > 0:
    return optax.chain(
        optax.clip_by_global_norm(float(opt_config.grad_clip_norm)), opt)
  return opt


def ema_decay_at(step: jax.Array, *, ema_decay: float,
                 ema_warmup: bool) -> jax.Array:
  """EMA decay at `step`: min(ema_decay, (1 + step) / (10 + step)) with
  warm-up, else ema_decay. float32 []."""
  decay = jnp.asarray(ema_decay, jnp.float32)
  if ema_warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


# ---------------------------------------------------------------------------
# State creation.


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     rng: jax.Array, *, image_shape: tuple[int, int, int]
                     ) -> TrainState:
  """A fresh train state (pure; wrap in jit / eval_shape).

  Args:
    model: a linen module called as `model.apply(variables, x, t, train=...)`.
    tx: the optimizer.
    rng: PRNG key for the parameters.
    image_shape: (H, W, C) of one image.

  Returns:
    `TrainState` at step 0 with ema_params == params.
  """
  params_rng, dropout_rng = jax.random.split(rng)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, x, t,
                         train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params),
      opt_state=tx.init(params),
      nonfinite_count=jnp.zeros((), jnp.int32))


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all, all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, *, image_shape: tuple[int, int, int],
                       mesh: Mesh) -> TrainState:
  """Initializes the state directly replicated on `mesh` (no host copy).

  The shapes are planned with `jax.eval_shape` and the state materialized by
  a jit with replicated `out_shardings`.
  """
  init_fn = functools.partial(init_train_state, model, tx,
                              image_shape=tuple(image_shape))
  abstract = jax.eval_shape(init_fn, rng)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, abstract)
  return jax.jit(init_fn, out_shardings=shardings)(rng)


# ---------------------------------------------------------------------------
# The train step.


def _draw_t_and_noise(key: jax.Array, x0: jnp.ndarray, num_timesteps: int,
                      axis_name: Optional[str]):
  """t [B] in [0, T) and noise like x0, one key per example of the global
  batch (sliced per device under pmap)."""
  local_batch = x0.shape[0]
  if axis_name is None:
    keys = jax.random.split(key, local_batch)
  else:
    num_shards = lax.axis_size(axis_name)
    keys = jax.random.split(key, local_batch * num_shards)
    keys = lax.dynamic_slice_in_dim(keys, lax.axis_index(axis_name) *
                                    local_batch, local_batch)

  def draw(k):
    t_key, noise_key = jax.random.split(k)
    t = jax.random.randint(t_key, (), 0, num_timesteps, jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape[1:], x0.dtype)
    return t, noise

  return jax.vmap(draw)(keys)


def train_step(state: TrainState, batch: dict[str, jnp.ndarray],
               rng: jax.Array, *, apply_fn: Callable[..., jnp.ndarray],
               tx: optax.GradientTransformation, schedule: Schedule,
               learning_rate_fn: optax.Schedule, loss_type: str = "l2",
               target: str = "eps", ema_decay: float = 0.9999,
               ema_warmup: bool = False,
               axis_name: Optional[str] = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the denoising loss. Pure; bind the keyword
  arguments with `make_train_step` (or `functools.partial`).

  Per example: t ~ U{0..T-1}, noise ~ N(0, I), x_t = q_sample(x0, t, noise),
  loss(model(x_t, t), target) averaged over the batch; gradients (pmean'd
  under pmap), optax update, EMA update. A step whose loss or gradient norm is
  not finite is skipped (params, EMA and optimizer state unchanged, step still
  advances) and `nonfinite_count` counts such steps in a row.

  Args:
    state: the current `TrainState`.
    batch: {'image': float [B, H, W, C] in [-1, 1], ...}; B is the global
      batch under jit (sharded by XLA) or the per-device batch under pmap.
    rng: the run's base key (the same every step).
    apply_fn: `model.apply`, called as
      `apply_fn({'params': p}, x_t, t, train=True, rngs={'dropout': k})`.
    tx: the optimizer.
    schedule: the diffusion schedule.
    learning_rate_fn: the optimizer's lr schedule (for the lr metric).
    loss_type: 'l2' (L_simple), 'l1' or 'huber'.
    target: 'eps', 'x0' or 'v'.
    ema_decay: EMA decay in [0, 1).
    ema_warmup: use min(ema_decay, (1 + step) / (10 + step)).
    axis_name: the pmap axis name, or None under jit.

  Returns:
    (new state, metrics): float32 scalars 'loss', 'grad_norm', 'lr',
    'ema_decay', and int32 'skipped' (1 when this step was skipped) and
    'nonfinite_count'.
  """
  x0 = batch["image"]
  step_key = jax.random.fold_in(rng, state.step)
  noise_key, dropout_key = jax.random.split(step_key)
  t, noise = _draw_t_and_noise(noise_key, x0, schedule.num_timesteps,
                               axis_name)
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))

  def loss_fn(params):
    def model_fn(x_t, steps):
      return apply_fn({"params": params}, x_t, steps, train=True,
                      rngs={"dropout": dropout_key})

    per_example = losses.denoising_loss(model_fn, schedule, x0, t, noise,
                                        loss_type=loss_type, target=target)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if axis_name is not None:
    loss, grads = lax.pmean((loss, grads), axis_name)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                           for g in jax.tree.leaves(grads)))
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay=ema_decay, ema_warmup=ema_warmup)
  new_ema = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
      state.ema_params, new_params)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  nonfinite_count = jnp.where(finite, 0, state.nonfinite_count + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt_state, state.opt_state),
      nonfinite_count=nonfinite_count.astype(jnp.int32))
  metrics = {
      "loss": loss.astype(jnp.float32),
      "grad_norm": grad_norm.astype(jnp.float32),
      "lr": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
      "ema_decay": decay,
      "skipped": (~finite).astype(jnp.int32),
      "nonfinite_count": nonfinite_count.astype(jnp.int32),
  }
  return new_state, metrics


def make_schedule_from_config(diffusion_config) -> Schedule:
  """The `Schedule` of `config.diffusion`."""
  return make_schedule(diffusion_config.schedule,
                       int(diffusion_config.num_timesteps),
                       beta_start=float(diffusion_config.beta_start),
                       beta_end=float(diffusion_config.beta_end))


def make_train_step(config, model: nn.Module, tx: optax.GradientTransformation,
                    *, axis_name: Optional[str] = None,
                    schedule: Optional[Schedule] = None) -> Callable:
  """`train_step` with model, optimizer and loss settings of `config` bound.

  Returns:
    `step(state, batch, rng) -> (state, metrics)`; jit it with
    `jit_train_step`, or `jax.pmap(..., axis_name=axis_name)` it.
  """
  if schedule is None:
    schedule = make_schedule_from_config(config.diffusion)
  return functools.partial(
      train_step, apply_fn=model.apply, tx=tx, schedule=schedule,
      learning_rate_fn=learning_rate_schedule(
          config.optimizer, num_steps=int(config.train.num_steps)),
      loss_type=config.diffusion.loss_type, target=config.diffusion.target,
      ema_decay=float(config.train.ema_decay),
      ema_warmup=bool(config.train.ema_warmup), axis_name=axis_name)


def jit_train_step(step_fn: Callable, mesh: Mesh,
                   state: PyTree) -> Callable:
  """jits `step_fn` for `mesh`: batch sharded on 'data', state replicated and
  donated, rng and metrics replicated.

  Args:
    step_fn: `step(state, batch, rng)`, e.g. from `make_train_step`.
    mesh: the mesh.
    state: the (abstract or concrete) state, for the sharding tree.
  """
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(DATA_AXIS))
  state_shardings = jax.tree.map(lambda _: replicated, state)
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, data, replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------
# Multi-host.


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process launch.

  Must run before any other JAX call. Multi-process is recognised from the
  arguments, or the environment: JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (explicit launch), a multi-host Cloud
  TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), SLURM_NTASKS > 1 or
  OMPI_COMM_WORLD_SIZE > 1 (JAX detects the rest). CPU collectives use gloo,
  so CPU-only hosts can train together too. Single-process launches do
  nothing.

  Returns:
    True when `jax.distributed.initialize` was called.
  """
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  explicit = coordinator_address is not None and num_processes is not None
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
           if h]
  detected = (len(hosts) > 1 or (_env_int("SLURM_NTASKS") or 1) > 1 or
              (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)
  if not explicit and not detected:
    return False
  if explicit and num_processes <= 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed initialized: process %d of %d.",
               jax.process_index(), jax.process_count())
  return True


def _host_value(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy, from a local copy."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


# ---------------------------------------------------------------------------
# The train loop.


def _default_dataset(config, *, batch_size: int, process_index: int,
                     process_count: int) -> Iterator[dict[str, np.ndarray]]:
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  return input_pipeline.create_dataset(
      data.source, split=data.split, batch_size=batch_size,
      image_size=data.image_size, channels=data.channels,
      resize=data.get("resize", False), random_flip=data.random_flip,
      seed=config.seed, shuffle=True,
      repeat=True, process_index=process_index, process_count=process_count,
      skip_bad_files=data.get("skip_bad_files", False))


def create_model(config) -> nn.Module:
  """The U-Net of `config.model` (a preset name plus field overrides)."""
  # Imported here: importing the models touches the XLA backend, which must
  # wait for `initialize_distributed`.
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  return models.UNet(config=config_validation.model_config(config))


def restore_ema_params(config, workdir: str, *, model: nn.Module,
                       mesh: Mesh) -> tuple[PyTree, int]:
  """The EMA parameters of the latest checkpoint in `<workdir>/checkpoints`.

  Args:
    config: the run config the checkpoint was trained with.
    workdir: the training workdir.
    model: the network (from `create_model(config)`).
    mesh: the mesh to restore onto (replicated).

  Returns:
    (ema_params replicated on `mesh`, the checkpoint's step).

  Raises:
    FileNotFoundError: naming the directory, when it holds no checkpoint.
    checkpoint_lib.CheckpointError: checkpoints exist but none is usable.
  """
  directory = os.path.join(os.fspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"No checkpoint in {directory}: train first with --mode=train and "
        "this --workdir.")
  tx = create_optimizer(config.optimizer, num_steps=int(config.train.num_steps))
  image_shape = (int(config.data.image_size), int(config.data.image_size),
                 int(config.data.channels))
  replicated = NamedSharding(mesh, P())
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(functools.partial(
      init_train_state, model, tx, image_shape=image_shape), rng)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  with checkpoint_lib.CheckpointManager(directory, writable=False) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
          f"No checkpoint in {directory}: train first with --mode=train and "
          "this --workdir.")
    # Skips incomplete or corrupt steps (with a warning) like training does.
    step, state, _, _ = ckpt.restore_newest_valid(
        checkpoint_lib.abstract_like(abstract, shardings),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))
  return state.ema_params, step


class _PreemptionFlag:
  """Sets itself on SIGTERM (main thread only), restores the old handler."""

  def __init__(self):
    self.value = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.value = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _sync_flag(flag: bool) -> bool:
  """True on every process when `flag` is True on any."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.array([flag], np.int32))
  return bool(np.asarray(flags).any())


def train_and_evaluate(config, workdir: str, *,
                       model: Optional[nn.Module] = None,
                       dataset_factory: Optional[Callable[..., Any]] = None
                       ) -> TrainState:
  """Trains (resuming from `workdir` when it holds a checkpoint).

  Checkpoints go to `<workdir>/checkpoints` every `train.checkpoint_every`
  steps, at the end, and on SIGTERM (then the function returns early);
  TensorBoard scalars to `workdir` (process 0). Call
  `initialize_distributed()` before, on multi-host launches.

  Args:
    config: the run config (seed, data, model, diffusion, optimizer, train).
    workdir: directory for checkpoints and TensorBoard events.
    model: the network; default `models.UNet(models.unet_config(**config.model))`.
    dataset_factory: `f(config, *, batch_size, process_index, process_count)`
      returning this host's iterator of {'image': [b, H, W, C]} batches with
      `get_state()` / `set_state()`; default `input_pipeline.create_dataset`.

  Returns:
    The final `TrainState` (replicated over the mesh).

  Raises:
    ValueError: a bad config field (before anything is compiled).
    NonFiniteError: `train.max_nonfinite_steps` non-finite steps in a row.
    checkpoint_lib.CheckpointError: the workdir holds checkpoints but none
      is usable (broken newer ones are skipped in favour of older ones).
  """
  config_validation.validate_train_config(
      config, num_devices=jax.device_count(),
      process_count=jax.process_count())
  tcfg = config.train
  num_steps = int(tcfg.num_steps)
  global_batch = int(tcfg.batch_size)
  process_count, process_index = jax.process_count(), jax.process_index()
  host_batch = global_batch // process_count
  is_chief = process_index == 0
  image_shape = (int(config.data.image_size), int(config.data.image_size),
                 int(config.data.channels))
  if str(config.diffusion.get("var_type", "fixed_large")).startswith(
      "learned"):
    logging.warning("var_type %r: only the mean prediction (first C channels)"
                    " is trained; the variance channels get no loss.",
                    config.diffusion.var_type)

  mesh = create_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P(DATA_AXIS))
  model = create_model(config) if model is None else model
  tx = create_optimizer(config.optimizer, num_steps=num_steps)
  # Made on the mesh by jit: identical and replicated on every process.
  # Three independent streams: parameters, train steps, sample grids.
  init_rng, train_rng, sample_rng = jax.jit(
      lambda: tuple(jax.random.split(jax.random.PRNGKey(config.seed), 3)),
      out_shardings=(replicated,) * 3)()
  init_fn = functools.partial(init_train_state, model, tx,
                              image_shape=image_shape)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)

  workdir = os.fspath(workdir)
  ckpt = checkpoint_lib.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=int(tcfg.keep_checkpoints))
  dataset_factory = dataset_factory or _default_dataset
  ds = dataset_factory(config, batch_size=host_batch,
                       process_index=process_index,
                       process_count=process_count)

  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)(init_rng)
    rng = train_rng
    last_saved = None
  else:
    # The newest complete, verified checkpoint; broken newer ones are
    # skipped with a warning (CheckpointError when none is usable).
    latest, state, rng, data_state = ckpt.restore_newest_valid(
        checkpoint_lib.abstract_like(abstract_state, state_shardings),
        jax.ShapeDtypeStruct(train_rng.shape, train_rng.dtype,
                             sharding=replicated))
    if data_state is not None and hasattr(ds, "set_state"):
      ds.set_state(data_state)
    else:
      logging.warning("Checkpoint %d has no input-pipeline position for this "
                      "process; the data restarts from the beginning.", latest)
    last_saved = latest
    if is_chief:
      logging.info("Resumed from checkpoint step %d in %s.", latest,
                   ckpt.directory)
  step = int(_host_value(state.step))
  if is_chief:
    logging.info("Training %d steps from step %d: global batch %d over %d "
                 "devices (%d processes), %d parameters.", num_steps, step,
                 global_batch, jax.device_count(), process_count,
                 sum(x.size for x in jax.tree.leaves(abstract_state.params)))

  schedule = make_schedule_from_config(config.diffusion)
  sample_every = int(tcfg.sample_every)
  p_train_step = jit_train_step(
      make_train_step(config, model, tx, schedule=schedule), mesh,
      abstract_state)
  writer = None
  if is_chief:
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      writer = tensorboardX.SummaryWriter(workdir)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard scalars.")

  max_nonfinite = int(tcfg.max_nonfinite_steps)
  log_every, ckpt_every = int(tcfg.log_every), int(tcfg.checkpoint_every)

  def save(at_step, metrics):
    nonlocal last_saved
    ckpt.save(at_step, state, rng,
              data_state=ds.get_state() if hasattr(ds, "get_state") else None)
    if metrics is None or int(_host_value(metrics["nonfinite_count"])) == 0:
      last_saved = at_step

  def check_finite(at_step, metrics):
    if max_nonfinite <= 0 or metrics is None:
      return
    count = int(_host_value(metrics["nonfinite_count"]))
    if count >= max_nonfinite:
      ckpt.close()
      if writer is not None:
        writer.close()
      raise NonFiniteError(
          f"Stopping at step {at_step}: the loss or gradient norm was "
          f"non-finite for {count} steps in a row (train.max_nonfinite_steps"
          f" = {max_nonfinite}); those updates were skipped. Last good "
          f"checkpoint: "
          + (f"step {last_saved} in {ckpt.directory}." if last_saved is not None
             else "none (no checkpoint was written before)."))

  metrics = prev_metrics = None
  timer_step, timer_start = step, None
  preempted = False
  # A progress bar only for a person watching a terminal.
  progress = tqdm.tqdm(total=num_steps, initial=step, unit="step",
                       dynamic_ncols=True,
                       disable=not (is_chief and sys.stderr.isatty()))
  with _PreemptionFlag() as sigterm, progress:
    while step < num_steps:
      batch = next(ds)
      images = np.asarray(batch["image"], np.float32)
      if images.shape != (host_batch,) + image_shape:
        raise ValueError(f"The input pipeline gave images of shape "
                         f"{images.shape}; expected {(host_batch,) + image_shape}.")
      global_images = jax.make_array_from_process_local_data(
          data_sharding, images, (global_batch,) + image_shape)
      state, metrics = p_train_step(state, {"image": global_images}, rng)
      step += 1
      progress.update(1)
      if timer_start is None:  # Excludes the first step's compilation.
        timer_step, timer_start = step, time.time()
      # Checks the previous step, so one step stays in flight.
      check_finite(step - 1, prev_metrics)
      prev_metrics = metrics

      if step % log_every == 0 or step == num_steps:
        host = {k: float(_host_value(v)) for k, v in metrics.items()}
        elapsed = time.time() - timer_start
        steps_per_sec = (step - timer_step) / elapsed if elapsed > 0 else 0.0
        host["images_per_sec"] = steps_per_sec * global_batch
        if is_chief:
          eta = ((num_steps - step) / steps_per_sec if steps_per_sec > 0
                 else float("nan"))
          logging.info(
              "step %d/%d: loss %.5f, grad_norm %.4f, lr %.3g, %.1f images/s,"
              " ETA %s%s", step, num_steps, host["loss"], host["grad_norm"],
              host["lr"], host["images_per_sec"], _format_seconds(eta),
              f", {int(host['nonfinite_count'])} non-finite steps in a row"
              if host["nonfinite_count"] else "")
          if writer is not None:
            for name, value in host.items():
              writer.add_scalar(f"train/{name}", value, step)
            writer.flush()
        if process_count > 1:
          preempted = _sync_flag(sigterm.value)
      if process_count == 1:
        preempted = sigterm.value

      if step % ckpt_every == 0 or step == num_steps or preempted:
        save(step, metrics)
      final = step == num_steps
      # Not on SIGTERM: the grace period is for the checkpoint.
      if sample_every and not preempted and (final or
                                             step % sample_every == 0):
        generation.save_training_samples(
            model, state.ema_params, schedule, config, step=step,
            workdir=workdir, key=sample_rng, mesh=mesh,
            gif=final and bool(config.sample.gif))
      if preempted:
        if is_chief:
          logging.warning("SIGTERM: saved checkpoint at step %d in %s; "
                          "stopping.", step, ckpt.directory)
        break
    check_finite(step, metrics)

  ckpt.close()
  if writer is not None:
    writer.close()
  return state


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"
