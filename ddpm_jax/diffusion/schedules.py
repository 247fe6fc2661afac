"""Noise schedules of the forward process, as an immutable pytree of arrays.

The schedule is computed once in float64 with numpy and stored as float32 jnp
arrays in a `flax.struct` dataclass, so it passes through `jax.jit`,
`lax.scan` and sharding like any other pytree of arrays.

Example:
  >>> from ddpm_jax import schedules
  >>> sched = schedules.make_schedule("linear", num_timesteps=1000)
  >>> sched.num_timesteps
  1000
  >>> float(sched.alphas_cumprod[-1])  # doctest: +ELLIPSIS
  4.035...e-05
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_NAMES = ("linear", "cosine", "quadratic", "sigmoid")

# Warn when the terminal signal-to-noise ratio alphas_cumprod / (1 -
# alphas_cumprod) is above this: x_T then still carries visible signal, and
# sampling from N(0, I) does not match the forward process. Linear 1e-4..0.02
# with T=1000 ends at 4.0e-5, with T=200 at 0.15.
TERMINAL_SNR_WARNING = 1e-2


class ScheduleWarning(UserWarning):
  """The schedule's last step does not reach (close to) pure noise."""


def linear_beta_schedule(num_timesteps: int, *, beta_start: float = 1e-4,
                         beta_end: float = 0.02) -> np.ndarray:
  """Linearly spaced betas (Ho et al., 2020). Returns float64 [T]."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def quadratic_beta_schedule(num_timesteps: int, *, beta_start: float = 1e-4,
                            beta_end: float = 0.02) -> np.ndarray:
  """Betas whose square roots are linearly spaced. Returns float64 [T]."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                     dtype=np.float64)**2


def sigmoid_beta_schedule(num_timesteps: int, *, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> np.ndarray:
  """Betas on a sigmoid over [-6, 6], scaled to [beta_start, beta_end]."""
  x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def cosine_beta_schedule(num_timesteps: int, *, s: float = 0.008,
                         max_beta: float = 0.9999,
                         min_beta: float = 1e-4) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (2021), clipped to [1e-4, 0.9999].

  alphas_cumprod(t) = f(t) / f(0) with f(t) = cos((t / T + s) / (1 + s) * pi/2)^2
  and beta_t = 1 - alphas_cumprod(t + 1) / alphas_cumprod(t).

  Returns:
    float64 [T] betas.
  """
  steps = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64)
  f = np.cos(((steps / num_timesteps) + s) / (1 + s) * math.pi * 0.5)**2
  alphas_cumprod = f / f[0]
  betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
  return np.clip(betas, min_beta, max_beta)


_BETA_FNS: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "quadratic": quadratic_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02, s: float = 0.008) -> np.ndarray:
  """Betas of a named schedule, in float64.

  Args:
    name: one of 'linear', 'cosine', 'quadratic', 'sigmoid'.
    num_timesteps: T >= 1.
    beta_start: first beta (linear, quadratic, sigmoid).
    beta_end: last beta (linear, quadratic, sigmoid).
    s: offset of the cosine schedule.

  Returns:
    float64 array [T].

  Raises:
    ValueError: for an unknown name, T < 1, or betas outside (0, 1).
  """
  if name not in _BETA_FNS:
    raise ValueError(f"Unknown beta schedule {name!r}; expected one of "
                     f"{', '.join(SCHEDULE_NAMES)}.")
  _check_num_timesteps(num_timesteps)
  if name == "cosine":
    return cosine_beta_schedule(num_timesteps, s=s)
  return _BETA_FNS[name](num_timesteps, beta_start=beta_start,
                         beta_end=beta_end)


def _check_num_timesteps(num_timesteps) -> None:
  if isinstance(num_timesteps,
                bool) or not isinstance(num_timesteps,
                                        (int, np.integer)) or num_timesteps < 1:
    raise ValueError(
        f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")


@struct.dataclass
class Schedule:
  """Every per-step coefficient of a diffusion process; all float32 [T].

  Index t in [0, T) is the paper's step t + 1: `alphas_cumprod[0]` is
  alpha-bar_1 and `alphas_cumprod_prev[0]` is alpha-bar_0 = 1.

  Attributes:
    betas: beta_t, the forward noise variances.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha-bar_{t-1}, with alpha-bar_0 = 1.
    sqrt_alphas_cumprod: sqrt(alpha-bar_t), the signal scale of q(x_t | x_0).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha-bar_t), its noise scale.
    log_one_minus_alphas_cumprod: log(1 - alpha-bar_t).
    sqrt_recip_alphas: 1 / sqrt(alpha_t).
    sqrt_recip_alphas_cumprod: 1 / sqrt(alpha-bar_t).
    sqrt_recipm1_alphas_cumprod: sqrt(1 / alpha-bar_t - 1).
    posterior_variance: variance of q(x_{t-1} | x_t, x_0) (0 at t = 0).
    posterior_log_variance_clipped: its log, with the t = 0 entry replaced by
      the t = 1 one (the variance is 0 there).
    posterior_mean_coef1: coefficient of x_0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_t in the posterior mean.
  """
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static, read from the shape)."""
    return self.betas.shape[0]

  @property
  def snr(self) -> jnp.ndarray:
    """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t), float32 [T]."""
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

  @classmethod
  def from_betas(cls, betas, *, warn: bool = True) -> Schedule:
    """Builds the schedule from any array of betas in (0, 1).

    Args:
      betas: array-like [T] of forward variances, each in (0, 1).
      warn: emit a `ScheduleWarning` when the last step keeps a terminal SNR
        above `TERMINAL_SNR_WARNING`.

    Returns:
      The `Schedule`, float32 arrays computed in float64.

    Raises:
      ValueError: betas not a non-empty 1-D array, or not all in (0, 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
      raise ValueError("betas must be a 1-D array with at least one step, got "
                       f"shape {betas.shape}.")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(
        betas >= 1):
      raise ValueError("every beta must lie in the open interval (0, 1); got "
                       f"min {betas.min():.6g}, max {betas.max():.6g}.")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 -
                                                                alphas_cumprod)
    # The posterior variance is 0 at t = 0; clip its log with the next value
    # (or beta_1 when T = 1) as Ho et al. do.
    first = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(
        np.append(first, posterior_variance[1:]))
    terminal_snr = alphas_cumprod[-1] / (1.0 - alphas_cumprod[-1])
    if warn and terminal_snr > TERMINAL_SNR_WARNING:
      warnings.warn(
          f"The schedule does not reach noise: alphas_cumprod[T-1] = "
          f"{alphas_cumprod[-1]:.4g} (T = {len(betas)}, terminal SNR "
          f"{terminal_snr:.3g} > {TERMINAL_SNR_WARNING}), so x_T keeps a "
          "visible part of the image and sampling from N(0, I) does not match "
          "the forward process. Use more steps, larger betas or the cosine "
          "schedule.", ScheduleWarning, stacklevel=2)
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas=np.sqrt(1.0 / alphas),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) /
        (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) /
        (1.0 - alphas_cumprod),
    )
    return cls(**{
        k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()
    })


def make_schedule(name: str = "linear", num_timesteps: int = 1000, *,
                  beta_start: float = 1e-4, beta_end: float = 0.02,
                  s: float = 0.008, warn: bool = True) -> Schedule:
  """Builds a named `Schedule`.

  Args:
    name: 'linear', 'cosine', 'quadratic' or 'sigmoid'.
    num_timesteps: T >= 1.
    beta_start: first beta (not used by 'cosine').
    beta_end: last beta (not used by 'cosine').
    s: cosine offset.
    warn: warn when the last step does not reach noise.

  Returns:
    The `Schedule`.

  Example:
    >>> sched = make_schedule("cosine", num_timesteps=1000)
  """
  betas = beta_schedule(name, num_timesteps, beta_start=beta_start,
                        beta_end=beta_end, s=s)
  return Schedule.from_betas(betas, warn=warn)
