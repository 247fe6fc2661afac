"""Continuous diffusion processes beside the discrete VP `Schedule`: EDM and
flow matching, behind one small interface that the solvers, losses and
trainer take.

Every process is x_t = alpha(t) x_0 + sigma(t) eps with eps ~ N(0, I). A
process object (an immutable pytree whose fields are static Python numbers)
exposes

  alpha_sigma(t)      -> (alpha, sigma), float32 arrays shaped as t;
  d_alpha_sigma(t)    -> their derivatives in t;
  log_snr(t)          -> log(alpha^2 / sigma^2);
  t_from_log_snr(l)   -> the time with that log-SNR (the inverse);
  grid(num_steps, spacing=...) -> float32 [S] descending sampling times;
  prior_std           -> the std of x at the first grid time;
  sample_t(key, n)    -> float32 [n] training times,

and the module functions convert any prediction (`TARGETS`: 'eps', 'x0',
'v' with v = alpha eps - sigma x0, 'velocity' u = dx_t/dt) into the
(x0, eps) pair and back, so one solver core serves all of them. The discrete
process of DDPM stays `ddpm_jax.diffusion.schedules.Schedule` (integer steps,
unchanged); `PROCESS_NAMES[0]` names it, and `ContinuousSchedule` is its
continuous-time view for the ODE likelihood.

EDM (Karras et al. 2022) uses t = sigma, alpha = 1: x_sigma = x_0 + sigma
eps, with the preconditioned denoiser

  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise),
  c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = log(sigma) / 4

(sd = sigma_data), training levels ln sigma ~ N(P_mean, P_std^2) and the loss
weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1).

Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023): x_t =
(1 - t) x_0 + t eps for t in [0, 1], velocity target u = eps - x_0; training
times uniform or logit-normal (Esser et al. 2024), optionally shifted for
resolution, t' = s t / (1 + (s - 1) t) (Esser et al. 2024).

Example:
  >>> edm = processes.EDM()
  >>> denoise = processes.precondition(edm, backbone)  # D(x, sigma)
  >>> flow = processes.Flow(time_sampling="logit_normal")
  >>> t = flow.sample_t(jax.random.key(0), 8)
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion.schedules import Schedule

PROCESS_NAMES = ("ddpm", "edm", "flow")
# What a network may predict on a continuous process.
TARGETS = ("eps", "x0", "v", "velocity")
SPACINGS = ("karras", "uniform", "logsnr")
TIME_SAMPLINGS = ("uniform", "logit_normal")
# A flow network sees 1000 t as its time (diffusers' and SD3's convention),
# the range of the DDPM U-Net's step embedding.
FLOW_TIME_SCALE = 1000.0
# Flow's 'logsnr' and 'karras' grids span t in [FLOW_EDGE, 1 - FLOW_EDGE]
# (the log-SNR is infinite at t = 0 and t = 1); 1 - 1/1000 is the top of
# diffusers' `use_flow_sigmas`.
FLOW_EDGE = 1e-3


def _check_positive(name, value):
  if isinstance(value, bool) or not isinstance(
      value, numbers.Real) or not value > 0 or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_real(name, value):
  if isinstance(
      value,
      bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _check_num_steps(num_steps):
  if isinstance(num_steps,
                bool) or not isinstance(num_steps,
                                        (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")


def _f32(t):
  return jnp.asarray(t, jnp.float32)


def _rho_ramp(hi, lo, rho, num_steps):
  """(hi^(1/rho) + i / (S-1) (lo^(1/rho) - hi^(1/rho)))^rho, i < S."""
  ramp = np.linspace(0.0, 1.0, num_steps)
  return (hi**(1.0 / rho) + ramp * (lo**(1.0 / rho) - hi**(1.0 / rho)))**rho


@struct.dataclass
class EDM:
  """The EDM process of Karras et al. (2022): t = sigma, alpha = 1.

  Attributes:
    sigma_min: smallest sampling level (0.002 in the paper).
    sigma_max: largest sampling level and the prior's std (80).
    rho: exponent of the 'karras' grid (7).
    sigma_data: std of the data (0.5).
    p_mean: mean of ln sigma at training (-1.2).
    p_std: std of ln sigma at training (1.2).
  """
  sigma_min: float = struct.field(pytree_node=False, default=0.002)
  sigma_max: float = struct.field(pytree_node=False, default=80.0)
  rho: float = struct.field(pytree_node=False, default=7.0)
  sigma_data: float = struct.field(pytree_node=False, default=0.5)
  p_mean: float = struct.field(pytree_node=False, default=-1.2)
  p_std: float = struct.field(pytree_node=False, default=1.2)

  def __post_init__(self):
    for name in ("sigma_min", "sigma_max", "rho", "sigma_data", "p_std"):
      _check_positive(name, getattr(self, name))
    _check_real("p_mean", self.p_mean)
    if not self.sigma_min < self.sigma_max:
      raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max "
                       f"({self.sigma_max}).")

  name = "edm"

  def alpha_sigma(self, t):
    """(1, sigma = t)."""
    t = _f32(t)
    return jnp.ones_like(t), t

  def d_alpha_sigma(self, t):
    """(0, 1)."""
    t = _f32(t)
    return jnp.zeros_like(t), jnp.ones_like(t)

  def log_snr(self, t):
    """-2 log sigma."""
    return -2.0 * jnp.log(_f32(t))

  def t_from_log_snr(self, log_snr):
    """sigma = exp(-log_snr / 2)."""
    return jnp.exp(-0.5 * _f32(log_snr))

  @property
  def prior_std(self) -> float:
    """sigma_max: sampling starts from x ~ N(0, sigma_max^2 I)."""
    return self.sigma_max

  def grid(self, num_steps: int, *, spacing: str = "karras") -> jnp.ndarray:
    """S levels from sigma_max down to sigma_min, float32 [S].

    'karras' is EDM's eq. 5 with this process's rho, 'uniform' is linear in
    sigma and 'logsnr' linear in log sigma. A solver then steps from the last
    level to sigma = 0. S = 1 gives [sigma_max].

    Example:
      >>> EDM().grid(18)[:2]  # doctest: +SKIP
      Array([80.      , 57.585983], dtype=float32)
    """
    _check_num_steps(num_steps)
    check_choice("spacing", spacing, SPACINGS)
    hi, lo = float(self.sigma_max), float(self.sigma_min)
    if spacing == "karras":
      sigma = _rho_ramp(hi, lo, self.rho, num_steps)
    elif spacing == "uniform":
      sigma = np.linspace(hi, lo, num_steps)
    else:
      sigma = np.exp(np.linspace(math.log(hi), math.log(lo), num_steps))
    return jnp.asarray(sigma, jnp.float32)

  def sample_t(self, key: jax.Array, num: int) -> jnp.ndarray:
    """Training levels sigma = exp(P_mean + P_std n), n ~ N(0, 1); [num]."""
    return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (num,)))

  def preconditioning(self, sigma):
    """(c_skip, c_out, c_in, c_noise) at `sigma` (EDM Table 1)."""
    sigma = _f32(sigma)
    sd = self.sigma_data
    total = jnp.square(sigma) + sd**2
    return (sd**2 / total, sigma * sd * jax.lax.rsqrt(total),
            jax.lax.rsqrt(total), 0.25 * jnp.log(sigma))

  def loss_weight(self, sigma):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    sigma = _f32(sigma)
    sd = self.sigma_data
    return (jnp.square(sigma) + sd**2) / jnp.square(sigma * sd)


@struct.dataclass
class Flow:
  """The linear path of flow matching: x_t = (1 - t) x_0 + t eps, t in [0, 1].

  Attributes:
    time_sampling: training times 'uniform' on [0, 1] or 'logit_normal'
      (t = sigmoid(location + scale n), n ~ N(0, 1); Esser et al. 2024 use
      location 0, scale 1).
    location: mean of logit(t) for 'logit_normal'.
    scale: std of logit(t) for 'logit_normal'.
    shift: resolution shift s > 0 applied to training and sampling times,
      t' = s t / (1 + (s - 1) t); 1 is no shift (Esser et al. 2024 use
      s = sqrt(m / n) for m pixels against a base resolution of n).
  """
  time_sampling: str = struct.field(pytree_node=False, default="uniform")
  location: float = struct.field(pytree_node=False, default=0.0)
  scale: float = struct.field(pytree_node=False, default=1.0)
  shift: float = struct.field(pytree_node=False, default=1.0)

  def __post_init__(self):
    check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
    _check_real("location", self.location)
    _check_positive("scale", self.scale)
    _check_positive("shift", self.shift)

  name = "flow"

  def alpha_sigma(self, t):
    """(1 - t, t)."""
    t = _f32(t)
    return 1.0 - t, t

  def d_alpha_sigma(self, t):
    """(-1, 1)."""
    t = _f32(t)
    return -jnp.ones_like(t), jnp.ones_like(t)

  def log_snr(self, t):
    """2 log((1 - t) / t)."""
    t = _f32(t)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_log_snr(self, log_snr):
    """t = sigmoid(-log_snr / 2)."""
    return jax.nn.sigmoid(-0.5 * _f32(log_snr))

  @property
  def prior_std(self) -> float:
    """1: sampling starts from x_1 = eps ~ N(0, I) (the 'logsnr' and
    'karras' grids start at t = 1 - FLOW_EDGE, where x_t's std differs from 1
    by about 0.1%)."""
    return 1.0

  def shift_t(self, t):
    """s t / (1 + (s - 1) t), the resolution-shifted time."""
    t = _f32(t)
    return self.shift * t / (1.0 + (self.shift - 1.0) * t)

  def grid(self, num_steps: int, *, spacing: str = "uniform") -> jnp.ndarray:
    """S sampling times, descending, float32 [S], shifted by `shift`.

    'uniform': t_i = 1 - i / S (rectified flow's Euler steps of 1/S; with
    the solver's last step to t = 0). 'logsnr' / 'karras': uniform in log-SNR
    / the rho = 7 ramp in sigma / alpha = t / (1 - t), between t = 1 -
    FLOW_EDGE and t = FLOW_EDGE (before the shift).
    """
    _check_num_steps(num_steps)
    check_choice("spacing", spacing, SPACINGS)
    if spacing == "uniform":
      t = 1.0 - np.arange(num_steps) / num_steps
    else:
      # log(sigma / alpha) at the two ends: +-log((1 - e) / e).
      top = math.log((1.0 - FLOW_EDGE) / FLOW_EDGE)
      if spacing == "logsnr":
        log_ratio = np.linspace(top, -top, num_steps)
      else:
        log_ratio = np.log(
            _rho_ramp(math.exp(top), math.exp(-top), 7.0, num_steps))
      t = 1.0 / (1.0 + np.exp(-log_ratio))
    t = self.shift * t / (1.0 + (self.shift - 1.0) * t)
    return jnp.asarray(t, jnp.float32)

  def sample_t(self, key: jax.Array, num: int) -> jnp.ndarray:
    """Training times [num], drawn by `time_sampling` then shifted."""
    if self.time_sampling == "uniform":
      t = jax.random.uniform(key, (num,))
    else:
      t = jax.nn.sigmoid(self.location +
                         self.scale * jax.random.normal(key, (num,)))
    return self.shift_t(t)


@struct.dataclass
class ContinuousSchedule:
  """A `Schedule` in continuous time, for the probability-flow ODE
  likelihood (`ddpm_jax.diffusion.ode_likelihood`).

  t in [0, T-1] is the step index; the log-SNR is linear between integer
  steps, where it equals the schedule's, so alpha(t)^2 = sigmoid(log_snr(t))
  = alpha-bar at each step. A network trained on integer steps is evaluated
  between them. Not a sampling process: the samplers take the `Schedule`.

  Attributes:
    log_snr_table: float32 [T], log(alpha-bar / (1 - alpha-bar)) per step.
  """
  log_snr_table: jnp.ndarray

  name = "ddpm"

  @classmethod
  def from_schedule(cls, schedule: Schedule) -> ContinuousSchedule:
    """Its log-SNR table, from the schedule's alpha-bar (float64 first)."""
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    return cls(
        log_snr_table=jnp.asarray(np.log(abar) - np.log1p(-abar), jnp.float32))

  def log_snr(self, t):
    """The log-SNR, linear between steps."""
    steps = jnp.arange(self.log_snr_table.shape[0], dtype=jnp.float32)
    return jnp.interp(_f32(t), steps, self.log_snr_table)

  def alpha_sigma(self, t):
    """(sqrt(sigmoid(log_snr)), sqrt(sigmoid(-log_snr)))."""
    log_snr = self.log_snr(t)
    return (jnp.sqrt(jax.nn.sigmoid(log_snr)),
            jnp.sqrt(jax.nn.sigmoid(-log_snr)))

  def d_alpha_sigma(self, t):
    """Derivatives of `alpha_sigma` in t (piecewise, by forward mode)."""
    t = _f32(t)
    _, tangents = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
    return tangents

  @property
  def prior_std(self) -> float:
    """1: the VP process ends near N(0, I)."""
    return 1.0


Process = Union[Schedule, EDM, Flow]


def process_name(process: Process) -> str:
  """'ddpm' for a `Schedule`, else the process's `name`."""
  return PROCESS_NAMES[0] if isinstance(process, Schedule) else process.name


def make_process(name: str, **options) -> Union[EDM, Flow]:
  """The continuous process `name` ('edm' or 'flow') with keyword options.

  Raises:
    ValueError: for an unknown name or a bad option value.

  Example:
    >>> make_process("edm", sigma_max=80.0, rho=7.0)
  """
  check_choice("process", name, PROCESS_NAMES[1:])
  return (EDM if name == "edm" else Flow)(**options)


# ----------------------------------------------------------------------------
# Conversions between predictions.


def _scales(process, t, ndim):
  shape = (-1,) + (1,) * (ndim - 1)
  alpha, sigma = process.alpha_sigma(t)
  d_alpha, d_sigma = process.d_alpha_sigma(t)
  return tuple(a.reshape(shape) for a in (alpha, sigma, d_alpha, d_sigma))


def predict_x0_eps(process, x_t, t, prediction, *, target: str):
  """(x0, eps) from a prediction of `target` at (x_t, t [B]).

  With x = alpha x0 + sigma eps: 'eps' gives x0 = (x - sigma eps) / alpha,
  'v' (= alpha eps - sigma x0) gives x0 = (alpha x - sigma v) / (alpha^2 +
  sigma^2), 'velocity' (u = alpha' x0 + sigma' eps) gives x0 = (sigma' x -
  sigma u) / (alpha sigma' - sigma alpha').

  Example:
    >>> x0, eps = predict_x0_eps(Flow(), x_t, t, u, target="velocity")
  """
  check_choice("target", target, TARGETS)
  alpha, sigma, d_alpha, d_sigma = _scales(process, t, x_t.ndim)
  if target == "eps":
    return (x_t - sigma * prediction) / alpha, prediction
  if target == "x0":
    x0 = prediction
  elif target == "v":
    x0 = (alpha * x_t - sigma * prediction) / (jnp.square(alpha) +
                                               jnp.square(sigma))
  else:
    x0 = (d_sigma * x_t - sigma * prediction) / (alpha * d_sigma -
                                                 sigma * d_alpha)
  return x0, (x_t - alpha * x0) / sigma


def from_x0_eps(process, x0, eps, t, *, target: str):
  """The prediction of `target` that corresponds to (x0, eps) at t [B]."""
  check_choice("target", target, TARGETS)
  alpha, sigma, d_alpha, d_sigma = _scales(process, t, x0.ndim)
  if target == "eps":
    return eps
  if target == "x0":
    return x0
  if target == "v":
    return alpha * eps - sigma * x0
  return d_alpha * x0 + d_sigma * eps


def velocity_from_x0(process, x_t, t, x0):
  """dx_t/dt = alpha' x0 + sigma' eps with eps = (x_t - alpha x0) / sigma."""
  alpha, sigma, d_alpha, d_sigma = _scales(process, t, x_t.ndim)
  return d_alpha * x0 + d_sigma * (x_t - alpha * x0) / sigma


def q_sample(process, x0, t, noise):
  """x_t = alpha(t) x0 + sigma(t) noise for t [B]."""
  alpha, sigma, _, _ = _scales(process, t, x0.ndim)
  return (alpha * x0 + sigma * noise).astype(x0.dtype)


def precondition(process: EDM, backbone: Callable[[jnp.ndarray, jnp.ndarray],
                                                  jnp.ndarray]):
  """EDM's denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

  Args:
    process: the `EDM` process (its sigma_data).
    backbone: any network F(x [B, ...], c_noise float32 [B]) -> [B, ...].

  Returns:
    denoiser(x [B, ...], sigma float32 [B]) -> the x0 prediction [B, ...].

  Example:
    >>> denoise = precondition(EDM(), lambda x, c: unet.apply(v, x, c))
    >>> out = solvers.heun_sample(denoise, EDM(), shape=(4, 32, 32, 3),
    ...                           key=key, num_steps=18, target="x0")
  """
  if not isinstance(process, EDM):
    raise ValueError("precondition applies to the 'edm' process, got "
                     f"{process_name(process)!r}.")

  def denoiser(x, sigma):
    c_skip, c_out, c_in, c_noise = process.preconditioning(sigma)
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = backbone(x * c_in.reshape(shape).astype(x.dtype), c_noise)
    return (c_skip.reshape(shape) * x + c_out.reshape(shape) * out).astype(
        x.dtype)

  return denoiser


def network_model_fn(process: Process,
                     net_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]):
  """The `model_fn(x_t, t)` that samplers and losses take, from a network
  `net_fn(x, time input [B]) -> output`.

  A `Schedule`'s network is the model itself (integer steps); `EDM`'s is
  preconditioned (`precondition`, time input c_noise = log(sigma) / 4, output
  the x0 prediction D); `Flow`'s sees FLOW_TIME_SCALE t.

  Example:
    >>> model_fn = network_model_fn(Flow(), lambda x, t: unet.apply(v, x, t))
  """
  if isinstance(process, Schedule):
    return net_fn
  if isinstance(process, EDM):
    return precondition(process, net_fn)
  return lambda x, t: net_fn(x, FLOW_TIME_SCALE * t)
