"""Classifier-free guidance with exact class-conditional denoisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from ddpm_jax import samplers
from ddpm_jax.diffusion import guidance, schedules, testing


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("linear", 1000)


# ----------------------------------------------------------------------------
# Gaussian class and Gaussian unconditional model: the guided ODE in closed
# form.

MU_C, S_C = 0.4, 0.2  # p(x | c)
MU_U, S_U = 0.0, 0.5  # p(x)


def _gaussian_cond_fn(schedule):
  """y = 0: the exact denoiser of N(MU_C, S_C^2); y = 1 (null): of
  N(MU_U, S_U^2)."""
  cond = testing.denoiser(
      testing.gaussian_mixture(weights=[1.0], means=[[MU_C]], stds=[S_C]),
      schedule)
  uncond = testing.denoiser(
      testing.gaussian_mixture(weights=[1.0], means=[[MU_U]], stds=[S_U]),
      schedule)
  return lambda x, t, y: jnp.where((y == 1)[:, None], uncond(x, t), cond(x, t))


def _guided_ode_affine_map(w, sigma_0, sigma_e):
  """(A, B) of out = A x_T + B for the exact guided probability-flow ODE.

  In x = x_t / alpha and sigma = sqrt(1 - abar) / sqrt(abar), the guided eps
  (1 + w) sigma (x - MU_C) / (S_C^2 + sigma^2) - w sigma (x - MU_U) /
  (S_U^2 + sigma^2) makes dx/dsigma = k x + b linear, with integrating factor
  Phi = (S_C^2 + sigma^2)^((1+w)/2) (S_U^2 + sigma^2)^(-w/2). The chain
  starts at sigma_0 with x = x_T sqrt(1 + sigma_0^2), runs to sigma_e and
  ends with D = x - sigma_e eps.
  """
  phi = lambda s: ((S_C**2 + s**2)**((1 + w) / 2) * (S_U**2 + s**2)**(-w / 2))
  k = lambda s: s * ((1 + w) / (S_C**2 + s**2) - w / (S_U**2 + s**2))
  b = lambda s: -s * ((1 + w) * MU_C / (S_C**2 + s**2) - w * MU_U /
                      (S_U**2 + s**2))
  # Integral of b / Phi from sigma_0 down to sigma_e, in log sigma.
  integral = -integrate.quad(
      lambda u: b(math.exp(u)) / phi(math.exp(u)) * math.exp(u),
      math.log(sigma_e), math.log(sigma_0), epsabs=1e-13, epsrel=1e-12)[0]
  shrink = 1.0 - sigma_e * k(sigma_e)
  slope = shrink * phi(sigma_e) / phi(sigma_0) * math.sqrt(1 + sigma_0**2)
  return slope, shrink * phi(sigma_e) * integral - sigma_e * b(sigma_e)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guided_ode_matches_the_closed_form(sched, w):
  """Guided samples have std A = S_C (S_C / S_U)^w up to sigma_0 = 157 and
  the last step (0.2, 0.08, 0.0128 for w = 0, 1, 3; exact A 0.19975,
  0.07982, 0.012744; the sampler's 0.19975, 0.07982, 0.012749): guidance
  concentrates the class geometrically in w, far more than the tilted
  density p(x|c)^(1+w) / p(x)^w would (std 0.2, 0.147, 0.107), and moves
  its mean away from the unconditional one (0.399, 0.509, 0.522)."""
  model_fn = guidance.classifier_free_guidance(
      _gaussian_cond_fn(sched), labels=jnp.zeros((2,), jnp.int32),
      num_classes=1, scale=w)
  x_T = jnp.array([[0.0], [1.0]])
  out = samplers.dpmpp_3m_sample(model_fn, sched, x_T=x_T,
                                 num_steps=200).images[:, 0]
  levels = np.asarray(samplers.solver_timesteps(sched, 200))
  abar = np.asarray(sched.alphas_cumprod, np.float64)[levels[[0, -1]]]
  sigma_0, sigma_e = np.sqrt((1 - abar) / abar)
  slope, intercept = _guided_ode_affine_map(w, sigma_0, sigma_e)
  np.testing.assert_allclose(float(out[1] - out[0]), slope, rtol=1e-3)
  np.testing.assert_allclose(float(out[0]), intercept, atol=1e-4)
  np.testing.assert_allclose(slope, S_C * (S_C / S_U)**w, rtol=0.01)


# ----------------------------------------------------------------------------
# A two-class mixture.

MIX = testing.gaussian_mixture(weights=[1.0, 1.0, 1.0], means=[[-0.2, 0.0],
                                                               [0.2, 0.0],
                                                               [0.2, 0.6]],
                               stds=[0.25, 0.25, 0.2], labels=[0, 1, 1])
NUM_POINTS = 4000


@pytest.fixture(scope="module")
def mix_samples(sched):
  """Class-1 samples (DPM-Solver++ 2M, 20 steps) for several scales, and
  the plain conditional and unconditional samples from the same x_T."""
  cond_fn = testing.conditional_denoiser(MIX, sched)
  x_T = jax.random.normal(jax.random.key(0), (NUM_POINTS, 2))
  labels = jnp.ones((NUM_POINTS,), jnp.int32)

  def run(model_fn):
    return jax.jit(lambda x: samplers.dpmpp_2m_sample(model_fn, sched, x_T=x,
                                                      num_steps=20).images)(x_T)

  out = {
      w:
          run(
              guidance.classifier_free_guidance(cond_fn, labels=labels,
                                                num_classes=2, scale=w))
      for w in (-1.0, 0.0, 1.0, 3.0)
  }
  out["cond"] = run(lambda x, t: cond_fn(x, t, labels))
  out["uncond"] = run(lambda x, t: cond_fn(x, t, jnp.full_like(labels, 2)))
  return out


def test_scale_0_is_the_conditional_and_minus_1_the_unconditional(mix_samples):
  np.testing.assert_allclose(mix_samples[0.0], mix_samples["cond"], atol=1e-5)
  np.testing.assert_allclose(mix_samples[-1.0], mix_samples["uncond"],
                             atol=1e-5)


def test_larger_scale_concentrates_on_the_class(mix_samples):
  """The class posterior p(y = 1 | x) of the samples rises with w, and the
  share of samples the true classifier gives to class 0 falls. Measured
  (mean p, share): unconditional 0.664, 32.5%; w = 0: 0.836, 10.7%; w = 1:
  0.929, 1.4%; w = 3: 0.980, 0%. At w = 0 the samples fit class 1's
  components."""
  stats = {}
  for w in ("uncond", 0.0, 1.0, 3.0):
    p1 = np.exp(
        np.asarray(testing.class_log_posterior(MIX, mix_samples[w]))[:, 1])
    stats[w] = (p1.mean(), (p1 < 0.5).mean())
  means = [stats[w][0] for w in ("uncond", 0.0, 1.0, 3.0)]
  shares = [stats[w][1] for w in ("uncond", 0.0, 1.0, 3.0)]
  assert np.all(np.diff(means) > 0.04), stats
  assert np.all(np.diff(shares) < 0) and shares[-1] < 0.005, stats
  class_1 = testing.gaussian_mixture(weights=[1.0, 1.0], means=[[0.2, 0.0],
                                                                [0.2, 0.6]],
                                     stds=[0.25, 0.2])
  fit = testing.fit_components(class_1, mix_samples[0.0])
  np.testing.assert_allclose(fit.weights, class_1.weights, atol=0.1)
  np.testing.assert_allclose(fit.stds, class_1.stds, rtol=0.1)


def test_one_batched_call_per_step_and_labels():
  seen = []

  def cond_fn(x, t, y):
    seen.append((x.shape, np.asarray(y), np.asarray(t)))
    return jnp.where((y == 3)[:, None], 0.0, 1.0) * x

  model_fn = guidance.classifier_free_guidance(cond_fn, labels=jnp.array([0,
                                                                          2]),
                                               num_classes=3, scale=2.0)
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  out = model_fn(x, jnp.array([5, 5]))
  assert len(seen) == 1
  shape, y, t = seen[0]
  assert shape == (4, 2)
  np.testing.assert_array_equal(y, [0, 2, 3, 3])
  np.testing.assert_array_equal(t, [5, 5, 5, 5])
  np.testing.assert_allclose(out, 3.0 * x)  # (1 + w) x - w 0


def test_scale_0_calls_the_conditional_model_alone():
  seen = []

  def cond_fn(x, t, y):
    seen.append((x.shape, np.asarray(y)))
    return x + y[:, None]

  model_fn = guidance.classifier_free_guidance(cond_fn, labels=jnp.array([0,
                                                                          2]),
                                               num_classes=3, scale=0)
  out = model_fn(jnp.ones((2, 2)), jnp.array([5, 5]))
  assert len(seen) == 1 and seen[0][0] == (2, 2)
  np.testing.assert_array_equal(seen[0][1], [0, 2])
  np.testing.assert_array_equal(out, [[1.0, 1.0], [3.0, 3.0]])


def test_learned_variance_channels_are_not_guided():

  def cond_fn(x, t, y):
    scale = jnp.where(y == 10, 1.0, 2.0)[:, None]
    return jnp.concatenate([scale * x, 10.0 * scale * x], axis=-1)

  model_fn = guidance.classifier_free_guidance(cond_fn, labels=jnp.array([1,
                                                                          4]),
                                               num_classes=10, scale=0.5)
  x = jnp.array([[1.0], [-2.0]])
  out = model_fn(x, jnp.array([0, 0]))
  np.testing.assert_allclose(out[:, :1], 2.0 * x + 0.5 * (2.0 * x - x))
  np.testing.assert_allclose(out[:, 1:], 20.0 * x)


def test_drop_labels():
  labels = jnp.arange(100_000) % 10
  dropped = guidance.drop_labels(labels, jax.random.key(0), p_uncond=0.1,
                                 num_classes=10)
  is_null = np.asarray(dropped) == 10
  assert abs(is_null.mean() - 0.1) < 4.5 * math.sqrt(0.09 / 100_000)
  np.testing.assert_array_equal(
      np.asarray(dropped)[~is_null],
      np.asarray(labels)[~is_null])
  again = guidance.drop_labels(labels, jax.random.key(0), p_uncond=0.1,
                               num_classes=10)
  np.testing.assert_array_equal(dropped, again)
  np.testing.assert_array_equal(
      guidance.drop_labels(labels, jax.random.key(1), p_uncond=0.0,
                           num_classes=10), labels)
  np.testing.assert_array_equal(
      guidance.drop_labels(labels[:5], jax.random.key(1), p_uncond=1.0,
                           num_classes=10, null_label=11), [11] * 5)


IDENTITY = lambda x, t, y: x


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=jnp.array([0, 10])),
     r"class ids must lie in \[0, 10\), got values in \[0, 10\]"),
    (dict(labels=jnp.array([-1, 3])), r"class ids must lie in \[0, 10\)"),
    (dict(labels=jnp.array([0.0, 1.0])), "labels must be a 1-D integer"),
    (dict(null_label=4), "null_label must be an integer outside"),
    (dict(num_classes=0), "num_classes must be an integer >= 1"),
    (dict(scale=float("nan")), "scale must be a finite real number"),
    (dict(scale=1j), "scale must be a finite real number"),
])
def test_bad_guidance_arguments(kwargs, message):
  args = dict(labels=jnp.array([0, 1]), num_classes=10, scale=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    guidance.classifier_free_guidance(IDENTITY, **args)


def test_bad_batch_and_dropout_arguments():
  model_fn = guidance.classifier_free_guidance(IDENTITY,
                                               labels=jnp.array([0, 1]),
                                               num_classes=10, scale=1.0)
  with pytest.raises(ValueError, match="guidance has 2 labels for a batch "
                     "of 3"):
    model_fn(jnp.zeros((3, 2)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"p_uncond must be a number in "
                     r"\[0, 1\]"):
    guidance.drop_labels(jnp.array([0]), jax.random.key(0), p_uncond=1.5,
                         num_classes=10)
  with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
    guidance.drop_labels(jnp.array([12]), jax.random.key(0), p_uncond=0.1,
                         num_classes=10)
