r"""EDM on CIFAR-10 (Karras et al. 2022) on the DDPM network.

EDM's training and sampling settings (Table 7, their config F) on this
library's 35.7M-parameter `ddpm_cifar10` U-Net (not their DDPM++/NCSN++
networks, and without their non-leaking augmentation): preconditioning with
sigma_data = 0.5, ln sigma ~ N(-1.2, 1.2^2) with the lambda(sigma) weight,
Adam 1e-3 with a 10M-image (19,531-step) warm-up, batch 512, dropout 0.13,
EMA half-life 0.5M images (decay 0.5^(512 / 500,000) = 0.99929 a step),
200M images (390,625 steps), random flips; samples with Heun's method on 18
rho = 7 levels from sigma 80 to 0.002 (35 network calls), unclipped. Not
trained here: no FID measured.

  python -m ddpm_jax.main --config=configs/cifar10_edm.py \
    --workdir=/tmp/cifar10_edm

`:tiny` runs in seconds; `:cond` is class-conditional with label dropout.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The EDM CIFAR-10 recipe; variants 'tiny', 'cond', 'cond,tiny'."""
  config = base_config()
  config.data.source = "tfds:cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.resize = False
  config.data.random_flip = True
  config.model.preset = "ddpm_cifar10"
  config.model.dropout = 0.13
  config.diffusion.process = "edm"
  config.diffusion.target = "x0"
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 19_531
  config.train.batch_size = 512
  config.train.num_steps = 390_625
  config.train.ema_decay = 0.5**(512 / 500_000)
  config.eval.bpd = "ode"  # the bound is DDPM's
  config.sample.sampler = "edm"
  config.sample.solver_spacing = "karras"
  config.sample.num_steps = 18
  config.sample.gif = False
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=32, channel_mults=(1, 2),
                      attention=("none", "full"), num_res_blocks=1))
