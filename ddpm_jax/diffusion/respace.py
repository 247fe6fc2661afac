"""Respacing (Nichol & Dhariwal 2021): a diffusion over a subset of the steps.

Keeping training steps t_1 < ... < t_S of a T-step schedule defines an S-step
forward process with the same alphas_cumprod at the kept steps and betas

  beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}   (abar_{t_0} = 1),

improved-diffusion's `SpacedDiffusion`. Every sampler and bound of the
library then runs on the respaced `Schedule` unchanged, provided the network,
trained on the original steps, is called at the ORIGINAL step t_i when the
respaced process is at step i: `map_timesteps` wraps `model_fn` so. With a
learned variance, 'learned_range' interpolates between the respaced process's
own beta'_i and posterior variance (as improved-diffusion does), so it needs
no retraining; 'learned' uses the network's log-variance as it is, the
variance of one original step.

Example:
  >>> sched = schedules.make_schedule("linear", 1000)
  >>> spaced = respace(sched, spaced_timesteps(1000, 50))
  >>> out = sampling.ddpm_sample(map_timesteps(model_fn, spaced.timesteps),
  ...                            spaced.schedule, shape=(16, 32, 32, 3),
  ...                            key=key, var_type="learned_range")
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import gaussian
from ddpm_jax.diffusion.schedules import Schedule


class Respaced(NamedTuple):
  """A respaced process and its timestep map."""
  schedule: Schedule  # The S-step process, betas recomputed.
  timesteps: np.ndarray  # int64 [S] original step of each respaced step.


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """S evenly spaced training steps from 0 to T-1, both ends included.

  improved-diffusion's `space_timesteps(T, [S])`: step i is
  round(i (T-1) / (S-1)) with Python's rounding, accumulated as its code
  does. One step keeps T-1 (improved-diffusion keeps 0, whose alphas_cumprod
  is close to 1, so x_T ~ N(0, I) would not be the process's last state).

  Args:
    num_timesteps: T >= 1.
    num_steps: S in [1, T].

  Returns:
    int64 numpy array [S], strictly increasing.

  Raises:
    ValueError: for T < 1 or S outside [1, T].

  Example:
    >>> spaced_timesteps(1000, 4)
    array([  0, 333, 666, 999])
  """
  _check_count("num_timesteps", num_timesteps, 1, None)
  _check_count("num_steps", num_steps, 1, num_timesteps)
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int64)
  stride = (num_timesteps - 1) / (num_steps - 1)
  steps, position = [], 0.0
  for _ in range(num_steps):
    steps.append(round(position))
    position += stride
  return np.asarray(steps, np.int64)


def _check_count(name: str, value, low: int, high) -> None:
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer)) or (value < low or
                                    (high is not None and value > high)):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")


def respace(schedule: Schedule, timesteps, *, warn: bool = True) -> Respaced:
  """The process over the kept training steps `timesteps`, betas recomputed.

  Computed in float64 from the schedule's betas, outside `jit` (the schedule
  must be concrete); the result is a plain `Schedule`.

  Args:
    schedule: the original T-step schedule.
    timesteps: the S kept steps, strictly increasing integers in [0, T).
    warn: warn (`ScheduleWarning`) when the last kept step does not reach
      noise.

  Returns:
    A `Respaced` whose schedule has S steps, alphas_cumprod equal to the
    original's at `timesteps`.

  Raises:
    ValueError: for a traced schedule, or `timesteps` that are not strictly
      increasing integers in [0, T).

  Example:
    >>> spaced = respace(sched, spaced_timesteps(sched.num_timesteps, 100))
    >>> spaced.schedule.num_timesteps
    100
  """
  if isinstance(schedule.betas, jax.core.Tracer):
    raise ValueError("respace needs a concrete schedule: call it outside "
                     "jax.jit and pass the respaced schedule in.")
  steps = np.asarray(timesteps)
  num_timesteps = schedule.num_timesteps
  if (steps.ndim != 1 or steps.size == 0 or
      not np.issubdtype(steps.dtype, np.integer) or steps[0] < 0 or
      steps[-1] >= num_timesteps or np.any(np.diff(steps) <= 0)):
    raise ValueError("timesteps must be a non-empty, strictly increasing "
                     f"1-D array of integer steps in [0, {num_timesteps}), "
                     f"got {np.asarray(timesteps)!r}.")
  abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[steps]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return Respaced(schedule=Schedule.from_betas(betas, warn=warn),
                  timesteps=steps.astype(np.int64))


def map_timesteps(model_fn: gaussian.ModelFn, timesteps) -> gaussian.ModelFn:
  """Wraps `model_fn` to be called at the original step `timesteps[t]`.

  Args:
    model_fn: denoiser `(x_t, t) -> output` trained on the original steps.
    timesteps: int [S], the timestep map of a `Respaced`.

  Returns:
    The denoiser `(x_t, i) -> model_fn(x_t, timesteps[i])` of the respaced
    process.

  Example:
    >>> spaced_fn = map_timesteps(model_fn, spaced.timesteps)
  """
  table = jnp.asarray(timesteps, jnp.int32)
  return lambda x_t, t: model_fn(x_t, table[t])
