"""Times the convolutions of `ddpm_jax.models.kernels`, alone and in the tutorial U-Net.

Run from the repository root, with the package installed (`pip install -e .`)
or importable (`PYTHONPATH=.`):

  python benchmarks/conv_kernels.py [--batch 128] [--repeats 5]

For `kernels.implementation('xla')` (XLA's convolutions) and 'auto' (on CPU:
the im2col kernel gradient and the shifted-sum depthwise convolution), reports
compile time and the median of `--repeats` timed runs after one warm-up: a
3x3 convolution [batch, 28, 28, 28] -> 56 channels and a 7x7 depthwise one on
[batch, 28, 28, 28], forward and forward + backward; the `tutorial` U-Net on
[batch, 28, 28, 1] images, forward and a training step (forward, backward and
an Adam update). Variants are timed one after the other, not interleaved: on a
shared machine, A/B the whole train step with `benchmarks/compare_train.py`.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from ddpm_jax.models import UNet, kernels, unet_config

IMPLEMENTATIONS = ("xla", "auto")


def _time(fn, args, repeats: int, implementation: str) -> tuple[float, float]:
  """Returns (compile seconds, median run seconds) of jitted `fn` on `args`."""
  with kernels.implementation(implementation):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  return compile_s, statistics.median(runs)


def _report(name: str, implementation: str, timing: tuple[float,
                                                          float]) -> None:
  print(
      f"{name:<28} {implementation:<6} compile {timing[0]:7.2f} s   run {timing[1] * 1e3:9.1f} ms",
      flush=True)


def bench_layers(batch: int, repeats: int) -> None:
  """Times a dense 3x3 and a depthwise 7x7 convolution and their gradients."""
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 28))
  cases = {
      "dense 3x3 28->56": (jax.random.normal(jax.random.key(1),
                                             (3, 3, 28, 56)), 1),
      "depthwise 7x7": (jax.random.normal(jax.random.key(1),
                                          (7, 7, 1, 28)), 28),
  }
  for name, (kernel, groups) in cases.items():

    def conv(x, k, groups=groups):
      return kernels.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=groups)

    grad = jax.grad(lambda x, k, c=conv: jnp.sum(c(x, k)**2), argnums=(0, 1))
    for implementation in IMPLEMENTATIONS:
      _report(f"{name} forward", implementation,
              _time(conv, (x, kernel), repeats, implementation))
      _report(f"{name} fwd+bwd", implementation,
              _time(grad, (x, kernel), repeats, implementation))


def bench_unet(batch: int, repeats: int) -> None:
  """Times the tutorial U-Net forward pass and training step."""
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  t = jax.random.randint(jax.random.key(1), (batch,), 0, 300)
  optimizer = optax.adam(1e-3)
  model = UNet(config=unet_config("tutorial"))
  params = jax.jit(
      lambda: model.init(jax.random.key(2), x, t, train=False))()["params"]
  opt_state = optimizer.init(params)

  def forward(params, x, t):
    return model.apply({"params": params}, x, t, train=False)

  def train_step(params, opt_state, x, t):

    def loss_fn(params):
      return jnp.mean(
          (model.apply({"params": params}, x, t, train=True) - x)**2)

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for implementation in IMPLEMENTATIONS:
    _report("tutorial U-Net forward", implementation,
            _time(forward, (params, x, t), repeats, implementation))
    _report(
        "tutorial U-Net train step", implementation,
        _time(train_step, (params, opt_state, x, t), repeats, implementation))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(
      f"backend {jax.default_backend()}, {jax.device_count()} device(s), batch {args.batch}"
  )
  bench_layers(args.batch, args.repeats)
  bench_unet(args.batch, args.repeats)


if __name__ == "__main__":
  main()
