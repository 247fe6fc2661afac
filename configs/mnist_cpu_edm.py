r"""MNIST on a CPU with EDM (Karras et al. 2022): configs/mnist_cpu.py's
network and budget, trained as EDM trains.

  python -m ddpm_jax.main --config=configs/mnist_cpu_edm.py \
    --workdir=/tmp/mnist_cpu_edm \
    --config.data.source=npz:../shared/data/mnist.npz

(or `tfds:mnist`, the default, with `pip install -e ".[tf]"`).
The same 0.8M-parameter ResNet U-Net as `configs/mnist_cpu.py`, wrapped in
EDM's preconditioning (sigma_data = 0.5, c_noise = log(sigma) / 4 as the
network's time input), trained on log-normal levels (P_mean = -1.2, P_std =
1.2) with the lambda(sigma) weight; samples with Heun's method (EDM's
Algorithm 1: the `edm` sampler with S_churn = 0) on 10 rho = 7 levels from
sigma_max = 80 to sigma_min = 0.002, 19 network calls, unclipped.
Training stops after 30 minutes (`train.max_time`) or 2,400 steps.
`configs/mnist_cpu_edm.py:tiny` runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The CPU MNIST EDM recipe; `variant='tiny'` for smoke tests."""
  config = base_config()
  config.data.source = "tfds:mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.resize = False
  config.model.preset = "tutorial"
  config.model.block_type = "resnet"
  config.model.base_channels = 32
  config.model.channel_mults = (1, 2, 2)
  config.model.attention = ("none", "none", "linear")
  config.model.num_res_blocks = 1
  config.diffusion.process = "edm"
  config.diffusion.target = "x0"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.decay = "cosine"
  config.train.batch_size = 64
  config.train.num_steps = 2400
  config.train.max_time = 30 * 60
  config.train.ema_decay = 0.999
  config.train.ema_warmup = True
  config.train.checkpoint_every = 600
  config.train.sample_every = 600
  config.eval.bpd = "ode"  # the bound is DDPM's
  config.sample.sampler = "edm"
  config.sample.solver_spacing = "karras"
  config.sample.num_steps = 10
  config.sample.batch_size = 500
  return apply_variant(
      config, variant,
      tiny_model=dict(base_channels=8, channel_mults=(1, 2),
                      attention=("none", "linear"), num_groups=4))
