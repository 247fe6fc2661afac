"""Samplers of the reverse process: ancestral DDPM, DDIM and DDIM inversion.

Every sampler is a pure function of a denoiser `model_fn(x_t, t)`, a
`Schedule` and keyword options. The whole reverse chain runs in ONE
`lax.scan`, so `model_fn` is traced once per call whatever the number of
steps. Nothing is jitted here: wrap a sampler in your own `jax.jit`, closing
over `model_fn` and the options. Static (Python) arguments: `shape`,
`num_steps`, `spacing`, `eta`, `target`, `var_type`, `mean_form`, `clip_x0`,
`trajectory_every`; the schedule, `key` and `x_T` may be traced.

Keys: `key` is split once into (initial-noise key, chain key); step t draws
its noise from `jax.random.fold_in(chain_key, t)`, so no key is used twice.

Sharding: the samplers only see global arrays. Give `x_T` (or constrain it
with `jax.lax.with_sharding_constraint`) sharded over a mesh's 'data' axis on
the batch dimension and the chain runs data-parallel;
`ddpm_jax.generation.generate` does this.

Few-step ODE/SDE solvers (Euler, Heun, DPM-Solver++) with the same
conventions are in `ddpm_jax.solvers`, which also holds the registry of every
sampler by name; `ddpm_jax.respace` runs `ddpm_sample` over fewer steps.

Guidance composes with `model_fn`: any `(x_t, t) -> output` callable works, so
a guided denoiser is a wrapper (classifier-free guidance:
`ddpm_jax.guidance.classifier_free_guidance`). For example classifier guidance
on eps
(Dhariwal & Nichol 2021, eq. 14), for a classifier `log_p_y(x_t, t) -> [B]`:

  >>> def guided_fn(x_t, t):
  ...   grad = jax.grad(lambda x: log_p_y(x, t).sum())(x_t)
  ...   sigma = diffusion.extract(sched.sqrt_one_minus_alphas_cumprod, t,
  ...                             x_t.shape)
  ...   return model_fn(x_t, t) - scale * sigma * grad
  >>> out = ddim_sample(guided_fn, sched, shape=(8, 32, 32, 3), key=key,
  ...                   num_steps=50)

Example:
  >>> sched = schedules.make_schedule("linear", 1000)
  >>> model_fn = lambda x_t, t: unet.apply({"params": params}, x_t, t,
  ...                                       train=False)
  >>> sample = jax.jit(lambda key: ddim_sample(
  ...     model_fn, sched, shape=(16, 32, 32, 3), key=key, num_steps=50))
  >>> images = sample(jax.random.key(0)).images  # [16, 32, 32, 3]
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax._checks import check_choice
from ddpm_jax.schedules import Schedule

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")


class SampleOutput(NamedTuple):
  """Samples and, when asked for, every k-th state of the reverse chain."""
  images: jnp.ndarray  # [B, H, W, C] final samples x_0.
  # [N, B, H, W, C] states after steps k, 2k, ..., and the last; or None.
  trajectory: Optional[jnp.ndarray]
  # [N] int32 diffusion step t of each frame's state x_t (paper numbering,
  # T = pure noise, 0 = the final images); or None.
  trajectory_steps: Optional[jnp.ndarray]


# ----------------------------------------------------------------------------
# Argument checks (plain Python, before anything is traced).


def _is_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _check_int(name: str, value, *, low: int, high: Optional[int] = None):
  if not _is_int(value) or value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")


def _check_trajectory_every(trajectory_every) -> None:
  if trajectory_every is not None:
    _check_int("trajectory_every", trajectory_every, low=1)


def _check_eta(eta) -> None:
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (
      0.0 <= eta <= 1.0):
    raise ValueError(f"eta must be a Python number in [0, 1], got {eta!r}.")


def _check_start(shape, key, x_T, *, needs_key: bool) -> tuple[int, ...]:
  """Validates (shape, key, x_T) and returns the batch shape."""
  if (shape is None) == (x_T is None):
    raise ValueError("Give exactly one of shape (to draw x_T from key) and "
                     "x_T.")
  if x_T is not None:
    shape = tuple(x_T.shape)
  elif not (isinstance(shape, (tuple, list)) and len(shape) >= 2 and
            all(_is_int(d) and d >= 1 for d in shape)):
    raise ValueError("shape must be a tuple of positive integers (B, H, W, C),"
                     f" got {shape!r}.")
  if key is None and (needs_key or x_T is None):
    raise ValueError("key is required: this sampler draws "
                     + ("x_T" if x_T is None else "noise at every step") + ".")
  return tuple(int(d) for d in shape)


def _initial_state(shape, key, x_T):
  """x_T (given, or drawn from split(key)[0]) and the chain key
  split(key)[1] (None without a key)."""
  if key is None:
    return x_T, None
  init_key, chain_key = jax.random.split(key)
  if x_T is None:
    x_T = jax.random.normal(init_key, shape, jnp.float32)
  return x_T, chain_key


# ----------------------------------------------------------------------------
# The chain: one lax.scan, optionally keeping every k-th state.


def _run_chain(step: Callable[[Any, Any], Any], init, xs,
               state_steps, *, trajectory_every: Optional[int],
               image: Callable[[Any], jnp.ndarray] = lambda carry: carry,
               step_ids: Optional[np.ndarray] = None) -> SampleOutput:
  """Applies `carry = step(carry, xs[i])` for every i in one `lax.scan`.

  The carry is the state x, or any pytree holding it (`image(carry)` reads
  x). A solver step may take several scan iterations (Heun's predictor and
  corrector): `step_ids[i]` is the solver step of iteration i.

  With `trajectory_every=k` the carry also holds a buffer of
  N = ceil(S / k) frames for S solver steps: iteration i writes its state into
  frame step_ids[i] // k, so frame j ends up holding the state after solver
  step min((j + 1) k, S) - 1. Only those N states are ever stored, whether or
  not k divides S.

  Args:
    step: (carry, one slice of xs) -> next carry.
    init: the starting carry.
    xs: pytree of per-iteration inputs with leading dimension I.
    state_steps: int [S], the paper's diffusion step of the state after
      each solver step (numpy, or a jnp array when the steps depend on a
      traced schedule).
    trajectory_every: k, or None for no trajectory.
    image: carry -> the state x [B, ...].
    step_ids: int numpy [I], non-decreasing solver step of each iteration;
      None means one iteration per step (I = S).
  """
  if trajectory_every is None:
    carry, _ = jax.lax.scan(lambda c, inp: (step(c, inp), None), init, xs)
    return SampleOutput(images=image(carry), trajectory=None,
                        trajectory_steps=None)

  k = trajectory_every
  num_steps = len(state_steps)
  if step_ids is None:
    step_ids = np.arange(num_steps)
  num_frames = math.ceil(num_steps / k)
  x_init = image(init)
  frames = jnp.zeros((num_frames,) + x_init.shape, x_init.dtype)

  def body(carry, inp):
    chain, frames = carry
    frame, step_inp = inp
    chain = step(chain, step_inp)
    frames = jax.lax.dynamic_update_index_in_dim(frames, image(chain), frame,
                                                 axis=0)
    return (chain, frames), None

  (chain, frames), _ = jax.lax.scan(
      body, (init, frames),
      (jnp.asarray(np.asarray(step_ids) // k, jnp.int32), xs))
  last_step_of_frame = np.minimum((np.arange(num_frames) + 1) * k,
                                  num_steps) - 1
  return SampleOutput(
      images=image(chain), trajectory=frames,
      trajectory_steps=jnp.asarray(state_steps[last_step_of_frame],
                                   jnp.int32))


def _batch_t(t, x):
  return jnp.full((x.shape[0],), t, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# DDPM.


def ddpm_sample(model_fn: diffusion.ModelFn, schedule: Schedule, *,
                shape: Optional[tuple[int, ...]] = None,
                key: Optional[jax.Array] = None,
                x_T: Optional[jnp.ndarray] = None, target: str = "eps",
                var_type: str = "fixed_large", mean_form: str = "x0",
                clip_x0: bool = True,
                trajectory_every: Optional[int] = None) -> SampleOutput:
  """Ancestral sampling (Ho et al. 2020, Algorithm 2) over all T steps.

  x_{t-1} = mean(x_t, t) + sigma_t z with z ~ N(0, I) and no noise at the
  last step; mean and sigma come from `diffusion.p_mean_variance`.

  Args:
    model_fn: denoiser (x_t [B, H, W, C], t int32 [B]) -> [B, H, W, C], or
      [B, H, W, 2C] for learned variances. Any wrapper (guidance) fits.
    schedule: the diffusion schedule (T = `schedule.num_timesteps`).
    shape: static (B, H, W, C) of x_T ~ N(0, I) drawn from `key`; give this
      or `x_T`.
    key: PRNG key; required (the chain draws noise at every step).
    x_T: optional starting noise [B, H, W, C] instead of `shape`.
    target: what `model_fn` predicts: 'eps', 'x0' or 'v'.
    var_type: 'fixed_large', 'fixed_small', 'learned' or 'learned_range'.
    mean_form: 'x0' (posterior mean of the predicted x_0, DDPM's default) or
      'eps' (the form of Algorithm 2).
    clip_x0: clip the predicted x_0 to [-1, 1] ('x0' mean form only).
    trajectory_every: static k >= 1 to also return the state after every k
      steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(T / k) frames.

  Raises:
    ValueError: for unknown names, a bad `trajectory_every`, or a missing key
      or shape.

  Example:
    >>> out = ddpm_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                   key=jax.random.key(0), trajectory_every=100)
    >>> out.images.shape, out.trajectory.shape
    ((4, 32, 32, 3), (10, 4, 32, 32, 3))
  """
  check_choice("target", target, diffusion.TARGETS)
  check_choice("var_type", var_type, diffusion.VAR_TYPES)
  check_choice("mean_form", mean_form, diffusion.MEAN_FORMS)
  _check_trajectory_every(trajectory_every)
  shape = _check_start(shape, key, x_T, needs_key=True)
  x_T, chain_key = _initial_state(shape, key, x_T)
  num_timesteps = schedule.num_timesteps

  def step(x, t):
    tb = _batch_t(t, x)
    out = diffusion.p_mean_variance(schedule, model_fn(x, tb), x, tb,
                                    target=target, var_type=var_type,
                                    mean_form=mean_form, clip_x0=clip_x0)
    noise = jax.random.normal(jax.random.fold_in(chain_key, t), x.shape,
                              x.dtype)
    scale = jnp.where(t > 0, jnp.exp(0.5 * out.log_variance), 0.0)
    return (out.mean + scale * noise).astype(x.dtype)

  ts = np.arange(num_timesteps - 1, -1, -1)  # T-1, ..., 0.
  # After processing index t the state is the paper's x_t.
  return _run_chain(step, x_T, jnp.asarray(ts, jnp.int32), ts,
                    trajectory_every=trajectory_every)


# ----------------------------------------------------------------------------
# DDIM.


def ddim_timesteps(num_timesteps: int, num_steps: int, *,
                   spacing: str = "uniform") -> np.ndarray:
  """The S step indices in [0, T) that DDIM visits, ascending.

  As in the DDIM authors' code: 'uniform' takes every (T // S)-th step from
  0 (`range(0, T, T // S)`, cut to S steps when S does not divide T);
  'quadratic' takes int(linspace(0, sqrt(0.8 T), S) ** 2). The quadratic
  formula repeats its first steps when S is large (for T = 1000 and S = 50:
  0, 0, 1, 3, ...), which the authors' code runs as wasted no-op steps; here
  each index is raised to at least its position, which keeps S distinct,
  increasing steps (0, 1, 2, 3, ...) and leaves the rest of the sequence as
  the authors'.

  Args:
    num_timesteps: T of the schedule.
    num_steps: S, 1 <= S <= T.
    spacing: 'uniform' or 'quadratic'.

  Returns:
    int64 numpy array [S], strictly increasing, in [0, T).

  Raises:
    ValueError: for S outside [1, T] or an unknown spacing.

  Example:
    >>> ddim_timesteps(1000, 4)
    array([  0, 250, 500, 750])
  """
  _check_int("num_timesteps", num_timesteps, low=1)
  _check_int("num_steps", num_steps, low=1, high=num_timesteps)
  check_choice("spacing", spacing, SPACINGS)
  if spacing == "uniform":
    return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
  seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps)**2).astype(
      np.int64)
  return np.maximum(seq, np.arange(num_steps))


def _ddim_predictions(model_fn, schedule, x, t, *, target, clip_x0):
  """(pred_x0, pred_eps) of `model_fn` at (x, t); learned-variance outputs
  (2C channels) contribute their first C channels."""
  out = model_fn(x, t)
  channels = x.shape[-1]
  if out.shape[:-1] == x.shape[:-1] and out.shape[-1] == 2 * channels:
    out = out[..., :channels]
  elif out.shape != x.shape:
    raise ValueError(f"model output shape {out.shape} must equal x_t shape "
                     f"{x.shape} (or have twice its channels).")
  pred_x0, pred_eps = diffusion.predict_x0_eps(schedule, x, t, out,
                                               target=target)
  if clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    pred_eps = diffusion.predict_eps_from_x0(schedule, x, t, pred_x0)
  return pred_x0, pred_eps


def ddim_sample(model_fn: diffusion.ModelFn, schedule: Schedule, *,
                num_steps: int, shape: Optional[tuple[int, ...]] = None,
                key: Optional[jax.Array] = None,
                x_T: Optional[jnp.ndarray] = None, eta: float = 0.0,
                spacing: str = "uniform", target: str = "eps",
                clip_x0: bool = False,
                trajectory_every: Optional[int] = None) -> SampleOutput:
  """DDIM sampling (Song et al. 2021, eq. 12) over S of the T steps.

  For consecutive visited steps t > s (s = -1 after the first, with
  alpha-bar = 1):
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)).
  eta = 0 is the deterministic DDIM; eta = 1 matches DDPM's fixed_small
  variance on the visited steps.

  Args:
    model_fn: denoiser (x_t [B, H, W, C], t int32 [B]) -> [B, H, W, C]; an
      output with 2C channels (learned variance) is read on its first C.
    schedule: the diffusion schedule.
    num_steps: static S in [1, T].
    shape: static (B, H, W, C) of x_T ~ N(0, I) drawn from `key`; give this
      or `x_T`.
    key: PRNG key; may be None only with `x_T` given and eta = 0.
    x_T: optional starting noise [B, H, W, C] instead of `shape`.
    eta: static, in [0, 1]: the stochasticity.
    spacing: 'uniform' or 'quadratic' (see `ddim_timesteps`).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v'.
    clip_x0: clip the predicted x_0 to [-1, 1] and recompute eps from it.
      Off by default, as in the DDIM authors' code.
    trajectory_every: static k >= 1 to also return the state after every k
      steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], eta outside [0, 1], unknown names, a
      bad `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = ddim_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                   key=jax.random.key(0), num_steps=50)
    >>> x_T = ddim_invert(model_fn, sched, out.images, num_steps=50)
  """
  _check_eta(eta)
  seq = ddim_timesteps(schedule.num_timesteps, num_steps, spacing=spacing)
  check_choice("target", target, diffusion.TARGETS)
  _check_trajectory_every(trajectory_every)
  shape = _check_start(shape, key, x_T, needs_key=eta > 0)
  x_T, chain_key = _initial_state(shape, key, x_T)

  abar = schedule.alphas_cumprod
  ts = seq[::-1]  # Visited steps, descending.
  prev = np.concatenate([[-1], seq[:-1]])[::-1]  # Where each step goes.
  abar_t = abar[ts]
  abar_prev = jnp.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)

  def step(x, inp):
    t, a_t, a_prev = inp
    pred_x0, pred_eps = _ddim_predictions(model_fn, schedule, x,
                                          _batch_t(t, x), target=target,
                                          clip_x0=clip_x0)
    x_prev = jnp.sqrt(a_prev) * pred_x0
    sigma_sq = 0.0
    if eta > 0:
      sigma_sq = eta**2 * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
      noise = jax.random.normal(jax.random.fold_in(chain_key, t), x.shape,
                                x.dtype)
      x_prev = x_prev + jnp.sqrt(sigma_sq) * noise
    x_prev = x_prev + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma_sq,
                                           0.0)) * pred_eps
    return x_prev.astype(x.dtype)

  return _run_chain(step, x_T, (jnp.asarray(ts, jnp.int32), abar_t, abar_prev),
                    prev + 1, trajectory_every=trajectory_every)


def ddim_invert(model_fn: diffusion.ModelFn, schedule: Schedule,
                x0: jnp.ndarray, *, num_steps: int, spacing: str = "uniform",
                target: str = "eps") -> jnp.ndarray:
  """Deterministic DDIM encoding of images into x_T (eta = 0, run upwards).

  Visits the steps of `ddim_timesteps` in increasing order; from the state at
  level s to the next visited step t > s it applies the DDIM update with
  alpha-bars swapped,
    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat,
  with eps_hat = model_fn(x_s, t) (the noise level being moved to, as in
  common DDIM-inversion code) and x0_hat from x_s and eps_hat at level s.
  `ddim_sample(..., x_T=ddim_invert(...), eta=0)` with the same `num_steps`,
  `spacing` and `target` reconstructs `x0` up to the discretization error,
  which shrinks as S grows.

  Args:
    model_fn: denoiser as for `ddim_sample`.
    schedule: the diffusion schedule.
    x0: images [B, H, W, C] in the data range.
    num_steps: static S in [1, T].
    spacing: 'uniform' or 'quadratic'.
    target: what `model_fn` predicts: 'eps', 'x0' or 'v'.

  Returns:
    x_T [B, H, W, C], the latent at the last visited step.

  Raises:
    ValueError: for S outside [1, T] or unknown names.

  Example:
    >>> x_T = ddim_invert(model_fn, sched, images, num_steps=100)
    >>> recon = ddim_sample(model_fn, sched, x_T=x_T, num_steps=100).images
  """
  seq = ddim_timesteps(schedule.num_timesteps, num_steps, spacing=spacing)
  check_choice("target", target, diffusion.TARGETS)
  abar = schedule.alphas_cumprod
  abar_t = abar[seq]
  abar_s = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[seq[:-1]]])

  def step(x, inp):
    t, a_t, a_s = inp
    _, pred_eps = _ddim_predictions(model_fn, schedule, x, _batch_t(t, x),
                                    target=target, clip_x0=False)
    pred_x0 = (x - jnp.sqrt(1.0 - a_s) * pred_eps) / jnp.sqrt(a_s)
    return (jnp.sqrt(a_t) * pred_x0 +
            jnp.sqrt(1.0 - a_t) * pred_eps).astype(x.dtype)

  x_T, _ = jax.lax.scan(lambda x, inp: (step(x, inp), None), x0,
                        (jnp.asarray(seq, jnp.int32), abar_t, abar_s))
  return x_T
