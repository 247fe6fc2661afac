"""A/B of implementation or model options on the library's train step, interleaved.

Run from the repository root:

  python -m benchmarks.compare_train --preset tutorial:128 --steps 5 \
      --variant kernels=xla --variant kernels=auto
  python -m benchmarks.compare_train --preset ddpm_cifar10:16 \
      --variant dtype=float32 --variant dtype=bfloat16

Each `--variant` is a comma-separated list of `FIELD=VALUE`: `kernels=auto|xla`
(`ddpm_jax.models.kernels.implementation`, the code that computes the
convolutions) and `UNetConfig` fields (e.g. `dtype=bfloat16`). As a script it
restarts with huge pages for malloc's large blocks, as the CLI does
(`ddpm_jax.hugepages.reexec_with_huge_page_malloc`). All steps are compiled first;
then timed steps alternate A, B, A, B, ... so that load from other processes on
a shared machine hits all alike. Prints the median step time of each, the
ratio to the first, compile times and the first loss.
"""

import argparse
import ast
import statistics
import sys
import time

import jax

from benchmarks import run
from ddpm_jax import hugepages
from ddpm_jax.models import kernels


def parse_variant(text: str) -> dict:
  """'kernels=xla,dtype=bfloat16' -> {'kernels': 'xla', 'dtype': 'bfloat16'} (literals parsed)."""
  fields = {}
  for item in text.split(","):
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise argparse.ArgumentTypeError(f"expected FIELD=VALUE[,FIELD=VALUE...], got {text!r}")
    try:
      fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[name] = value
  return fields


def build(preset: str, batch: int, variant: dict, *, tiny: bool = False) -> dict:
  """Compiles the train step of one variant and runs one warm-up step."""
  overrides = dict(variant)
  with kernels.implementation(overrides.pop("kernels", "auto")):
    compiled, state, batch_arr, rng, compile_s, _ = run.build_train_step(
        preset, batch, tiny=tiny, **overrides)
  state, metrics = compiled(state, batch_arr, rng)
  jax.block_until_ready(metrics)
  return dict(compiled=compiled, state=state, batch=batch_arr, rng=rng, compile_s=compile_s,
              times=[], loss=float(metrics["loss"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", type=run._parse_preset, required=True)  # pylint: disable=protected-access
  parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                      help="FIELD=VALUE[,FIELD=VALUE...] of one variant (give two or more)")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  preset, batch = args.preset
  variants = [build(preset, batch, v) for v in args.variant]
  for _ in range(args.steps):
    for v in variants:
      start = time.perf_counter()
      v["state"], metrics = v["compiled"](v["state"], v["batch"], v["rng"])
      jax.block_until_ready(metrics)
      v["times"].append(time.perf_counter() - start)
  base = statistics.median(variants[0]["times"])
  print(f"{preset}:{batch}, {args.steps} interleaved steps each after 1 warm-up")
  for spec, v in zip(args.variant, variants):
    name = ",".join(f"{k}={val}" for k, val in spec.items())
    med = statistics.median(v["times"])
    print(f"{name:<28} median {med:7.3f} s (min {min(v['times']):.3f}, max {max(v['times']):.3f})"
          f"  {batch / med:7.1f} images/s  compile {v['compile_s']:6.1f} s  x{med / base:.3f}"
          f"  first loss {v['loss']:.6f}", flush=True)


if __name__ == "__main__":
  hugepages.reexec_with_huge_page_malloc()
  sys.exit(main())
