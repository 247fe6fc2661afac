"""A/B of model implementation options on the library's train step, interleaved.

Run from the repository root:

  python -m benchmarks.compare_train --preset tutorial:128 --steps 5 \
      --option conv_method=lax --option conv_method=auto

As a script it restarts with huge pages for malloc's large blocks, as the CLI
does (`ddpm_jax.hugepages.reexec_with_huge_page_malloc`). Both steps are compiled
first; then timed steps alternate A, B, A, B, ... so that load from other
processes on a shared machine hits both alike. Prints the median step time of
each, the ratio, and compile times.
"""

import argparse
import statistics
import sys
import time

import jax

from benchmarks import run
from ddpm_jax import hugepages


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", type=run._parse_preset, required=True)  # pylint: disable=protected-access
  parser.add_argument("--option", action="append", required=True,
                      help="FIELD=VALUE of UNetConfig for one variant (give two)")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args(argv)
  preset, batch = args.preset
  variants = []
  for option in args.option:
    field, _, value = option.partition("=")
    built = run.build_train_step(preset, batch, tiny=False, **{field: value})
    compiled, state, batch_arr, rng, compile_s, _ = built
    state, metrics = compiled(state, batch_arr, rng)  # warm-up
    jax.block_until_ready(metrics)
    variants.append(dict(option=option, compiled=compiled, state=state, batch=batch_arr, rng=rng,
                         compile_s=compile_s, times=[], loss=float(metrics["loss"])))
  for _ in range(args.steps):
    for v in variants:
      start = time.perf_counter()
      v["state"], metrics = v["compiled"](v["state"], v["batch"], v["rng"])
      jax.block_until_ready(metrics)
      v["times"].append(time.perf_counter() - start)
  base = statistics.median(variants[0]["times"])
  print(f"{preset}:{batch}, {args.steps} interleaved steps each after 1 warm-up")
  for v in variants:
    med = statistics.median(v["times"])
    print(f"{v['option']:<24} median {med:7.3f} s (min {min(v['times']):.3f}, max {max(v['times']):.3f})"
          f"  {batch / med:7.1f} images/s  compile {v['compile_s']:6.1f} s  x{med / base:.3f}"
          f"  first loss {v['loss']:.6f}", flush=True)


if __name__ == "__main__":
  hugepages.reexec_with_huge_page_malloc()
  sys.exit(main())
