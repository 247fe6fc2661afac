"""Training losses: formulas, targets, weighting and determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import diffusion
from ddpm_jax.diffusion import likelihood, losses, schedules

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
  out = losses.denoising_loss(_linear_model, sched, x0, t, noise, target=target)
  out_jit = jax.jit(lambda *a: losses.denoising_loss(
      _linear_model, sched, *a, target=target))(x0, t, noise)
  chex.assert_shape(out, (shape[0],))
  np.testing.assert_allclose(out, out_jit, rtol=1e-6)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  goal = {
      "eps": noise,
      "x0": x0,
      "v": diffusion.velocity(sched, x0, t, noise)
  }[target]
  expected = ((np.asarray(_linear_model(x_t, t)) -
               np.asarray(goal))**2).mean(axis=(1, 2, 3))
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
    return jnp.concatenate([_linear_model(x_t, t), jnp.full_like(x_t, 9.0)], -1)

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
  x0 = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1), minval=-1, maxval=1)
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
  x0 = jax.random.uniform(jax.random.key(0), (6, 4, 4, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 10, 100, 300, 600, 999])
  prediction = jax.random.normal(jax.random.key(2), x0.shape)
  loss = losses.denoising_loss(lambda x_t, s: prediction, sched, x0, t, noise,
                               target=target, t_weights=weights)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  x0_hat, _ = diffusion.predict_x0_eps(sched, x_t, t, prediction, target=target)
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


# ----------------------------------------------------------------------------
# L_hybrid for learned variances.


def _grid_image(shape, seed):
  u8 = jax.random.randint(jax.random.key(seed), shape, 0, 256)
  return u8.astype(jnp.float32) / 127.5 - 1.0


def test_learned_range_ends_are_the_fixed_variances(sched):
  """-1 gives fixed_small's log-variance at every step; +1 gives log beta_t,
  fixed_large's for t >= 1 (fixed_large takes the posterior variance of
  step 1 at t = 0, as improved-diffusion does)."""
  x_t = jax.random.normal(jax.random.key(0), (T, 2, 2, 1))
  t = jnp.arange(T)
  pred = jnp.zeros_like(x_t)
  for end, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
    learned = diffusion.p_mean_variance(
        sched, jnp.concatenate([pred, jnp.full_like(x_t, end)], -1), x_t, t,
        var_type="learned_range")
    ref = diffusion.p_mean_variance(sched, pred, x_t, t, var_type=fixed)
    first = 0 if fixed == "fixed_small" else 1
    np.testing.assert_allclose(
        jnp.broadcast_to(learned.log_variance, x_t.shape)[first:],
        jnp.broadcast_to(ref.log_variance, x_t.shape)[first:], rtol=1e-6)
  np.testing.assert_allclose(learned.log_variance[0], jnp.log(sched.betas[0]),
                             rtol=1e-6)


def _hybrid_setup(shape=(6, 4, 4, 2), seed=0):
  x0 = _grid_image(shape, seed)
  noise = jax.random.normal(jax.random.key(seed + 1), shape)
  t = jnp.arange(shape[0]) * 9 % T
  t = t.at[0].set(0)  # The decoder term.
  out = 0.3 * jax.random.normal(jax.random.key(seed + 2), shape[:-1] +
                                (2 * shape[-1],))
  return x0, noise, t, out


@pytest.mark.parametrize("var_type", losses.LEARNED_VAR_TYPES)
@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_hybrid_loss_is_simple_plus_weighted_bound(sched, var_type, target):
  x0, noise, t, out = _hybrid_setup()
  model_fn = lambda x_t, t: out
  terms = losses.hybrid_loss(model_fn, sched, x0, t, noise, var_type=var_type,
                             target=target)
  chex.assert_shape([terms.loss, terms.simple, terms.vlb], (6,))
  np.testing.assert_allclose(
      terms.simple,
      losses.denoising_loss(model_fn, sched, x0, t, noise, target=target),
      rtol=1e-6)
  x_t = diffusion.q_sample(sched, x0, t, noise)
  np.testing.assert_allclose(
      terms.vlb,
      likelihood.vb_terms_bpd(sched, out, x0, x_t, t, target=target,
                              var_type=var_type, clip_x0=False), rtol=1e-6)
  np.testing.assert_allclose(terms.loss, terms.simple + 1e-3 * T * terms.vlb,
                             rtol=1e-6)


@pytest.mark.parametrize("var_type", losses.LEARNED_VAR_TYPES)
def test_bound_gradient_does_not_reach_the_mean(sched, var_type):
  x0, noise, t, out = _hybrid_setup(seed=3)
  grad = lambda field: jax.grad(lambda o: getattr(
      losses.hybrid_loss(lambda x_t, t: o, sched, x0, t, noise, var_type=
                         var_type), field).sum())(out)
  vlb, simple, total = grad("vlb"), grad("simple"), grad("loss")
  channels = x0.shape[-1]
  np.testing.assert_array_equal(vlb[..., :channels], 0.0)
  assert np.abs(np.asarray(vlb[..., channels:])).min() > 0
  np.testing.assert_array_equal(simple[..., channels:], 0.0)
  np.testing.assert_array_equal(total[..., :channels], simple[..., :channels])


def test_training_losses_trains_learned_variances_with_hybrid(sched):
  x0, _, _, out = _hybrid_setup(seed=5)
  model_fn = lambda x_t, t: out
  key = jax.random.key(9)
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, T)
  noise = jax.random.normal(noise_key, x0.shape)
  np.testing.assert_allclose(
      losses.training_losses(model_fn, sched, x0, key,
                             var_type="learned_range"),
      losses.hybrid_loss(model_fn, sched, x0, t, noise).loss, rtol=1e-6)
  np.testing.assert_allclose(
      losses.training_losses(model_fn, sched, x0, key),
      losses.denoising_loss(model_fn, sched, x0, t, noise), rtol=1e-6)


@pytest.mark.parametrize("var_type,init", [("learned_range", 0.5),
                                           ("learned", 0.0)])
def test_learned_variance_goes_to_the_posterior_variance(var_type, init):
  """One training image: the true reverse step is the posterior
  q(x_{t-1} | x_t, x_0), so L_hybrid drives a per-step variance parameter
  to the posterior variance (and the mean offset to 0). Measured after 300
  Adam steps, from log-variance errors up to 2.8 (learned_range at 0.5) and
  9.2 (learned at 0): at most 8.7e-4 (learned_range) and 6.1e-4 (learned) at
  t >= 1; offsets at most 1.6e-5. (At t = 0 the decoder likelihood of 8-bit
  data, not a KL, trains the variance.)"""
  # Linear: cosine's clipped last beta amplifies a mean offset at t = T-1
  # by sqrt(1 / abar - 1) ~ 10^4, which the variance then absorbs.
  sched = schedules.make_schedule("linear", T, beta_end=0.2, warn=False)
  x0 = jnp.broadcast_to(_grid_image((1, 4, 4, 1), 7), (64, 4, 4, 1))
  params = {"offset": jnp.full((T,), 0.3), "var": jnp.full((T,), init)}

  def loss_fn(params, key):

    def model_fn(x_t, t):
      a = diffusion.extract(sched.alphas_cumprod, t, x_t.shape)
      eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
      mean = eps + params["offset"][t][:, None, None, None]
      var = jnp.broadcast_to(params["var"][t][:, None, None, None], x_t.shape)
      return jnp.concatenate([mean, var], axis=-1)

    t = jnp.arange(64) % T
    noise = jax.random.normal(key, x0.shape)
    return losses.hybrid_loss(model_fn, sched, x0, t, noise,
                              var_type=var_type).loss.mean()

  optimizer = optax.adam(0.05)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for i in range(300):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  if var_type == "learned":
    log_var = params["var"]
  else:
    frac = (params["var"] + 1.0) / 2.0
    log_var = (frac * jnp.log(sched.betas) +
               (1 - frac) * sched.posterior_log_variance_clipped)
  np.testing.assert_allclose(log_var[1:],
                             sched.posterior_log_variance_clipped[1:],
                             atol=1e-2)
  np.testing.assert_allclose(params["offset"], 0.0, atol=1e-3)


def test_hybrid_loss_bad_arguments(sched):
  x0, noise, t, out = _hybrid_setup()
  model_fn = lambda x_t, t: out
  with pytest.raises(ValueError, match="Unknown var_type 'fixed_small'"):
    losses.hybrid_loss(model_fn, sched, x0, t, noise, var_type="fixed_small")
  with pytest.raises(ValueError, match="vlb_weight must be a number >= 0"):
    losses.hybrid_loss(model_fn, sched, x0, t, noise, vlb_weight=-1.0)
  with pytest.raises(ValueError, match="needs a model output with 2 x 2"):
    losses.hybrid_loss(lambda x_t, t: x_t, sched, x0, t, noise)
  with pytest.raises(ValueError, match="Unknown var_type 'large'"):
    losses.training_losses(model_fn, sched, x0, jax.random.key(0),
                           var_type="large")
