"""Tests of ddpm_jax.samplers with closed-form (optimal) denoisers.

Compiling a program that draws threefry random numbers costs about a second
on CPU, so most tests pass x_T drawn once outside, and compiled samplers are
shared through module-level fixtures.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, samplers
from ddpm_jax.diffusion import schedules

SHAPE = (4, 8, 8, 1)
# A single training image c in (-1, 1), so clipping never changes it.
C_IMAGE = jnp.linspace(-0.9, 0.9, 64, dtype=jnp.float32).reshape(1, 8, 8, 1)
# Gaussian data N(MU, SD^2) per pixel.
MU, SD = 0.3, 0.5


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("cosine", 100)


@pytest.fixture(scope="module")
def sched1000():
  return schedules.make_schedule("cosine", 1000)


@pytest.fixture(scope="module")
def x_T():
  return jax.random.normal(jax.random.key(2), SHAPE)


def _abar(schedule, t, x):
  return diffusion.extract(schedule.alphas_cumprod, t, x.shape)


def single_image_model(schedule, target="eps", extra_channels=None):
  """The optimal denoiser when the data is the one image C_IMAGE.

  eps(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t), converted to
  `target`; `extra_channels` appends a constant variance output.
  """

  def model_fn(x, t):
    a = _abar(schedule, t, x)
    eps = (x - jnp.sqrt(a) * C_IMAGE) / jnp.sqrt(1.0 - a)
    out = {
        "eps": eps,
        "x0": jnp.broadcast_to(C_IMAGE, x.shape),
        "v": jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * C_IMAGE
    }[target]
    if extra_channels is not None:
      out = jnp.concatenate([out, jnp.full_like(out, extra_channels(t, x))],
                            axis=-1)
    return out

  return model_fn


def gaussian_model(schedule):
  """The optimal eps for data ~ N(MU, SD^2 I):
  E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar SD^2 + 1 - abar).
  """

  def model_fn(x, t):
    a = _abar(schedule, t, x)
    return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * MU) / (a * SD**2 + 1.0 - a)

  return model_fn


# ----------------------------------------------------------------------------
# Exact single-image recovery.

# Every var_type, mean_form and target appears at least once; each case is one
# compile, so the lists are kept short.
DDPM_CASES = [
    dict(),  # fixed_large, x0 mean form, clipped, eps target: DDPM's default.
    dict(var_type="fixed_small", mean_form="eps", target="v"),
    dict(var_type="learned", mean_form="eps", extra="log_beta"),
    dict(var_type="learned_range", target="x0", extra="zero"),
]


@pytest.mark.parametrize("case", DDPM_CASES, ids=str)
def test_ddpm_recovers_single_image(sched, x_T, case):
  case = dict(case)
  extra = case.pop("extra", None)
  extra_fn = {
      None:
          None,
      "zero":
          lambda t, x: 0.0,
      "log_beta":
          lambda t, x: jnp.log(diffusion.extract(sched.betas, t, x.shape)),
  }[extra]
  model_fn = single_image_model(sched, case.get("target", "eps"), extra_fn)
  out = jax.jit(lambda x_T, key: samplers.ddpm_sample(
      model_fn, sched, x_T=x_T, key=key, **case))(x_T, jax.random.key(0))
  chex.assert_shape(out.images, SHAPE)
  chex.assert_trees_all_close(out.images, jnp.broadcast_to(C_IMAGE, SHAPE),
                              atol=1e-5)


DDIM_CASES = [
    dict(num_steps=10),
    dict(num_steps=100),
    dict(num_steps=25, target="x0"),
    dict(num_steps=25, clip_x0=True),
    dict(num_steps=25, spacing="quadratic"),
    dict(num_steps=25, learned_variance=True),
    dict(num_steps=10, eta=1.0),
    dict(num_steps=100, eta=0.5, target="v", spacing="quadratic"),
]


@pytest.mark.parametrize("case", DDIM_CASES, ids=str)
def test_ddim_recovers_single_image(sched, x_T, case):
  case = dict(case)
  learned = case.pop("learned_variance", False)
  model_fn = single_image_model(sched, case.get("target", "eps"),
                                (lambda t, x: 0.0) if learned else None)
  out = jax.jit(lambda x_T, key: samplers.ddim_sample(
      model_fn, sched, x_T=x_T, key=key, **case))(x_T, jax.random.key(0))
  chex.assert_shape(out.images, SHAPE)
  chex.assert_trees_all_close(out.images, jnp.broadcast_to(C_IMAGE, SHAPE),
                              atol=1e-5)


# ----------------------------------------------------------------------------
# Keys, determinism, shapes, tracing, use inside jit.


def _counting(model_fn):
  """model_fn and a list that grows by one each time it is traced."""
  calls = []

  def counted(x, t):
    calls.append(None)
    return model_fn(x, t)

  return counted, calls


@pytest.fixture(scope="module")
def jitted_samplers(sched):
  """Compiled once per module: name -> (fn(x_T, key), list of model_fn
  traces). The schedule is a traced argument."""
  configs = {
      "ddpm": (samplers.ddpm_sample, {}),
      "ddpm_traj": (samplers.ddpm_sample, dict(trajectory_every=33)),
      "ddim_eta1": (samplers.ddim_sample, dict(num_steps=20, eta=1.0)),
      "ddim_eta0": (samplers.ddim_sample, dict(num_steps=20)),
      "ddim_traj": (samplers.ddim_sample,
                    dict(num_steps=30, eta=0.5, trajectory_every=4)),
  }
  fns = {}
  for name, (sampler, kwargs) in configs.items():
    model_fn, calls = _counting(gaussian_model(sched))
    jitted = jax.jit(
        lambda x_T, key, schedule, sampler=sampler, kwargs=kwargs, model_fn=
        model_fn: sampler(model_fn, schedule, x_T=x_T, key=key, **kwargs))
    fns[name] = (lambda x_T, key, jitted=jitted: jitted(x_T, key, sched), calls)
  return fns


def _x_T(key):
  """The x_T that `shape=SHAPE, key=key` draws (documented contract)."""
  return jax.random.normal(jax.random.split(key)[0], SHAPE)


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "ddim_eta0"])
def test_same_key_bitwise_identical_different_key_differs(
    jitted_samplers, name):
  fn, *_ = jitted_samplers[name]
  key3, key4 = jax.random.key(3), jax.random.key(4)
  a = fn(_x_T(key3), key3).images
  b = fn(_x_T(key3), key3).images
  c = fn(_x_T(key4), key4).images
  chex.assert_shape([a, b, c], SHAPE)
  chex.assert_type(a, jnp.float32)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).min() > 0


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1"])
def test_step_noise_comes_from_the_key(jitted_samplers, x_T, name):
  fn, *_ = jitted_samplers[name]
  a = fn(x_T, jax.random.key(1)).images
  b = fn(x_T, jax.random.key(2)).images
  assert np.abs(np.asarray(a - b)).min() > 0


def test_ddim_eta0_is_a_function_of_x_T(sched, jitted_samplers, x_T):
  fn, *_ = jitted_samplers["ddim_eta0"]
  a = fn(x_T, jax.random.key(1)).images
  b = fn(x_T, jax.random.key(2)).images
  c = samplers.ddim_sample(gaussian_model(sched), sched, x_T=x_T,
                           num_steps=20).images  # No key at all.
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)


def test_model_traced_once_per_compile(jitted_samplers, x_T):
  """Every compiled sampler traced model_fn exactly once over two calls: the
  whole chain is one scan, traced once however many steps it runs, and the
  second call (new values, same shapes) is not traced again."""
  for name, (fn, calls) in jitted_samplers.items():
    fn(x_T, jax.random.key(11))
    fn(x_T + 1.0, jax.random.key(12))
    assert len(calls) == 1, name


@pytest.mark.parametrize("sampler,kwargs", [
    ("ddim", dict(num_steps=30)),
    ("ddim", dict(num_steps=30, trajectory_every=4)),
    ("invert", dict(num_steps=30)),
])
def test_model_traced_once_per_eager_call(sched, sampler, kwargs):
  model_fn, calls = _counting(gaussian_model(sched))
  if sampler == "ddim":
    samplers.ddim_sample(model_fn, sched, x_T=jnp.ones(SHAPE), **kwargs)
  else:
    samplers.ddim_invert(model_fn, sched, jnp.zeros(SHAPE), **kwargs)
  assert len(calls) == 1


def test_jitted_sampler_traces_once_across_inputs(sched, x_T):
  model_fn = gaussian_model(sched)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sample(schedule, x_T):
    return samplers.ddim_sample(model_fn, schedule, x_T=x_T,
                                num_steps=10).images

  for shift in range(3):  # The schedule and x_T are traced arguments.
    sample(sched, x_T + shift)


# ----------------------------------------------------------------------------
# Trajectories.


@pytest.mark.parametrize("num_steps,every", [(20, 5), (20, 7), (20, 1),
                                             (20, 50)])
def test_ddim_trajectory_frames_are_the_chain_states(sched, x_T, num_steps,
                                                     every):
  """With the single-image denoiser DDIM (eta = 0) keeps eps constant, so the
  state at paper step t is sqrt(abar) c + sqrt(1 - abar) eps_T exactly."""
  out = samplers.ddim_sample(single_image_model(sched), sched, x_T=x_T,
                             num_steps=num_steps, trajectory_every=every)
  num_frames = math.ceil(num_steps / every)
  chex.assert_shape(out.trajectory, (num_frames,) + SHAPE)
  chex.assert_shape(out.trajectory_steps, (num_frames,))
  seq = samplers.ddim_timesteps(100, num_steps)
  state_steps = np.concatenate([[0], seq[:-1] + 1])[::-1]  # After each step.
  last = np.minimum((np.arange(num_frames) + 1) * every, num_steps) - 1
  np.testing.assert_array_equal(np.asarray(out.trajectory_steps),
                                state_steps[last])
  np.testing.assert_array_equal(np.asarray(out.trajectory[-1]),
                                np.asarray(out.images))
  abar = np.append(1.0, np.asarray(sched.alphas_cumprod, np.float64))
  eps_T = (x_T - math.sqrt(abar[seq[-1] + 1]) *
           C_IMAGE) / math.sqrt(1 - abar[seq[-1] + 1])
  for frame, t in zip(out.trajectory, state_steps[last]):
    expected = math.sqrt(abar[t]) * C_IMAGE + math.sqrt(1 - abar[t]) * eps_T
    np.testing.assert_allclose(frame, expected, atol=2e-5)


def test_ddpm_trajectory(jitted_samplers, x_T):
  # trajectory_every=33 does not divide T = 100: the last frame is 1 step.
  key = jax.random.key(1)
  plain = jitted_samplers["ddpm"][0](x_T, key)
  out = jitted_samplers["ddpm_traj"][0](x_T, key)
  assert plain.trajectory is None and plain.trajectory_steps is None
  chex.assert_shape(out.trajectory, (4,) + SHAPE)
  np.testing.assert_array_equal(np.asarray(out.trajectory_steps),
                                [67, 34, 1, 0])
  np.testing.assert_array_equal(np.asarray(out.images),
                                np.asarray(plain.images))
  np.testing.assert_array_equal(np.asarray(out.trajectory[-1]),
                                np.asarray(out.images))
  # Earlier frames are noisier: their spread falls towards the data's.
  stds = np.asarray(out.trajectory).std(axis=(1, 2, 3, 4))
  assert stds[0] > stds[1] > stds[2] > SD * 0.8


def test_stochastic_ddim_trajectory(jitted_samplers, x_T):
  out = jitted_samplers["ddim_traj"][0](x_T, jax.random.key(1))
  chex.assert_shape(out.trajectory, (8,) + SHAPE)  # ceil(30 / 4)
  seq = samplers.ddim_timesteps(100, 30)
  np.testing.assert_array_equal(np.asarray(out.trajectory_steps),
                                [seq[-1 - 4 * (j + 1)] + 1 for j in range(7)] +
                                [0])
  np.testing.assert_array_equal(np.asarray(out.trajectory[-1]),
                                np.asarray(out.images))


# ----------------------------------------------------------------------------
# Gaussian data: moments of the samples.

NUM_PIXELS = 20_000
# Two-sided z of the Monte-Carlo checks; P(|Z| > 4.5) = 7e-6 per check.
Z = 4.5


def chain_moments(schedule, sampler, num_steps=None, eta=0.0):
  """Exact mean and variance of the sampler's output for Gaussian data.

  With the optimal eps (linear in x_t) and no clipping, every step is
  x <- A x + B + sigma z, so the output is Gaussian with moments given by a
  float64 recursion from x_T ~ N(0, 1). Written from the papers' update
  rules, independently of the sampler code.
  """
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  m, v = 0.0, 1.0

  def eps_coefs(a):  # eps = k x + k0
    k = math.sqrt(1 - a) / (a * SD**2 + 1 - a)
    return k, -k * math.sqrt(a) * MU

  if sampler == "ddpm":  # Algorithm 2 with sigma_t^2 = beta-tilde_t.
    for t in range(len(betas) - 1, -1, -1):
      k, k0 = eps_coefs(abar[t])
      c = betas[t] / math.sqrt(1 - abar[t])
      alpha = 1 - betas[t]
      var_t = betas[t] * (1 - abar[t - 1]) / (1 - abar[t]) if t > 0 else 0.0
      A, B = (1 - c * k) / math.sqrt(alpha), -c * k0 / math.sqrt(alpha)
      m, v = A * m + B, A * A * v + var_t
    return m, v
  seq = samplers.ddim_timesteps(len(betas), num_steps)
  for i in range(num_steps - 1, -1, -1):  # DDIM eq. 12.
    a = abar[seq[i]]
    a_prev = abar[seq[i - 1]] if i > 0 else 1.0
    k, k0 = eps_coefs(a)
    s2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    c_eps = math.sqrt(1 - a_prev - s2)
    A = math.sqrt(a_prev) * (1 -
                             math.sqrt(1 - a) * k) / math.sqrt(a) + c_eps * k
    B = (-math.sqrt(a_prev) * math.sqrt(1 - a) * k0 / math.sqrt(a) + c_eps * k0)
    m, v = A * m + B, A * A * v + s2
  return m, v


def _check_moments(samples, mean, var):
  """Sample mean/variance of n Gaussian draws vs. (mean, var), at Z standard
  errors: SE(mean) = sqrt(var / n), SE(var) = var sqrt(2 / (n - 1))."""
  n = samples.size
  samples = np.asarray(samples, np.float64).ravel()
  assert abs(samples.mean() - mean) < Z * math.sqrt(var / n)
  assert abs(samples.var(ddof=1) - var) < Z * var * math.sqrt(2 / (n - 1))


GAUSS_SHAPE = (NUM_PIXELS, 1, 1, 1)

FULL_CHAINS = [("ddpm", None, 0.0), ("ddim", 1000, 0.0), ("ddim", 1000, 1.0)]


@pytest.fixture(scope="module")
def gauss_x_T():
  return jax.random.normal(jax.random.key(0), GAUSS_SHAPE)


def _gaussian_samples(schedule, x_T, sampler, num_steps, eta):
  model_fn = gaussian_model(schedule)
  if sampler == "ddpm":
    fn = lambda x_T, key: samplers.ddpm_sample(
        model_fn, schedule, x_T=x_T, key=key, var_type="fixed_small", mean_form=
        "eps", clip_x0=False).images
  else:
    fn = lambda x_T, key: samplers.ddim_sample(model_fn, schedule, x_T=x_T, key=
                                               key, num_steps=num_steps, eta=eta
                                              ).images
  return jax.jit(fn)(x_T, jax.random.key(1))


@pytest.mark.parametrize("sampler,num_steps,eta", FULL_CHAINS)
def test_full_chain_samples_match_data_distribution(sched1000, gauss_x_T,
                                                    sampler, num_steps, eta):
  """With all T = 1000 cosine steps the samples have mean MU, variance SD^2."""
  # The sampler's exact output law differs from the data's only by the
  # discretization; check it is well inside the Monte-Carlo tolerance so the
  # direct comparison below is meaningful.
  m, v = chain_moments(sched1000, sampler, num_steps, eta)
  n = NUM_PIXELS
  assert abs(m - MU) < 0.1 * Z * SD / math.sqrt(n)
  assert abs(v - SD**2) < 0.25 * Z * SD**2 * math.sqrt(2 / (n - 1))
  _check_moments(
      _gaussian_samples(sched1000, gauss_x_T, sampler, num_steps, eta), MU,
      SD**2)


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_few_steps_matches_exact_chain_law(sched1000, gauss_x_T, num_steps,
                                                eta):
  """With few steps DDIM's output law is Gaussian but biased towards a
  smaller variance (e.g. 0.19 instead of 0.25 for 10 steps, eta = 0): check
  the samples against that exact law, and the bias shrinks with more steps."""
  m, v = chain_moments(sched1000, "ddim", num_steps, eta)
  _check_moments(
      _gaussian_samples(sched1000, gauss_x_T, "ddim", num_steps, eta), m, v)
  m_fine, v_fine = chain_moments(sched1000, "ddim", 1000, eta)
  assert abs(v_fine - SD**2) < abs(v - SD**2)
  assert abs(m_fine - MU) <= abs(m - MU) + 1e-12


# ----------------------------------------------------------------------------
# DDIM inversion.


def test_ddim_inversion_reconstructs(sched1000):
  model_fn = gaussian_model(sched1000)
  x0 = MU + SD * jax.random.normal(jax.random.key(1), SHAPE)
  errors = {}
  for num_steps in (100, 1000):
    x_T = samplers.ddim_invert(model_fn, sched1000, x0, num_steps=num_steps)
    chex.assert_shape(x_T, SHAPE)
    # The latent is noise-like: unit scale, not the image.
    assert 0.8 < float(jnp.std(x_T)) < 1.25
    recon = samplers.ddim_sample(model_fn, sched1000, x_T=x_T,
                                 num_steps=num_steps).images
    errors[num_steps] = float(jnp.abs(recon - x0).max())
  assert errors[1000] < 1e-2
  assert errors[100] < 5e-2
  assert errors[1000] < errors[100] / 5  # First-order convergence.


def test_ddim_inversion_exact_for_single_image(sched):
  """The single-image denoiser keeps eps constant along the ODE, so
  inversion and sampling are exact inverses for any step count."""
  x0 = jnp.broadcast_to(C_IMAGE, SHAPE)
  x_T = samplers.ddim_invert(single_image_model(sched), sched, x0, num_steps=10,
                             spacing="quadratic")
  recon = samplers.ddim_sample(single_image_model(sched), sched, x_T=x_T,
                               num_steps=10, spacing="quadratic").images
  chex.assert_trees_all_close(recon, x0, atol=1e-5)


# ----------------------------------------------------------------------------
# Step sequences.


def test_ddim_timesteps_uniform_as_authors():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 50),
                                np.arange(0, 1000, 20))
  np.testing.assert_array_equal(samplers.ddim_timesteps(10, 3), [0, 3, 6])
  np.testing.assert_array_equal(samplers.ddim_timesteps(7, 7), np.arange(7))


def test_ddim_timesteps_quadratic_as_authors_when_distinct():
  authors = (np.linspace(0, np.sqrt(800), 20)**2).astype(int)
  assert len(set(authors)) == 20
  np.testing.assert_array_equal(
      samplers.ddim_timesteps(1000, 20, spacing="quadratic"), authors)
  # The authors' formula repeats steps for T = 1000, S = 50: 0, 0, 1, 3, ...
  seq = samplers.ddim_timesteps(1000, 50, spacing="quadratic")
  authors = (np.linspace(0, np.sqrt(800), 50)**2).astype(int)
  np.testing.assert_array_equal(seq[:4], [0, 1, 2, 3])
  np.testing.assert_array_equal(seq[4:], authors[4:])


@pytest.mark.parametrize("spacing", samplers.DDIM_SPACINGS)
@pytest.mark.parametrize("num_timesteps", [1, 7, 100, 1000])
def test_ddim_timesteps_distinct_increasing_in_range(spacing, num_timesteps):
  for num_steps in range(1, num_timesteps + 1):
    seq = samplers.ddim_timesteps(num_timesteps, num_steps, spacing=spacing)
    assert seq.shape == (num_steps,)
    assert seq[0] == 0 and seq[-1] < num_timesteps
    assert np.all(np.diff(seq) > 0)


# ----------------------------------------------------------------------------
# Bad arguments.


def _ddim(sched, **kw):
  args = dict(shape=SHAPE, key=jax.random.key(0), num_steps=10)
  args.update(kw)
  return samplers.ddim_sample(gaussian_model(sched), sched, **args)


def _ddpm(sched, **kw):
  args = dict(shape=SHAPE, key=jax.random.key(0))
  args.update(kw)
  return samplers.ddpm_sample(gaussian_model(sched), sched, **args)


BAD_ARGS = [
    (_ddim, dict(eta=-0.1), "eta must be a Python number in [0, 1]"),
    (_ddim, dict(eta=1.5), "eta must be a Python number in [0, 1]"),
    (_ddim, dict(num_steps=0), "num_steps must be an integer in [1, 100]"),
    (_ddim, dict(num_steps=101), "num_steps must be an integer in [1, 100]"),
    (_ddim, dict(spacing="linear"), "Unknown spacing 'linear'"),
    (_ddim, dict(target="score"), "Unknown target 'score'"),
    (_ddim, dict(trajectory_every=0), "trajectory_every must be an integer"),
    (_ddim, dict(eta=0.5, key=None, x_T=jnp.zeros(SHAPE),
                 shape=None), "key is required"),
    (_ddim, dict(x_T=jnp.zeros(SHAPE)), "Give exactly one of shape"),
    (_ddim, dict(shape=None), "Give exactly one of shape"),
    (_ddim, dict(shape=(4, 0, 8, 1)), "shape must be a tuple of positive"),
    (_ddpm, dict(key=None), "key is required"),
    (_ddpm, dict(var_type="large"), "Unknown var_type 'large'"),
    (_ddpm, dict(mean_form="v"), "Unknown mean_form 'v'"),
    (_ddpm, dict(trajectory_every=2.5), "trajectory_every must be an integer"),
]


@pytest.mark.parametrize("fn,kwargs,message", BAD_ARGS,
                         ids=[str(a[1]) for a in BAD_ARGS])
def test_bad_arguments(sched, fn, kwargs, message):
  with pytest.raises(ValueError) as info:
    fn(sched, **kwargs)
  assert message in str(info.value)


def test_bad_arguments_for_inversion(sched):
  with pytest.raises(ValueError, match=r"num_steps must be an integer in"):
    samplers.ddim_invert(gaussian_model(sched), sched, jnp.zeros(SHAPE),
                         num_steps=0)
  with pytest.raises(ValueError, match="Unknown spacing"):
    samplers.ddim_invert(gaussian_model(sched), sched, jnp.zeros(SHAPE),
                         num_steps=5, spacing="cubic")


def test_bad_model_output_shape(sched):
  with pytest.raises(ValueError, match="model output shape"):
    samplers.ddim_sample(lambda x, t: x[..., :0], sched, shape=SHAPE,
                         key=jax.random.key(0), num_steps=2)
