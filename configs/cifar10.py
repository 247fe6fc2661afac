r"""DDPM on CIFAR-10 with the recipe of Ho et al. (2020), Appendix B.

The 35.7M-parameter network, T = 1000 linear betas 1e-4..0.02, L_simple,
Adam 2e-4 with 5000 warm-up steps and clipping at 1.0, batch 128, EMA 0.9999,
dropout 0.1, random horizontal flips, 800k steps:

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=/tmp/cifar10

Offline, from the JPEG archive of this repository's shared data:

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=/tmp/cifar10 \
    --config.data.source=folder:../shared/data/cifar10_jpg.tar.gz

Class-conditional, with label dropout 0.1 so that samples can be guided
(`:cond`; sample grids guided with w = 1, one row per class):

  python -m ddpm_jax.main --config=configs/cifar10.py:cond \
    --workdir=/tmp/cifar10_cond
  python -m ddpm_jax.main --config=configs/cifar10.py:cond \
    --workdir=/tmp/cifar10_cond --mode=sample \
    --config.sample.guidance_scale=3 --config.sample.class_id=7

`configs/cifar10.py:tiny` (and `:cond,tiny`) is the same recipe at a size that
runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The DDPM CIFAR-10 recipe; variants 'tiny', 'cond', 'cond,tiny'."""
  config = base_config()
  config.data.source = "tfds:cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.resize = False
  config.data.random_flip = True
  config.model.preset = "ddpm_cifar10"
  config.sample.gif = False
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=32, channel_mults=(1, 2),
                      attention=("none", "full"), num_res_blocks=1))
