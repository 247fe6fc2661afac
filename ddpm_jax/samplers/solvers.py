"""Few-step ODE/SDE solvers on the discrete schedule and on the continuous
processes (EDM, flow matching).

Euler and Heun (Karras et al. 2022, Algorithm 1 with the probability-flow
ODE in sigma = sqrt((1 - abar) / abar)) and DPM-Solver++ (Lu et al. 2022):
2M, 2M-SDE and 3M. Each sampler is one `lax.scan` over any
`model_fn(x_t, t)` with the conventions of `ddpm_jax.samplers` (shape or
x_T, key, trajectory_every, `SampleOutput`) and reads eps, x0 or v
predictions; a learned-variance output (2C channels) is read on its first C.

Levels. A sampler with `num_steps=S` visits S training steps
t_0 > t_1 > ... > t_{S-1} (`solver_timesteps`) and ends with a step from
t_{S-1} to the clean level (abar = 1, sigma = 0), which returns the denoised
x_0 prediction at t_{S-1}: the last step denoises to x0. The model is only
ever called at integer training steps. Spacings:

  'uniform': round(linspace(0, t_max, S+1)) from t_max down, without the 0
             (diffusers' 'linspace' timestep spacing): t_{S-1} ~ t_max / S.
  'logsnr':  uniform in log-SNR lambda = log(alpha / sigma) from
             lambda(t_max) to lambda(0) (diffusers' `use_lu_lambdas`, Lu et
             al.).
  'karras':  sigma_i = (sigma_max^(1/rho) + i / (S-1) (sigma_min^(1/rho) -
             sigma_max^(1/rho)))^rho with rho = 7, sigma_max = sigma(t_max),
             sigma_min = sigma(0) (k-diffusion's `get_sigmas_karras`), where
             sigma = sqrt((1 - abar) / abar) = exp(-lambda).

t_max = T-1 unless sigma(T-1) > exp(5.1): then it is the last step with
sigma <= exp(5.1), as diffusers' `lambda_min_clipped = -5.1`, which it calls
critical for the cosine schedule. That schedule's clipped last beta makes
sigma(T-1) ~100x sigma(T-2) (64,179 vs 642 at T = 1000): unclipped, half of
the 'logsnr' or 'karras' levels fall into that one step, and Heun's first
step across it diverges. The chain starts from x_T ~ N(0, I) at t_0 = t_max
(alpha <= 0.006 there). The linear schedule (sigma(T-1) = 157 at T = 1000)
is not clipped.

'logsnr' and 'karras' end at t_{S-1} = 0 (for S > 1), as diffusers and
k-diffusion do: their last call, at sigma(0), only removes the smallest
noise. Their targets go to the training step nearest in log sigma, as
diffusers' `_sigma_to_t(...).round()`. Where several levels round to the same
step they move to the neighbouring free steps, so the S levels stay distinct
and every sampler makes exactly `num_model_calls(name, S)` network calls.
'logsnr' is the default, chosen for DPM-Solver++ by the Gaussian-mixture
benchmark (BENCHMARKS.md): at 20 and 50 calls it is the best of the three
for 2M, 2M-SDE and 3M on the linear and the cosine schedule (3M at 50 calls:
by the distance to the ODE solution; all three fits are at the Monte-Carlo
floor there). It is not
always the best: on cosine 'uniform' is better at 10 calls or fewer for every
solver and for Euler at every budget; Heun needs about 50 calls before
'logsnr' beats 'uniform', and below 10 calls diverges on 'logsnr' and
'karras' levels (its trapezoid across sigma_max -> sigma(0) in one or two
steps).

Updates (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), D_i the data
prediction at level i, h = lambda_{i+1} - lambda_i, r = h_{i-1} / h):

  euler:  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h) D_i,
          Euler's method on dx/dsigma = (x - D) / sigma in the variable
          x / alpha; the same update as DDIM (eta = 0) and DPM-Solver++(1).
  heun:   Euler's step to level i+1, a second call there, and the average of
          the two slopes (Karras et al. Algorithm 1); Euler for the last step.
  dpmpp_2m: DPM-Solver++(2M) with diffusers' 'midpoint' form:
          euler + 0.5 (-alpha_{i+1} expm1(-h)) (D_i - D_{i-1}) / r.
  dpmpp_2m_sde: diffusers' 'sde-dpmsolver++' (midpoint), k-diffusion's
          `sample_dpmpp_2m_sde` with eta = 1: x_{i+1} = (sigma_{i+1} /
          sigma_i) e^{-h} x_i + alpha_{i+1} (1 - e^{-2h}) (D_i + 0.5 (D_i -
          D_{i-1}) / r) + sigma_{i+1} sqrt(1 - e^{-2h}) z.
  dpmpp_3m: diffusers' third-order multistep DPM-Solver++ update; step 1 uses
          the 2M update, and with S < 15 so does step S-2 (diffusers'
          `lower_order_final`).

'leading' and 'trailing' are diffusers' DPMSolverMultistepScheduler
spacings (with steps_offset 0) over t_max + 1 steps: 'leading' visits
k * ((t_max + 1) // (S + 1)) for k = S, ..., 1 and 'trailing'
round(t_max + 1 - k (t_max + 1) / S) - 1 for k = 0, ..., S-1 (for an
unclipped schedule, t_max + 1 = T, exactly diffusers'). 'uniform' is
diffusers' 'linspace'.

Continuous processes. Given a process of `ddpm_jax.diffusion.processes`
(`EDM`, `Flow`) instead of a `Schedule`, the same updates run on its
`grid(S, spacing)` ('karras', 'uniform' or 'logsnr'), with its alpha(t) and
sigma(t), `model_fn(x, t float32 [B])` and targets 'eps', 'x0', 'v' or
'velocity'; x_T is drawn with the process's `prior_std`. Heun then steps the
velocity dx/dt in the process's time (on EDM, t = sigma: Algorithm 1
exactly; on flow, Heun in t). On flow's first level t = 1, alpha = 0 and
lambda = -inf: the multistep updates take their limits there (DDIM from
pure noise; the next step's second-order term vanishes, and 3M waits for two
finite steps). trajectory_steps are then float32 times.

The first step of the multistep solvers is first order, the last step returns
D_{S-1}. Coefficients are computed in float32 from the schedule, which may be
a traced `jit` argument (the levels are then traced too).

Example:
  >>> sched = schedules.make_schedule("linear", 1000)
  >>> out = jax.jit(lambda key: dpmpp_2m_sample(
  ...     model_fn, sched, shape=(16, 32, 32, 3), key=key, num_steps=20))(
  ...     jax.random.key(0))
  >>> num_model_calls("dpmpp_2m", 20), num_model_calls("heun", 10)
  (20, 19)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import gaussian, processes
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.samplers import chain

SPACINGS = ("uniform", "logsnr", "karras", "leading", "trailing")
KARRAS_RHO = 7.0
# diffusers' recommended `lambda_min_clipped` for the cosine schedule: the
# levels start at the last step with sigma <= exp(5.1) = 164.
MAX_LOG_SIGMA = 5.1
# diffusers' DPMSolverMultistepScheduler(lower_order_final=True) lowers the
# order of the last steps below this many steps.
LOWER_ORDER_FINAL_BELOW = 15

# ----------------------------------------------------------------------------
# Levels.


def _distinct_descending(nearest: jnp.ndarray,
                         num_timesteps: int) -> jnp.ndarray:
  """Moves repeated steps of a descending int sequence to free neighbours.

  On the ascending sequence a: a_i <- max(a_i, a_{i-1} + 1), then
  a_i <- min(a_i, T - S + i); the result is strictly increasing in [0, T)
  and equals `a` wherever `a` already was.
  """
  num_steps = nearest.shape[0]
  ascending = nearest[::-1]
  offsets = jnp.arange(num_steps, dtype=ascending.dtype)
  ascending = jax.lax.cummax(ascending - offsets) + offsets
  ascending = jnp.minimum(ascending, num_timesteps - num_steps + offsets)
  return ascending[::-1]


def solver_timesteps(schedule: Schedule, num_steps: int, *,
                     spacing: str = "logsnr") -> jnp.ndarray:
  """The S training steps a solver visits, descending.

  Args:
    schedule: the diffusion schedule (concrete or traced).
    num_steps: static S in [1, T].
    spacing: 'uniform', 'logsnr', 'karras', 'leading' or 'trailing' (see the
      module docstring).

  Returns:
    int32 [S], strictly decreasing: t_0 = t_max (T-1 unless sigma(T-1) >
    exp(MAX_LOG_SIGMA)), and t_{S-1} about t_max / S for 'uniform', 0 (for
    S > 1) for the others.

  Raises:
    ValueError: for S outside [1, T] or an unknown spacing.

  Example:
    >>> solver_timesteps(schedules.make_schedule("linear", 1000), 5,
    ...                  spacing="uniform")
    Array([999, 799, 599, 400, 200], dtype=int32)
  """
  num_timesteps = schedule.num_timesteps
  chain.check_int("num_steps", num_steps, low=1, high=num_timesteps)
  check_choice("spacing", spacing, SPACINGS)
  abar = schedule.alphas_cumprod
  log_sigma = 0.5 * (jnp.log1p(-abar) - jnp.log(abar))  # Increasing in t.
  t_max = num_timesteps - 1 - jnp.sum(log_sigma > MAX_LOG_SIGMA)
  if spacing == "uniform":
    nearest = jnp.round(
        jnp.linspace(0.0, t_max.astype(jnp.float32), num_steps + 1))[:0:-1]
  elif spacing == "leading":
    ratio = (t_max + 1) // (num_steps + 1)
    nearest = jnp.arange(num_steps, 0, -1) * ratio
  elif spacing == "trailing":
    ratio = (t_max + 1).astype(jnp.float32) / num_steps
    nearest = jnp.round(t_max + 1 - jnp.arange(num_steps) * ratio) - 1
  else:
    top = log_sigma[t_max]
    ramp = jnp.linspace(0.0, 1.0, num_steps)
    if spacing == "logsnr":
      targets = top + ramp * (log_sigma[0] - top)
    else:
      hi = jnp.exp(top / KARRAS_RHO)
      lo = jnp.exp(log_sigma[0] / KARRAS_RHO)
      targets = KARRAS_RHO * jnp.log(hi + ramp * (lo - hi))
    nearest = jnp.argmin(jnp.abs(log_sigma[None, :] - targets[:, None]), axis=1)
  # Rounding can repeat steps (S close to T, or dense targets near 0).
  return _distinct_descending(nearest.astype(jnp.int32), num_timesteps)


class _Levels(NamedTuple):
  """Per-step quantities of the S solver steps (float32 [S] unless noted)."""
  t: jnp.ndarray  # int32 [S] level t_i.
  alpha_next: jnp.ndarray  # alpha of level i+1 (1 after the last).
  sigma_next: jnp.ndarray  # sigma of level i+1 (0 after the last).
  sigma_ratio: jnp.ndarray  # sigma_{i+1} / sigma_i (0 for the last).
  h: jnp.ndarray  # lambda_{i+1} - lambda_i (1 for the last: unused).
  h_prev: jnp.ndarray  # h of step i-1 (1 for the first: unused).
  h_prev2: jnp.ndarray  # h of step i-2 (1 for the first two: unused).
  last: jnp.ndarray  # bool [S], the step to the clean level.
  # int32 [S] paper step of the state after step i; on a continuous process
  # float32 [S], its time (0 after the last).
  state_steps: jnp.ndarray


def _levels(schedule, num_steps: int, spacing: str) -> _Levels:
  if isinstance(schedule, Schedule):
    t = solver_timesteps(schedule, num_steps, spacing=spacing)
    alpha = schedule.sqrt_alphas_cumprod[t]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t]
    after = t[1:] + 1
  else:
    t = schedule.grid(num_steps, spacing=spacing)
    alpha, sigma = schedule.alpha_sigma(t)
    after = t[1:]
  # On flow's first level alpha = 0: lambda = -inf and h = inf, where the
  # updates take their limits (the first step is first order anyway).
  lam = jnp.log(alpha) - jnp.log(sigma)
  one = jnp.ones((1,), lam.dtype)
  # The clean level has lambda = inf; its step is special-cased, so give it
  # a finite stand-in (h = 1) to keep every coefficient finite.
  h = jnp.concatenate([lam[1:] - lam[:-1], one])
  last = jnp.arange(num_steps) == num_steps - 1
  return _Levels(
      t=t, alpha_next=jnp.concatenate([alpha[1:], one]),
      sigma_next=jnp.concatenate([sigma[1:],
                                  jnp.zeros((1,), lam.dtype)]),
      sigma_ratio=jnp.concatenate(
          [sigma[1:] / sigma[:-1],
           jnp.zeros((1,),
                     lam.dtype)]), h=h, h_prev=jnp.concatenate([one, h[:-1]]),
      h_prev2=jnp.concatenate([one, one, h[:-2]])[:num_steps], last=last,
      state_steps=jnp.concatenate([after, jnp.zeros((1,), after.dtype)]))


# ----------------------------------------------------------------------------
# Multistep solvers: x_{i+1} = c_x x + c_0 D_i + c_1 (D_i - D_{i-1})
#                              + c_2 (D_{i-1} - D_{i-2}) + c_z z.


class _Coefs(NamedTuple):
  c_x: jnp.ndarray
  c_0: jnp.ndarray
  c_1: jnp.ndarray
  c_2: jnp.ndarray
  c_z: jnp.ndarray


def _first_order(lv: _Levels) -> _Coefs:
  zero = jnp.zeros_like(lv.h)
  return _Coefs(c_x=lv.sigma_ratio, c_0=-lv.alpha_next * jnp.expm1(-lv.h),
                c_1=zero, c_2=zero, c_z=zero)


def _finish(coefs: _Coefs, lv: _Levels, *, order: jnp.ndarray) -> _Coefs:
  """Zeroes the terms above each step's order; the last step returns D."""
  one, zero = jnp.ones_like(lv.h), jnp.zeros_like(lv.h)
  return _Coefs(c_x=jnp.where(lv.last, zero, coefs.c_x),
                c_0=jnp.where(lv.last, one,
                              coefs.c_0), c_1=jnp.where(lv.last | (order < 2),
                                                        zero, coefs.c_1),
                c_2=jnp.where(lv.last | (order < 3), zero,
                              coefs.c_2), c_z=jnp.where(lv.last, zero,
                                                        coefs.c_z))


def _step_orders(num_steps: int, max_order: int) -> np.ndarray:
  """Order of each step: min(i + 1, max_order), diffusers' lower order for
  step S-2 below LOWER_ORDER_FINAL_BELOW steps; the last step is first order
  (see `_finish`)."""
  order = np.minimum(np.arange(num_steps) + 1, max_order)
  if num_steps < LOWER_ORDER_FINAL_BELOW and num_steps >= 2:
    order[num_steps - 2] = min(order[num_steps - 2], 2)
  return order


def _euler_coefs(lv: _Levels) -> _Coefs:
  return _finish(_first_order(lv), lv, order=jnp.ones_like(lv.t))


def _dpmpp_2m_coefs(lv: _Levels) -> _Coefs:
  coefs = _first_order(lv)
  coefs = coefs._replace(c_1=0.5 * coefs.c_0 * lv.h / lv.h_prev)
  return _finish(coefs, lv, order=jnp.asarray(_step_orders(len(lv.t), 2)))


def _dpmpp_2m_sde_coefs(lv: _Levels) -> _Coefs:
  decay = -jnp.expm1(-2.0 * lv.h)  # 1 - e^{-2h}
  c_0 = lv.alpha_next * decay
  coefs = _Coefs(c_x=lv.sigma_ratio * jnp.exp(-lv.h), c_0=c_0,
                 c_1=0.5 * c_0 * lv.h / lv.h_prev, c_2=jnp.zeros_like(c_0),
                 c_z=lv.sigma_next * jnp.sqrt(decay))
  return _finish(coefs, lv, order=jnp.asarray(_step_orders(len(lv.t), 2)))


def _dpmpp_3m_coefs(lv: _Levels) -> _Coefs:
  h = lv.h
  r0, r1 = lv.h_prev / h, lv.h_prev2 / h
  em1 = jnp.expm1(-h)
  p2 = lv.alpha_next * (em1 / h + 1.0)
  p3 = lv.alpha_next * ((em1 + h) / h**2 - 0.5)
  coefs = _first_order(lv)
  # Third order needs two finite previous steps (not so on flow's step 2).
  order = jnp.where(jnp.isinf(lv.h_prev2), 2,
                    jnp.asarray(_step_orders(len(lv.t), 3)))
  third_1 = p2 * (1.0 / r0 + 1.0 / (r0 + r1)) - p3 / (r0 * (r0 + r1))
  third_2 = -p2 * r0 / (r1 * (r0 + r1)) + p3 / (r1 * (r0 + r1))
  second_1 = 0.5 * coefs.c_0 / r0
  coefs = coefs._replace(c_1=jnp.where(order >= 3, third_1, second_1),
                         c_2=third_2)
  return _finish(coefs, lv, order=order)


def _check_solver_args(schedule, num_steps, spacing, target, trajectory_every):
  if isinstance(schedule, Schedule):
    chain.check_int("num_steps", num_steps, low=1, high=schedule.num_timesteps)
    check_choice("spacing", spacing, SPACINGS)
    check_choice("target", target, gaussian.TARGETS)
  else:
    chain.check_int("num_steps", num_steps, low=1)
    check_choice("spacing", spacing, processes.SPACINGS)
    check_choice("target", target, processes.TARGETS)
  chain.check_trajectory_every(trajectory_every)


def _predict(model_fn, schedule, x, t, *, target, clip_x0):
  """(pred_x0, pred_eps) at level t (a step, or a continuous time)."""
  if isinstance(schedule, Schedule):
    return chain.x0_eps_predictions(model_fn, schedule, x, chain.batch_t(t, x),
                                    target=target, clip_x0=clip_x0)
  return chain.process_predictions(model_fn, schedule, x, t, target=target,
                                   clip_x0=clip_x0)


def _multistep_sample(coef_fn: Callable[[_Levels], _Coefs], *, stochastic,
                      model_fn, schedule, num_steps, shape, key, x_T, spacing,
                      target, clip_x0, trajectory_every) -> chain.SampleOutput:
  """Runs x_{i+1} = c_x x + c_0 D + c_1 (D - D1) + c_2 (D1 - D2) + c_z z."""
  _check_solver_args(schedule, num_steps, spacing, target, trajectory_every)
  shape = chain.check_start(shape, key, x_T, needs_key=stochastic)
  x_T, chain_key = chain.initial_state(shape, key, x_T,
                                       std=chain.prior_std(schedule))
  lv = _levels(schedule, num_steps, spacing)
  coefs = coef_fn(lv)

  def step(carry, inp):
    x, d1, d2 = carry
    i, t, c = inp
    pred_x0, _ = _predict(model_fn, schedule, x, t, target=target,
                          clip_x0=clip_x0)
    x_next = (c.c_x * x + c.c_0 * pred_x0 + c.c_1 * (pred_x0 - d1) + c.c_2 *
              (d1 - d2))
    if stochastic:
      noise = jax.random.normal(jax.random.fold_in(chain_key, i), x.shape,
                                x.dtype)
      x_next = x_next + c.c_z * noise
    return x_next.astype(x.dtype), pred_x0.astype(x.dtype), d1

  zeros = jnp.zeros_like(x_T)
  return chain.run_chain(step, (x_T, zeros, zeros),
                         (jnp.arange(num_steps, dtype=jnp.int32), lv.t, coefs),
                         lv.state_steps, trajectory_every=trajectory_every,
                         image=lambda carry: carry[0])


# ----------------------------------------------------------------------------
# Heun: 2S - 1 scan iterations, one network call each.


class _HeunIter(NamedTuple):
  """Per-iteration inputs of Heun's scan (float32 [2S-1] unless noted)."""
  t: jnp.ndarray  # int32 step at which the network is called.
  kind: jnp.ndarray  # int32: 0 predictor, 1 corrector, 2 last (denoise).
  a_x: jnp.ndarray  # alpha_{i+1} / alpha_i
  a_e: jnp.ndarray  # alpha_{i+1} (sigma~_{i+1} - sigma~_i) / 2, sigma~ =
  #                   sigma / alpha, the Karras noise level.


_PREDICT, _CORRECT, _DENOISE = 0, 1, 2


def _heun_iterations(schedule, num_steps: int, spacing: str):
  """(_HeunIter, solver step of each iteration (numpy), state steps).

  On a `Schedule` the slope is eps in Karras's variables (x / alpha, sigma /
  alpha); on a continuous process it is the velocity dx/dt in the process's
  time t (a_x = 1, a_e = (t_{i+1} - t_i) / 2), which on `EDM` (t = sigma,
  velocity = eps) is the same Algorithm 1.
  """
  lv = _levels(schedule, num_steps, spacing)
  t = lv.t
  if isinstance(schedule, Schedule):
    alpha = schedule.sqrt_alphas_cumprod[t]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t]
    a_x = lv.alpha_next / alpha
    a_e = 0.5 * (lv.sigma_next - lv.alpha_next * sigma / alpha)
  else:
    a_x = jnp.ones_like(t)
    a_e = 0.5 * (jnp.concatenate([t[1:], jnp.zeros((1,), t.dtype)]) - t)
  # Iterations: (predict 0, correct 0, predict 1, ..., correct S-2, denoise).
  steps = np.repeat(np.arange(num_steps), 2)[:-1]
  kinds = np.tile([_PREDICT, _CORRECT], num_steps)[:-1]
  kinds[-1] = _DENOISE
  # The corrector calls the network at the next level.
  t_eval = t[np.minimum(steps + (kinds == _CORRECT), num_steps - 1)]
  return (_HeunIter(t=t_eval, kind=jnp.asarray(kinds, jnp.int32),
                    a_x=a_x[steps], a_e=a_e[steps]), steps, lv.state_steps)


# ----------------------------------------------------------------------------
# Public samplers.


def euler_sample(model_fn: gaussian.ModelFn, schedule: Schedule, *,
                 num_steps: int, shape: Optional[tuple[int, ...]] = None,
                 key: Optional[jax.Array] = None,
                 x_T: Optional[jnp.ndarray] = None, spacing: str = "logsnr",
                 target: str = "eps", clip_x0: bool = False,
                 trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """Euler's method on the probability-flow ODE (Karras et al. 2022); S network calls.

  The same update as DDIM with eta = 0 (and DPM-Solver++(1)), on the levels
  of `solver_timesteps`.

  Args:
    model_fn: denoiser (x_t [B, ...], t int32 [B]) -> [B, ...], or [B, ..., 2C]
      for learned variances (read on the first C channels). Any wrapper
      (guidance) fits.
    schedule: the diffusion schedule (concrete or a traced jit argument), or
      a continuous process (`ddpm_jax.diffusion.processes.EDM`, `Flow`).
    num_steps: static S in [1, T] (S >= 1 on a continuous process), the
      number of levels (see `solver_timesteps`).
    shape: static (B, ...) of x_T ~ N(0, I) drawn from `key`; give this or
      `x_T`.
    key: PRNG key; may be None when `x_T` is given.
    x_T: optional starting noise [B, ...] instead of `shape`.
    spacing: 'logsnr' (default), 'uniform', 'karras', and on a Schedule
      'leading' or 'trailing' (see the module docstring).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v' (and 'velocity' on
      a continuous process).
    clip_x0: clip the predicted x_0 to [-1, 1] (and recompute eps from it).
    trajectory_every: static k >= 1 to also return the state after every k
      solver steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], unknown names, a bad
      `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = euler_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                    key=jax.random.key(0), num_steps=50)
  """
  return _multistep_sample(_euler_coefs, stochastic=False, model_fn=model_fn,
                           schedule=schedule, num_steps=num_steps, shape=shape,
                           key=key, x_T=x_T, spacing=spacing, target=target,
                           clip_x0=clip_x0, trajectory_every=trajectory_every)


def heun_sample(model_fn: gaussian.ModelFn, schedule: Schedule, *,
                num_steps: int, shape: Optional[tuple[int, ...]] = None,
                key: Optional[jax.Array] = None,
                x_T: Optional[jnp.ndarray] = None, spacing: str = "logsnr",
                target: str = "eps", clip_x0: bool = False,
                trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """Heun's second-order method (Karras et al. 2022, Algorithm 1); 2S - 1 network calls.

  Each step takes Euler's step to the next level, calls the network there
  and restarts from x_i with the mean of the two slopes; the last step (to
  the clean level) is Euler's. One scan iteration per network call.

  Args:
    model_fn: denoiser (x_t [B, ...], t int32 [B]) -> [B, ...], or [B, ..., 2C]
      for learned variances (read on the first C channels). Any wrapper
      (guidance) fits.
    schedule: the diffusion schedule (concrete or a traced jit argument), or
      a continuous process (`ddpm_jax.diffusion.processes.EDM`, `Flow`).
    num_steps: static S in [1, T] (S >= 1 on a continuous process), the
      number of levels (see `solver_timesteps`).
    shape: static (B, ...) of x_T ~ N(0, I) drawn from `key`; give this or
      `x_T`.
    key: PRNG key; may be None when `x_T` is given.
    x_T: optional starting noise [B, ...] instead of `shape`.
    spacing: 'logsnr' (default), 'uniform', 'karras', and on a Schedule
      'leading' or 'trailing' (see the module docstring).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v' (and 'velocity' on
      a continuous process).
    clip_x0: clip the predicted x_0 to [-1, 1] (and recompute eps from it).
    trajectory_every: static k >= 1 to also return the state after every k
      solver steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], unknown names, a bad
      `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = heun_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                   key=jax.random.key(0), num_steps=10)  # 19 calls
  """
  _check_solver_args(schedule, num_steps, spacing, target, trajectory_every)
  shape = chain.check_start(shape, key, x_T, needs_key=False)
  x_T, _ = chain.initial_state(shape, key, x_T, std=chain.prior_std(schedule))
  iters, step_ids, state_steps = _heun_iterations(schedule, num_steps, spacing)

  continuous = not isinstance(schedule, Schedule)

  def step(carry, it):
    x, x_eval, slope = carry
    pred_x0, eps = _predict(model_fn, schedule, x_eval, it.t, target=target,
                            clip_x0=clip_x0)
    if continuous:
      eps = processes.velocity_from_x0(schedule, x_eval,
                                       jnp.full((x.shape[0],), it.t), pred_x0)
    corrected = it.a_x * x + it.a_e * (slope + eps)
    x_new = jnp.where(it.kind == _CORRECT, corrected,
                      jnp.where(it.kind == _DENOISE, pred_x0, x))
    euler = it.a_x * x + 2.0 * it.a_e * eps
    x_eval = jnp.where(it.kind == _PREDICT, euler, x_new)
    slope = jnp.where(it.kind == _PREDICT, eps, slope)
    return (x_new.astype(x.dtype), x_eval.astype(x.dtype),
            slope.astype(x.dtype))

  return chain.run_chain(step, (x_T, x_T, jnp.zeros_like(x_T)), iters,
                         state_steps, trajectory_every=trajectory_every,
                         image=lambda carry: carry[0], step_ids=step_ids)


def dpmpp_2m_sample(
    model_fn: gaussian.ModelFn, schedule: Schedule, *, num_steps: int,
    shape: Optional[tuple[int, ...]] = None, key: Optional[jax.Array] = None,
    x_T: Optional[jnp.ndarray] = None, spacing: str = "logsnr",
    target: str = "eps", clip_x0: bool = False,
    trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """DPM-Solver++(2M) (Lu et al. 2022), multistep, second order; S network calls.

  Args:
    model_fn: denoiser (x_t [B, ...], t int32 [B]) -> [B, ...], or [B, ..., 2C]
      for learned variances (read on the first C channels). Any wrapper
      (guidance) fits.
    schedule: the diffusion schedule (concrete or a traced jit argument), or
      a continuous process (`ddpm_jax.diffusion.processes.EDM`, `Flow`).
    num_steps: static S in [1, T] (S >= 1 on a continuous process), the
      number of levels (see `solver_timesteps`).
    shape: static (B, ...) of x_T ~ N(0, I) drawn from `key`; give this or
      `x_T`.
    key: PRNG key; may be None when `x_T` is given.
    x_T: optional starting noise [B, ...] instead of `shape`.
    spacing: 'logsnr' (default), 'uniform', 'karras', and on a Schedule
      'leading' or 'trailing' (see the module docstring).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v' (and 'velocity' on
      a continuous process).
    clip_x0: clip the predicted x_0 to [-1, 1] (and recompute eps from it).
    trajectory_every: static k >= 1 to also return the state after every k
      solver steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], unknown names, a bad
      `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = dpmpp_2m_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                       key=jax.random.key(0), num_steps=20)
  """
  return _multistep_sample(_dpmpp_2m_coefs, stochastic=False, model_fn=model_fn,
                           schedule=schedule, num_steps=num_steps, shape=shape,
                           key=key, x_T=x_T, spacing=spacing, target=target,
                           clip_x0=clip_x0, trajectory_every=trajectory_every)


def dpmpp_2m_sde_sample(
    model_fn: gaussian.ModelFn, schedule: Schedule, *, num_steps: int,
    shape: Optional[tuple[int, ...]] = None, key: Optional[jax.Array] = None,
    x_T: Optional[jnp.ndarray] = None, spacing: str = "logsnr",
    target: str = "eps", clip_x0: bool = False,
    trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """DPM-Solver++(2M) SDE (Lu et al. 2022; midpoint form, eta = 1); S network calls.

  Step i draws its noise from `fold_in(split(key)[1], i)`; no noise at the last
  step.

  Args:
    model_fn: denoiser (x_t [B, ...], t int32 [B]) -> [B, ...], or [B, ..., 2C]
      for learned variances (read on the first C channels). Any wrapper
      (guidance) fits.
    schedule: the diffusion schedule (concrete or a traced jit argument), or
      a continuous process (`ddpm_jax.diffusion.processes.EDM`, `Flow`).
    num_steps: static S in [1, T] (S >= 1 on a continuous process), the
      number of levels (see `solver_timesteps`).
    shape: static (B, ...) of x_T ~ N(0, I) drawn from `key`; give this or
      `x_T`.
    key: PRNG key; may be None when `x_T` is given; required (noise at every step).
    x_T: optional starting noise [B, ...] instead of `shape`.
    spacing: 'logsnr' (default), 'uniform', 'karras', and on a Schedule
      'leading' or 'trailing' (see the module docstring).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v' (and 'velocity' on
      a continuous process).
    clip_x0: clip the predicted x_0 to [-1, 1] (and recompute eps from it).
    trajectory_every: static k >= 1 to also return the state after every k
      solver steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], unknown names, a bad
      `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = dpmpp_2m_sde_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                           key=jax.random.key(0), num_steps=50)
  """
  return _multistep_sample(_dpmpp_2m_sde_coefs, stochastic=True,
                           model_fn=model_fn, schedule=schedule,
                           num_steps=num_steps, shape=shape, key=key, x_T=x_T,
                           spacing=spacing, target=target, clip_x0=clip_x0,
                           trajectory_every=trajectory_every)


def dpmpp_3m_sample(
    model_fn: gaussian.ModelFn, schedule: Schedule, *, num_steps: int,
    shape: Optional[tuple[int, ...]] = None, key: Optional[jax.Array] = None,
    x_T: Optional[jnp.ndarray] = None, spacing: str = "logsnr",
    target: str = "eps", clip_x0: bool = False,
    trajectory_every: Optional[int] = None) -> chain.SampleOutput:
  """DPM-Solver++(3M) (Lu et al. 2022), multistep, third order; S network calls.

  Args:
    model_fn: denoiser (x_t [B, ...], t int32 [B]) -> [B, ...], or [B, ..., 2C]
      for learned variances (read on the first C channels). Any wrapper
      (guidance) fits.
    schedule: the diffusion schedule (concrete or a traced jit argument), or
      a continuous process (`ddpm_jax.diffusion.processes.EDM`, `Flow`).
    num_steps: static S in [1, T] (S >= 1 on a continuous process), the
      number of levels (see `solver_timesteps`).
    shape: static (B, ...) of x_T ~ N(0, I) drawn from `key`; give this or
      `x_T`.
    key: PRNG key; may be None when `x_T` is given.
    x_T: optional starting noise [B, ...] instead of `shape`.
    spacing: 'logsnr' (default), 'uniform', 'karras', and on a Schedule
      'leading' or 'trailing' (see the module docstring).
    target: what `model_fn` predicts: 'eps', 'x0' or 'v' (and 'velocity' on
      a continuous process).
    clip_x0: clip the predicted x_0 to [-1, 1] (and recompute eps from it).
    trajectory_every: static k >= 1 to also return the state after every k
      solver steps (and after the last); None returns no trajectory.

  Returns:
    A `SampleOutput`; the trajectory has ceil(S / k) frames.

  Raises:
    ValueError: for S outside [1, T], unknown names, a bad
      `trajectory_every`, or a missing key or shape.

  Example:
    >>> out = dpmpp_3m_sample(model_fn, sched, shape=(4, 32, 32, 3),
    ...                       key=jax.random.key(0), num_steps=20)
  """
  return _multistep_sample(_dpmpp_3m_coefs, stochastic=False, model_fn=model_fn,
                           schedule=schedule, num_steps=num_steps, shape=shape,
                           key=key, x_T=x_T, spacing=spacing, target=target,
                           clip_x0=clip_x0, trajectory_every=trajectory_every)
