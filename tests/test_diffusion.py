"""Forward process, posterior and parameterizations against closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax.diffusion import schedules

T = 100
SHAPES = [(1, 8, 8, 1), (3, 5, 7, 3), (4, 4, 4, 2)]


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("cosine", T)


def _inputs(shape, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
  noise = jax.random.normal(k2, shape)
  t = jax.random.randint(k3, (shape[0],), 0, T)
  return x0, noise, t


@pytest.mark.parametrize("shape", SHAPES)
def test_extract_broadcasts(sched, shape):
  t = jnp.arange(shape[0]) % T
  out = diffusion.extract(sched.betas, t, shape)
  chex.assert_shape(out, (shape[0], 1, 1, 1))
  np.testing.assert_array_equal(out[:, 0, 0, 0], sched.betas[t])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("jit", [False, True])
def test_q_sample_shapes_and_jit(sched, shape, jit):
  x0, noise, t = _inputs(shape)
  fn = jax.jit(diffusion.q_sample) if jit else diffusion.q_sample
  x_t = fn(sched, x0, t, noise)
  chex.assert_shape(x_t, shape)
  chex.assert_type(x_t, jnp.float32)
  expected = (
      np.asarray(sched.sqrt_alphas_cumprod)[t][:, None, None, None] * x0 +
      np.asarray(sched.sqrt_one_minus_alphas_cumprod)[t][:, None, None, None] *
      noise)
  np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t_value", [0, 30, 99])
def test_q_sample_monte_carlo_moments(sched, t_value):
  n = 200_000
  x0 = jnp.array([0.7, -0.3]).reshape(1, 2)
  x0_b = jnp.broadcast_to(x0, (n, 2))
  noise = jax.random.normal(jax.random.key(1), (n, 2))
  t = jnp.full((n,), t_value)
  x_t = np.asarray(diffusion.q_sample(sched, x0_b, t, noise), np.float64)
  abar = float(sched.alphas_cumprod[t_value])
  mean_target = np.sqrt(abar) * np.array([0.7, -0.3])
  var_target = 1.0 - abar
  # 5 standard errors of the mean and of the variance estimate.
  np.testing.assert_allclose(x_t.mean(0), mean_target,
                             atol=5 * np.sqrt(var_target / n))
  np.testing.assert_allclose(x_t.var(0), var_target,
                             atol=5 * var_target * np.sqrt(2.0 / n))


def test_posterior_is_the_gaussian_product(sched):
  """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0)."""
  x0, _, _ = _inputs((5, 3, 3, 1), seed=3)
  x_t = jax.random.normal(jax.random.key(4), x0.shape)
  t = jnp.array([1, 2, 10, 50, 99])
  mean, var, log_var = diffusion.q_posterior_mean_variance(sched, x0, x_t, t)
  betas = np.asarray(sched.betas, np.float64)
  abar = np.cumprod(1 - betas)
  for i, ti in enumerate(np.asarray(t)):
    prior_mean = np.sqrt(abar[ti - 1]) * np.asarray(x0[i])
    prior_var = 1 - abar[ti - 1]
    precision = 1 / prior_var + (1 - betas[ti]) / betas[ti]
    product_mean = (prior_mean / prior_var + np.sqrt(1 - betas[ti]) *
                    np.asarray(x_t[i]) / betas[ti]) / precision
    np.testing.assert_allclose(mean[i], product_mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(var[i, 0, 0, 0], 1 / precision, rtol=1e-4)
    np.testing.assert_allclose(log_var[i, 0, 0, 0], np.log(1 / precision),
                               rtol=1e-4)


def test_posterior_at_first_step_returns_x0(sched):
  x0, _, _ = _inputs((2, 4, 4, 1))
  x_t = jax.random.normal(jax.random.key(5), x0.shape)
  mean, var, _ = diffusion.q_posterior_mean_variance(sched, x0, x_t,
                                                     jnp.zeros((2,), jnp.int32))
  np.testing.assert_allclose(mean, x0, atol=1e-6)
  np.testing.assert_array_equal(var, 0.0)


@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_parameterizations_round_trip(sched, target):
  x0, noise, t = _inputs((6, 4, 4, 3), seed=7)
  t = jnp.clip(t, 0, T - 2)  # the last cosine step has abar ~ 1e-9
  x_t = diffusion.q_sample(sched, x0, t, noise)
  prediction = diffusion.training_target(sched, x0, t, noise, target=target)
  pred_x0, pred_eps = diffusion.predict_x0_eps(sched, x_t, t, prediction,
                                               target=target)
  np.testing.assert_allclose(pred_x0, x0, atol=2e-3)
  np.testing.assert_allclose(pred_eps, noise, atol=2e-3)


def test_velocity_identity(sched):
  x0, noise, t = _inputs((4, 2, 2, 1))
  v = diffusion.velocity(sched, x0, t, noise)
  abar = np.asarray(sched.alphas_cumprod)[t][:, None, None, None]
  np.testing.assert_allclose(v,
                             np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_p_mean_variance_exact_model(sched, var_type):
  """With the true x0, the x0 mean form is the true posterior mean."""
  x0, noise, t = _inputs((5, 4, 4, 1), seed=2)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  eps = diffusion.predict_eps_from_x0(sched, x_t, t, x0)
  out = jax.jit(lambda o, x, tt: diffusion.p_mean_variance(
      sched, o, x, tt, var_type=var_type, clip_x0=False))(eps, x_t, t)
  true_mean, post_var, post_log_var = diffusion.q_posterior_mean_variance(
      sched, x0, x_t, t)
  for arr in (out.mean, out.pred_x0, out.pred_eps):
    chex.assert_shape(arr, x0.shape)
  chex.assert_shape([out.variance, out.log_variance], (5, 1, 1, 1))
  np.testing.assert_allclose(out.mean, true_mean, atol=1e-4)
  if var_type == "fixed_small":
    np.testing.assert_allclose(out.variance, post_var, rtol=1e-6)
    np.testing.assert_allclose(out.log_variance, post_log_var, rtol=1e-6)
  else:
    betas = np.asarray(sched.betas)[t]
    betas = np.where(
        np.asarray(t) == 0, float(sched.posterior_variance[1]), betas)
    np.testing.assert_allclose(out.variance[:, 0, 0, 0], betas, rtol=1e-6)


def test_mean_forms_agree_without_clipping(sched):
  x0, noise, t = _inputs((4, 4, 4, 1), seed=9)
  t = jnp.clip(t, 1, T - 2)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  eps = noise + 0.1  # any prediction
  a = diffusion.p_mean_variance(sched, eps, x_t, t, mean_form="x0",
                                clip_x0=False)
  b = diffusion.p_mean_variance(sched, eps, x_t, t, mean_form="eps")
  np.testing.assert_allclose(a.mean, b.mean, rtol=1e-3, atol=1e-4)


def test_clipping_bounds_pred_x0(sched):
  x_t = jnp.full((2, 2, 2, 1), 5.0)
  out = diffusion.p_mean_variance(sched, jnp.zeros_like(x_t), x_t,
                                  jnp.array([10, 90]))
  assert float(out.pred_x0.max()) == 1.0


def test_learned_range_interpolates(sched):
  x_t = jnp.zeros((3, 2, 2, 1))
  t = jnp.array([5, 20, 80])
  lo = diffusion.p_mean_variance(
      sched, jnp.concatenate([x_t, -jnp.ones_like(x_t)], -1), x_t, t,
      var_type="learned_range")
  hi = diffusion.p_mean_variance(sched,
                                 jnp.concatenate([x_t, jnp.ones_like(x_t)], -1),
                                 x_t, t, var_type="learned_range")
  np.testing.assert_allclose(lo.log_variance[:, 0, 0, 0],
                             sched.posterior_log_variance_clipped[t], rtol=1e-6)
  np.testing.assert_allclose(hi.log_variance[:, 0, 0, 0],
                             np.log(sched.betas[t]), rtol=1e-6)
  learned = diffusion.p_mean_variance(
      sched, jnp.concatenate([x_t, jnp.full_like(x_t, -3.0)], -1), x_t, t,
      var_type="learned")
  np.testing.assert_allclose(learned.variance, np.exp(-3.0), rtol=1e-6)


def test_bad_inputs(sched):
  x0, noise, _ = _inputs((2, 4, 4, 1))
  with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
    diffusion.q_sample(sched, x0, jnp.array([0, 100]), noise)
  with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
    diffusion.q_sample(sched, x0, jnp.array([-1, 3]), noise)
  with pytest.raises(ValueError, match="integer array"):
    diffusion.q_sample(sched, x0, jnp.array([0.5, 3.0]), noise)
  with pytest.raises(ValueError, match="noise shape"):
    diffusion.q_sample(sched, x0, jnp.array([0, 3]), noise[:1])
  with pytest.raises(ValueError, match="Unknown target 'score'"):
    diffusion.training_target(sched, x0, jnp.array([0, 1]), noise,
                              target="score")
  with pytest.raises(ValueError, match="Unknown var_type"):
    diffusion.p_mean_variance(sched, x0, x0, jnp.array([0, 1]), var_type="big")
  with pytest.raises(ValueError, match=r"2 x 1 channels"):
    diffusion.p_mean_variance(sched, x0, x0, jnp.array([0, 1]),
                              var_type="learned")


def test_out_of_range_t_under_jit_is_nan(sched):
  x0, noise, _ = _inputs((2, 4, 4, 1))
  x_t = jax.jit(diffusion.q_sample)(sched, x0, jnp.array([3, T]), noise)
  assert np.isfinite(x_t[0]).all() and np.isnan(x_t[1]).all()
