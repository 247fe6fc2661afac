"""DDIM (Song et al. 2021): the deterministic (eta = 0) or stochastic
sampler on a subsequence of the steps, and DDIM inversion."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.samplers import chain

SPACINGS = ("uniform", "quadratic")


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
  chain.check_int("num_timesteps", num_timesteps, low=1)
  chain.check_int("num_steps", num_steps, low=1, high=num_timesteps)
  check_choice("spacing", spacing, SPACINGS)
  if spacing == "uniform":
    return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
  seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8),
                     num_steps)**2).astype(np.int64)
  return np.maximum(seq, np.arange(num_steps))


def ddim_sample(model_fn: gaussian.ModelFn, schedule: Schedule, *,
                num_steps: int, shape: Optional[tuple[int, ...]] = None,
                key: Optional[jax.Array] = None,
                x_T: Optional[jnp.ndarray] = None, eta: float = 0.0,
                spacing: str = "uniform", target: str = "eps",
                clip_x0: bool = False,
                trajectory_every: Optional[int] = None) -> chain.SampleOutput:
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
  chain.check_eta(eta)
  seq = ddim_timesteps(schedule.num_timesteps, num_steps, spacing=spacing)
  check_choice("target", target, gaussian.TARGETS)
  chain.check_trajectory_every(trajectory_every)
  shape = chain.check_start(shape, key, x_T, needs_key=eta > 0)
  x_T, chain_key = chain.initial_state(shape, key, x_T)

  abar = schedule.alphas_cumprod
  ts = seq[::-1]  # Visited steps, descending.
  prev = np.concatenate([[-1], seq[:-1]])[::-1]  # Where each step goes.
  abar_t = abar[ts]
  abar_prev = jnp.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)

  def step(x, inp):
    t, a_t, a_prev = inp
    pred_x0, pred_eps = chain.x0_eps_predictions(model_fn, schedule, x,
                                                 chain.batch_t(t, x),
                                                 target=target, clip_x0=clip_x0)
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

  return chain.run_chain(step, x_T,
                         (jnp.asarray(ts, jnp.int32), abar_t, abar_prev),
                         prev + 1, trajectory_every=trajectory_every)


def ddim_invert(model_fn: gaussian.ModelFn, schedule: Schedule, x0: jnp.ndarray,
                *, num_steps: int, spacing: str = "uniform",
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
  check_choice("target", target, gaussian.TARGETS)
  abar = schedule.alphas_cumprod
  abar_t = abar[seq]
  abar_s = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[seq[:-1]]])

  def step(x, inp):
    t, a_t, a_s = inp
    _, pred_eps = chain.x0_eps_predictions(model_fn, schedule, x,
                                           chain.batch_t(t, x), target=target,
                                           clip_x0=False)
    pred_x0 = (x - jnp.sqrt(1.0 - a_s) * pred_eps) / jnp.sqrt(a_s)
    return (jnp.sqrt(a_t) * pred_x0 + jnp.sqrt(1.0 - a_t) * pred_eps).astype(
        x.dtype)

  x_T, _ = jax.lax.scan(lambda x, inp: (step(x, inp), None), x0,
                        (jnp.asarray(seq, jnp.int32), abar_t, abar_s))
  return x_T
