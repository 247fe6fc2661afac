"""Denoising training losses for any denoiser `model_fn(x_t, t)`.

Example:
  >>> def model_fn(x_t, t):
  ...   return unet.apply({"params": params}, x_t, t, train=False)
  >>> per_example = training_losses(model_fn, sched, x0, key)  # [B]
  >>> loss = per_example.mean()
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax._checks import check_choice
from ddpm_jax.schedules import Schedule

LOSS_TYPES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "min_snr")


def regression_loss(prediction: jnp.ndarray, target: jnp.ndarray, *,
                    loss_type: str = "l2") -> jnp.ndarray:
  """Per-example loss, averaged over every non-batch dimension.

  Args:
    prediction: [B, ...].
    target: [B, ...], same shape.
    loss_type: 'l2' (mean squared error, L_simple), 'l1' (mean absolute error)
      or 'huber' (smooth L1 with delta 1, as PyTorch's `smooth_l1_loss`).

  Returns:
    float32 [B].
  """
  check_choice("loss_type", loss_type, LOSS_TYPES)
  if prediction.shape != target.shape:
    raise ValueError(f"prediction shape {prediction.shape} must equal target "
                     f"shape {target.shape}.")
  err = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  if loss_type == "l2":
    per_elem = jnp.square(err)
  elif loss_type == "l1":
    per_elem = jnp.abs(err)
  else:
    abs_err = jnp.abs(err)
    per_elem = jnp.where(abs_err < 1.0, 0.5 * jnp.square(err), abs_err - 0.5)
  return jnp.mean(per_elem, axis=tuple(range(1, err.ndim)))


def denoising_loss(model_fn: diffusion.ModelFn, schedule: Schedule, x0: jnp.ndarray,
                   t: jnp.ndarray, noise: jnp.ndarray, *,
                   loss_type: str = "l2", target: str = "eps",
                   t_weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-example denoising loss at given steps and noise.

  Args:
    model_fn: denoiser `(x_t [B, ...], t [B]) -> prediction`; a
      learned-variance output with 2C channels is trained on its first C.
    schedule: the diffusion schedule.
    x0: clean images [B, ..., C] in [-1, 1].
    t: integer steps [B] in [0, T).
    noise: standard normal noise, shape of `x0`.
    loss_type: 'l2', 'l1' or 'huber'.
    target: what the network predicts: 'eps', 'x0' or 'v'.
    t_weights: optional per-step weights [T], multiplied into each example's
      loss (e.g. `loss_weights(schedule, weighting="min_snr", ...)`).

  Returns:
    float32 [B].
  """
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  prediction = model_fn(x_t, t)
  channels = x0.shape[-1]
  if prediction.shape[-1] == 2 * channels:
    prediction = prediction[..., :channels]
  goal = diffusion.training_target(schedule, x0, t, noise, target=target)
  loss = regression_loss(prediction, goal, loss_type=loss_type)
  if t_weights is not None:
    if t_weights.shape != (schedule.num_timesteps,):
      raise ValueError(f"t_weights must have shape ({schedule.num_timesteps},)"
                       f", got {t_weights.shape}.")
    loss = loss * jnp.take(t_weights, t)
  return loss


def training_losses(model_fn: diffusion.ModelFn, schedule: Schedule, x0: jnp.ndarray,
                    key: jax.Array, *, loss_type: str = "l2",
                    target: str = "eps",
                    t_weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-example loss with t ~ U{0, ..., T-1} and noise ~ N(0, I) from `key`.

  Args:
    model_fn: denoiser `(x_t, t) -> prediction`.
    schedule: the diffusion schedule.
    x0: clean images [B, ..., C] in [-1, 1].
    key: PRNG key; split here into the step and noise keys.
    loss_type: 'l2' (L_simple), 'l1' or 'huber'.
    target: 'eps', 'x0' or 'v'.
    t_weights: optional per-step weights [T].

  Returns:
    float32 [B].
  """
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  return denoising_loss(model_fn, schedule, x0, t, noise, loss_type=loss_type,
                        target=target, t_weights=t_weights)


def loss_weights(schedule: Schedule, *, weighting: str, target: str = "eps",
                 gamma: float = 5.0) -> Optional[jnp.ndarray]:
  """Per-step loss weights [T] for `denoising_loss`'s `t_weights`.

  'uniform' gives None (every step weighs 1). 'min_snr' is Min-SNR-gamma
  weighting (Hang et al. 2023): each step's loss is rescaled so that in
  x0 terms it weighs min(SNR_t, gamma), i.e. the weight is
  min(SNR_t, gamma) / SNR_t for an eps target, min(SNR_t, gamma) for x0 and
  min(SNR_t, gamma) / (SNR_t + 1) for v. Low-noise steps, whose loss is easy
  and whose gradients dominate otherwise, are down-weighted.

  Args:
    schedule: the diffusion schedule.
    weighting: 'uniform' or 'min_snr'.
    target: what the network predicts: 'eps', 'x0' or 'v'.
    gamma: the SNR cap, > 0.

  Returns:
    float32 [T], or None for 'uniform'.

  Example:
    >>> w = loss_weights(sched, weighting="min_snr", target="eps", gamma=5.0)
    >>> loss = denoising_loss(model_fn, sched, x0, t, noise, t_weights=w)
  """
  check_choice("weighting", weighting, WEIGHTINGS)
  check_choice("target", target, diffusion.TARGETS)
  if weighting == "uniform":
    return None
  if not gamma > 0:
    raise ValueError(f"gamma must be > 0, got {gamma!r}.")
  snr = schedule.snr
  capped = jnp.minimum(snr, gamma)
  if target == "eps":
    weights = capped / snr
  elif target == "x0":
    weights = capped
  else:
    weights = capped / (snr + 1.0)
  return weights.astype(jnp.float32)
