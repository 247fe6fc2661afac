"""A/B of implementation or model options on the library's train step, interleaved.

Run from the repository root:

  python -m benchmarks.compare_train --preset tutorial:128 --steps 5 \
      --variant kernels=xla --variant kernels=auto
  python -m benchmarks.compare_train --preset ddpm_cifar10:16 \
      --variant dtype=float32 --variant dtype=bfloat16

Each `--variant` is a comma-separated list of `FIELD=VALUE`: `kernels=auto|xla`
(`ddpm_jax.models.kernels.implementation`, the code that computes the
convolutions and the GroupNorm gradient) and `UNetConfig` fields (e.g. `dtype=bfloat16`). As a script it
restarts with huge pages for malloc's large blocks and adds `ddpm_jax.infra.cpu_flags`'
XLA:CPU flags, as the CLI does (`ddpm_jax.infra.hugepages.reexec_with_huge_page_malloc`,
`ddpm_jax.infra.cpu_flags.add_to_environment`). All steps are compiled first;
then timed steps alternate A, B, A, B, ... so that load from other processes on
a shared machine hits all alike. Prints, for each variant, the median wall
time and process CPU time per step (`time.process_time`: all threads,
children excluded) and their ratios to the first variant (medians of the
per-round ratios), compile times, the first loss, and the load average
before and after. On a loaded machine the CPU-time ratio is the steadier
evidence; pinned to one core (`taskset -c 0`) it is the work itself.
"""

import argparse
import ast
import os
import statistics
import sys
import time

import jax

from benchmarks import run
from ddpm_jax.infra import cpu_flags, hugepages
from ddpm_jax.models import kernels


def parse_variant(text: str) -> dict:
  """'kernels=xla,dtype=bfloat16' -> {'kernels': 'xla', 'dtype': 'bfloat16'} (literals parsed)."""
  fields = {}
  for item in text.split(","):
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise argparse.ArgumentTypeError(
          f"expected FIELD=VALUE[,FIELD=VALUE...], got {text!r}")
    try:
      fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[name] = value
  return fields


def build(preset: str, batch: int, variant: dict, *,
          tiny: bool = False) -> dict:
  """Compiles the train step of one variant and runs one warm-up step."""
  overrides = dict(variant)
  with kernels.implementation(overrides.pop("kernels", "auto")):
    compiled, state, batch_arr, rng, compile_s, _ = run.build_train_step(
        preset, batch, tiny=tiny, **overrides)
  state, metrics = compiled(state, batch_arr, rng)
  jax.block_until_ready(metrics)
  return dict(compiled=compiled, state=state, batch=batch_arr, rng=rng,
              compile_s=compile_s, times=[], cpu=[],
              loss=float(metrics["loss"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", type=run._parse_preset, required=True)  # pylint: disable=protected-access
  parser.add_argument(
      "--variant", type=parse_variant, action="append", required=True,
      help="FIELD=VALUE[,FIELD=VALUE...] of one variant (give two or more)")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  preset, batch = args.preset
  variants = [build(preset, batch, v) for v in args.variant]
  load = os.getloadavg()
  for _ in range(args.steps):
    for v in variants:
      wall, cpu = time.perf_counter(), time.process_time()
      v["state"], metrics = v["compiled"](v["state"], v["batch"], v["rng"])
      jax.block_until_ready(metrics)
      v["times"].append(time.perf_counter() - wall)
      v["cpu"].append(time.process_time() - cpu)
  print(
      f"{preset}:{batch}, {args.steps} interleaved steps each after 1 warm-up, "
      f"{len(os.sched_getaffinity(0))} cores, load average {_load(load)} -> {_load(os.getloadavg())}"
  )
  base = variants[0]
  for spec, v in zip(args.variant, variants):
    name = ",".join(f"{k}={val}" for k, val in spec.items())
    med = statistics.median(v["times"])
    wall_ratio = statistics.median(
        a / b for a, b in zip(v["times"], base["times"]))
    cpu_ratio = statistics.median(a / b for a, b in zip(v["cpu"], base["cpu"]))
    print(
        f"{name:<28} wall {med:7.3f} s (min {min(v['times']):.3f}, max {max(v['times']):.3f}) "
        f"x{wall_ratio:.3f}  CPU {statistics.median(v['cpu']):7.3f} s x{cpu_ratio:.3f}  "
        f"{batch / med:7.1f} images/s  compile {v['compile_s']:6.1f} s  first loss {v['loss']:.6f}",
        flush=True)


def _load(load) -> str:
  return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
  hugepages.reexec_with_huge_page_malloc()
  cpu_flags.add_to_environment()
  sys.exit(main())
