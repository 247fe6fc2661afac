"""Variational bound: KL, discretized decoder, prior and the full bound."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion
from ddpm_jax.diffusion import likelihood, schedules

T = 20


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("cosine", T)


def test_kl_of_gaussian_to_itself_is_zero():
  mean = jnp.array([-1.0, 0.0, 2.5])
  logvar = jnp.array([-3.0, 0.0, 1.2])
  np.testing.assert_allclose(likelihood.normal_kl(mean, logvar, mean, logvar),
                             0.0, atol=1e-7)


def test_kl_closed_form():
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
  expected = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.25) / 4 - 0.5
  np.testing.assert_allclose(likelihood.normal_kl(m1, lv1, m2, lv2), expected,
                             rtol=1e-6)


def test_approx_cdf_is_close_to_exact():
  x = jnp.linspace(-5, 5, 101)
  np.testing.assert_allclose(likelihood.approx_standard_normal_cdf(x),
                             stats.norm.cdf(np.asarray(x)), atol=2e-4)


@pytest.mark.parametrize("mean, log_scale", [(0.0, np.log(0.1)),
                                             (0.93, np.log(0.02)),
                                             (-1.0, np.log(0.5)),
                                             (0.2, np.log(1e-3))])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
  grid = jnp.arange(256, dtype=jnp.float32)[:, None] / 127.5 - 1.0
  log_probs = likelihood.discretized_gaussian_log_likelihood(
      grid, means=jnp.full_like(grid, mean),
      log_scales=jnp.full_like(grid, log_scale))
  chex.assert_shape(log_probs, (256, 1))
  np.testing.assert_allclose(
      np.exp(np.asarray(log_probs, np.float64)).sum(), 1.0, atol=1e-4)


def test_discretized_likelihood_of_a_sharp_gaussian():
  x = jnp.array([[0.0]])
  lp = likelihood.discretized_gaussian_log_likelihood(
      x, means=x, log_scales=jnp.log(jnp.array([[1e-4]])))
  np.testing.assert_allclose(lp, 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 4, 1), (3, 3, 5, 3)])
def test_prior_bpd(shape):
  sched = schedules.make_schedule("linear", T, warn=False)  # abar_T = 0.82
  x0 = jnp.full(shape, 0.5)
  bpd = likelihood.prior_bpd(sched, x0)
  chex.assert_shape(bpd, (shape[0],))
  abar = float(sched.alphas_cumprod[-1])
  kl = 0.5 * (-np.log(1 - abar) + (1 - abar) + abar * 0.25 - 1)
  np.testing.assert_allclose(bpd, kl / np.log(2), rtol=1e-5)


def _grid_images(shape, seed=0):
  u8 = jax.random.randint(jax.random.key(seed), shape, 0, 256)
  return u8.astype(jnp.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def bound_fn(sched):
  """A jitted bound for a denoiser that knows the data is `x0` (or not)."""

  def bound(x0, key, *, exact):

    def model_fn(x_t, t):
      if exact:
        return diffusion.predict_eps_from_x0(sched, x_t, t, x0)
      return jnp.zeros_like(x_t)

    return likelihood.variational_bound(model_fn, sched, x0, key,
                                        var_type="fixed_small")

  return jax.jit(bound, static_argnames="exact")


def test_variational_bound_terms_and_breakdown(bound_fn):
  x0 = _grid_images((3, 4, 4, 1))
  out = bound_fn(x0, jax.random.key(0), exact=True)
  chex.assert_shape([out.total_bpd, out.prior_bpd, out.decoder_bpd, out.kl_bpd],
                    (3,))
  chex.assert_shape(out.terms_bpd, (3, T))
  np.testing.assert_allclose(out.total_bpd,
                             out.prior_bpd + out.decoder_bpd + out.kl_bpd,
                             rtol=1e-6)
  np.testing.assert_allclose(
      out.terms_bpd.sum(1) + out.prior_bpd, out.total_bpd, rtol=1e-5)
  # The exact denoiser matches every posterior: all KL terms vanish.
  np.testing.assert_allclose(out.kl_bpd, 0.0, atol=1e-3)
  assert np.isfinite(out.total_bpd).all()


def test_exact_denoiser_beats_a_poor_one(bound_fn):
  x0 = _grid_images((2, 4, 4, 1), seed=1)
  good = bound_fn(x0, jax.random.key(0), exact=True).total_bpd
  poor = bound_fn(x0, jax.random.key(0), exact=False).total_bpd
  assert np.all(np.isfinite(poor)) and np.all(good < poor)


def test_variational_bound_determinism(bound_fn):
  x0 = _grid_images((2, 4, 4, 1), seed=2)
  a = bound_fn(x0, jax.random.key(5), exact=False)
  b = bound_fn(x0, jax.random.key(5), exact=False)
  c = bound_fn(x0, jax.random.key(6), exact=False)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.kl_bpd, c.kl_bpd)


def test_vb_terms_without_jit_match_jit(sched):
  x0 = _grid_images((2, 4, 4, 1), seed=3)
  x_t = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 7])
  out = jnp.zeros_like(x0)
  eager = likelihood.vb_terms_bpd(sched, out, x0, x_t, t)
  jitted = jax.jit(likelihood.vb_terms_bpd)(sched, out, x0, x_t, t)
  chex.assert_shape(eager, (2,))
  np.testing.assert_allclose(eager, jitted, rtol=1e-5)


def test_bound_uses_the_learned_variance(sched):
  """bits/dim of a learned-variance model goes through p_mean_variance:
  learned_range at -1 is the fixed_small bound; 'learned' log-variances of
  the posterior with the exact mean make every KL term 0, and other learned
  variances raise the bound."""
  x0 = _grid_images((2, 4, 4, 1), seed=4)

  def bound(var_type, var_fn):

    def model_fn(x_t, t):
      eps = diffusion.predict_eps_from_x0(sched, x_t, t, x0)
      return jnp.concatenate([eps, var_fn(x_t, t)], axis=-1)

    return likelihood.variational_bound(model_fn, sched, x0, jax.random.key(0),
                                        var_type=var_type)

  fixed = likelihood.variational_bound(
      lambda x_t, t: diffusion.predict_eps_from_x0(sched, x_t, t, x0), sched,
      x0, jax.random.key(0), var_type="fixed_small")
  low_end = bound("learned_range", lambda x_t, t: -jnp.ones_like(x_t))
  np.testing.assert_allclose(low_end.total_bpd, fixed.total_bpd, rtol=1e-6)
  posterior = lambda x_t, t: jnp.broadcast_to(
      diffusion.extract(sched.posterior_log_variance_clipped, t, x_t.shape), x_t
      .shape)
  exact = bound("learned", posterior)
  np.testing.assert_allclose(exact.kl_bpd, 0.0, atol=1e-4)
  wider = bound("learned", lambda x_t, t: posterior(x_t, t) + 0.5)
  assert np.all(np.asarray(wider.kl_bpd) > 0.01)
