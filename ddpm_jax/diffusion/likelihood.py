"""The variational bound of DDPM in bits per dimension.

The negative log-likelihood of 8-bit images is bounded by

  L = L_T + sum_{t>1} L_{t-1} + L_0,

the prior term L_T = KL(q(x_T | x_0) || N(0, I)), the KL terms
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and the discretized
Gaussian decoder L_0 = -log p(x_0 | x_1). Everything here is in bits per
dimension (nats / (log 2 * number of dimensions)).

Example:
  >>> vlb = variational_bound(model_fn, sched, x0, key)
  >>> vlb.total_bpd.mean()
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import gaussian
from ddpm_jax.diffusion.schedules import Schedule


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats.

  Arguments broadcast against each other.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
  """The tanh approximation of the standard normal CDF used by DDPM."""
  return 0.5 * (1.0 + jnp.tanh(
      math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, *, means: jnp.ndarray,
                                        log_scales: jnp.ndarray) -> jnp.ndarray:
  """Log-likelihood of 8-bit data under a Gaussian discretized into bins.

  The 256 values of 8-bit data map to x in {-1, -1 + 2/255, ..., 1}; each owns
  the bin x +- 1/255, and the outer bins reach to -inf and +inf, so the
  probabilities of the 256 values sum to 1.

  Args:
    x: data in [-1, 1] on the 8-bit grid, [B, ...].
    means: Gaussian means, broadcastable to `x`.
    log_scales: log standard deviations, broadcastable to `x`.

  Returns:
    Elementwise log-probabilities in nats, shape of `x`.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_bits(nats: jnp.ndarray) -> jnp.ndarray:
  """Averages nats over the non-batch dimensions and converts to bits."""
  return jnp.mean(nats, axis=tuple(range(1, nats.ndim))) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """The prior term KL(q(x_T | x_0) || N(0, I)) in bits/dim, float32 [B]."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean, _, log_variance = gaussian.q_mean_variance(schedule, x0, t)
  return _mean_bits(normal_kl(mean, log_variance, 0.0, 0.0))


def vb_terms_bpd(schedule: Schedule, model_output: jnp.ndarray, x0: jnp.ndarray,
                 x_t: jnp.ndarray, t: jnp.ndarray, *, target: str = "eps",
                 var_type: str = "fixed_large", mean_form: str = "x0",
                 clip_x0: bool = True) -> jnp.ndarray:
  """One term of the bound per example: L_{t-1} for t > 0, L_0 for t = 0.

  Args:
    schedule: the diffusion schedule.
    model_output: the network output at (x_t, t).
    x0: clean images [B, ...] on the 8-bit grid in [-1, 1].
    x_t: noisy images at step t.
    t: steps [B].
    target, var_type, mean_form, clip_x0: as in
      `ddpm_jax.diffusion.p_mean_variance`.

  Returns:
    float32 [B], bits per dimension.
  """
  true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(
      schedule, x0, x_t, t)
  out = gaussian.p_mean_variance(schedule, model_output, x_t, t, target=target,
                                 var_type=var_type, mean_form=mean_form,
                                 clip_x0=clip_x0)
  kl = _mean_bits(
      normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
  decoder_nll = -_mean_bits(
      discretized_gaussian_log_likelihood(x0, means=out.mean,
                                          log_scales=0.5 * out.log_variance))
  return jnp.where(t == 0, decoder_nll, kl)


class VariationalBound(NamedTuple):
  """The bound of each image in bits/dim and its per-term breakdown."""
  total_bpd: jnp.ndarray  # [B] = prior_bpd + decoder_bpd + kl_bpd
  prior_bpd: jnp.ndarray  # [B] L_T
  decoder_bpd: jnp.ndarray  # [B] L_0
  kl_bpd: jnp.ndarray  # [B] sum of L_1 .. L_{T-1}
  terms_bpd: jnp.ndarray  # [B, T] term of each step (index 0 is L_0)


def variational_bound(model_fn: gaussian.ModelFn, schedule: Schedule,
                      x0: jnp.ndarray, key: jax.Array, *, target: str = "eps",
                      var_type: str = "fixed_large", mean_form: str = "x0",
                      clip_x0: bool = True) -> VariationalBound:
  """The full bound of each image over all T steps, with one `lax.scan`.

  Step t draws its noise from `fold_in(key, t)`, so the result does not depend
  on the batch it runs in beyond the images themselves.

  Args:
    model_fn: denoiser `(x_t [B, ...], t [B]) -> output`.
    schedule: the diffusion schedule.
    x0: images [B, ...] on the 8-bit grid in [-1, 1] (u8 / 127.5 - 1).
    key: PRNG key.
    target, var_type, mean_form, clip_x0: as in
      `ddpm_jax.diffusion.p_mean_variance`.

  Returns:
    A `VariationalBound`.
  """
  batch = x0.shape[0]

  def step(carry, t_scalar):
    t = jnp.full((batch,), t_scalar, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape,
                              x0.dtype)
    x_t = gaussian.q_sample(schedule, x0, t, noise)
    term = vb_terms_bpd(schedule, model_fn(x_t, t), x0, x_t, t, target=target,
                        var_type=var_type, mean_form=mean_form, clip_x0=clip_x0)
    return carry, term

  _, terms = jax.lax.scan(step, None,
                          jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
  terms = terms.T  # [B, T]
  prior = prior_bpd(schedule, x0)
  decoder = terms[:, 0]
  kl = jnp.sum(terms[:, 1:], axis=1)
  return VariationalBound(total_bpd=prior + decoder + kl, prior_bpd=prior,
                          decoder_bpd=decoder, kl_bpd=kl, terms_bpd=terms)
