"""The train state, the pure train step and its jit over the 'data' mesh.

`train_step(state, batch, rng)` is pure: jit it over a mesh with
`jit_train_step` (batch sharded along 'data', state replicated, or sharded
along 'fsdp' on a mesh with that axis (`parallel.create_mesh(fsdp=n)`), and
donated)
or run it under `jax.pmap(..., axis_name=...)` (gradients and loss averaged
with `lax.pmean`). Both draw the same t, noise and label dropout for the same
example: the step key is `fold_in(rng, state.step)`; split, it gives the t
and noise stream (0) and the network-dropout stream (1), and
`fold_in(step key, 2)` is the label-dropout stream. From the t/noise and
label streams each example of the *global* batch gets its own key; under
pmap each device takes its slice of those keys by `lax.axis_index`. Network
dropout draws over the whole batch on the mesh path (device-count
independent) and also folds in the device index under pmap, so pmap and mesh
agree only without network dropout.

Class-conditional models (`num_classes` = C > 0) are called with
`y=labels`, each label replaced by the null class C with probability
`p_uncond` (classifier-free guidance training); learned variances train
L_hybrid (`losses.hybrid_loss`).

Example:
  >>> tx = optim.create_optimizer(lr=2e-4, warmup_steps=0, num_steps=1000)
  >>> state = create_train_state(model, tx, rng, image_shape=(32, 32, 3),
  ...                            mesh=mesh)
  >>> step = jit_train_step(make_train_step(model, tx, schedule), mesh,
  ...                       state)
  >>> state, metrics = step(state, {"image": images}, rng)
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, guidance, losses, processes
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.engine import optim
from ddpm_jax.infra import parallel
from ddpm_jax.typing import PyTree


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


def _label_kwargs(labels: Optional[jnp.ndarray]) -> dict[str, jnp.ndarray]:
  """The model's keyword arguments for class labels (none if None)."""
  return {} if labels is None else {"y": labels}


def init_params(model: nn.Module, rng: jax.Array, *,
                image_shape: tuple[int, int,
                                   int], num_classes: int = 0) -> PyTree:
  """The model's initial parameters for images of `image_shape` (pure);
  with `num_classes` > 0 the model is class-conditional (called with y)."""
  params_rng, dropout_rng = jax.random.split(rng)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if num_classes else None
  return model.init({
      "params": params_rng,
      "dropout": dropout_rng
  }, x, t, train=False, **_label_kwargs(labels))["params"]


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     rng: jax.Array, *, image_shape: tuple[int, int, int],
                     num_classes: int = 0) -> TrainState:
  """A fresh train state (pure; wrap in jit / eval_shape).

  Args:
    model: a linen module called as `model.apply(variables, x, t, train=...)`
      (and `y=labels` when class-conditional).
    tx: the optimizer.
    rng: PRNG key for the parameters.
    image_shape: (H, W, C) of one image.
    num_classes: C > 0 for a class-conditional model; 0 otherwise.

  Returns:
    `TrainState` at step 0 with ema_params == params.
  """
  params = init_params(model, rng, image_shape=image_shape,
                       num_classes=num_classes)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params),
      opt_state=tx.init(params), nonfinite_count=jnp.zeros((), jnp.int32))


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, *,
                         image_shape: tuple[int, int, int], mesh: Mesh,
                         num_classes: int = 0) -> TrainState:
  """The train state's shapes, replicated on `mesh`, or sharded along its
  'fsdp' axis if it has one (`parallel.fsdp_abstract`; nothing computed)."""
  init_fn = functools.partial(init_train_state, model, tx,
                              image_shape=tuple(image_shape),
                              num_classes=num_classes)
  return parallel.fsdp_abstract(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32),
                                mesh=mesh)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, *, image_shape: tuple[int, int, int],
                       mesh: Mesh, num_classes: int = 0) -> TrainState:
  """Initializes the state directly on `mesh` (no host copy), replicated or
  sharded along 'fsdp' as `abstract_train_state`: shapes planned with
  `jax.eval_shape`, then a jit with `out_shardings`."""
  init_fn = functools.partial(init_train_state, model, tx,
                              image_shape=tuple(image_shape),
                              num_classes=num_classes)
  abstract = parallel.fsdp_abstract(init_fn, rng, mesh=mesh)
  return jax.jit(init_fn, out_shardings=parallel.shardings(abstract))(rng)


def _example_keys(key: jax.Array, local_batch: int,
                  axis_name: Optional[str]) -> jax.Array:
  """One key per example of the global batch, split from `key`; under pmap
  this device's slice of them."""
  if axis_name is None:
    return jax.random.split(key, local_batch)
  num_shards = lax.axis_size(axis_name)
  keys = jax.random.split(key, local_batch * num_shards)
  return lax.dynamic_slice_in_dim(keys,
                                  lax.axis_index(axis_name) * local_batch,
                                  local_batch)


def _draw_t_and_noise(key: jax.Array, x0: jnp.ndarray, num_timesteps: int,
                      axis_name: Optional[str]):
  """t [B] in [0, T) and noise like x0, one key per example of the global
  batch (sliced per device under pmap)."""

  def draw(k):
    t_key, noise_key = jax.random.split(k)
    t = jax.random.randint(t_key, (), 0, num_timesteps, jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape[1:], x0.dtype)
    return t, noise

  return jax.vmap(draw)(_example_keys(key, x0.shape[0], axis_name))


def _draw_time_and_noise(key: jax.Array, x0: jnp.ndarray, process,
                         axis_name: Optional[str]):
  """As `_draw_t_and_noise` on a continuous process: t float32 [B] from
  `process.sample_t`."""

  def draw(k):
    t_key, noise_key = jax.random.split(k)
    t = process.sample_t(t_key, 1)[0]
    noise = jax.random.normal(noise_key, x0.shape[1:], x0.dtype)
    return t, noise

  return jax.vmap(draw)(_example_keys(key, x0.shape[0], axis_name))


def drop_batch_labels(key: jax.Array, labels: jnp.ndarray, *, p_uncond: float,
                      num_classes: int,
                      axis_name: Optional[str] = None) -> jnp.ndarray:
  """Label dropout of a training batch with one key per example of the
  global batch, so a pmap over devices drops the same labels as one jit.

  Args:
    key: the step's label-dropout key.
    labels: int [B] in [0, num_classes): the global batch, or this device's
      slice of it under pmap.
    p_uncond: probability in [0, 1] that a label becomes the null class.
    num_classes: C; the null class is C.
    axis_name: the pmap axis name, or None.

  Returns:
    int [B]: `guidance.drop_labels` of each label with its example's key.

  Example:
    >>> y = drop_batch_labels(key, batch["label"], p_uncond=0.1,
    ...                       num_classes=10)
  """

  def drop(k, label):
    return guidance.drop_labels(label[None], k, p_uncond=p_uncond,
                                num_classes=num_classes)[0]

  return jax.vmap(drop)(_example_keys(key, labels.shape[0], axis_name), labels)


def train_step(
    state: TrainState, batch: dict[str, jnp.ndarray], rng: jax.Array, *,
    apply_fn: Callable[..., jnp.ndarray], tx: optax.GradientTransformation,
    schedule: Schedule, learning_rate_fn: optax.Schedule, loss_type: str = "l2",
    target: str = "eps", t_weights: Optional[jnp.ndarray] = None,
    var_type: str = "fixed_large", num_classes: int = 0, p_uncond: float = 0.0,
    ema_decay: float = 0.9999, ema_warmup: bool = False,
    axis_name: Optional[str] = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the denoising loss. Pure; bind the keyword
  arguments with `make_train_step` (or `functools.partial`).

  Per example: t ~ U{0..T-1}, noise ~ N(0, I), x_t = q_sample(x0, t, noise),
  loss(model(x_t, t), target) (times t_weights[t]; L_hybrid for learned
  variances) averaged over the batch; on a continuous process (`schedule` an
  `EDM` or `Flow`) t from `schedule.sample_t` and `losses.process_loss` of
  the network wrapped by `processes.network_model_fn`; gradients (pmean'd
  under pmap), optax update, EMA update. A step whose loss or gradient norm is not finite is
  skipped (params, EMA and optimizer state unchanged, step still advances)
  and `nonfinite_count` counts such steps in a row.

  Args:
    state: the current `TrainState`.
    batch: {'image': float [B, H, W, C] in [-1, 1], 'label': int [B] (read
      when class-conditional), ...}; B is the global batch under jit
      (sharded by XLA) or the per-device batch under pmap.
    rng: the run's base key (the same every step).
    apply_fn: `model.apply`, called as
      `apply_fn({'params': p}, x_t, t, train=True, rngs={'dropout': k})`,
      with `y=labels` as well when class-conditional.
    tx: the optimizer.
    schedule: the diffusion schedule, or a continuous process
      (`processes.EDM`, `processes.Flow`).
    learning_rate_fn: the optimizer's lr schedule (for the lr metric).
    loss_type: 'l2' (L_simple), 'l1' or 'huber'.
    target: 'eps', 'x0' or 'v' ('x0' on EDM; 'velocity', 'x0', 'v' on flow).
    t_weights: optional per-step loss weights [T] (`losses.loss_weights`;
      ddpm process only).
    var_type: the model's variance; 'learned' and 'learned_range' train
      L_hybrid (`losses.hybrid_loss`, x0 on the 8-bit grid), the fixed ones
      the denoising loss alone.
    num_classes: C > 0 for a class-conditional model (labels in [0, C), the
      null class C); 0 for an unconditional one (labels unused).
    p_uncond: probability in [0, 1] that a label becomes the null class.
    ema_decay: EMA decay in [0, 1).
    ema_warmup: use min(ema_decay, (1 + step) / (10 + step)).
    axis_name: the pmap axis name, or None under jit.

  Returns:
    (new state, metrics): float32 scalars 'loss', 'grad_norm', 'lr',
    'ema_decay', and int32 'skipped' (1 when this step was skipped) and
    'nonfinite_count'.
  """
  check_choice("var_type", var_type, gaussian.VAR_TYPES)
  continuous = not isinstance(schedule, Schedule)
  if continuous and (t_weights is not None or var_type != "fixed_large"):
    raise ValueError("t_weights and learned variances apply to the ddpm "
                     "process only.")
  x0 = batch["image"]
  step_key = jax.random.fold_in(rng, state.step)
  noise_key, dropout_key = jax.random.split(step_key)
  if continuous:
    t, noise = _draw_time_and_noise(noise_key, x0, schedule, axis_name)
  else:
    t, noise = _draw_t_and_noise(noise_key, x0, schedule.num_timesteps,
                                 axis_name)
  labels = None
  if num_classes:
    labels = drop_batch_labels(jax.random.fold_in(step_key, 2), batch["label"],
                               p_uncond=p_uncond, num_classes=num_classes,
                               axis_name=axis_name)
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))
  options = dict(loss_type=loss_type, target=target, t_weights=t_weights)

  def loss_fn(params):

    def model_fn(x_t, steps):
      return apply_fn({"params": params}, x_t, steps, train=True,
                      rngs={"dropout": dropout_key}, **_label_kwargs(labels))

    if continuous:
      per_example = losses.process_loss(
          processes.network_model_fn(schedule, model_fn), schedule, x0, t,
          noise, target=target, loss_type=loss_type)
    elif var_type in losses.LEARNED_VAR_TYPES:
      per_example = losses.hybrid_loss(model_fn, schedule, x0, t, noise,
                                       var_type=var_type, **options).loss
    else:
      per_example = losses.denoising_loss(model_fn, schedule, x0, t, noise,
                                          **options)
    return jnp.mean(per_example)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if axis_name is not None:
    loss, grads = lax.pmean((loss, grads), axis_name)
  grad_norm = jnp.sqrt(
      sum(
          jnp.sum(jnp.square(g.astype(jnp.float32)))
          for g in jax.tree.leaves(grads)))
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  decay = optim.ema_decay_at(state.step, ema_decay=ema_decay,
                             ema_warmup=ema_warmup)
  new_ema = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
      state.ema_params, new_params)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                       new, old)
  nonfinite_count = jnp.where(finite, 0, state.nonfinite_count + 1)
  new_state = state.replace(step=state.step + 1,
                            params=keep(new_params, state.params),
                            ema_params=keep(new_ema, state.ema_params),
                            opt_state=keep(new_opt_state, state.opt_state),
                            nonfinite_count=nonfinite_count.astype(jnp.int32))
  metrics = {
      "loss": loss.astype(jnp.float32),
      "grad_norm": grad_norm,
      "lr": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
      "ema_decay": decay,
      "skipped": (~finite).astype(jnp.int32),
      "nonfinite_count": nonfinite_count.astype(jnp.int32),
  }
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Schedule, *, learning_rate_fn: optax.Schedule,
                    **options) -> Callable:
  """`train_step` with the model, optimizer, schedule and `options` (the
  keyword options of `train_step`: loss_type, target, t_weights, var_type,
  num_classes, p_uncond, ema_decay, ema_warmup, axis_name) bound.

  Returns:
    `step(state, batch, rng) -> (state, metrics)`; jit it with
    `jit_train_step`, or `jax.pmap(..., axis_name=axis_name)` it.
  """
  return functools.partial(train_step, apply_fn=model.apply, tx=tx,
                           schedule=schedule, learning_rate_fn=learning_rate_fn,
                           **options)


def jit_train_step(step_fn: Callable, mesh: Mesh, state: PyTree) -> Callable:
  """jits `step_fn` for `mesh`: batch sharded on 'data' (`parallel.
  data_sharded`), state donated and kept in its shardings, rng and metrics
  replicated.

  Args:
    step_fn: `step(state, batch, rng)`, e.g. from `make_train_step`.
    mesh: the mesh.
    state: the (abstract or concrete) state, for the sharding tree: each
      leaf's `NamedSharding` on `mesh` (from `abstract_train_state` or
      `create_train_state`, FSDP or replicated); a leaf with none, or with
      another sharding, is replicated.
  """
  replicated = parallel.replicated(mesh)

  def sharding_of(leaf):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding,
                  jax.sharding.NamedSharding) and sharding.mesh == mesh:
      return sharding
    return replicated

  state_shardings = jax.tree.map(sharding_of, state)
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, parallel.data_sharded(mesh), replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
