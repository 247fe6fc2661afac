r"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): learned variances.

  python -m ddpm_jax.main --config=configs/improved_cifar10.py \
    --workdir=/tmp/improved_cifar10

improved-diffusion's CIFAR-10 flags: the network learns the reverse-process
variance (`learned_range`, trained with L_hybrid = L_simple + 0.001 L_vlb),
T = 4000 steps of the cosine schedule, 3 blocks per level, dropout 0.3, Adam
1e-4 without warm-up or clipping, batch 128, EMA 0.9999, 500k steps. Samples
are ancestral DDPM on the process respaced to 100 of the 4000 steps, which
with learned variances costs little quality (their section 4). The network is
the DDPM CIFAR-10 U-Net with attention at 16x16 and 8x8, single-headed
(improved-diffusion's has 4 heads). Offline, from the JPEG archive of this
repository's shared data:

  python -m ddpm_jax.main --config=configs/improved_cifar10.py \
    --workdir=/tmp/improved_cifar10 \
    --config.data.source=folder:../shared/data/cifar10_jpg.tar.gz

Bits/dim of the test split (the bound uses the learned variances):

  python -m ddpm_jax.main --config=configs/improved_cifar10.py \
    --workdir=/tmp/improved_cifar10 --mode=eval

`configs/improved_cifar10.py:tiny` runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """Improved DDPM on CIFAR-10; variants tiny, cond, cond,tiny."""
  config = base_config()
  config.data.source = "tfds:cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.resize = False
  config.model.preset = "ddpm_cifar10"
  config.model.num_res_blocks = 3
  config.model.dropout = 0.3
  config.model.attention = ("none", "full", "full", "none")
  config.model.learned_variance = True
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 4000
  config.diffusion.var_type = "learned_range"
  config.optimizer.lr = 1e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.train.batch_size = 128
  config.train.num_steps = 500_000
  config.sample.sampler = "ddpm"
  config.sample.ddpm_steps = 100
  config.sample.gif = False
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=32, channel_mults=(1, 2),
                      attention=("none", "full"), num_res_blocks=1))
