"""The continuous processes of ddpm_jax.diffusion.processes: EDM's closed
forms, flow matching's, the conversions between predictions, and their exact
Gaussian-mixture denoisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion import processes, testing

MIX = testing.gaussian_mixture(weights=[0.3, 0.5, 0.2], means=[[-0.6, -0.3],
                                                               [0.5, 0.5],
                                                               [0.2, -0.7]],
                               stds=[0.12, 0.18, 0.15])
PROCESSES = [processes.EDM(), processes.Flow(), processes.Flow(shift=3.0)]


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_preconditioning_is_table_1(sigma_data):
  edm = processes.EDM(sigma_data=sigma_data)
  sigma = np.array([0.002, 0.1, 0.5, 1.0, 80.0])
  c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
  sd = sigma_data
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2),
                             rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sd**2 + sigma**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
  np.testing.assert_allclose(edm.loss_weight(sigma),
                             (sigma**2 + sd**2) / (sigma * sd)**2, rtol=1e-6)
  # The weight undoes c_out: lambda c_out^2 = 1 (EDM eq. 8, uniform
  # effective weight).
  np.testing.assert_allclose(
      edm.loss_weight(sigma) * np.square(c_out), 1.0, rtol=1e-5)


def test_precondition_wraps_the_backbone():
  edm = processes.EDM()
  seen = {}

  def backbone(x, c_noise):
    seen["x"], seen["c"] = x, c_noise
    return 2.0 * x + 1.0

  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  sigma = jnp.array([0.1, 1.0, 10.0])
  out = processes.precondition(edm, backbone)(x, sigma)
  c_skip, c_out, c_in, c_noise = (
      np.asarray(c)[:, None, None, None] for c in edm.preconditioning(sigma))
  np.testing.assert_allclose(seen["x"], c_in * x, rtol=1e-6)
  np.testing.assert_allclose(seen["c"], c_noise[:, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(out, c_skip * x + c_out * (2 * c_in * x + 1),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="applies to the 'edm' process"):
    processes.precondition(processes.Flow(), backbone)


@pytest.mark.parametrize("sigma", [0.5, math.exp(-1.2)],
                         ids=["sigma_data", "p_mean"])
def test_edm_weighted_loss_of_the_exact_denoiser_is_one(sigma):
  """Data N(mu, sd^2 I) with sd = sigma_data: the exact denoiser's error has
  variance sd^2 sigma^2 / (sd^2 + sigma^2) per dimension, which lambda(sigma)
  turns into exactly 1, at every sigma. Monte Carlo with 100,000 points:
  std 0.003."""
  edm = processes.EDM()
  gauss = testing.gaussian_mixture(weights=[1.0], means=[[0.3, -0.2]],
                                   stds=[edm.sigma_data])
  x0, _ = testing.sample(gauss, jax.random.key(1), 100_000)
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  sigmas = jnp.full((x0.shape[0],), sigma)
  denoise = testing.process_denoiser(gauss, edm, target="x0")
  per_example = edm.loss_weight(sigmas) * jnp.mean(
      jnp.square(denoise(x0 + sigma * noise, sigmas) - x0), axis=1)
  assert abs(float(per_example.mean()) - 1.0) < 0.015


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_loss_of_the_exact_velocity_is_its_minimum(t):
  """Data N(mu, s^2 I): E[u | x_t] leaves Var(u | x_t) = Var(x0 | x_t) / t^2
  = s^2 / ((1 - t)^2 s^2 + t^2) per dimension; any other field adds its
  mean squared distance to E[u | x_t]."""
  sd = 0.4
  gauss = testing.gaussian_mixture(weights=[1.0], means=[[0.3, -0.2]],
                                   stds=[sd])
  flow = processes.Flow()
  x0, _ = testing.sample(gauss, jax.random.key(1), 100_000)
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  ts = jnp.full((x0.shape[0],), t)
  x_t = processes.q_sample(flow, x0, ts, noise)
  exact = testing.process_denoiser(gauss, flow, target="velocity")(x_t, ts)
  u = noise - x0
  loss = float(jnp.mean(jnp.square(exact - u)))
  minimum = sd**2 / ((1 - t)**2 * sd**2 + t**2)
  assert abs(loss / minimum - 1.0) < 0.015
  shifted = float(jnp.mean(jnp.square(exact + 0.1 - u)))
  np.testing.assert_allclose(shifted - loss, 0.01, rtol=0.15)


@pytest.mark.parametrize("process", PROCESSES, ids=str)
@pytest.mark.parametrize("target", processes.TARGETS)
def test_conversions_round_trip(process, target):
  x0 = jax.random.normal(jax.random.key(0), (64, 3))
  eps = jax.random.normal(jax.random.key(1), (64, 3))
  t = process.grid(64, spacing="logsnr")
  x_t = processes.q_sample(process, x0, t, eps)
  prediction = processes.from_x0_eps(process, x0, eps, t, target=target)
  back = processes.predict_x0_eps(process, x_t, t, prediction, target=target)
  np.testing.assert_allclose(back[0], x0, rtol=1e-3, atol=2e-3)
  np.testing.assert_allclose(back[1], eps, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("process", PROCESSES, ids=str)
def test_velocity_is_the_time_derivative_of_the_path(process):
  x0 = jax.random.normal(jax.random.key(0), (8, 2))
  eps = jax.random.normal(jax.random.key(1), (8, 2))
  t = jnp.linspace(0.2, 0.8, 8)
  path = lambda s: processes.q_sample(process, x0, s, eps)  # noqa: E731
  _, tangent = jax.jvp(path, (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(
      processes.from_x0_eps(process, x0, eps, t, target="velocity"), tangent,
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      processes.velocity_from_x0(process, path(t), t, x0), tangent, rtol=1e-4,
      atol=1e-4)


@pytest.mark.parametrize("process", PROCESSES, ids=str)
def test_log_snr_and_its_inverse(process):
  t = process.grid(20, spacing="logsnr")
  alpha, sigma = process.alpha_sigma(t)
  np.testing.assert_allclose(process.log_snr(t),
                             2 * np.log(np.asarray(alpha) / np.asarray(sigma)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(process.t_from_log_snr(process.log_snr(t)), t,
                             rtol=1e-4)


def test_edm_grids():
  edm = processes.EDM(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  i = np.arange(18)
  eq5 = (80**(1 / 7) + i / 17 * (0.002**(1 / 7) - 80**(1 / 7)))**7
  np.testing.assert_allclose(edm.grid(18), eq5, rtol=1e-6)
  np.testing.assert_allclose(edm.grid(5, spacing="uniform"),
                             np.linspace(80, 0.002, 5), rtol=1e-6)
  np.testing.assert_allclose(edm.grid(5, spacing="logsnr"),
                             np.geomspace(80, 0.002, 5), rtol=1e-5)
  np.testing.assert_allclose(edm.grid(1), [80.0])


def test_flow_grids_and_shift():
  np.testing.assert_allclose(processes.Flow().grid(4), [1.0, 0.75, 0.5, 0.25])
  s = 3.0
  t = np.array([1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose(
      processes.Flow(shift=s).grid(4), s * t / (1 + (s - 1) * t), rtol=1e-6)
  logsnr = processes.Flow().grid(5, spacing="logsnr")
  np.testing.assert_allclose(
      np.asarray(logsnr)[[0, -1]],
      [1 - processes.FLOW_EDGE, processes.FLOW_EDGE], rtol=1e-5)
  np.testing.assert_allclose(np.diff(processes.Flow().log_snr(logsnr)),
                             np.diff(processes.Flow().log_snr(logsnr))[0],
                             rtol=1e-3)


def test_training_levels():
  """EDM: ln sigma ~ N(P_mean, P_std^2); flow: logit t ~ N(location,
  scale^2) or t uniform, then shifted. 100,000 draws: std errors < 0.004."""
  key = jax.random.key(0)
  log_sigma = np.log(processes.EDM().sample_t(key, 100_000))
  np.testing.assert_allclose(
      [log_sigma.mean(), log_sigma.std()], [-1.2, 1.2], atol=0.015)
  t = np.asarray(
      processes.Flow(time_sampling="logit_normal", location=0.5,
                     scale=0.8).sample_t(key, 100_000))
  logit = np.log(t / (1 - t))
  np.testing.assert_allclose([logit.mean(), logit.std()], [0.5, 0.8],
                             atol=0.015)
  u = np.asarray(processes.Flow().sample_t(key, 100_000))
  shifted = np.asarray(processes.Flow(shift=2.0).sample_t(key, 100_000))
  np.testing.assert_allclose(shifted, 2 * u / (1 + u), rtol=1e-5)
  assert abs(u.mean() - 0.5) < 0.005 and 0 <= u.min() and u.max() <= 1


def test_exact_velocity_at_the_ends():
  """At t = 1 (pure noise) E[u | x] = x - E[x0]; at t = 0, where x = x0, the
  x0 prediction is x itself."""
  flow = processes.Flow()
  x = jax.random.normal(jax.random.key(0), (16, 2))
  ones = jnp.ones((16,))
  mean = np.asarray(MIX.weights) @ np.asarray(MIX.means)
  np.testing.assert_allclose(
      testing.process_denoiser(MIX, flow, target="velocity")(x, ones), x - mean,
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      testing.process_denoiser(MIX, flow, target="x0")(x, 0 * ones), x,
      rtol=1e-5, atol=1e-6)


BAD = [
    (lambda: processes.EDM(sigma_min=0.0), "sigma_min must be a finite number"),
    (lambda: processes.EDM(rho=-1.0), "rho must be a finite number > 0"),
    (lambda: processes.EDM(sigma_max=math.inf), "sigma_max must be a finite"),
    (lambda: processes.EDM(sigma_min=5.0, sigma_max=1.0), "must be below"),
    (lambda: processes.Flow(time_sampling="beta"),
     "Unknown time_sampling 'beta'"),
    (lambda: processes.Flow(shift=0.0), "shift must be a finite number > 0"),
    (lambda: processes.make_process("ddim"), "Unknown process 'ddim'"),
    (lambda: processes.EDM().grid(0), "num_steps must be an integer >= 1"),
    (lambda: processes.EDM().grid(4, spacing="leading"),
     "Unknown spacing 'leading'"),
    (lambda: processes.predict_x0_eps(processes.EDM(), jnp.ones(
        (1, 2)), jnp.ones(1), jnp.ones(
            (1, 2)), target="score"), "Unknown target 'score'"),
]


@pytest.mark.parametrize("fn,message", BAD, ids=[b[1] for b in BAD])
def test_bad_input(fn, message):
  with pytest.raises(ValueError) as info:
    fn()
  assert message in str(info.value)
  assert "\n" not in str(info.value)
