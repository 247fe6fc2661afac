r"""MNIST with the tutorial's U-Net (dim 28, dim_mults (1, 2, 4)) and L_simple.

  python -m ddpm_jax.main --config=configs/mnist.py --workdir=/tmp/mnist

Offline, from a Keras-layout .npz (x_train, y_train, x_test, y_test):

  python -m ddpm_jax.main --config=configs/mnist.py --workdir=/tmp/mnist \
    --config.data.source=npz:../shared/data/mnist.npz

Class-conditional, with label dropout 0.1 so that samples can be guided
(`:cond`; sample grids guided with w = 1, one row per class):

  python -m ddpm_jax.main --config=configs/mnist.py:cond \
    --workdir=/tmp/mnist_cond
  python -m ddpm_jax.main --config=configs/mnist.py:cond \
    --workdir=/tmp/mnist_cond --mode=sample \
    --config.sample.guidance_scale=3 --config.sample.class_id=7

`configs/mnist.py:tiny` (and `:cond,tiny`) runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """MNIST, 10 epochs; variants 'tiny', 'cond', 'cond,tiny'."""
  config = base_config()
  config.data.source = "tfds:mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.resize = False
  config.model.preset = "tutorial"
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 500
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 500
  config.train.batch_size = 128
  config.train.num_steps = 10 * 468  # 10 epochs of 60,000 images
  config.train.ema_decay = 0.999
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=12, channel_mults=(1, 2),
                      attention=("linear", "linear")))
