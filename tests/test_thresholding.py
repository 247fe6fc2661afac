"""Dynamic thresholding (ddpm_jax.diffusion.thresholding) against its
formula, on the discrete schedule and the continuous processes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion import gaussian, processes, schedules, thresholding
from ddpm_jax.engine import builders
from ddpm_jax.engine import config as config_lib

SCHED = schedules.make_schedule("cosine", 100)


def test_threshold_is_imagens_formula():
  x0 = 3.0 * jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  x0 = x0.at[0].multiply(0.1)  # All within [-1, 1]: left as it is.
  out = thresholding.threshold_x0(x0, percentile=0.9)
  flat = np.abs(np.asarray(x0).reshape(4, -1))
  s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0)[:, None, None, None]
  np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-6)
  np.testing.assert_allclose(out[0], x0[0])
  assert float(jnp.max(jnp.abs(out))) <= 1.0


def _x0_of(process, x_t, t, out, target):
  if isinstance(process, schedules.Schedule):
    return gaussian.predict_x0_eps(process, x_t, t, out, target=target)[0]
  return processes.predict_x0_eps(process, x_t, t, out, target=target)[0]


CASES = [(SCHED, "eps"), (SCHED, "x0"), (SCHED, "v"), (processes.EDM(), "x0"),
         (processes.EDM(), "eps"), (processes.Flow(), "velocity"),
         (processes.Flow(), "v")]


@pytest.mark.parametrize("process,target", CASES, ids=str)
def test_wrapped_model_predicts_the_thresholded_x0(process, target):
  x_t = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
  if isinstance(process, schedules.Schedule):
    t = jnp.arange(6) * 15
  else:
    t = process.grid(6, spacing="logsnr")
  wild = lambda x, t: 2.0 * jnp.sin(3.0 * x) + 0.5  # noqa: E731
  out = thresholding.dynamic_thresholding(wild, process, target=target,
                                          percentile=0.95)(x_t, t)
  expected = thresholding.threshold_x0(
      _x0_of(process, x_t, t, wild(x_t, t), target), percentile=0.95)
  np.testing.assert_allclose(_x0_of(process, x_t, t, out, target), expected,
                             rtol=1e-4, atol=1e-4)


def test_learned_variance_channels_pass_through():
  x_t = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  model_fn = lambda x, t: jnp.concatenate([3 * x, x + 1], axis=-1)  # noqa: E731
  out = thresholding.dynamic_thresholding(model_fn, SCHED,
                                          target="eps")(x_t, jnp.array([10,
                                                                        90]))
  np.testing.assert_array_equal(out[..., 1:], x_t + 1)


def test_config_field_wraps_every_sampler():
  config = config_lib.base_config()
  config.diffusion.update(num_timesteps=100, schedule="cosine", clip_x0=False)
  config.sample.update(sampler="dpmpp_2m", num_steps=5, dynamic_threshold=0.9)
  model_fn = lambda x, t: 2.0 * jnp.sin(3.0 * x)  # noqa: E731
  x_T = jax.random.normal(jax.random.key(2), (4, 2))
  built = builders.build_sampler(config).fn(model_fn, SCHED, x_T=x_T,
                                            key=jax.random.key(0))
  from ddpm_jax import samplers  # pylint: disable=g-import-not-at-top
  direct = samplers.dpmpp_2m_sample(
      thresholding.dynamic_thresholding(model_fn, SCHED, target="eps",
                                        percentile=0.9), SCHED, x_T=x_T,
      num_steps=5)
  np.testing.assert_array_equal(built.images, direct.images)
  config.sample.dynamic_threshold = 1.5
  with pytest.raises(config_lib.ConfigError,
                     match="config.sample.dynamic_threshold must be a number"):
    config_lib.validate_config(config)


def test_bad_percentile():
  with pytest.raises(ValueError, match=r"percentile must be a number in \(0"):
    thresholding.dynamic_thresholding(lambda x, t: x, SCHED, target="eps",
                                      percentile=0.0)
