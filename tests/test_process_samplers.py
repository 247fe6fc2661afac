"""Every sampler on the continuous processes (EDM, flow matching), with the
exact Gaussian-mixture denoisers of ddpm_jax.diffusion.testing. Figures
measured on a 2-core CPU (float32) are quoted; the assertions leave room."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.diffusion import processes, schedules, testing

MIX = testing.gaussian_mixture(weights=[0.3, 0.5, 0.2], means=[[-0.6, -0.3],
                                                               [0.5, 0.5],
                                                               [0.2, -0.7]],
                               stds=[0.12, 0.18, 0.15])
MU, SD = np.array([0.3, -0.2]), 0.5
GAUSS = testing.gaussian_mixture(weights=[1.0], means=[MU], stds=[SD])
EDM, FLOW = processes.EDM(), processes.Flow()
# (process, target the exact denoiser gives, spacing).
CASES = {
    "edm": (EDM, "x0", "karras"),
    "flow": (FLOW, "velocity", "uniform"),
    "flow_logsnr": (FLOW, "velocity", "logsnr"),
}


def _run(name, process, mix, x_T, *, key=None, **options):
  model_fn = testing.process_denoiser(mix, process, target=options["target"])
  fn = samplers.get_sampler(name)
  return jax.jit(
      lambda x, k: fn(model_fn, process, x_T=x, key=k, **options).images)(
          x_T, jax.random.key(0) if key is None else key)


def _fit_error(x):
  """Largest relative error of the mixture's weights, means (in stds) and
  stds estimated from `x` (three data samples of 10,000 points: < 0.06)."""
  fit = testing.fit_components(MIX, x)
  return max(
      float(jnp.max(jnp.abs(fit.weights / MIX.weights - 1.0))),
      float(jnp.max(jnp.linalg.norm(fit.means - MIX.means, axis=1) / MIX.stds)),
      float(jnp.max(jnp.abs(fit.stds / MIX.stds - 1.0))))


# Fit errors measured (10,000 points), few -> many steps:
#   edm:   euler 1.85 -> 0.05 (200), heun 12.9 -> 0.05, dpmpp_2m 1.60 ->
#          0.05, dpmpp_3m 2.40 -> 0.03, dpmpp_2m_sde 1.10 -> 0.07, edm
#          (churn 40) -> 0.05.
#   flow:  euler 0.97 -> 0.07 (50) , heun 0.27 -> 0.03, dpmpp_2m 0.72 ->
#          0.04, dpmpp_3m 0.72 -> 0.03, dpmpp_2m_sde 0.86 -> 0.05.
CONVERGENCE = [(case, name, 5, 100)
               for case in ("edm", "flow")
               for name in ("euler", "heun", "dpmpp_2m", "dpmpp_3m",
                            "dpmpp_2m_sde")]


@pytest.mark.parametrize("case,name,few,many", CONVERGENCE,
                         ids=[f"{c[0]}-{c[1]}" for c in CONVERGENCE])
def test_samplers_converge_to_the_data(case, name, few, many):
  process, target, spacing = CASES[case]
  x_T = process.prior_std * jax.random.normal(jax.random.key(3), (10_000, 2))
  errors = [
      _fit_error(
          _run(name, process, MIX, x_T, key=jax.random.key(5),
               num_steps=num_steps, spacing=spacing, target=target))
      for num_steps in (few, many)
  ]
  assert errors[1] < 0.1, errors
  assert errors[0] > 0.2 and errors[0] > 2 * errors[1], errors


def _exact_gaussian_output(process, levels, x_T):
  """The probability-flow ODE of N(MU, SD^2) data is affine: x_t = alpha_t
  MU + s_t (x_0 - alpha_0 MU) / s_0 with s_t^2 = alpha_t^2 SD^2 + sigma_t^2;
  then the exact x_0 prediction at the last level."""
  alpha, sigma = (np.asarray(a, np.float64)
                  for a in process.alpha_sigma(np.asarray(levels)[[0, -1]]))
  std = np.sqrt(alpha**2 * SD**2 + sigma**2)
  x = alpha[1] * MU + std[1] * (np.asarray(x_T, np.float64) -
                                alpha[0] * MU) / std[0]
  return MU + alpha[1] * SD**2 / std[1]**2 * (x - alpha[1] * MU)


# RMS error against the exact solution (512 points) for S = 40, 80, 160:
#   edm karras:  euler x1.98, 1.99; heun x4.5, 4.2, 4.1 (from 20);
#                dpmpp_2m x4.7, 4.4, 4.2 (from 20).
#   flow logsnr: euler x1.98, 1.99; heun x3.95, 3.98; dpmpp_2m x3.96, 4.02.
#   flow uniform: heun x4.08, 4.05; dpmpp_2m x3.23, 3.43 (its second step
#                follows an infinite first step in log-SNR and is first
#                order; the ratio creeps to 4).
ORDERS = [(case, name, low, high)
          for case in ("edm", "flow_logsnr")
          for name, low, high in (("euler", 1.8, 2.3), ("heun", 3.5, 5.0),
                                  ("dpmpp_2m", 3.5, 5.0))]


@pytest.mark.parametrize("case,name,low,high", ORDERS,
                         ids=[f"{o[0]}-{o[1]}" for o in ORDERS])
def test_error_falls_with_the_order_of_the_solver(case, name, low, high):
  process, target, spacing = CASES[case]
  x_T = process.prior_std * jax.random.normal(jax.random.key(3), (512, 2))
  errors = []
  for num_steps in (40, 80, 160):
    out = _run(name, process, GAUSS, x_T, num_steps=num_steps, spacing=spacing,
               target=target)
    exact = _exact_gaussian_output(process,
                                   process.grid(num_steps, spacing=spacing),
                                   x_T)
    errors.append(float(np.sqrt(np.mean((np.asarray(out) - exact)**2))))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all((ratios > low) & (ratios < high)), (errors, ratios)


def test_edm_sampler_without_churn_is_heun_on_the_edm_grid():
  x_T = EDM.prior_std * jax.random.normal(jax.random.key(3), (256, 2))
  for num_steps in (1, 5, 18):
    heun = _run("heun", EDM, MIX, x_T, num_steps=num_steps, spacing="karras",
                target="x0")
    edm = _run("edm", EDM, MIX, x_T, num_steps=num_steps, spacing="karras",
               target="x0")
    np.testing.assert_allclose(edm, heun, rtol=1e-5, atol=1e-5)


def test_edm_sampler_with_churn():
  """Churn 40 in [0.05, 50] with S_noise 1.003 (EDM's ImageNet-64 settings
  scaled to this problem) still reaches the data, from different noise than
  Heun, and the key decides the noise."""
  x_T = EDM.prior_std * jax.random.normal(jax.random.key(3), (10_000, 2))
  options = dict(num_steps=64, spacing="karras", target="x0", s_churn=40.0,
                 s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  churned = _run("edm", EDM, MIX, x_T, key=jax.random.key(1), **options)
  again = _run("edm", EDM, MIX, x_T, key=jax.random.key(1), **options)
  other = _run("edm", EDM, MIX, x_T, key=jax.random.key(2), **options)
  heun = _run("heun", EDM, MIX, x_T, num_steps=64, spacing="karras",
              target="x0")
  np.testing.assert_array_equal(churned, again)
  assert float(jnp.mean(jnp.abs(churned - other))) > 0.01
  assert float(jnp.mean(jnp.abs(churned - heun))) > 0.01
  assert _fit_error(churned) < 0.1


def test_draws_the_prior_and_trajectory_times():
  model_fn = testing.process_denoiser(MIX, EDM, target="x0")
  out = samplers.euler_sample(model_fn, EDM, shape=(4096, 2),
                              key=jax.random.key(0), num_steps=1, target="x0")
  init, _ = jax.random.split(jax.random.key(0))
  x_T = EDM.sigma_max * jax.random.normal(init, (4096, 2))
  np.testing.assert_allclose(out.images, model_fn(x_T, jnp.full((4096,), 80.)),
                             rtol=1e-5, atol=1e-6)
  out = samplers.heun_sample(model_fn, EDM, shape=(4, 2), key=jax.random.key(0),
                             num_steps=4, target="x0", spacing="karras",
                             trajectory_every=2)
  np.testing.assert_allclose(out.trajectory_steps, [EDM.grid(4)[2], 0.0])
  assert out.trajectory_steps.dtype == jnp.float32


@pytest.mark.parametrize("num_timesteps,num_steps", [(1000, 5), (1000, 20),
                                                     (1000, 50), (100, 7),
                                                     (37, 10)])
def test_leading_and_trailing_are_diffusers(num_timesteps, num_steps):
  """DPMSolverMultistepScheduler's 'leading' ((arange(S + 1) * (T // (S +
  1)))[::-1][:-1], steps_offset 0) and 'trailing' (round(arange(T, 0, -T /
  S)) - 1)."""
  sched = schedules.Schedule.from_betas(np.linspace(1e-4, 0.02, num_timesteps),
                                        warn=False)
  leading = (np.arange(num_steps + 1) * (num_timesteps //
                                         (num_steps + 1))).round()[::-1][:-1]
  trailing = np.arange(num_timesteps, 0, -num_timesteps / num_steps).round() - 1
  np.testing.assert_array_equal(
      samplers.solver_timesteps(sched, num_steps, spacing="leading"), leading)
  np.testing.assert_array_equal(
      samplers.solver_timesteps(sched, num_steps, spacing="trailing"), trailing)


def test_which_sampler_runs_on_which_process():
  for process, allowed in samplers.PROCESS_SAMPLERS.items():
    for name in samplers.SAMPLER_NAMES:
      if name in allowed:
        samplers.check_sampler_process(name, process)
      else:
        with pytest.raises(ValueError, match="does not apply to the"):
          samplers.check_sampler_process(name, process)
  assert samplers.num_model_calls("edm", 18) == 35  # EDM's 35 NFE.


BAD = [
    ("edm", FLOW, dict(), "sampler 'edm' applies to the 'edm' process only"),
    ("edm", EDM, dict(s_churn=-1.0), "s_churn must be a finite number >= 0"),
    ("edm", EDM, dict(s_tmin=1.0, s_tmax=0.5), "s_tmax must be a number >="),
    ("edm", EDM, dict(s_churn=1.0, key=None), "key is required"),
    ("dpmpp_2m", EDM, dict(spacing="leading"), "Unknown spacing 'leading'"),
    ("euler", FLOW, dict(target="score"), "Unknown target 'score'"),
    ("heun", FLOW, dict(num_steps=0), "num_steps must be an integer >= 1"),
]


@pytest.mark.parametrize("name,process,kwargs,message", BAD,
                         ids=[b[3] for b in BAD])
def test_bad_arguments(name, process, kwargs, message):
  args = dict(x_T=jnp.zeros((4, 2)), key=jax.random.key(0), num_steps=5,
              target="x0")
  args.update(kwargs)
  model_fn = testing.process_denoiser(MIX, process, target="x0")
  with pytest.raises(ValueError) as info:
    samplers.get_sampler(name)(model_fn, process, **args)
  assert message in str(info.value)
  assert "\n" not in str(info.value)
