r"""Fashion-MNIST with the setup of "The Annotated Diffusion Model".

The tutorial's U-Net (dim 28, dim_mults (1, 2, 4), ConvNeXt blocks), Huber
loss, Adam 1e-3, batch 128, random flips and its sampler (Algorithm 2 with
the posterior variance), for 6 epochs, but with a cosine schedule: the
tutorial's 200 linear betas stop at alphas_cumprod = 0.13, short of noise.

  python -m ddpm_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/fmnist

Class-conditional, with label dropout 0.1 so that samples can be guided
(`:cond`; sample grids guided with w = 1, one row per class):

  python -m ddpm_jax.main --config=configs/fashion_mnist.py:cond \
    --workdir=/tmp/fmnist_cond
  python -m ddpm_jax.main --config=configs/fashion_mnist.py:cond \
    --workdir=/tmp/fmnist_cond --mode=sample \
    --config.sample.guidance_scale=3 --config.sample.class_id=7

`configs/fashion_mnist.py:tiny` (and `:cond,tiny`) runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The tutorial's Fashion-MNIST setup; variants tiny, cond, cond,tiny."""
  config = base_config()
  config.data.source = "tfds:fashion_mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.resize = False
  config.data.random_flip = True
  config.model.preset = "tutorial"
  config.model.in_channels = 1
  config.model.base_channels = 28
  config.model.channel_mults = (1, 2, 4)
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 200
  config.diffusion.loss_type = "huber"
  config.diffusion.var_type = "fixed_small"
  config.diffusion.mean_form = "eps"
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.train.batch_size = 128
  config.train.num_steps = 6 * 468  # 6 epochs of 60,000 images
  config.train.ema_decay = 0.999
  config.train.checkpoint_every = 500
  config.train.sample_every = 1000
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=12, channel_mults=(1, 2),
                      attention=("linear", "linear")))
