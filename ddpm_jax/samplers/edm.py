"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2).

On the `EDM` process (x = x_0 + sigma eps) with levels sigma_0 > ... >
sigma_{S-1} (`EDM.grid`) and sigma_S = 0, step i

  gamma_i = min(S_churn / S, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax
            else 0,
  sigma^_i = (1 + gamma_i) sigma_i,
  x^_i = x_i + sqrt(sigma^_i^2 - sigma_i^2) S_noise z_i,
  d_i = (x^_i - D(x^_i; sigma^_i)) / sigma^_i,
  x_{i+1} = x^_i + (sigma_{i+1} - sigma^_i) d_i, and unless sigma_{i+1} = 0
  x_{i+1} = x^_i + (sigma_{i+1} - sigma^_i) (d_i + d'_i) / 2 with d'_i the
  slope at (x_{i+1}, sigma_{i+1}),

2S - 1 network calls in one `lax.scan`. With S_churn = 0 it is Heun's
method (Algorithm 1), `solvers.heun_sample` on the same levels. z_i is drawn
from `fold_in(split(key)[1], i)`.

Example:
  >>> edm = processes.EDM()
  >>> out = edm_sample(processes.precondition(edm, backbone), edm,
  ...                  shape=(16, 32, 32, 3), key=key, num_steps=18,
  ...                  target="x0", s_churn=40.0, s_tmin=0.05, s_tmax=50.0,
  ...                  s_noise=1.003)
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, processes
from ddpm_jax.samplers import chain

_PREDICT, _CORRECT, _DENOISE = 0, 1, 2


class _Iter(NamedTuple):
  """Per-iteration inputs (float32 [2S-1] unless noted)."""
  step: jnp.ndarray  # int32 solver step i.
  kind: jnp.ndarray  # int32: 0 predictor, 1 corrector, 2 last.
  sigma_hat: jnp.ndarray  # sigma^_i.
  sigma_next: jnp.ndarray  # sigma_{i+1} (0 after the last).
  noise_std: jnp.ndarray  # sqrt(sigma^_i^2 - sigma_i^2) S_noise.


def _check_nonneg(name, value):
  if isinstance(value, bool) or not isinstance(
      value, numbers.Real) or not value >= 0 or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def edm_sample(model_fn: gaussian.ModelFn, process: processes.EDM, *,
               num_steps: int, shape: Optional[tuple[int, ...]] = None,
               key: Optional[jax.Array] = None,
               x_T: Optional[jnp.ndarray] = None, spacing: str = "karras",
               target: str = "x0", clip_x0: bool = False, s_churn: float = 0.0,
               s_tmin: float = 0.0, s_tmax: float = math.inf,
               s_noise: float = 1.0,
               trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """EDM's stochastic sampler (Algorithm 2); 2S - 1 network calls.

  Args:
    model_fn: denoiser (x [B, ...], sigma float32 [B]) -> prediction of
      `target` (an `EDM`-preconditioned network gives 'x0').
    process: the `EDM` process.
    num_steps: static S >= 1 levels (`process.grid`).
    shape: static (B, ...) of x_0 ~ N(0, sigma_max^2 I) drawn from `key`;
      give this or `x_T`.
    key: PRNG key; may be None with `x_T` given and s_churn = 0.
    x_T: optional starting state [B, ...] at sigma_0.
    spacing: 'karras' (default), 'uniform' or 'logsnr' (`EDM.grid`).
    target: what `model_fn` predicts: 'eps', 'x0', 'v' or 'velocity'.
    clip_x0: clip the predicted x_0 to [-1, 1].
    s_churn: total stochasticity, >= 0 (0: Heun's deterministic method).
    s_tmin: lowest sigma at which noise is added, >= 0.
    s_tmax: highest sigma at which noise is added, >= s_tmin.
    s_noise: std of the added noise relative to the level, >= 0.
    trajectory_every: static k >= 1 to also return the state after every k
      steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; trajectory_steps are the sigmas of the frames.

  Raises:
    ValueError: for a process other than EDM, a bad option, or a missing key
      or shape.

  Example:
    >>> out = edm_sample(denoise, processes.EDM(), shape=(4, 32, 32, 3),
    ...                  key=jax.random.key(0), num_steps=18, s_churn=40.0)
  """
  if not isinstance(process, processes.EDM):
    raise ValueError("sampler 'edm' applies to the 'edm' process only, got "
                     f"{processes.process_name(process)!r}.")
  chain.check_int("num_steps", num_steps, low=1)
  check_choice("spacing", spacing, processes.SPACINGS)
  check_choice("target", target, processes.TARGETS)
  chain.check_trajectory_every(trajectory_every)
  for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise",
                                                                 s_noise)):
    _check_nonneg(name, value)
  if isinstance(
      s_tmax,
      bool) or not isinstance(s_tmax, numbers.Real) or not s_tmax >= s_tmin:
    raise ValueError(f"s_tmax must be a number >= s_tmin ({s_tmin}), got "
                     f"{s_tmax!r}.")
  stochastic = s_churn > 0
  shape = chain.check_start(shape, key, x_T, needs_key=stochastic)
  x_T, chain_key = chain.initial_state(shape, key, x_T, std=process.prior_std)

  sigma = process.grid(num_steps, spacing=spacing)
  sigma_next = jnp.concatenate([sigma[1:], jnp.zeros((1,), sigma.dtype)])
  in_range = (sigma >= s_tmin) & (sigma <= s_tmax)
  gamma = jnp.where(in_range, min(s_churn / num_steps,
                                  math.sqrt(2.0) - 1.0), 0.0)
  sigma_hat = sigma * (1.0 + gamma)
  noise_std = jnp.sqrt(jnp.square(sigma_hat) - jnp.square(sigma)) * s_noise
  steps = np.repeat(np.arange(num_steps), 2)[:-1]
  kinds = np.tile([_PREDICT, _CORRECT], num_steps)[:-1]
  kinds[-1] = _DENOISE
  iters = _Iter(step=jnp.asarray(steps, jnp.int32),
                kind=jnp.asarray(kinds, jnp.int32), sigma_hat=sigma_hat[steps],
                sigma_next=sigma_next[steps], noise_std=noise_std[steps])

  def step(carry, it):
    x, x_eval, x_hat, d = carry
    predicting = it.kind != _CORRECT
    if stochastic:
      noise = jax.random.normal(jax.random.fold_in(chain_key, it.step), x.shape,
                                x.dtype)
      churned = x + it.noise_std * noise
    else:
      churned = x
    x_hat = jnp.where(predicting, churned, x_hat)
    point = jnp.where(predicting, x_hat, x_eval)
    level = jnp.where(predicting, it.sigma_hat, it.sigma_next)
    pred_x0, _ = chain.process_predictions(model_fn, process, point, level,
                                           target=target, clip_x0=clip_x0)
    d_new = (point - pred_x0) / level
    dt = it.sigma_next - it.sigma_hat
    euler = x_hat + dt * d_new
    corrected = x_hat + 0.5 * dt * (d + d_new)
    # The last step's Euler step to sigma = 0 lands on D(x^; sigma^) itself.
    x_new = jnp.where(it.kind == _CORRECT, corrected,
                      jnp.where(it.kind == _DENOISE, pred_x0, x))
    x_eval = jnp.where(it.kind == _PREDICT, euler, x_new)
    d = jnp.where(it.kind == _PREDICT, d_new, d)
    return tuple(a.astype(x.dtype) for a in (x_new, x_eval, x_hat, d))

  return chain.run_chain(
      step, (x_T, x_T, x_T, jnp.zeros_like(x_T)), iters,
      jnp.concatenate([sigma[1:], jnp.zeros(
          (1,), sigma.dtype)]), trajectory_every=trajectory_every,
      image=lambda carry: carry[0], step_ids=steps)
