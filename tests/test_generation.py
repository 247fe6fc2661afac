"""Tests of ddpm_jax.engine.generation.generate, the sharded batch driver."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax.diffusion import schedules
from ddpm_jax.engine import generation
from ddpm_jax.infra import images, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDIM = functools.partial(samplers.ddim_sample, num_steps=10, eta=1.0)


@pytest.fixture(scope="module")
def sched():
  return schedules.make_schedule("cosine", 100)


def _shrink(params):
  """A denoiser that predicts eps = scale * x_t."""
  return lambda x, t: params["scale"] * x


def test_generate_compiles_once_and_matches_the_sampler(sched):
  built = []

  def make_model_fn(params):
    built.append(None)
    return _shrink(params)

  params = {"scale": jnp.float32(0.5)}
  key = jax.random.key(7)
  out = generation.generate(make_model_fn, params, sched, sample_fn=DDIM,
                            num_images=10, batch_size=4, image_shape=(8, 8, 1),
                            key=key, mesh=parallel.create_mesh())
  assert out.shape == (10, 8, 8, 1) and out.dtype == np.uint8
  assert len(built) == 1  # One trace for the three batches.
  reference = jax.jit(lambda k: images.to_uint8(
      DDIM(_shrink(params), sched, shape=(4, 8, 8, 1), key=k).images))
  expected = np.concatenate(
      [reference(jax.random.fold_in(key, i)) for i in range(3)])[:10]
  np.testing.assert_array_equal(out, expected)


def test_generate_passes_each_batch_its_labels(sched):
  """Batch i gets labels[i B:(i + 1) B]; the last batch's labels continue
  from the start."""

  def make_model_fn(params):
    return lambda x, t, y: params["scale"] * x + y[:, None, None, None]

  def sample_fn(model_fn, schedule, *, x_T, key, labels):
    return DDIM(lambda x, t: model_fn(x, t, labels), schedule, x_T=x_T, key=key)

  params = {"scale": jnp.float32(0.5)}
  key = jax.random.key(2)
  labels = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)
  out = generation.generate(make_model_fn, params, sched, sample_fn=sample_fn,
                            num_images=7, batch_size=4, image_shape=(4, 4, 1),
                            key=key, mesh=parallel.create_mesh(), labels=labels)
  reference = jax.jit(lambda k, y: images.to_uint8(
      sample_fn(make_model_fn(params), sched, x_T=jax.random.normal(
          jax.random.split(k)[0], (4, 4, 4, 1)), key=k, labels=y).images))
  expected = np.concatenate([
      reference(jax.random.fold_in(key, 0), labels[:4]),
      reference(jax.random.fold_in(key, 1), np.array([1, 2, 0, 0]))
  ])[:7]
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match=r"labels must have shape \(7,\)"):
    generation.generate(make_model_fn, params, sched, sample_fn=sample_fn,
                        num_images=7, batch_size=4, image_shape=(4, 4, 1),
                        key=key, mesh=parallel.create_mesh(), labels=labels[:3])


@pytest.mark.parametrize(
    "num_images, per_row, order",
    [
        (25, 2, [
            0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15, 6, 16, 7, 17, 8, 18, 9, 19
        ]),
        (10, 1, list(range(10))),
        (7, 1, list(range(7))),  # Fewer images than classes: one row each.
        (200, 6, None),  # At most 64 shown: 6 per class.
    ])
def test_class_rows(num_images, per_row, order):
  labels = np.arange(num_images) % 10
  indices, nrow = generation.class_rows(labels, 10)
  assert nrow == per_row
  if order is not None:
    np.testing.assert_array_equal(indices, order)
  shown = labels[indices]
  np.testing.assert_array_equal(shown, np.sort(shown))
  assert len(indices) == min(num_images, 10 * per_row)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(mesh=jax.make_mesh((1,), ("model",))), "mesh needs a 'data' axis"),
])
def test_bad_arguments(sched, kwargs, message):
  args = dict(sample_fn=DDIM, num_images=4, batch_size=4, image_shape=(8, 8, 1),
              key=jax.random.key(0), mesh=parallel.create_mesh())
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    generation.generate(_shrink, {"scale": 0.5}, sched, **args)


@pytest.mark.slow
def test_generate_shards_batch_over_devices():
  """On two (virtual CPU) devices the batch is split over the 'data' axis,
  the images equal those of a one-device mesh, and every process can read
  them."""
  script = textwrap.dedent("""
      import functools
      import jax, numpy as np
      from ddpm_jax import samplers
      from ddpm_jax.diffusion import schedules
      from ddpm_jax.engine import generation
      from ddpm_jax.infra import parallel
      assert len(jax.devices()) == 2
      sched = schedules.make_schedule("cosine", 20)
      make = lambda p: (lambda x, t: p * x)
      kw = dict(num_images=6, batch_size=4, image_shape=(4, 4, 1),
                key=jax.random.key(0), sample_fn=functools.partial(
                    samplers.ddim_sample, num_steps=5, eta=1.0))
      two = generation.generate(make, 0.5, sched,
                                mesh=parallel.create_mesh(), **kw)
      one = generation.generate(
          make, 0.5, sched, mesh=parallel.create_mesh(jax.devices()[:1]),
          **kw)
      np.testing.assert_array_equal(two, one)
      try:
        generation.generate(make, 0.5, sched, mesh=parallel.create_mesh(),
                            **dict(kw, batch_size=3))
        raise AssertionError("no error")
      except ValueError as e:
        assert "multiple of the mesh's 'data' size 2" in str(e)
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
