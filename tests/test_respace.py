"""Respacing: the kept steps, the recomputed process, DDPM over it."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, samplers
from ddpm_jax.diffusion import respace, schedules


def _improved_diffusion_steps(num_timesteps, count):
  """improved-diffusion's space_timesteps(T, [count]) (one section)."""
  frac_stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
  cur_idx, taken = 0.0, []
  for _ in range(count):
    taken.append(round(cur_idx))
    cur_idx += frac_stride
  return sorted(set(taken))


@pytest.mark.parametrize("num_timesteps,num_steps", [(1000, 2), (1000, 25),
                                                     (1000, 50), (1000, 100),
                                                     (1000, 250), (4000, 100),
                                                     (100, 99), (7, 7)])
def test_spaced_timesteps_as_improved_diffusion(num_timesteps, num_steps):
  steps = respace.spaced_timesteps(num_timesteps, num_steps)
  np.testing.assert_array_equal(
      steps, _improved_diffusion_steps(num_timesteps, num_steps))
  assert steps[0] == 0 and steps[-1] == num_timesteps - 1
  assert len(steps) == num_steps


def test_one_spaced_step_is_the_last():
  np.testing.assert_array_equal(respace.spaced_timesteps(1000, 1), [999])


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("linear", 1000)


def test_respacing_over_all_steps_equals_the_original(sched):
  """Equal to one float32 ulp (measured: 1.2e-7 relative at most)."""
  spaced = respace.respace(sched, np.arange(1000))
  np.testing.assert_array_equal(spaced.timesteps, np.arange(1000))
  chex.assert_trees_all_close(spaced.schedule, sched, rtol=3e-7, atol=0)


@pytest.mark.parametrize("num_steps", [25, 100, 250])
def test_respaced_alphas_cumprod_are_the_originals(sched, num_steps):
  steps = respace.spaced_timesteps(1000, num_steps)
  spaced = respace.respace(sched, steps).schedule
  assert spaced.num_timesteps == num_steps
  np.testing.assert_allclose(spaced.alphas_cumprod,
                             np.asarray(sched.alphas_cumprod)[steps], rtol=1e-6)
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[steps]
  np.testing.assert_allclose(spaced.betas, 1 - abar / np.append(1.0, abar[:-1]),
                             rtol=1e-6)


def test_any_subset_of_steps(sched):
  steps = np.array([3, 10, 11, 500, 998, 999])
  spaced = respace.respace(sched, steps).schedule
  np.testing.assert_allclose(spaced.alphas_cumprod,
                             np.asarray(sched.alphas_cumprod)[steps], rtol=1e-6)


# A single training image c in (-1, 1): the optimal eps of every respaced
# process recovers it exactly, provided the network sees the original steps.
C_IMAGE = jnp.linspace(-0.9, 0.9, 64, dtype=jnp.float32).reshape(1, 8, 8, 1)
SHAPE = (4, 8, 8, 1)


def _single_image_model(schedule, calls, extra=None):

  def model_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    a = diffusion.extract(schedule.alphas_cumprod, t, x.shape)
    eps = (x - jnp.sqrt(a) * C_IMAGE) / jnp.sqrt(1.0 - a)
    if extra is not None:
      eps = jnp.concatenate([eps, jnp.full_like(eps, extra)], axis=-1)
    return eps

  return model_fn


@pytest.mark.parametrize("case", [
    dict(),
    dict(var_type="fixed_small", mean_form="eps"),
    dict(var_type="learned_range", extra=0.3),
], ids=str)
def test_respaced_ddpm_calls_the_original_steps(sched, case):
  case = dict(case)
  extra = case.pop("extra", None)
  spaced = respace.respace(sched, respace.spaced_timesteps(1000, 25))
  calls = []
  model_fn = respace.map_timesteps(_single_image_model(sched, calls, extra),
                                   spaced.timesteps)
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  out = samplers.ddpm_sample(model_fn, spaced.schedule, x_T=x_T,
                             key=jax.random.key(1), **case)
  assert calls == list(spaced.timesteps[::-1])
  # float32 rounding of the x_0 prediction at high noise (x_0 = 157 x_t -
  # 157 eps at t = T-1) reaches the output through the large coefficients of
  # 25 steps: 4.3e-5 measured for the x0 mean form (2.9e-6 for the eps
  # form); a wrong timestep map errs by more than 0.1.
  chex.assert_trees_all_close(out.images, jnp.broadcast_to(C_IMAGE, SHAPE),
                              atol=1e-4)


MU, SD, NUM_PIXELS = 0.3, 0.5, 20_000


def _exact_moments(schedule):
  """Mean and variance of ancestral DDPM (fixed_small, Algorithm 2) with the
  optimal eps of N(MU, SD^2) data, by a float64 recursion from N(0, 1)."""
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  m, v = 0.0, 1.0
  for t in range(len(betas) - 1, -1, -1):
    k = math.sqrt(1 - abar[t]) / (abar[t] * SD**2 + 1 - abar[t])
    c = betas[t] / math.sqrt(1 - abar[t])
    scale = 1 / math.sqrt(1 - betas[t])
    var_t = betas[t] * (1 - abar[t - 1]) / (1 - abar[t]) if t > 0 else 0.0
    a = (1 - c * k) * scale
    b = c * k * math.sqrt(abar[t]) * MU * scale
    m, v = a * m + b, a * a * v + var_t
  return m, v


@pytest.mark.parametrize("num_steps", [25, 250])
def test_respaced_ddpm_samples_gaussian_data(sched, num_steps):
  """Samples follow the exact law of the respaced chain (at 4.5 standard
  errors). learned_range at -1 is the fixed_small chain, whose variance
  falls short of the data's 0.25: 0.163 with 25 steps, 0.196 with 50, 0.219
  with 100, 0.236 with 250, 0.246 with all 1000 (the mean is 0.300)."""
  spaced = respace.respace(sched, respace.spaced_timesteps(1000, num_steps))

  def gaussian_eps(x, t):
    a = diffusion.extract(sched.alphas_cumprod, t, x.shape)
    eps = jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * MU) / (a * SD**2 + 1.0 - a)
    return jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)

  model_fn = respace.map_timesteps(gaussian_eps, spaced.timesteps)
  x_T = jax.random.normal(jax.random.key(0), (NUM_PIXELS, 1, 1, 1))
  sample = jax.jit(lambda x: samplers.ddpm_sample(
      model_fn, spaced.schedule, x_T=x, key=jax.random.key(
          1), var_type="learned_range", mean_form="eps", clip_x0=False).images)
  samples = np.asarray(sample(x_T), np.float64).ravel()
  m, v = _exact_moments(spaced.schedule)
  n = samples.size
  assert abs(samples.mean() - m) < 4.5 * math.sqrt(v / n)
  assert abs(samples.var(ddof=1) - v) < 4.5 * v * math.sqrt(2 / (n - 1))
  assert abs(m - MU) < 1e-4
  assert {25: 0.16, 250: 0.23}[num_steps] < v < SD**2


def test_bad_arguments(sched):
  for steps in ([], [5, 5], [10, 3], [-1, 4], [0, 1000], [0.0, 1.0], [[0, 1]]):
    with pytest.raises(ValueError, match="strictly increasing 1-D array"):
      respace.respace(sched, np.asarray(steps))
  with pytest.raises(ValueError, match=r"num_steps must be an integer in "
                     r"\[1, 1000\]"):
    respace.spaced_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="num_timesteps must be an integer"):
    respace.spaced_timesteps(0, 1)
  with pytest.raises(ValueError, match="needs a concrete schedule"):
    jax.jit(lambda s: respace.respace(s, np.arange(3)).schedule)(sched)
