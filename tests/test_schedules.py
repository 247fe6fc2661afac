"""Schedules: closed-form values, the pytree contract and input checks."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.diffusion import schedules


def _reference_betas(name, T, t, beta_start=1e-4, beta_end=0.02, s=0.008):
  """Scalar re-derivation of beta at index t from each formula."""
  if name == "linear":
    return beta_start + (beta_end - beta_start) * t / (T - 1)
  if name == "quadratic":
    root = math.sqrt(beta_start) + (math.sqrt(beta_end) -
                                    math.sqrt(beta_start)) * t / (T - 1)
    return root**2
  if name == "sigmoid":
    x = -6.0 + 12.0 * t / (T - 1)
    return beta_start + (beta_end - beta_start) / (1.0 + math.exp(-x))
  f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2)**2
  return min(max(1.0 - f(t + 1) / f(t), 1e-4), 0.9999)


def test_linear_1000_terminal_alpha_cumprod():
  sched = schedules.make_schedule("linear", 1000)
  np.testing.assert_allclose(float(sched.alphas_cumprod[999]), 4.0358e-05,
                             rtol=1e-4)


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [10, 1000])
def test_betas_match_formula(name, T):
  betas = schedules.beta_schedule(name, T)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  for t in (0, 1, T // 3, T // 2, T - 2, T - 1):
    np.testing.assert_allclose(betas[t], _reference_betas(name, T, t),
                               rtol=1e-10)


def test_cosine_is_clipped():
  betas = schedules.beta_schedule("cosine", 1000)
  assert betas.min() >= 1e-4 and betas.max() <= 0.9999
  assert betas[-1] == pytest.approx(0.9999)  # the last step hits the clip


def test_custom_betas_and_derived_arrays():
  betas = np.array([0.1, 0.2, 0.3, 0.5])
  sched = schedules.Schedule.from_betas(betas, warn=False)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  expected = dict(
      alphas=1 - betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
      log_one_minus_alphas_cumprod=np.log(1 - abar),
      sqrt_recip_alphas=1 / np.sqrt(1 - betas),
      sqrt_recip_alphas_cumprod=1 / np.sqrt(abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1),
      posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(np.append(post_var[1],
                                                      post_var[1:])),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1 - abar),
      posterior_mean_coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
  )
  for name, value in expected.items():
    arr = getattr(sched, name)
    assert arr.dtype == jnp.float32, name
    np.testing.assert_allclose(arr, value, rtol=1e-6, err_msg=name)
  assert sched.num_timesteps == 4
  np.testing.assert_allclose(sched.snr, abar / (1 - abar), rtol=1e-6)
  assert float(sched.posterior_variance[0]) == 0.0


def test_single_step_schedule():
  sched = schedules.Schedule.from_betas([0.999], warn=False)
  assert sched.num_timesteps == 1
  assert np.isfinite(sched.posterior_log_variance_clipped).all()


def test_warns_when_noise_not_reached():
  with pytest.warns(schedules.ScheduleWarning, match=r"0\.1322"):
    schedules.make_schedule("linear", 200)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    schedules.make_schedule("linear", 1000)
    schedules.make_schedule("cosine", 200)


def test_snr_decreases():
  snr = np.asarray(schedules.make_schedule("cosine", 100).snr)
  assert np.all(np.diff(snr) < 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="cosin", num_timesteps=10), "Unknown beta schedule 'cosin'"),
    (dict(name="linear", num_timesteps=0), "num_timesteps must be an integer"),
    (dict(name="linear",
          num_timesteps=2.5), "num_timesteps must be an integer"),
    (dict(name="linear", num_timesteps=10, beta_end=1.5), r"open interval"),
    (dict(name="linear", num_timesteps=10, beta_start=0.0), r"open interval"),
])
def test_bad_schedule_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    schedules.make_schedule(**kwargs)


@pytest.mark.parametrize("betas", [[], [[0.1]], [0.1, np.nan], [0.1, 1.0]])
def test_bad_custom_betas(betas):
  with pytest.raises(ValueError, match="beta"):
    schedules.Schedule.from_betas(betas)


def test_pytree_through_jit_scan_and_sharding():
  sched = schedules.make_schedule("cosine", 50)
  leaves = jax.tree_util.tree_leaves(sched)
  assert len(leaves) == 14

  out = jax.jit(lambda s: s)(sched)
  chex.assert_trees_all_equal(out, sched)
  assert isinstance(out, schedules.Schedule)

  def body(carry, _):
    return carry, carry.alphas_cumprod[-1]

  carried, ys = jax.lax.scan(body, sched, None, length=3)
  chex.assert_trees_all_equal(carried, sched)
  assert ys.shape == (3,)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  placed = jax.device_put(sched, replicated)
  chex.assert_trees_all_equal(placed, sched)
  assert all(
      leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(placed))
