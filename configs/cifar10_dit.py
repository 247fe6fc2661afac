r"""A class-conditional DiT-S/2 on CIFAR-10, with the training recipe of
Peebles & Xie (2023).

DiT-S/2 (width 384, 12 blocks of 6 heads, 2x2 patches: 256 tokens of a
32x32x3 image, 32.5M parameters) conditioned on the 10 classes with label
dropout 0.1 (the null class makes classifier-free guidance possible), a
learned variance trained with L_hybrid, T = 1000 linear betas, Adam at a
constant 1e-4 with no warm-up, batch 256, EMA 0.9999, random horizontal
flips:

  python -m ddpm_jax.main --config=configs/cifar10_dit.py \
    --workdir=/tmp/cifar10_dit
  python -m ddpm_jax.main --config=configs/cifar10_dit.py \
    --workdir=/tmp/cifar10_dit --mode=sample \
    --config.sample.guidance_scale=3 --config.sample.class_id=7

Another size is one override, e.g. `--config.model.preset=dit_b_2`.
`configs/cifar10_dit.py:tiny` is the same recipe at a size that runs in
seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The class-conditional DiT CIFAR-10 recipe; variant 'tiny' ('cond' is
  the recipe itself)."""
  config = base_config()
  config.data.source = "tfds:cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.resize = False
  config.data.random_flip = True
  config.data.num_classes = 10
  config.model.preset = "dit_s_2"
  config.model.in_channels = 3
  config.model.learned_variance = True
  config.diffusion.var_type = "learned_range"
  config.optimizer.lr = 1e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.train.batch_size = 256
  config.train.num_steps = 400_000
  config.train.p_uncond = 0.1
  config.sample.guidance_scale = 1.0
  config.sample.gif = False
  return apply_variant(config, variant, tiny_model=dict(hidden_size=32, depth=2,
                                                        num_heads=4))
