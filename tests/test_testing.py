"""The Gaussian-mixture reference problems of ddpm_jax.diffusion.testing."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax.diffusion import schedules, testing

MIX = testing.gaussian_mixture(weights=[1.0, 2.0, 1.0], means=[[-0.5, 0.2],
                                                               [0.4, 0.4],
                                                               [0.1, -0.6]],
                               stds=[0.1, 0.2, 0.15], labels=[0, 1, 1])


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("linear", 100, warn=False)


def test_single_gaussian_is_the_linear_denoiser(sched):
  mu, sd = np.array([0.3, -0.2]), 0.5
  gauss = testing.gaussian_mixture(weights=[1.0], means=[mu], stds=[sd])
  x_t = jax.random.normal(jax.random.key(0), (16, 2))
  t = jnp.arange(16) * 6
  alpha = diffusion.extract(sched.sqrt_alphas_cumprod, t, x_t.shape)
  sigma = diffusion.extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
  expected = sigma * (x_t - alpha * mu) / (alpha**2 * sd**2 + sigma**2)
  np.testing.assert_allclose(
      testing.denoiser(gauss, sched)(x_t, t), expected, rtol=1e-5, atol=1e-6)


def test_targets_are_consistent(sched):
  x_t = jax.random.normal(jax.random.key(1), (32, 2))
  t = jnp.arange(32) * 3
  eps, x0, v = (testing.denoiser(MIX, sched, target=target)(x_t, t)
                for target in ("eps", "x0", "v"))
  np.testing.assert_allclose(diffusion.predict_x0_from_eps(sched, x_t, t, eps),
                             x0, atol=2e-5)
  np.testing.assert_allclose(diffusion.predict_eps_from_v(sched, x_t, t, v),
                             eps, atol=2e-5)


def test_denoiser_is_the_conditional_mean(sched):
  """E[(x_0 - D(x_t)) g(x_t)] = 0 for every g (here 1, x_t and its square),
  and the exact D has a lower error than a slightly shrunk one."""
  n = 200_000
  x0, _ = testing.sample(MIX, jax.random.key(2), n)
  t = jnp.full((n,), 40)
  noise = jax.random.normal(jax.random.key(3), x0.shape)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  d = testing.denoiser(MIX, sched, target="x0")(x_t, t)
  err = np.asarray(x0 - d, np.float64)
  for g in (np.ones_like(err), np.asarray(x_t), np.asarray(x_t)**2):
    moment = (err * g).mean(0)
    bound = 5 * (err * g).std(0) / math.sqrt(n)
    assert np.all(np.abs(moment) < bound), (moment, bound)
  assert np.mean(err**2) < np.mean(np.asarray(x0 - 0.98 * d)**2)


def test_null_label_is_unconditional_and_classes_restrict(sched):
  cond = testing.conditional_denoiser(MIX, sched)
  x_t = jax.random.normal(jax.random.key(4), (8, 2))
  t = jnp.full((8,), 30)
  null = jnp.full((8,), MIX.num_classes)
  np.testing.assert_allclose(cond(x_t, t, null),
                             testing.denoiser(MIX, sched)(x_t, t), atol=1e-6)
  only_first = testing.gaussian_mixture(weights=[1.0], means=[[-0.5, 0.2]],
                                        stds=[0.1])
  np.testing.assert_allclose(cond(x_t, t, jnp.zeros((8,), jnp.int32)),
                             testing.denoiser(only_first, sched)(x_t, t),
                             atol=1e-6)


def test_sampling_and_class_posterior():
  x, y = testing.sample(MIX, jax.random.key(5), 40_000)
  chex.assert_shape([x], (40_000, 2))
  np.testing.assert_allclose(
      np.bincount(np.asarray(y)) / 40_000, [0.25, 0.75], atol=0.01)
  x1, y1 = testing.sample(MIX, jax.random.key(6), 1000, label=1)
  assert np.all(np.asarray(y1) == 1)
  log_post = testing.class_log_posterior(MIX, x)
  np.testing.assert_allclose(np.exp(log_post).sum(1), 1.0, rtol=1e-5)
  # Averaged over the data, p(y | x) is the class prior.
  np.testing.assert_allclose(np.exp(log_post).mean(0), [0.25, 0.75], atol=0.01)


def test_fit_components_recovers_the_mixture():
  x, _ = testing.sample(MIX, jax.random.key(7), 100_000)
  fit = testing.fit_components(MIX, x)
  np.testing.assert_allclose(fit.weights, MIX.weights, atol=0.006)
  np.testing.assert_allclose(fit.means, MIX.means, atol=0.005)
  np.testing.assert_allclose(fit.stds, MIX.stds, rtol=0.02)
  shrunk = testing.fit_components(MIX, 0.9 * x)
  assert np.all(np.asarray(shrunk.stds) < 0.95 * np.asarray(MIX.stds))


def test_sliced_wasserstein_of_a_shift():
  """Shifting by d moves every projection u.x by u.d: SW_2^2 = E[(u.d)^2] =
  |d|^2 / D for uniform unit directions u."""
  x, _ = testing.sample(MIX, jax.random.key(8), 1000)
  shift = jnp.array([0.3, -0.4])
  sw = testing.sliced_wasserstein(x, x + shift, key=jax.random.key(9),
                                  num_projections=1024)
  np.testing.assert_allclose(sw, 0.5 / math.sqrt(2), rtol=0.04)
  assert float(testing.sliced_wasserstein(x, x, key=jax.random.key(9))) == 0
  with pytest.raises(ValueError, match="x and y must both be"):
    testing.sliced_wasserstein(x, x[:10], key=jax.random.key(9))


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights=[1.0], means=[0.0], stds=[1.0]), "means must be"),
    (dict(weights=[1.0, 1.0], means=[[0.0]], stds=[1.0]), "means must be"),
    (dict(weights=[0.0], means=[[0.0]], stds=[1.0]), "must be positive"),
    (dict(weights=[1.0], means=[[0.0]], stds=[-1.0]), "must be positive"),
    (dict(weights=[1.0, 1.0], means=[[0.0], [1.0]], stds=[1.0, 1.0],
          labels=[0, 2]), "every class"),
    (dict(weights=[1.0], means=[[0.0]], stds=[1.0],
          labels=[0.5]), "labels must be"),
])
def test_bad_mixtures(kwargs, message):
  with pytest.raises(ValueError, match=message):
    testing.gaussian_mixture(**kwargs)
