"""The GPU figures of issue 19 in one timed run: train, DDIM-50, kernels A/B, profile.

Run by `benchmarks/gpu_check.sh` (which also runs the GPU numerics tests and
installs the wheels the GPU image lacks); by hand, from the repository root:

  python -m benchmarks.gpu_check --out DIR [--budget-s 300]
  python -m benchmarks.gpu_check --dry-run --out DIR   # tiny sizes, any backend (CI)

Sections, in order of priority; a section that would start after `--budget-s`
seconds is recorded as skipped, so that the run fits its lease:

* train: the library's train step (`benchmarks.run.build_train_step`: Adam,
  EMA, donated state) of `ddpm_cifar10` at batch 128, 256 and 512, compute
  dtype bfloat16 then float32 (parameters, optimizer state, EMA and loss stay
  float32, checked on the returned state): compile time, median step time
  after warm-up, images/s, XLA's FLOPs and the fraction of the device's
  peak (`run.PEAK_FLOPS`), XLA's memory estimate and the device's peak bytes.
* sample: `sampling.ddim_sample` with 50 steps at a large batch, bfloat16:
  images/s and the time that 50,000 samples would take at that rate.
* DiT: the same train row for DiT-B/2 (unconditional, 32x32x3, 256 tokens)
  at batch 256 in bfloat16; its peak fraction is the model FLOP utilisation
  of issue 27 (target 40%), from XLA's FLOP count of the step.
* kernels: the bfloat16 step at batch 256 again under
  `kernels.implementation('xla')` (XLA's attention instead of cuDNN's), to
  show whether 'auto' is the faster default on this GPU.
* profile: a `jax.profiler` trace of a few bfloat16 steps at batch 256 and
  the ops that took the most device time (grouped by HLO op name without its
  numeric suffix).

Writes DIR/gpu_check.json and DIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(_ROOT) not in sys.path:
  sys.path.insert(
      0, str(_ROOT))  # `python benchmarks/gpu_check.py` without install

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import run  # noqa: E402
from ddpm_jax import samplers  # noqa: E402
from ddpm_jax.engine import builders
from ddpm_jax.models import kernels  # noqa: E402

PRESET = "ddpm_cifar10"
#: The transformer of issue 27, trained in bfloat16 for its model FLOP utilisation.
DIT_PRESET = "dit_b_2"
#: (train batches, train steps, DDIM batch, DDIM steps, kernels A/B batch,
#: profiled steps, DiT batch).
FULL = dict(batches=(128, 256, 512), steps=10, sample_batch=5000, ddim_steps=50,
            ab_batch=256, profile_steps=3, dit_batch=256)
DRY_RUN = dict(batches=(2,), steps=2, sample_batch=2, ddim_steps=5, ab_batch=2,
               profile_steps=1, dit_batch=2)
TARGET_SAMPLES = 50_000


class Budget:
  """Seconds since the start, against a limit."""

  def __init__(self, seconds: float):
    self.start, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)


def _float_dtypes(tree) -> list[str]:
  return sorted({
      str(leaf.dtype)
      for leaf in jax.tree.leaves(tree)
      if jnp.issubdtype(leaf.dtype, jnp.floating)
  })


def _train(batch: int, dtype: str, *, steps: int, tiny: bool,
           implementation: str = "auto", preset: str = PRESET):
  """One train row, and what the profile section needs to run the same step again."""
  with kernels.implementation(implementation):
    compiled, state, batch_arr, rng, compile_s, model = run.build_train_step(
        preset, batch, tiny=tiny, dtype=dtype)
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch_arr, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arr, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  row = run._train_row(preset, batch, compiled, state, metrics, model,
                       compile_s, times)  # pylint: disable=protected-access
  row["kernels"] = implementation
  row["loss_dtype"] = str(metrics["loss"].dtype)
  row["state_float_dtypes"] = {
      "params": _float_dtypes(state.params),
      "opt_state": _float_dtypes(state.opt_state),
      "ema_params": _float_dtypes(state.ema_params)
  }
  return row, (compiled, state, batch_arr, rng)


def _sample(batch: int, *, ddim_steps: int, tiny: bool) -> dict:
  config = run.make_config(PRESET, batch, tiny=tiny, dtype="bfloat16")
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  shape = (batch,) + run.IMAGE_SHAPES[PRESET]
  params = jax.jit(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape[1:]),
                         jnp.zeros((1,), jnp.int32), train=False))()["params"]
  x_T = jax.random.normal(jax.random.key(2), shape)

  def sample(params, x_T):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    return samplers.ddim_sample(model_fn, schedule, x_T=x_T,
                                key=jax.random.key(1),
                                num_steps=ddim_steps).images

  start = time.perf_counter()
  compiled = jax.jit(sample).lower(params, x_T).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, x_T))  # warm-up
  times = []
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x_T))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return dict(preset=PRESET, sampler="ddim", steps=ddim_steps, batch=batch,
              dtype="bfloat16", compile_s=compile_s, median_s=median,
              times_s=times, images_per_s=batch / median,
              seconds_for_50k=TARGET_SAMPLES / (batch / median))


def profile_summary(trace_dir: str, *, top: int = 15) -> dict:
  """Device time by op kind from the newest `jax.profiler` trace under `trace_dir`.

  On GPU the events of the device planes' 'XLA Ops' lines (else of their
  'Stream' lines: kernels); on CPU those of XLA's threads on the host plane. Op names
  are grouped without their numeric suffix ('fusion.12' -> 'fusion'). On CPU a thunk's
  duration includes any wait for the shared pool, so fractions are rough.
  """
  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    return dict(source=None, total_ms=0.0, ops=[])
  data = jax.profiler.ProfileData.from_file(paths[-1])
  planes = list(data.planes)
  devices = [p for p in planes if p.name.startswith("/device:")]
  if devices:
    lines = (
        [l for p in devices for l in p.lines if l.name == "XLA Ops"] or
        [l for p in devices for l in p.lines if l.name.startswith("Stream")])
    source = "device planes: " + ", ".join(sorted({p.name for p in devices}))
  else:
    # The executor's threads: the client's and the intra-op pool's (tf_XLAEigen/...), where
    # XLA:CPU runs most thunks.
    lines = [
        l for p in planes if p.name == "/host:CPU" for l in p.lines
        if "XLA" in l.name
    ]
    source = "host plane: XLA executor and intra-op pool threads"
  skip = ("ThreadpoolListener", "end: ", "ThunkExecutor")
  totals, counts = collections.Counter(), collections.Counter()
  for line in lines:
    for event in line.events:
      if event.name.startswith(skip):
        continue
      kind = re.sub(r"(\.\d+)+$", "", event.name)
      totals[kind] += event.duration_ns
      counts[kind] += 1
  total = sum(totals.values())
  ops = [
      dict(op=name, ms=ns / 1e6, count=counts[name],
           fraction=ns / total if total else 0.0)
      for name, ns in totals.most_common(top)
  ]
  return dict(source=source, total_ms=total / 1e6, ops=ops)


def _profile(step, *, steps: int) -> dict:
  compiled, state, batch_arr, rng = step
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state, metrics = compiled(state, batch_arr, rng)
      jax.block_until_ready(metrics)
    summary = profile_summary(trace_dir)
  summary["steps"] = steps
  return summary


def markdown(result: dict) -> str:
  env = result["environment"]
  lines = [
      f"GPU check, {env['device_kind']} x{env['device_count']} ({env['backend']}), "
      f"JAX {env['jax']}, Flax {env['flax']}, {env['date']}" +
      (" — DRY RUN (tiny sizes, figures mean nothing)"
       if result["dry_run"] else ""), ""
  ]
  if result.get("pytest"):
    lines += [f"Numerics tests: `{result['pytest']}`", ""]
  if result["train"]:
    lines += [
        "| train | dtype | kernels | batch | step median | images/s | compile | "
        "GFLOP/image | peak frac | XLA mem | device peak | state dtypes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in result["train"]:
      m = r["memory"]
      frac = "-" if r.get(
          "peak_fraction") is None else f"{r['peak_fraction']:.1%}"
      gf = "-" if r.get(
          "flops_per_image") is None else f"{r['flops_per_image'] / 1e9:.2f}"
      dtypes = ",".join(
          sorted({d for v in r["state_float_dtypes"].values() for d in v}))
      lines.append(
          f"| {r['preset']} | {r['dtype']} | {r['kernels']} | {r['batch']} | "
          f"{r['median_s'] * 1e3:.1f} ms | {r['images_per_s']:,.0f} | {r['compile_s']:.1f} s | "
          f"{gf} | {frac} | {run._fmt_bytes(m.get('peak_bytes'))} | "  # pylint: disable=protected-access
          f"{run._fmt_bytes(m.get('device_peak_bytes_in_use'))} | {dtypes}, loss {r['loss_dtype']} |"
      )  # pylint: disable=protected-access
    lines.append("")
  if result.get("sample"):
    s = result["sample"]
    lines += [
        "| sample | steps | batch | dtype | time | images/s | 50,000 samples | compile |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['sampler']} | {s['steps']} | {s['batch']} | {s['dtype']} | {s['median_s']:.2f} s | "
        f"{s['images_per_s']:,.0f} | {s['seconds_for_50k']:.1f} s | {s['compile_s']:.1f} s |",
        ""
    ]
  if result.get("profile"):
    p = result["profile"]
    lines += [
        f"Profile: {p['steps']} step(s), {p['source']}, {p['total_ms']:.1f} ms in all",
        "", "| op | ms | count | share |", "|---|---|---|---|"
    ]
    lines += [
        f"| {o['op']} | {o['ms']:.2f} | {o['count']} | {o['fraction']:.1%} |"
        for o in p["ops"]
    ]
    lines.append("")
  if result["skipped"]:
    lines += [
        "Skipped for the time budget: " + ", ".join(result["skipped"]), ""
    ]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="folder for gpu_check.json and gpu_check.md")
  parser.add_argument(
      "--dry-run", action="store_true",
      help="tiny network and sizes, for CI on the CPU (the figures mean nothing)"
  )
  parser.add_argument("--budget-s", type=float, default=300.0,
                      help="start no section after this many seconds")
  parser.add_argument(
      "--pytest-log", default=None,
      help="log of the numerics tests; its last line goes into the report")
  args = parser.parse_args(argv)
  sizes = DRY_RUN if args.dry_run else FULL
  budget = Budget(args.budget_s)
  result = dict(environment=run.environment(), dry_run=args.dry_run,
                sizes=sizes, train=[], skipped=[])
  if args.pytest_log and pathlib.Path(args.pytest_log).exists():
    log = pathlib.Path(args.pytest_log).read_text().strip().splitlines()
    result["pytest"] = log[-1] if log else "(empty log)"

  def due(name: str) -> bool:
    if budget.left() > 0:
      print(f"gpu_check: {name} ({budget.left():.0f} s of budget left)",
            file=sys.stderr, flush=True)
      return True
    result["skipped"].append(name)
    return False

  profiled = None
  for dtype in ("bfloat16", "float32"):
    for batch in sizes["batches"]:
      if due(f"train {dtype} b{batch}"):
        row, step = _train(batch, dtype, steps=sizes["steps"],
                           tiny=args.dry_run)
        result["train"].append(row)
        if dtype == "bfloat16" and batch == sizes["ab_batch"]:
          profiled = step
  if due(f"sample ddim{sizes['ddim_steps']} b{sizes['sample_batch']}"):
    result["sample"] = _sample(sizes["sample_batch"],
                               ddim_steps=sizes["ddim_steps"],
                               tiny=args.dry_run)
  if due(f"train {DIT_PRESET} bfloat16 b{sizes['dit_batch']}"):
    row, _ = _train(sizes["dit_batch"], "bfloat16", steps=sizes["steps"],
                    tiny=args.dry_run, preset=DIT_PRESET)
    result["train"].append(row)
  if due(f"train bfloat16 b{sizes['ab_batch']} kernels=xla"):
    row, _ = _train(sizes["ab_batch"], "bfloat16", steps=sizes["steps"],
                    tiny=args.dry_run, implementation="xla")
    result["train"].append(row)
  if profiled is not None and due("profile"):
    result["profile"] = _profile(profiled, steps=sizes["profile_steps"])
  result["elapsed_s"] = args.budget_s - budget.left()

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
  table = markdown(result)
  (out / "gpu_check.md").write_text(table)
  print(table)
  return result


if __name__ == "__main__":
  main()
