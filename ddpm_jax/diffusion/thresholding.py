"""Dynamic thresholding of the predicted x0 (Saharia et al. 2022, Imagen,
Section 2.3), as a wrapper of any denoiser, so every sampler can use it.

Per example, s = max(1, the `percentile` quantile of |x0_hat|), and x0_hat
becomes clip(x0_hat, -s, s) / s; the wrapped model returns the prediction of
its own target that corresponds to the thresholded x0 at the same x_t (eps
recomputed from it). Where every |x0_hat| <= 1, s = 1 and nothing changes;
static clipping to [-1, 1] is the limit percentile -> 1 without the division.

Example:
  >>> model_fn = dynamic_thresholding(model_fn, sched, target="eps",
  ...                                 percentile=0.995)
  >>> out = solvers.dpmpp_2m_sample(model_fn, sched, shape=(4, 64, 64, 3),
  ...                               key=key, num_steps=20)
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, processes
from ddpm_jax.diffusion.schedules import Schedule


def threshold_x0(x0: jnp.ndarray, *, percentile: float) -> jnp.ndarray:
  """clip(x0, -s, s) / s per example, s = max(1, quantile(|x0|, percentile)).

  Args:
    x0: [B, ...] predicted clean images.
    percentile: in (0, 1], e.g. 0.995 (Imagen's 99.5%).

  Returns:
    [B, ...], within [-1, 1].
  """
  if isinstance(percentile, bool) or not isinstance(
      percentile, numbers.Real) or not 0 < percentile <= 1:
    raise ValueError(f"percentile must be a number in (0, 1], got "
                     f"{percentile!r}.")
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def dynamic_thresholding(model_fn: gaussian.ModelFn, schedule, *, target: str,
                         percentile: float = 0.995) -> gaussian.ModelFn:
  """`model_fn` with its implied x0 dynamically thresholded.

  Args:
    model_fn: denoiser `(x_t, t) -> prediction of target` (a learned-variance
      output with 2C channels keeps its variance channels).
    schedule: the `Schedule` (integer t) or a continuous process (`EDM`,
      `Flow`; float t).
    target: what `model_fn` predicts ('eps', 'x0', 'v'; also 'velocity' on
      a continuous process).
    percentile: in (0, 1].

  Returns:
    `(x_t, t) -> prediction of target` from the thresholded x0.

  Example:
    >>> model_fn = dynamic_thresholding(model_fn, sched, target="v")
  """
  discrete = isinstance(schedule, Schedule)
  check_choice("target", target,
               gaussian.TARGETS if discrete else processes.TARGETS)
  threshold_x0(jnp.zeros((1, 1)), percentile=percentile)  # Checks it.

  def wrapped(x_t, t):
    out = model_fn(x_t, t)
    channels = x_t.shape[-1]
    extra = None
    if out.shape[-1] == 2 * channels and out.shape[:-1] == x_t.shape[:-1]:
      out, extra = out[..., :channels], out[..., channels:]
    if discrete:
      x0, _ = gaussian.predict_x0_eps(schedule, x_t, t, out, target=target)
      x0 = threshold_x0(x0, percentile=percentile)
      eps = gaussian.predict_eps_from_x0(schedule, x_t, t, x0)
      new = {
          "eps": eps,
          "x0": x0,
          "v": gaussian.velocity(schedule, x0, t, eps)
      }[target]
    else:
      x0, _ = processes.predict_x0_eps(schedule, x_t, t, out, target=target)
      x0 = threshold_x0(x0, percentile=percentile)
      alpha, sigma = (a.reshape((-1,) + (1,) * (x_t.ndim - 1))
                      for a in schedule.alpha_sigma(t))
      eps = (x_t - alpha * x0) / sigma
      new = processes.from_x0_eps(schedule, x0, eps, t, target=target)
    new = new.astype(out.dtype)
    return new if extra is None else jnp.concatenate([new, extra], axis=-1)

  return wrapped
