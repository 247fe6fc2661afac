"""Denoising training losses for any denoiser `model_fn(x_t, t)`.

L_simple regresses the network's prediction (eps, x0 or v) on its target.
On the continuous processes (`ddpm_jax.diffusion.processes`) `process_loss`
is EDM's lambda(sigma)-weighted loss of the preconditioned denoiser
(Karras et al. 2022, eq. 8) or flow matching's velocity regression.
A learned variance (2C output channels, `var_type` 'learned' or
'learned_range') is trained with L_hybrid = L_simple + lambda L_vlb
(Nichol & Dhariwal 2021, lambda = 0.001), where L_vlb sees the mean through
`stop_gradient`, so the bound only trains the variance channels.

Example:
  >>> def model_fn(x_t, t):
  ...   return unet.apply({"params": params}, x_t, t, train=False)
  >>> per_example = training_losses(model_fn, sched, x0, key)  # [B]
  >>> loss = per_example.mean()
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, likelihood, processes
from ddpm_jax.diffusion.schedules import Schedule

LOSS_TYPES = ("l2", "l1", "huber")
WEIGHTINGS = ("uniform", "min_snr")
LEARNED_VAR_TYPES = ("learned", "learned_range")
# lambda of L_hybrid (Nichol & Dhariwal 2021, Section 3.1).
VLB_WEIGHT = 1e-3


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


def denoising_loss(model_fn: gaussian.ModelFn, schedule: Schedule,
                   x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, *,
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
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  prediction = model_fn(x_t, t)
  channels = x0.shape[-1]
  if prediction.shape[-1] == 2 * channels:
    prediction = prediction[..., :channels]
  return _simple_loss(schedule, prediction, x0, t, noise, loss_type=loss_type,
                      target=target, t_weights=t_weights)


def _simple_loss(schedule, prediction, x0, t, noise, *, loss_type, target,
                 t_weights):
  """The (weighted) regression of `prediction` on the target, [B]."""
  goal = gaussian.training_target(schedule, x0, t, noise, target=target)
  loss = regression_loss(prediction, goal, loss_type=loss_type)
  if t_weights is not None:
    if t_weights.shape != (schedule.num_timesteps,):
      raise ValueError(f"t_weights must have shape ({schedule.num_timesteps},)"
                       f", got {t_weights.shape}.")
    loss = loss * jnp.take(t_weights, t)
  return loss


class HybridLoss(NamedTuple):
  """L_hybrid of each example and its two terms."""
  loss: jnp.ndarray  # [B] simple + vlb_weight * T * vlb.
  simple: jnp.ndarray  # [B] L_simple of the prediction channels.
  vlb: jnp.ndarray  # [B] L_{t-1} (L_0 at t = 0) in bits/dim, mean stopped.


def hybrid_loss(model_fn: gaussian.ModelFn, schedule: Schedule, x0: jnp.ndarray,
                t: jnp.ndarray, noise: jnp.ndarray, *,
                var_type: str = "learned_range", loss_type: str = "l2",
                target: str = "eps", t_weights: Optional[jnp.ndarray] = None,
                vlb_weight: float = VLB_WEIGHT) -> HybridLoss:
  """L_hybrid = L_simple + lambda L_vlb at given steps and noise.

  As improved-diffusion's `training_losses` with a learned sigma and
  `rescale_learned_sigmas`: one network call; the bound term is
  `likelihood.vb_terms_bpd` of the output with its prediction channels
  through `stop_gradient` (x0 mean form, no clipping), so its gradient only
  reaches the variance channels. With t uniform, T L_{t-1} is an unbiased
  estimate of L_vlb (less its prior term, which has no parameters), so the
  per-example loss is simple + lambda T vlb.

  Args:
    model_fn: denoiser `(x_t [B, ..., C], t [B]) -> [B, ..., 2C]`: the
      prediction, then the variance channels.
    schedule: the diffusion schedule (T = `schedule.num_timesteps`).
    x0: clean images [B, ..., C] on the 8-bit grid in [-1, 1] (the decoder
      term L_0 is a likelihood of 8-bit values).
    t: integer steps [B] in [0, T).
    noise: standard normal noise, shape of `x0`.
    var_type: 'learned' (log-variance channels) or 'learned_range'
      (interpolation between the fixed log-variances, in [-1, 1]).
    loss_type: 'l2' (L_simple), 'l1' or 'huber' for the first term.
    target: what the network predicts: 'eps', 'x0' or 'v'.
    t_weights: optional per-step weights [T] of the first term.
    vlb_weight: lambda >= 0.

  Returns:
    A `HybridLoss`, each field float32 [B].

  Raises:
    ValueError: for a fixed var_type, a negative `vlb_weight`, or an output
      without 2C channels.

  Example:
    >>> terms = hybrid_loss(model_fn, sched, x0, t, noise)
    >>> loss = terms.loss.mean()
  """
  check_choice("var_type", var_type, LEARNED_VAR_TYPES)
  if isinstance(
      vlb_weight,
      bool) or not isinstance(vlb_weight, numbers.Real) or vlb_weight < 0:
    raise ValueError(f"vlb_weight must be a number >= 0, got {vlb_weight!r}.")
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  output = model_fn(x_t, t)
  prediction, var_output = gaussian.split_model_output(output, x_t,
                                                       var_type=var_type)
  simple = _simple_loss(schedule, prediction, x0, t, noise, loss_type=loss_type,
                        target=target, t_weights=t_weights)
  frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_output],
                           axis=-1)
  vlb = likelihood.vb_terms_bpd(schedule, frozen, x0, x_t, t, target=target,
                                var_type=var_type, mean_form="x0",
                                clip_x0=False)
  return HybridLoss(loss=simple + vlb_weight * schedule.num_timesteps * vlb,
                    simple=simple, vlb=vlb)


def training_losses(model_fn: gaussian.ModelFn, schedule: Schedule,
                    x0: jnp.ndarray, key: jax.Array, *, loss_type: str = "l2",
                    target: str = "eps",
                    t_weights: Optional[jnp.ndarray] = None,
                    var_type: str = "fixed_large") -> jnp.ndarray:
  """Per-example loss with t ~ U{0, ..., T-1} and noise ~ N(0, I) from `key`.

  Args:
    model_fn: denoiser `(x_t, t) -> prediction`.
    schedule: the diffusion schedule.
    x0: clean images [B, ..., C] in [-1, 1] (on the 8-bit grid for a learned
      variance).
    key: PRNG key; split here into the step and noise keys.
    loss_type: 'l2' (L_simple), 'l1' or 'huber'.
    target: 'eps', 'x0' or 'v'.
    t_weights: optional per-step weights [T].
    var_type: the model's variance: 'fixed_large' or 'fixed_small' train the
      prediction alone (`denoising_loss`); 'learned' and 'learned_range'
      train L_hybrid (`hybrid_loss`, lambda = VLB_WEIGHT).

  Returns:
    float32 [B].
  """
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  check_choice("var_type", var_type, gaussian.VAR_TYPES)
  if var_type in LEARNED_VAR_TYPES:
    return hybrid_loss(model_fn, schedule, x0, t, noise, var_type=var_type,
                       loss_type=loss_type, target=target,
                       t_weights=t_weights).loss
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
  check_choice("target", target, gaussian.TARGETS)
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


def process_loss(model_fn: gaussian.ModelFn, process, x0: jnp.ndarray,
                 t: jnp.ndarray, noise: jnp.ndarray, *, target: str,
                 loss_type: str = "l2") -> jnp.ndarray:
  """Per-example loss on a continuous process at given times and noise.

  x_t = alpha(t) x0 + sigma(t) noise and the loss regresses
  `model_fn(x_t, t)` on `target`'s value (`processes.from_x0_eps`). On `EDM`
  the model is the preconditioned denoiser D (`processes.precondition`),
  `target` must be 'x0' and the loss is weighted by lambda(sigma):
  lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2 (EDM eq. 2 and 8). On `Flow`
  with 'velocity' it is the conditional flow-matching loss
  |u(x_t, t) - (noise - x0)|^2 (Lipman et al. 2023).

  Args:
    model_fn: `(x_t [B, ...], t float32 [B]) -> prediction of target`.
    process: an `EDM` or `Flow`.
    x0: clean images [B, ...] in [-1, 1].
    t: float32 [B] times (sigmas on EDM).
    noise: standard normal noise, shape of `x0`.
    target: 'x0' on EDM; 'velocity', 'x0', 'eps' or 'v' on Flow.
    loss_type: 'l2', 'l1' or 'huber' (averaged over non-batch dimensions).

  Returns:
    float32 [B].

  Raises:
    ValueError: for an EDM target other than 'x0', or an unknown name.

  Example:
    >>> edm = processes.EDM()
    >>> sigma = edm.sample_t(key, x0.shape[0])
    >>> loss = process_loss(processes.precondition(edm, net_fn), edm, x0,
    ...                     sigma, noise, target="x0").mean()
  """
  check_choice("target", target, processes.TARGETS)
  edm = isinstance(process, processes.EDM)
  if edm and target != "x0":
    raise ValueError("the 'edm' process trains its preconditioned denoiser "
                     f"on target 'x0', got {target!r}.")
  x_t = processes.q_sample(process, x0, t, noise)
  goal = processes.from_x0_eps(process, x0, noise, t, target=target)
  loss = regression_loss(model_fn(x_t, t), goal, loss_type=loss_type)
  return process.loss_weight(t) * loss if edm else loss


def process_training_losses(model_fn: gaussian.ModelFn, process,
                            x0: jnp.ndarray, key: jax.Array, *, target: str,
                            loss_type: str = "l2") -> jnp.ndarray:
  """`process_loss` with t from `process.sample_t` (EDM's log-normal sigma,
  flow's uniform or logit-normal t) and noise ~ N(0, I), from `key`.

  Example:
    >>> loss = process_training_losses(velocity_fn, processes.Flow(), x0,
    ...                                key, target="velocity").mean()
  """
  t_key, noise_key = jax.random.split(key)
  t = process.sample_t(t_key, x0.shape[0])
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  return process_loss(model_fn, process, x0, t, noise, target=target,
                      loss_type=loss_type)
