"""Training losses: formulas, targets, weighting and determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, losses, schedules

T = 50


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("cosine", T)


def _linear_model(x_t, t):
  """A cheap stand-in denoiser that depends on both inputs."""
  return 0.5 * x_t + 0.01 * t[:, None, None, None].astype(x_t.dtype)


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_regression_loss_formulas(loss_type):
  pred = jnp.array([[0.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
  target = jnp.zeros_like(pred)
  out = losses.regression_loss(pred, target, loss_type=loss_type)
  chex.assert_shape(out, (2,))
  err = np.asarray(pred)
  if loss_type == "l2":
    expected = (err**2).mean(1)
  elif loss_type == "l1":
    expected = np.abs(err).mean(1)
  else:  # PyTorch's smooth_l1_loss with beta = 1
    expected = np.where(np.abs(err) < 1, 0.5 * err**2,
                        np.abs(err) - 0.5).mean(1)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("target", diffusion.TARGETS)
@pytest.mark.parametrize("shape", [(1, 8, 8, 1), (5, 4, 6, 3)])
def test_denoising_loss_matches_definition(sched, target, shape):
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
  noise = jax.random.normal(k2, shape)
  t = jnp.arange(shape[0]) * 7 % T
  out = losses.denoising_loss(_linear_model, sched, x0, t, noise,
                              target=target)
  out_jit = jax.jit(lambda *a: losses.denoising_loss(
      _linear_model, sched, *a, target=target))(x0, t, noise)
  chex.assert_shape(out, (shape[0],))
  np.testing.assert_allclose(out, out_jit, rtol=1e-6)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  goal = {"eps": noise, "x0": x0,
          "v": diffusion.velocity(sched, x0, t, noise)}[target]
  expected = ((np.asarray(_linear_model(x_t, t)) - np.asarray(goal))**2).mean(
      axis=(1, 2, 3))
  np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_perfect_eps_model_has_zero_loss(sched):
  x0 = jnp.linspace(-1, 1, 2 * 16).reshape(2, 4, 4, 1)
  def exact(x_t, t):
    return diffusion.predict_eps_from_x0(sched, x_t, t, x0)
  out = losses.training_losses(exact, sched, x0, jax.random.key(3))
  np.testing.assert_allclose(out, 0.0, atol=1e-8)


def test_learned_variance_output_trains_first_half(sched):
  x0 = jnp.ones((2, 4, 4, 3)) * 0.2
  noise = jnp.ones_like(x0)
  t = jnp.array([3, 9])
  def two_headed(x_t, t):
    return jnp.concatenate([_linear_model(x_t, t), jnp.full_like(x_t, 9.0)],
                           -1)
  np.testing.assert_allclose(
      losses.denoising_loss(two_headed, sched, x0, t, noise),
      losses.denoising_loss(_linear_model, sched, x0, t, noise), rtol=1e-6)


def test_t_weights(sched):
  x0 = jnp.ones((3, 4, 4, 1)) * 0.2
  noise = -jnp.ones_like(x0)
  t = jnp.array([0, 5, 49])
  weights = jnp.arange(T, dtype=jnp.float32)
  plain = losses.denoising_loss(_linear_model, sched, x0, t, noise)
  weighted = losses.denoising_loss(_linear_model, sched, x0, t, noise,
                                   t_weights=weights)
  np.testing.assert_allclose(weighted, plain * np.array([0.0, 5.0, 49.0]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"t_weights must have shape \(50,\)"):
    losses.denoising_loss(_linear_model, sched, x0, t, noise,
                          t_weights=weights[:3])


def test_training_losses_determinism(sched):
  x0 = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1), minval=-1,
                          maxval=1)
  fn = jax.jit(lambda k: losses.training_losses(_linear_model, sched, x0, k,
                                                loss_type="huber"))
  a, b = fn(jax.random.key(7)), fn(jax.random.key(7))
  c = fn(jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_unknown_loss_type():
  with pytest.raises(ValueError, match="Unknown loss_type 'mse'"):
    losses.regression_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                           loss_type="mse")


@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_min_snr_weighting_is_min_snr_times_the_x0_error(target):
  """Weighted by `loss_weights`, every target's L2 loss equals
  min(SNR_t, gamma) * ||x0 - x0_hat||^2 (Hang et al. 2023)."""
  sched = schedules.make_schedule("linear", 1000)
  gamma = 5.0
  weights = losses.loss_weights(sched, weighting="min_snr", target=target,
                                gamma=gamma)
  chex.assert_shape(weights, (1000,))
  x0 = jax.random.uniform(jax.random.key(0), (6, 4, 4, 1), minval=-1,
                          maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 10, 100, 300, 600, 999])
  prediction = jax.random.normal(jax.random.key(2), x0.shape)
  loss = losses.denoising_loss(lambda x_t, s: prediction, sched, x0, t, noise,
                               target=target, t_weights=weights)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  x0_hat, _ = diffusion.predict_x0_eps(sched, x_t, t, prediction,
                                       target=target)
  snr = sched.snr[t]
  expected = jnp.minimum(snr, gamma) * jnp.mean(jnp.square(x0 - x0_hat),
                                                 axis=(1, 2, 3))
  np.testing.assert_allclose(loss, expected, rtol=2e-4)
  # Both regimes occur: capped at high SNR, SNR itself at low SNR.
  assert snr[0] > gamma > snr[-1]


def test_uniform_weighting_and_bad_options():
  sched = schedules.make_schedule("linear", 10)
  assert losses.loss_weights(sched, weighting="uniform") is None
  with pytest.raises(ValueError, match="Unknown weighting 'snr'"):
    losses.loss_weights(sched, weighting="snr")
  with pytest.raises(ValueError, match="gamma must be > 0"):
    losses.loss_weights(sched, weighting="min_snr", gamma=0.0)
