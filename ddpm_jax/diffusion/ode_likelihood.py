"""Log-likelihood through the probability-flow ODE of any process.

For a process of `ddpm_jax.diffusion.processes` (`EDM`, `Flow`), or a DDPM
`Schedule` in continuous time (`processes.ContinuousSchedule`: the log-SNR
linear between steps, the network called between integer steps), and a
model `model_fn(x_t, t)`, the probability-flow ODE dx/dt = u(x, t) (the velocity
alpha' x0_hat + sigma' eps_hat of the model's predictions) carries the data
at t0 to the prior at t1, and the instantaneous change of variables (Chen
et al. 2018; Song et al. 2021, Appendix D.2) gives

  log p_t0(x) = log p_t1(x(t1)) + int_t0^t1 div u(x(t), t) dt.

The divergence is exact (one vector-Jacobian product per dimension, for
small D) or Hutchinson's estimate z^T (du/dx) z with one Rademacher z per
example, fixed along the path, as in score_sde (which also takes it in
reverse mode: networks with custom_vjp kernels, as the U-Net's on CPU,
have no forward mode). The ODE is solved by diffrax
(Tsit5, adaptive steps). The prior is N(0, prior_std^2 I) at t1: exact for
flow (t1 = 1), within O(|x_t1| |E x0| / sigma_max^2) nats for EDM and
O(alpha_{T-1} |x_t1| |E x0|) for a Schedule.

Bits per dimension follow score_sde for data in [-1, 1] on `num_bins`
levels with uniform dequantization: -log p / (D ln 2) + log2(num_bins / 2).
diffrax is an optional dependency (`pip install -e ".[likelihood]"`).

Example:
  >>> flow = processes.Flow()
  >>> out = ode_log_likelihood(velocity_fn, flow, x0, target="velocity",
  ...                          key=jax.random.key(0))
  >>> float(out.bits_per_dim.mean())
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, processes
from ddpm_jax.diffusion.schedules import Schedule


class ODELikelihood(NamedTuple):
  """Per-example results of `ode_log_likelihood`."""
  log_prob: jnp.ndarray  # float32 [B], log p_t0(x) in nats.
  bits_per_dim: jnp.ndarray  # float32 [B], dequantized (see the module).
  prior_log_prob: jnp.ndarray  # float32 [B], log p_t1(x(t1)).
  num_steps: jnp.ndarray  # int32 [], accepted steps of the ODE solver.


def default_interval(process) -> tuple[float, float]:
  """(t0, t1): (sigma_min, sigma_max) on EDM, (FLOW_EDGE, 1) on flow, (0,
  T-1) on a `Schedule` (or its `processes.ContinuousSchedule`)."""
  if isinstance(process, Schedule):
    return 0.0, float(process.num_timesteps - 1)
  if isinstance(process, processes.ContinuousSchedule):
    return 0.0, float(process.log_snr_table.shape[0] - 1)
  if isinstance(process, processes.EDM):
    return float(process.sigma_min), float(process.sigma_max)
  if isinstance(process, processes.Flow):
    return processes.FLOW_EDGE, 1.0
  raise ValueError("ode_log_likelihood takes a Schedule, EDM or Flow, got "
                   f"{type(process).__name__}.")


def ode_log_likelihood(model_fn: gaussian.ModelFn, process, x0: jnp.ndarray, *,
                       target: str, key: Optional[jax.Array] = None,
                       exact_trace: bool = False,
                       interval: Optional[tuple[float, float]] = None,
                       rtol: float = 1e-5, atol: float = 1e-5,
                       num_bins: int = 256,
                       max_steps: int = 4096) -> ODELikelihood:
  """log p(x0) of the model's probability-flow ODE, per example.

  Args:
    model_fn: `(x_t [B, ...], t float32 [B]) -> prediction of target`.
    process: an `EDM`, `Flow` or `Schedule` (then `model_fn` gets float
      steps t in [0, T-1]).
    x0: data [B, ...] (in [-1, 1] for the bits/dim offset).
    target: what `model_fn` predicts: 'eps', 'x0', 'v' or 'velocity'.
    key: PRNG key of Hutchinson's Rademacher vectors; not used with
      `exact_trace`.
    exact_trace: the exact divergence (D Jacobian-vector products) instead
      of Hutchinson's estimate.
    interval: (t0, t1) of the ODE; default `default_interval(process)`.
    rtol, atol: tolerances of diffrax's PID step-size controller.
    num_bins: levels of the data, for bits/dim.
    max_steps: most ODE steps.

  Returns:
    An `ODELikelihood`.

  Raises:
    ValueError: for another process type, an unknown target, a missing key,
      or a bad interval.

  Example:
    >>> out = ode_log_likelihood(denoise, processes.EDM(), x0, target="x0",
    ...                          key=jax.random.key(0))
  """
  import diffrax  # pylint: disable=g-import-not-at-top

  check_choice("target", target, processes.TARGETS)
  t0, t1 = default_interval(process) if interval is None else interval
  if isinstance(process, Schedule):
    process = processes.ContinuousSchedule.from_schedule(process)
  if not 0 <= t0 < t1:
    raise ValueError(f"interval must satisfy 0 <= t0 < t1, got {(t0, t1)}.")
  if not exact_trace and key is None:
    raise ValueError("key is required for Hutchinson's trace estimator (or "
                     "pass exact_trace=True).")
  batch = x0.shape[0]
  axes = tuple(range(1, x0.ndim))
  dim = math.prod(x0.shape[1:])

  def velocity(t, x):
    tb = jnp.full((batch,), t, jnp.float32)
    pred_x0, _ = processes.predict_x0_eps(process, x, tb, model_fn(x, tb),
                                          target=target)
    return processes.velocity_from_x0(process, x, tb, pred_x0)

  if exact_trace:
    basis = jnp.eye(dim, dtype=x0.dtype).reshape((dim,) + x0.shape[1:])

    def divergence(t, x):
      u, vjp_fn = jax.vjp(lambda y: velocity(t, y), x)

      def diag_term(e):
        cotangent = jnp.broadcast_to(e, x.shape)
        (row,) = vjp_fn(cotangent)
        return jnp.sum(row * cotangent, axis=axes)

      return u, jnp.sum(jax.lax.map(diag_term, basis), axis=0)
  else:
    z = jax.random.rademacher(key, x0.shape, x0.dtype)

    def divergence(t, x):
      u, vjp_fn = jax.vjp(lambda y: velocity(t, y), x)
      (zj,) = vjp_fn(z)
      return u, jnp.sum(zj * z, axis=axes)

  def drift(t, state, args):
    del args
    return divergence(t, state[0])

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(drift), diffrax.Tsit5(), t0=t0, t1=t1, dt0=None,
      y0=(x0.astype(jnp.float32), jnp.zeros((batch,), jnp.float32)),
      stepsize_controller=diffrax.PIDController(rtol=rtol,
                                                atol=atol), max_steps=max_steps)
  x1, delta = (y[-1] for y in solution.ys)
  std = float(process.prior_std)
  prior = (-0.5 * jnp.sum(jnp.square(x1), axis=axes) / std**2 -
           0.5 * dim * math.log(2 * math.pi * std**2))
  log_prob = prior + delta
  bpd = -log_prob / (dim * math.log(2.0)) + math.log2(num_bins / 2)
  return ODELikelihood(
      log_prob=log_prob, bits_per_dim=bpd, prior_log_prob=prior,
      num_steps=jnp.asarray(solution.stats["num_accepted_steps"], jnp.int32))
