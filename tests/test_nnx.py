"""The U-Net from Flax NNX code through `flax.nnx.bridge`, trained with the
library's loss and sampled with its samplers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ddpm_jax import samplers
from ddpm_jax.data import pipeline
from ddpm_jax.diffusion import losses, schedules
from ddpm_jax.models import UNet, unet_config


@pytest.mark.slow
def test_unet_in_nnx_trains_and_samples():
  config = unet_config("tutorial", block_type="resnet", base_channels=8,
                       channel_mults=(1, 2), attention=("none", "linear"),
                       mid_attention="full", num_groups=4)
  linen = UNet(config=config)
  model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
  x0 = jnp.asarray(
      next(
          pipeline.create_dataset("digits", batch_size=16, image_size=8,
                                  channels=1, random_flip=False,
                                  seed=0))["image"])
  nnx.bridge.lazy_init(model, x0, jnp.zeros((16,), jnp.int32), train=False)

  # The bridged module is the Linen network with the same parameters.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  t = jnp.arange(16, dtype=jnp.int32) * 3
  chex.assert_trees_all_close(
      model(x0, t, train=False),
      linen.apply({"params": params}, x0, t, train=False), atol=1e-6)

  sched = schedules.make_schedule("cosine", 50)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def loss_of(model, key):
    model_fn = lambda x_t, s: model(x_t, s, train=True)
    return losses.training_losses(model_fn, sched, x0, key).mean()

  @nnx.jit
  def train_step(model, optimizer, key):
    loss, grads = nnx.value_and_grad(loss_of)(model, key)
    optimizer.update(model, grads)
    return loss

  fixed = jax.random.key(123)  # The same t and noise before and after.
  before = float(nnx.jit(loss_of)(model, fixed))
  for i in range(60):
    train_step(model, optimizer, jax.random.key(i))
  after = float(nnx.jit(loss_of)(model, fixed))
  assert after < 0.6 * before, (before, after)

  # Samplers scan over the model, where an NNX module may not mutate its
  # rng counter: they take the pure Linen apply of the trained parameters.
  trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  @jax.jit
  def sample(params, key):
    model_fn = lambda x_t, s: linen.apply({"params": params}, x_t, s, train=
                                          False)
    return samplers.ddim_sample(model_fn, sched, num_steps=10,
                                shape=(4, 8, 8, 1), key=key).images

  images = sample(trained, jax.random.key(0))
  chex.assert_shape(images, (4, 8, 8, 1))
  assert np.all(np.isfinite(images))
  np.testing.assert_array_equal(images, sample(trained, jax.random.key(0)))
