r"""MNIST on a CPU: clearly recognisable digits in about 30 minutes on 2 cores.

  python -m ddpm_jax.main --config=configs/mnist_cpu.py --workdir=/tmp/mnist_cpu \
    --config.data.source=npz:../shared/data/mnist.npz

(or `tfds:mnist`, the default, with `pip install -e ".[tf]"`).
A 0.8M-parameter ResNet U-Net (32 channels, levels (1, 2, 2), linear
attention at the lowest level only) predicts v on the cosine schedule;
training stops after 30 minutes (`train.max_time`, with a checkpoint and
final samples) or 2,400 steps, whichever comes first. Samples use
DPM-Solver++(2M) with 20 network calls. Measured in benchmarks/HISTORY.md
("MNIST quality per CPU-minute"; summary in BENCHMARKS.md).
`configs/mnist_cpu.py:tiny` runs in seconds.
"""

from ddpm_jax.engine.config import apply_variant, base_config


def get_config(variant: str = ""):
  """The CPU MNIST recipe; `variant='tiny'` for smoke tests."""
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
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 1000
  config.diffusion.target = "v"
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.decay = "cosine"
  config.train.batch_size = 64
  # About what 2 cores do in the budget (0.7 s a step), so that the cosine
  # decay nearly ends when the budget does.
  config.train.num_steps = 2400
  config.train.max_time = 30 * 60
  config.train.ema_decay = 0.999
  config.train.ema_warmup = True
  config.train.checkpoint_every = 600
  config.train.sample_every = 600
  config.sample.sampler = "dpmpp_2m"
  # Clipped, as the figures of BENCHMARKS.md were measured.
  config.diffusion.clip_x0 = True
  config.sample.num_steps = 20
  config.sample.batch_size = 500
  return apply_variant(
      config, variant,
      tiny_model=dict(base_channels=8, channel_mults=(1, 2),
                      attention=("none", "linear"), num_groups=4))
