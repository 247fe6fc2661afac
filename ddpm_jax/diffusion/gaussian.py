"""The Gaussian diffusion process: forward process, posterior, parameterizations.

Every function is pure and works on a batch: images are NHWC (any trailing
shape works), `t` is an integer array [B] of steps in [0, T), where index t is
the paper's step t + 1 (see `ddpm_jax.diffusion.schedules.Schedule`).

Example:
  >>> sched = make_schedule("linear", 1000)
  >>> x_t = q_sample(sched, x0, t, noise)
  >>> out = p_mean_variance(sched, model_fn(x_t, t), x_t, t)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion.schedules import Schedule

TARGETS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_large", "fixed_small", "learned", "learned_range")
MEAN_FORMS = ("x0", "eps")

# A denoiser: (x_t [B, ...], t [B]) -> output [B, ...] (2C channels for a
# learned variance). Any network or closure fits.
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check_t(t, num_timesteps: int) -> None:
  """Raises for a concrete `t` that is not an integer array in [0, T)."""
  if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
    raise ValueError(f"t must be an integer array of steps, got dtype "
                     f"{jnp.result_type(t)}.")
  if isinstance(t, jax.core.Tracer):
    return  # Traced: out-of-range steps gather NaN instead (see `extract`).
  t = np.asarray(t)
  if t.size and (t.min() < 0 or t.max() >= num_timesteps):
    raise ValueError(f"t must lie in [0, {num_timesteps}), got values in "
                     f"[{t.min()}, {t.max()}].")


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
  """Gathers per-step values and shapes them to broadcast against images.

  Args:
    a: per-step values [T].
    t: integer steps [B] in [0, T). A concrete out-of-range `t` raises; under
      `jit` an out-of-range step yields NaN rather than a silently clamped
      value.
    x_shape: shape of the batch to broadcast against, (B, ...).

  Returns:
    `a[t]` reshaped to [B, 1, ..., 1] with len(x_shape) dimensions.
  """
  _check_t(t, a.shape[0])
  out = jnp.take(a, t, mode="fill", fill_value=jnp.nan)
  return out.reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def q_mean_variance(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and log-variance of q(x_t | x_0).

  Args:
    schedule: the diffusion schedule.
    x0: clean images [B, ...].
    t: steps [B].

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).
  """
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
  variance = extract(1.0 - schedule.alphas_cumprod, t, x0.shape)
  log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
  return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray,
             noise: jnp.ndarray) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x_0) in closed form.

  x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) noise.

  Args:
    schedule: the diffusion schedule.
    x0: clean images [B, ...].
    t: steps [B].
    noise: standard normal noise, same shape as `x0`.

  Returns:
    x_t, same shape and dtype as `x0`.
  """
  if noise.shape != x0.shape:
    raise ValueError(f"noise shape {noise.shape} must equal x0 shape "
                     f"{x0.shape}.")
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0 +
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) *
          noise).astype(x0.dtype)


def q_posterior_mean_variance(schedule: Schedule, x0: jnp.ndarray,
                              x_t: jnp.ndarray, t: jnp.ndarray):
  """Mean and variance of the posterior q(x_{t-1} | x_t, x_0).

  Args:
    schedule: the diffusion schedule.
    x0: (predicted) clean images [B, ...].
    x_t: noisy images at step t [B, ...].
    t: steps [B].

  Returns:
    (mean [B, ...], variance [B, 1, ...], clipped log-variance [B, 1, ...]).
  """
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0 +
          extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
  variance = extract(schedule.posterior_variance, t, x_t.shape)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, variance, log_variance


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
  """x_0 = x_t / sqrt(alpha-bar_t) - sqrt(1 / alpha-bar_t - 1) eps."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t -
          extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
  """eps = (x_t / sqrt(alpha-bar_t) - x_0) / sqrt(1 / alpha-bar_t - 1)."""
  return (
      (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) /
      extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def velocity(schedule: Schedule, x0, t, eps):
  """The v target of Salimans & Ho: v = sqrt(a-bar) eps - sqrt(1 - a-bar) x_0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def predict_x0_from_v(schedule: Schedule, x_t, t, v):
  """x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


def predict_eps_from_v(schedule: Schedule, x_t, t, v):
  """eps = sqrt(1 - alpha-bar_t) x_t + sqrt(alpha-bar_t) v."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t +
          extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * v)


def training_target(schedule: Schedule, x0, t, noise, *,
                    target: str = "eps") -> jnp.ndarray:
  """What a network trained with `target` should output for x_t(x0, noise).

  Args:
    schedule: the diffusion schedule.
    x0: clean images [B, ...].
    t: steps [B].
    noise: the noise used to form x_t, same shape as `x0`.
    target: 'eps' (noise), 'x0' (clean image) or 'v' (velocity).

  Returns:
    The regression target, same shape as `x0`.
  """
  check_choice("target", target, TARGETS)
  if target == "eps":
    return noise
  if target == "x0":
    return x0
  return velocity(schedule, x0, t, noise)


def predict_x0_eps(schedule: Schedule, x_t, t, prediction, *,
                   target: str = "eps"):
  """Converts a network prediction of `target` into (x_0, eps) predictions.

  Args:
    schedule: the diffusion schedule.
    x_t: noisy images [B, ...].
    t: steps [B].
    prediction: the network's prediction of `target`, same shape as `x_t`.
    target: 'eps', 'x0' or 'v'.

  Returns:
    (pred_x0, pred_eps), each the shape of `x_t`.
  """
  check_choice("target", target, TARGETS)
  if target == "eps":
    return predict_x0_from_eps(schedule, x_t, t, prediction), prediction
  if target == "x0":
    return prediction, predict_eps_from_x0(schedule, x_t, t, prediction)
  return (predict_x0_from_v(schedule, x_t, t, prediction),
          predict_eps_from_v(schedule, x_t, t, prediction))


class PMeanVariance(NamedTuple):
  """The reverse-step Gaussian p(x_{t-1} | x_t) and the predictions behind it."""
  mean: jnp.ndarray  # [B, ...]
  variance: jnp.ndarray  # [B, 1, ...] (fixed) or [B, ...] (learned)
  log_variance: jnp.ndarray  # same shape as variance
  pred_x0: jnp.ndarray  # [B, ...]
  pred_eps: jnp.ndarray  # [B, ...]


def split_model_output(model_output, x_t, *, var_type: str):
  """Splits a network output into (prediction, variance output or None).

  Learned-variance networks output twice the image channels: the prediction
  first, then the variance channels.
  """
  check_choice("var_type", var_type, VAR_TYPES)
  channels = x_t.shape[-1]
  if var_type.startswith("learned"):
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(
          f"var_type {var_type!r} needs a model output with 2 x {channels} "
          f"channels, got shape {model_output.shape}.")
    return model_output[..., :channels], model_output[..., channels:]
  if model_output.shape != x_t.shape:
    raise ValueError(f"model output shape {model_output.shape} must equal "
                     f"x_t shape {x_t.shape} for var_type {var_type!r}.")
  return model_output, None


def p_mean_variance(schedule: Schedule, model_output, x_t, t, *,
                    target: str = "eps", var_type: str = "fixed_large",
                    mean_form: str = "x0",
                    clip_x0: bool = True) -> PMeanVariance:
  """The reverse-step Gaussian p(x_{t-1} | x_t) for a network output.

  Args:
    schedule: the diffusion schedule.
    model_output: the network output at (x_t, t): [B, ..., C], or
      [B, ..., 2C] for learned variances.
    x_t: noisy images [B, ..., C].
    t: steps [B].
    target: what the network predicts: 'eps', 'x0' or 'v'.
    var_type: 'fixed_large' (beta_t; the first step uses the posterior
      variance), 'fixed_small' (the posterior variance), 'learned' (the
      extra channels are log-variances) or 'learned_range' (they interpolate
      between the two fixed log-variances, Nichol & Dhariwal).
    mean_form: 'x0' computes the posterior mean from the predicted x_0
      (DDPM's default; clipped to [-1, 1] when `clip_x0`), 'eps' uses
      1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha-bar_t) eps), the form of
      Algorithm 2.
    clip_x0: clip the predicted x_0 to [-1, 1] (x0 mean form only).

  Returns:
    A `PMeanVariance`.
  """
  check_choice("mean_form", mean_form, MEAN_FORMS)
  prediction, var_output = split_model_output(model_output, x_t,
                                              var_type=var_type)
  pred_x0, pred_eps = predict_x0_eps(schedule, x_t, t, prediction,
                                     target=target)
  if mean_form == "x0":
    if clip_x0:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  else:
    mean = extract(schedule.sqrt_recip_alphas, t, x_t.shape) * (
        x_t - extract(schedule.betas / schedule.sqrt_one_minus_alphas_cumprod,
                      t, x_t.shape) * pred_eps)

  if var_type == "fixed_large":
    large = schedule.betas
    if schedule.num_timesteps > 1:
      large = large.at[0].set(schedule.posterior_variance[1])
    variance = extract(large, t, x_t.shape)
    log_variance = jnp.log(variance)
  elif var_type == "fixed_small":
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t,
                           x_t.shape)
  elif var_type == "learned":
    log_variance = var_output
    variance = jnp.exp(log_variance)
  else:  # learned_range
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    max_log = extract(jnp.log(schedule.betas), t, x_t.shape)
    frac = (var_output + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  return PMeanVariance(mean=mean, variance=variance, log_variance=log_variance,
                       pred_x0=pred_x0, pred_eps=pred_eps)
