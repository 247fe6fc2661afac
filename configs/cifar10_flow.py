r"""Rectified flow on CIFAR-10 (Liu et al. 2023) on the DDPM network.

The flow-matching objective (x_t = (1 - t) x_0 + t eps, velocity target, t
uniform on [0, 1], 1-rectified flow) on the `ddpm_cifar10` U-Net with the
DDPM recipe's optimisation (`configs/cifar10.py`: Adam 2e-4, 5000 warm-up
steps, clipping at 1.0, batch 128, EMA 0.9999, dropout 0.1, flips, 800k
steps); samples with Heun's method in t on 50 uniform steps (99 network
calls), unclipped. Not trained here: no FID measured.

  python -m ddpm_jax.main --config=configs/cifar10_flow.py \
    --workdir=/tmp/cifar10_flow

`:tiny` runs in seconds; `:cond` is class-conditional with label dropout.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The rectified-flow CIFAR-10 recipe; variants 'tiny', 'cond'."""
  config = base_config()
  config.data.source = "tfds:cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.resize = False
  config.data.random_flip = True
  config.model.preset = "ddpm_cifar10"
  config.diffusion.process = "flow"
  config.diffusion.target = "velocity"
  config.eval.bpd = "ode"  # the bound is DDPM's
  config.sample.sampler = "heun"
  config.sample.solver_spacing = "uniform"
  config.sample.num_steps = 50
  config.sample.gif = False
  return apply_variant(
      config, variant, num_classes=10,
      tiny_model=dict(base_channels=32, channel_mults=(1, 2),
                      attention=("none", "full"), num_res_blocks=1))
