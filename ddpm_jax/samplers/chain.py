"""The core every sampler shares: its output, argument checks, the start of
the chain and the one `lax.scan` that runs it.

Samplers are built from these pieces: check the arguments (`check_start`,
`check_int`, ...), draw x_T (`initial_state`), write one step
`step(carry, inputs) -> carry` and run it with `run_chain`, which also keeps
every k-th state when a trajectory is asked for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import gaussian, processes


class SampleOutput(NamedTuple):
  """Samples and, when asked for, every k-th state of the reverse chain."""
  images: jnp.ndarray  # [B, H, W, C] final samples x_0.
  # [N, B, H, W, C] states after steps k, 2k, ..., and the last; or None.
  trajectory: Optional[jnp.ndarray]
  # [N] int32 diffusion step t of each frame's state x_t (paper numbering,
  # T = pure noise, 0 = the final images); float32 times on a continuous
  # process (`ddpm_jax.diffusion.processes`); or None.
  trajectory_steps: Optional[jnp.ndarray]


# ----------------------------------------------------------------------------
# Argument checks (plain Python, before anything is traced).


def is_int(value) -> bool:
  """True for a Python or numpy integer (not a bool)."""
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_int(name: str, value, *, low: int, high: Optional[int] = None):
  """Raises ValueError unless `value` is an integer in [low, high]."""
  if not is_int(value) or value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")


def check_trajectory_every(trajectory_every) -> None:
  """Raises ValueError unless `trajectory_every` is None or an integer >= 1."""
  if trajectory_every is not None:
    check_int("trajectory_every", trajectory_every, low=1)


def check_eta(eta) -> None:
  """Raises ValueError unless `eta` is a Python number in [0, 1]."""
  if isinstance(
      eta,
      bool) or not isinstance(eta, numbers.Real) or not (0.0 <= eta <= 1.0):
    raise ValueError(f"eta must be a Python number in [0, 1], got {eta!r}.")


def check_start(shape, key, x_T, *, needs_key: bool) -> tuple[int, ...]:
  """Validates (shape, key, x_T) and returns the batch shape."""
  if (shape is None) == (x_T is None):
    raise ValueError("Give exactly one of shape (to draw x_T from key) and "
                     "x_T.")
  if x_T is not None:
    shape = tuple(x_T.shape)
  elif not (isinstance(shape, (tuple, list)) and len(shape) >= 2 and
            all(is_int(d) and d >= 1 for d in shape)):
    raise ValueError("shape must be a tuple of positive integers (B, H, W, C),"
                     f" got {shape!r}.")
  if key is None and (needs_key or x_T is None):
    raise ValueError("key is required: this sampler draws " +
                     ("x_T" if x_T is None else "noise at every step") + ".")
  return tuple(int(d) for d in shape)


def prior_std(schedule) -> float:
  """Std of the starting noise x_T: 1 on a `Schedule`, else the continuous
  process's `prior_std` (sigma_max on EDM)."""
  return getattr(schedule, "prior_std", 1.0)


def initial_state(shape, key, x_T, *, std: float = 1.0):
  """x_T (given, or drawn as std N(0, I) from split(key)[0]) and the chain
  key split(key)[1] (None without a key)."""
  if key is None:
    return x_T, None
  init_key, chain_key = jax.random.split(key)
  if x_T is None:
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    if std != 1.0:
      x_T = std * x_T
  return x_T, chain_key


# ----------------------------------------------------------------------------
# The chain: one lax.scan, optionally keeping every k-th state.


def run_chain(step: Callable[[Any, Any], Any], init, xs, state_steps, *,
              trajectory_every: Optional[int],
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
  last_step_of_frame = np.minimum(
      (np.arange(num_frames) + 1) * k, num_steps) - 1
  frame_steps = jnp.asarray(state_steps[last_step_of_frame])
  if jnp.issubdtype(frame_steps.dtype, jnp.integer):
    frame_steps = frame_steps.astype(jnp.int32)
  return SampleOutput(images=image(chain), trajectory=frames,
                      trajectory_steps=frame_steps)


def batch_t(t, x):
  """Step `t` as int32 [B], one per example of x [B, ...]."""
  return jnp.full((x.shape[0],), t, dtype=jnp.int32)


def x0_eps_predictions(model_fn, schedule, x, t, *, target, clip_x0):
  """(pred_x0, pred_eps) of `model_fn` at (x, t); learned-variance outputs
  (2C channels) contribute their first C channels."""
  out = model_fn(x, t)
  channels = x.shape[-1]
  if out.shape[:-1] == x.shape[:-1] and out.shape[-1] == 2 * channels:
    out = out[..., :channels]
  elif out.shape != x.shape:
    raise ValueError(f"model output shape {out.shape} must equal x_t shape "
                     f"{x.shape} (or have twice its channels).")
  pred_x0, pred_eps = gaussian.predict_x0_eps(schedule, x, t, out,
                                              target=target)
  if clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    pred_eps = gaussian.predict_eps_from_x0(schedule, x, t, pred_x0)
  return pred_x0, pred_eps


def process_predictions(model_fn, process, x, t, *, target, clip_x0):
  """(pred_x0, pred_eps) of `model_fn(x, t float32 [B])` on a continuous
  process at the scalar time t; optionally with x0 clipped to [-1, 1] (and
  eps recomputed from it)."""
  t = jnp.full((x.shape[0],), t, jnp.float32)
  out = model_fn(x, t)
  if out.shape != x.shape:
    raise ValueError(f"model output shape {out.shape} must equal x_t shape "
                     f"{x.shape}.")
  pred_x0, pred_eps = processes.predict_x0_eps(process, x, t, out,
                                               target=target)
  if clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    alpha, sigma = (
        a.reshape((-1,) + (1,) * (x.ndim - 1)) for a in process.alpha_sigma(t))
    pred_eps = (x - alpha * pred_x0) / sigma
  return pred_x0.astype(x.dtype), pred_eps.astype(x.dtype)
