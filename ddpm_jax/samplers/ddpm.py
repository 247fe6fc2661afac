"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) over every step of
a schedule (respace it for fewer steps, `ddpm_jax.diffusion.respace`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.samplers import chain


def ddpm_sample(model_fn: gaussian.ModelFn, schedule: Schedule, *,
                shape: Optional[tuple[int, ...]] = None,
                key: Optional[jax.Array] = None,
                x_T: Optional[jnp.ndarray] = None, target: str = "eps",
                var_type: str = "fixed_large", mean_form: str = "x0",
                clip_x0: bool = True,
                trajectory_every: Optional[int] = None) -> chain.SampleOutput:
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
  check_choice("target", target, gaussian.TARGETS)
  check_choice("var_type", var_type, gaussian.VAR_TYPES)
  check_choice("mean_form", mean_form, gaussian.MEAN_FORMS)
  chain.check_trajectory_every(trajectory_every)
  shape = chain.check_start(shape, key, x_T, needs_key=True)
  x_T, chain_key = chain.initial_state(shape, key, x_T)
  num_timesteps = schedule.num_timesteps

  def step(x, t):
    tb = chain.batch_t(t, x)
    out = gaussian.p_mean_variance(schedule, model_fn(x, tb), x, tb,
                                   target=target, var_type=var_type,
                                   mean_form=mean_form, clip_x0=clip_x0)
    noise = jax.random.normal(jax.random.fold_in(chain_key, t), x.shape,
                              x.dtype)
    scale = jnp.where(t > 0, jnp.exp(0.5 * out.log_variance), 0.0)
    return (out.mean + scale * noise).astype(x.dtype)

  ts = np.arange(num_timesteps - 1, -1, -1)  # T-1, ..., 0.
  # After processing index t the state is the paper's x_t.
  return chain.run_chain(step, x_T, jnp.asarray(ts, jnp.int32), ts,
                         trajectory_every=trajectory_every)
