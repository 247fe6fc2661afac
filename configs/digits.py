r"""Handwritten digits with no download: the README's first command.

scikit-learn ships 1,797 real 8x8 handwritten digits; they are scaled up to
16x16 and a small U-Net (v target, cosine learning-rate decay, EMA with
warm-up) learns them in about 3 minutes on a 2-core CPU (2,000 steps of
batch 64; README and BENCHMARKS.md for the measured time):

  python -m ddpm_jax.main --config=configs/digits.py --workdir=/tmp/ddpm_digits

It writes checkpoints, a grid of real digits (`samples/data.png`), a sample
grid and a GIF of the denoising chain to the workdir.

Class-conditional, with label dropout 0.1 so that samples can be guided
(`:cond`; sample grids guided with w = 1, one row per class):

  python -m ddpm_jax.main --config=configs/digits.py:cond \
    --workdir=/tmp/ddpm_digits_cond
  python -m ddpm_jax.main --config=configs/digits.py:cond \
    --workdir=/tmp/ddpm_digits_cond --mode=sample \
    --config.sample.guidance_scale=3 --config.sample.class_id=7

`configs/digits.py:tiny` (and `:cond,tiny`) runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """scikit-learn's digits at 16x16; variants 'tiny', 'cond', 'cond,tiny'."""
  config = base_config()
  config.data.source = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.data.resize = True
  # The tutorial's layout, small: ResNet blocks (cheaper than ConvNeXt on a
  # CPU), two levels, no attention (for speed), 128k parameters.
  config.model.preset = "tutorial"
  config.model.base_channels = 16
  config.model.channel_mults = (1, 2)
  config.model.attention = ("none", "none")
  config.model.mid_attention = "none"
  config.model.block_type = "resnet"
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 500
  config.diffusion.target = "v"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.decay = "cosine"
  config.train.batch_size = 64
  config.train.num_steps = 2000
  config.train.ema_decay = 0.999
  config.train.ema_warmup = True
  config.train.log_every = 250
  config.train.checkpoint_every = 500
  config.train.sample_every = 2000
  config.sample.sampler = "ddim"
  # Clipped DDIM (diffusers' default), as docs/first_command_samples.png.
  config.diffusion.clip_x0 = True
  config.sample.num_steps = 50
  config.sample.num_images = 64
  config.eval.num_images = 256
  return apply_variant(config, variant, num_classes=10,
                       tiny_model=dict(base_channels=8))
