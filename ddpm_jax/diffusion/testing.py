"""Reference problems with exact answers, for testing and benchmarking samplers.

Data from an isotropic Gaussian mixture has an exact denoiser in closed form:
with x_t = alpha x_0 + sigma eps (alpha = sqrt(abar_t), sigma =
sqrt(1 - abar_t)), component k gives x_t ~ N(alpha mu_k, v_k I) with
v_k = alpha^2 s_k^2 + sigma^2, and

  E[x_0 | x_t]  = sum_k r_k (mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k)),
  E[eps | x_t]  = sum_k r_k sigma (x_t - alpha mu_k) / v_k,
  r_k(x_t)      = softmax_k(log w_k + log N(x_t; alpha mu_k, v_k I)).

These are the minimizers of the eps, x0 and v losses, so a sampler driven by
them samples the mixture up to its own discretization error. Each component
may carry a class label: the class-conditional denoiser restricts the sum to
that class's components, and the null label gives the unconditional one,
which is exactly what classifier-free guidance trains a network to be.

Example:
  >>> mix = gaussian_mixture(weights=[0.5, 0.5], means=[[-0.5], [0.5]],
  ...                        stds=[0.1, 0.1])
  >>> model_fn = denoiser(mix, sched)  # (x_t [B, 1], t [B]) -> eps
  >>> out = solvers.dpmpp_2m_sample(model_fn, sched, shape=(1000, 1),
  ...                               key=key, num_steps=20)
  >>> x, _ = sample(mix, key, 1000)
  >>> float(sliced_wasserstein(out.images, x, key=key))
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, processes
from ddpm_jax.diffusion.schedules import Schedule


class GaussianMixture(NamedTuple):
  """An isotropic Gaussian mixture in D dimensions with K components."""
  weights: jnp.ndarray  # [K] float32, positive, summing to 1.
  means: jnp.ndarray  # [K, D] float32.
  stds: jnp.ndarray  # [K] float32 standard deviation of each component.
  labels: jnp.ndarray  # [K] int32 class of each component, in [0, C).

  @property
  def num_classes(self) -> int:
    """C = 1 + the largest label (static)."""
    return int(np.max(np.asarray(self.labels))) + 1


def gaussian_mixture(*, weights, means, stds, labels=None) -> GaussianMixture:
  """Builds a `GaussianMixture`, checking its arguments.

  Args:
    weights: K positive numbers; normalized to sum to 1.
    means: [K, D] component means.
    stds: K positive standard deviations.
    labels: optional K class labels in [0, C) using every class; default all
      0 (one class).

  Returns:
    The `GaussianMixture`.

  Raises:
    ValueError: for mismatched shapes, non-positive weights or stds, or
      labels that skip a class.
  """
  weights = np.asarray(weights, np.float64)
  means = np.asarray(means, np.float64)
  stds = np.asarray(stds, np.float64)
  if means.ndim != 2 or weights.shape != (means.shape[0],) or (
      stds.shape != weights.shape):
    raise ValueError("means must be [K, D] with K weights and K stds; got "
                     f"shapes {means.shape}, {weights.shape}, {stds.shape}.")
  if np.any(weights <= 0) or np.any(stds <= 0):
    raise ValueError("weights and stds must be positive.")
  labels = np.zeros(len(weights),
                    np.int64) if labels is None else (np.asarray(labels))
  if labels.shape != weights.shape or not np.issubdtype(labels.dtype,
                                                        np.integer):
    raise ValueError(f"labels must be K = {len(weights)} integers.")
  if set(labels.tolist()) != set(range(labels.max() + 1)):
    raise ValueError(f"labels must use every class 0..C-1, got {labels}.")
  return GaussianMixture(
      weights=jnp.asarray(weights / weights.sum(),
                          jnp.float32), means=jnp.asarray(means, jnp.float32),
      stds=jnp.asarray(stds,
                       jnp.float32), labels=jnp.asarray(labels, jnp.int32))


def sample(mix: GaussianMixture, key: jax.Array, num: int, *,
           label: Optional[int] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Draws `num` points, optionally from one class only.

  Returns:
    (x float32 [num, D], class labels int32 [num]).
  """
  comp_key, noise_key = jax.random.split(key)
  logits = jnp.log(mix.weights)
  if label is not None:
    logits = jnp.where(mix.labels == label, logits, -jnp.inf)
  comp = jax.random.categorical(comp_key, logits, shape=(num,))
  noise = jax.random.normal(noise_key, (num, mix.means.shape[1]))
  return mix.means[comp] + mix.stds[comp, None] * noise, mix.labels[comp]


def _component_logits(mix: GaussianMixture, x, alpha, var):
  """log w_k + log N(x; alpha mu_k, var_k I): [B, K]. alpha [B, 1]; var
  [B, K]."""
  dim = x.shape[-1]
  sq = jnp.sum(jnp.square(x[:, None, :] - alpha[:, :, None] * mix.means),
               axis=-1)
  return (jnp.log(mix.weights) - 0.5 * dim * jnp.log(2 * math.pi * var) -
          0.5 * sq / var)


def posterior_predictions(mix: GaussianMixture, x_t, alpha, sigma,
                          class_mask=None):
  """Exact E[x_0 | x_t] and E[eps | x_t].

  Args:
    mix: the data distribution.
    x_t: [B, D].
    alpha, sigma: [B, 1] signal and noise scales of x_t.
    class_mask: optional bool [B, K]: the components each example may come
      from (the conditional); None for all.

  Returns:
    (x0 [B, D], eps [B, D]).
  """
  var = jnp.square(alpha) * jnp.square(mix.stds) + jnp.square(sigma)  # [B, K]
  logits = _component_logits(mix, x_t, alpha, var)
  if class_mask is not None:
    logits = jnp.where(class_mask, logits, -jnp.inf)
  resp = jax.nn.softmax(logits, axis=-1)[:, :, None]  # [B, K, 1]
  offset = x_t[:, None, :] - alpha[:, :, None] * mix.means  # [B, K, D]
  var = var[:, :, None]
  x0 = jnp.sum(
      resp *
      (mix.means +
       (alpha[:, :, None] * jnp.square(mix.stds)[:, None] / var) * offset),
      axis=1)
  eps = jnp.sum(resp * sigma[:, :, None] * offset / var, axis=1)
  return x0, eps


def _as_target(x0, eps, alpha, sigma, target):
  if target == "eps":
    return eps
  if target == "x0":
    return x0
  return alpha * eps - sigma * x0


def _scales(schedule: Schedule, x, t):
  return (gaussian.extract(schedule.sqrt_alphas_cumprod, t, x.shape),
          gaussian.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape))


def denoiser(mix: GaussianMixture, schedule: Schedule, *,
             target: str = "eps") -> gaussian.ModelFn:
  """The exact unconditional denoiser `(x_t [B, D], t [B]) -> target`.

  Example:
    >>> model_fn = denoiser(mix, sched, target="v")
  """
  check_choice("target", target, gaussian.TARGETS)

  def model_fn(x_t, t):
    alpha, sigma = _scales(schedule, x_t, t)
    x0, eps = posterior_predictions(mix, x_t, alpha, sigma)
    return _as_target(x0, eps, alpha, sigma, target)

  return model_fn


def conditional_denoiser(
    mix: GaussianMixture, schedule: Schedule, *, target: str = "eps"
) -> Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """The exact class-conditional denoiser `(x_t, t, y) -> target`.

  Label y in [0, C) conditions on that class; y = C (`mix.num_classes`, the
  null label) gives the unconditional denoiser.

  Example:
    >>> cond_fn = conditional_denoiser(mix, sched)
    >>> eps = cond_fn(x_t, t, jnp.array([0, 1, mix.num_classes]))
  """
  check_choice("target", target, gaussian.TARGETS)
  num_classes = mix.num_classes

  def model_fn(x_t, t, y):
    alpha, sigma = _scales(schedule, x_t, t)
    mask = (mix.labels[None, :] == y[:, None]) | (y[:, None] == num_classes)
    x0, eps = posterior_predictions(mix, x_t, alpha, sigma, mask)
    return _as_target(x0, eps, alpha, sigma, target)

  return model_fn


def process_denoiser(mix: GaussianMixture, process, *,
                     target: str = "x0") -> gaussian.ModelFn:
  """The exact denoiser `(x_t [B, D], t float32 [B]) -> target` of a
  continuous process (`ddpm_jax.diffusion.processes`: `EDM`, `Flow`).

  With target 'velocity' this is the exact velocity E[u | x_t] of flow
  matching, whose ODE carries N(0, I) at t = 1 to the mixture at t = 0; with
  'x0' on `EDM` it is the ideal preconditioned denoiser D(x; sigma).

  Example:
    >>> velocity_fn = process_denoiser(mix, processes.Flow(),
    ...                                target="velocity")
  """
  check_choice("target", target, processes.TARGETS)

  def model_fn(x_t, t):
    alpha, sigma = (a[:, None] for a in process.alpha_sigma(t))
    x0, eps = posterior_predictions(mix, x_t, alpha, sigma)
    return processes.from_x0_eps(process, x0, eps, t, target=target)

  return model_fn


def class_log_posterior(mix: GaussianMixture, x: jnp.ndarray) -> jnp.ndarray:
  """log p(y | x_0 = x) of the mixture's classes, float32 [B, C]."""
  var = jnp.broadcast_to(jnp.square(mix.stds), (x.shape[0],) + mix.stds.shape)
  logits = _component_logits(mix, x, jnp.ones((x.shape[0], 1)), var)
  one_hot = jax.nn.one_hot(mix.labels, mix.num_classes, dtype=bool)  # [K, C]
  per_class = jax.nn.logsumexp(
      jnp.where(one_hot[None], logits[:, :, None], -jnp.inf), axis=1)
  return per_class - jax.nn.logsumexp(logits, axis=1, keepdims=True)


class ComponentFit(NamedTuple):
  """Per-component estimates from samples (see `fit_components`)."""
  weights: jnp.ndarray  # [K]
  means: jnp.ndarray  # [K, D]
  stds: jnp.ndarray  # [K] isotropic standard deviations.


def fit_components(mix: GaussianMixture, x: jnp.ndarray) -> ComponentFit:
  """The mixture's parameters as estimated from samples `x` [n, D].

  With r_k(x) the posterior probability of component k under `mix`,
  E[r_k(x) g(x)] = w_k E_k[g] for data from `mix`, so
  w_k ~ mean(r_k), mu_k ~ mean(r_k x) / w_k and
  s_k^2 ~ mean(r_k |x - mu_k|^2) / (w_k D) are consistent estimates of the
  true parameters when x comes from `mix`, and differ from them when it does
  not: a sampler's weight, location and spread errors per component.
  """
  var = jnp.broadcast_to(jnp.square(mix.stds), (x.shape[0],) + mix.stds.shape)
  resp = jax.nn.softmax(
      _component_logits(mix, x, jnp.ones((x.shape[0], 1)), var), axis=-1)
  weights = jnp.mean(resp, axis=0)
  means = (resp.T @ x) / (x.shape[0] * weights[:, None])
  sq = jnp.sum(jnp.square(x[:, None, :] - means[None]), axis=-1)
  stds = jnp.sqrt(jnp.mean(resp * sq, axis=0) / (weights * x.shape[1]))
  return ComponentFit(weights=weights, means=means, stds=stds)


def sliced_wasserstein(x: jnp.ndarray, y: jnp.ndarray, *, key: jax.Array,
                       num_projections: int = 128) -> jnp.ndarray:
  """Sliced 2-Wasserstein distance between two equal-size point sets.

  sqrt(mean over random unit directions u of W_2^2(u.x, u.y)), each 1-D W_2
  from the sorted projections. Two independent samples of n points from the
  same law still differ by about c / sqrt(n).

  Args:
    x, y: [n, D].
    key: PRNG key of the directions.
    num_projections: number of directions.

  Returns:
    float32 scalar.
  """
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f"x and y must both be [n, D], got {x.shape} and "
                     f"{y.shape}.")
  dirs = jax.random.normal(key, (x.shape[1], num_projections))
  dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
  px = jnp.sort(x @ dirs, axis=0)
  py = jnp.sort(y @ dirs, axis=0)
  return jnp.sqrt(jnp.mean(jnp.square(px - py)))
