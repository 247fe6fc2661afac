"""Times the depthwise convolution implementations, alone and inside the tutorial U-Net.

Run from the repository root, with the package installed (`pip install -e .`)
or importable (`PYTHONPATH=.`): python benchmarks/depthwise_conv.py [--batch 128] [--repeats 5]

Reports compile time and the median of `--repeats` timed runs (after one
warm-up run) for a 7x7 depthwise convolution on [batch, 28, 28, 28] and for the
`tutorial` U-Net on [batch, 28, 28, 1] images: forward, and a training step
(forward, backward and an Adam update), with `depthwise_method='lax'`
(`nn.Conv(feature_group_count=C)`'s convolution) and 'shifted_sum'.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from ddpm_jax.models import UNet, unet_config
from ddpm_jax.models import layers

METHODS = ("lax", "shifted_sum")


def _time(fn, args, repeats: int) -> tuple[float, float]:
  """Returns (compile seconds, median run seconds) of jitted `fn` on `args`."""
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


def _report(name: str, method: str, timing: tuple[float, float]) -> None:
  print(f"{name:<28} {method:<12} compile {timing[0]:7.2f} s   run {timing[1] * 1e3:9.1f} ms", flush=True)


def bench_layer(batch: int, repeats: int) -> None:
  """Times the bare 7x7 depthwise convolution and its gradient."""
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 28))
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 1, 28))
  for method in METHODS:
    conv = lambda x, k, m=method: layers.depthwise_conv2d(x, k, method=m)
    grad = jax.grad(lambda x, k, c=conv: jnp.sum(c(x, k) ** 2), argnums=(0, 1))
    _report("depthwise 7x7 forward", method, _time(conv, (x, kernel), repeats))
    _report("depthwise 7x7 fwd+bwd", method, _time(grad, (x, kernel), repeats))


def bench_unet(batch: int, repeats: int) -> None:
  """Times the tutorial U-Net forward pass and training step."""
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  t = jax.random.randint(jax.random.key(1), (batch,), 0, 300)
  optimizer = optax.adam(1e-3)
  for method in METHODS:
    model = UNet(config=unet_config("tutorial", depthwise_method=method))
    params = jax.jit(lambda: model.init(jax.random.key(2), x, t, train=False))()["params"]
    opt_state = optimizer.init(params)

    def forward(params, x, t, model=model):
      return model.apply({"params": params}, x, t, train=False)

    def train_step(params, opt_state, x, t, model=model):
      def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x, t, train=True) - x) ** 2)

      grads = jax.grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state

    _report(f"tutorial U-Net forward", method, _time(forward, (params, x, t), repeats))
    _report(f"tutorial U-Net train step", method, _time(train_step, (params, opt_state, x, t), repeats))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), batch {args.batch}")
  bench_layer(args.batch, args.repeats)
  bench_unet(args.batch, args.repeats)


if __name__ == "__main__":
  main()
