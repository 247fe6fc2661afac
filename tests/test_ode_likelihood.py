"""The probability-flow ODE likelihood (ddpm_jax.diffusion.ode_likelihood)
against closed forms, with the exact denoisers of ddpm_jax.diffusion.testing.
Needs diffrax (the 'likelihood' extra)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion import processes, schedules, testing

pytest.importorskip("diffrax")
from ddpm_jax.diffusion import ode_likelihood  # pylint: disable=g-import-not-at-top,wrong-import-position

SD = 0.4


def _gaussian_log_density(process, x, mu):
  """log N(x; alpha_0 mu, (alpha_0^2 SD^2 + sigma_0^2) I) at t0."""
  t0, _ = ode_likelihood.default_interval(process)
  alpha, sigma = (float(a) for a in process.alpha_sigma(t0))
  var = alpha**2 * SD**2 + sigma**2
  x = np.asarray(x, np.float64)
  return (-0.5 * np.sum((x - alpha * mu)**2, axis=1) / var -
          0.5 * x.shape[1] * math.log(2 * math.pi * var))


# Measured max |error| over 64 points (nats): flow 2.2e-5 (7 solver steps);
# EDM with mean 0 data 1e-4 (the prior N(0, 80^2) against the true
# N(0, 80^2 + SD^2)); EDM with mean (0.3, -0.2) 0.010, the prior's missing
# mean, O(|x_T| |mu| / sigma_max^2).
CASES = [(processes.Flow(), "velocity", [0.3, -0.2], 1e-3),
         (processes.Flow(shift=3.0), "x0", [0.3, -0.2], 1e-3),
         (processes.EDM(), "x0", [0.0, 0.0], 1e-3),
         (processes.EDM(), "x0", [0.3, -0.2], 0.02)]


@pytest.mark.parametrize("process,target,mu,tol", CASES, ids=str)
def test_gaussian_log_density_is_exact(process, target, mu, tol):
  gauss = testing.gaussian_mixture(weights=[1.0], means=[mu], stds=[SD])
  x0, _ = testing.sample(gauss, jax.random.key(0), 64)
  model_fn = testing.process_denoiser(gauss, process, target=target)
  out = jax.jit(lambda x: ode_likelihood.ode_log_likelihood(
      model_fn, process, x, target=target, key=jax.random.key(1)))(x0)
  exact = _gaussian_log_density(process, x0, np.asarray(mu))
  np.testing.assert_allclose(out.log_prob, exact, atol=tol)
  np.testing.assert_allclose(out.bits_per_dim,
                             -out.log_prob / (2 * math.log(2)) + 7, rtol=1e-6)


def test_continuous_schedule_matches_the_steps():
  sched = schedules.make_schedule("linear", 1000)
  vp = processes.ContinuousSchedule.from_schedule(sched)
  steps = jnp.array([0, 1, 10, 500, 999])
  alpha, sigma = vp.alpha_sigma(steps)
  np.testing.assert_allclose(alpha, sched.sqrt_alphas_cumprod[steps], rtol=2e-5)
  np.testing.assert_allclose(sigma, sched.sqrt_one_minus_alphas_cumprod[steps],
                             rtol=2e-4)
  # Between steps the log-SNR is the linear interpolation.
  np.testing.assert_allclose(vp.log_snr(10.25),
                             0.75 * vp.log_snr(10) + 0.25 * vp.log_snr(11),
                             rtol=1e-5)


@pytest.mark.parametrize("target", ["eps", "v"])
def test_ddpm_schedule_gaussian_log_density(target):
  """The linear schedule in continuous time (t in [0, 999]) on N(0, SD^2)
  data: the exact log density at step 1 (sigma = 0.01). Measured max error
  3.7e-3 nats (1.7e-3 at rtol 1e-7, 405 steps): the log-SNR's kinks at the
  integer steps make the velocity's time derivative jump and cost Tsit5
  its order; the prior N(0, I) at alpha_{T-1} = 0.006 is off by ~1e-4."""
  sched = schedules.make_schedule("linear", 1000)
  vp = processes.ContinuousSchedule.from_schedule(sched)
  gauss = testing.gaussian_mixture(weights=[1.0], means=[[0.0, 0.0]], stds=[SD])
  x0, _ = testing.sample(gauss, jax.random.key(0), 64)
  model_fn = testing.process_denoiser(gauss, vp, target=target)
  out = jax.jit(lambda x: ode_likelihood.ode_log_likelihood(
      model_fn, sched, x, target=target, key=jax.random.key(1)))(x0)
  exact = _gaussian_log_density(vp, x0, np.zeros(2))
  np.testing.assert_allclose(out.log_prob, exact, atol=1e-2)


def test_hutchinson_is_unbiased_on_a_mixture():
  """On a mixture the Jacobian is not isotropic, so each Rademacher estimate
  differs from the exact trace; 64 copies of a point (one z each) average to
  it. Measured: per-copy std 0.05 to 0.8 nats by point; each mean within
  half its standard error of the exact value here, asserted within four.
  """
  mix = testing.gaussian_mixture(weights=[0.3, 0.5, 0.2], means=[[-0.6, -0.3],
                                                                 [0.5, 0.5],
                                                                 [0.2, -0.7]],
                                 stds=[0.12, 0.18, 0.15])
  flow = processes.Flow()
  model_fn = testing.process_denoiser(mix, flow, target="velocity")
  x, _ = testing.sample(mix, jax.random.key(0), 4)
  run = jax.jit(
      lambda x, exact: ode_likelihood.ode_log_likelihood(
          model_fn, flow, x, target="velocity", key=jax.random.key(2),
          exact_trace=exact).log_prob, static_argnums=1)
  exact = np.asarray(run(x, True))
  copies = np.asarray(run(jnp.repeat(x, 64, axis=0), False)).reshape(4, 64)
  assert np.all(copies.std(axis=1) > 1e-3)  # The estimate is random...
  error = np.abs(copies.mean(axis=1) - exact)
  assert np.all(error < 4 * copies.std(axis=1) / 8), (error, copies.std(1))


def test_bad_input():
  x0 = jnp.zeros((2, 2))
  model_fn = lambda x, t: x  # noqa: E731
  with pytest.raises(ValueError, match="takes a Schedule, EDM or Flow"):
    ode_likelihood.ode_log_likelihood(model_fn, object(), x0, target="eps",
                                      key=jax.random.key(0))
  with pytest.raises(ValueError, match="key is required"):
    ode_likelihood.ode_log_likelihood(model_fn, processes.Flow(), x0,
                                      target="velocity")
  with pytest.raises(ValueError, match="0 <= t0 < t1"):
    ode_likelihood.ode_log_likelihood(model_fn, processes.Flow(), x0,
                                      target="velocity", exact_trace=True,
                                      interval=(0.5, 0.1))
  with pytest.raises(ValueError, match="Unknown target 'score'"):
    ode_likelihood.ode_log_likelihood(model_fn, processes.Flow(), x0,
                                      target="score", exact_trace=True)


def test_runs_on_the_unet_whose_cpu_kernels_have_no_forward_mode():
  # The U-Net's CPU convolutions are custom_vjp functions (models/kernels.py):
  # the divergence must be taken in reverse mode (forward mode raises).
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  net = models.UNet(
      config=models.unet_config("tutorial", base_channels=8, channel_mults=(
          1,), attention=("none",), mid_attention="none", num_res_blocks=1,
                                block_type="resnet"))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
  params = net.init(jax.random.key(1), x, jnp.zeros((2,)), train=False)
  flow = processes.Flow()
  model_fn = processes.network_model_fn(
      flow, lambda x_t, t: net.apply(params, x_t, t, train=False))
  out = jax.jit(lambda x: ode_likelihood.ode_log_likelihood(
      model_fn, flow, x, target="velocity", key=jax.random.key(2), rtol=1e-3,
      atol=1e-3))(x)
  assert out.bits_per_dim.shape == (2,)
  assert np.all(np.isfinite(np.asarray(out.bits_per_dim)))
