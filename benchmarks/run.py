"""The benchmark suite: training, sampling and input-pipeline throughput.

Run from the repository root (the package installed with `pip install -e .`,
or importable, which this script arranges when run as a file):

  python -m benchmarks.run                      # every section, default sizes
  python -m benchmarks.run --tiny               # CI smoke setting (seconds)
  python benchmarks/run.py --preset tutorial:128 --preset ddpm_cifar10:16 \
      --steps 10 --sections train

It runs on whatever backend JAX sees and writes
`benchmarks/results/<backend>_<date>.json` (or `--out`) plus a markdown table
(stdout, and `--md FILE`). Sections:

* train: for each `PRESET:BATCH`, the library's own train step
  (`builders.build_train_step` + `train_step.jit_train_step` on
  `train_step.create_train_state`):
  compile time, the median / min / max / IQR of `--steps` step times after
  `--warmup` steps, images/s, XLA's memory analysis of the compiled step
  (arguments + outputs + temporaries - aliased) and the process's peak RSS,
  model FLOPs per image from `compiled.cost_analysis()` and, on GPU, the
  achieved fraction of the device's peak.
* sample: for each preset, `sampling.ddpm_sample` over `--ddpm-steps` steps
  (default: all T) and `sampling.ddim_sample` with `--ddim-steps` steps, in
  images/s, and each sampler's time over the time of one `lax.scan` of the
  same number of bare network calls on the same batch, the two timed in
  alternation (the overhead ratio: median of the per-pair ratios).
* input: `pipeline.create_dataset` alone, images/s for each source
  that is available (digits always; MNIST npz and the CIFAR-10 JPEG tar from
  ../shared/data when present).

`--kernels xla` runs every section with XLA's own convolutions and autodiff
GroupNorm instead of the CPU kernels of `ddpm_jax.models.kernels` (recorded in
the JSON's settings and the table's header). Run as a script, it sets up the
process as the CLI does: huge pages for malloc (`ddpm_jax.infra.hugepages`; not with
`--default-malloc`) and `ddpm_jax.infra.cpu_flags`' XLA:CPU flags (XLA_FLAGS is in
the JSON's environment).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))  # `python benchmarks/run.py` without install

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import samplers
from ddpm_jax.data import pipeline
from ddpm_jax.engine import builders, train_step
from ddpm_jax.engine import config as config_lib  # noqa: E402
from ddpm_jax.infra import cpu_flags, hugepages, parallel
from ddpm_jax.models import count_params, kernels  # noqa: E402

#: Image shape (H, W, C) each preset is benchmarked at (the DiTs
#: unconditional, predicting eps, on CIFAR-10's images).
IMAGE_SHAPES = {
    "tutorial": (28, 28, 1),
    "ddpm_cifar10": (32, 32, 3),
    "ddpm_256": (256, 256, 3),
    "dit_s_2": (32, 32, 3),
    "dit_b_2": (32, 32, 3),
}
#: Dense peak FLOP/s by device kind (substring match), for the GPU fraction.
PEAK_FLOPS = {
    "H200": {
        "bfloat16": 790e12,
        "float32": 67e12
    },  # bf16: measured matmul peak
    "H100": {
        "bfloat16": 989e12,
        "float32": 67e12
    },
    "A100": {
        "bfloat16": 312e12,
        "float32": 19.5e12
    },
}
#: Tiny networks for the CI smoke run: a U-Net of one level (half the
#: compile time of two), a DiT of two blocks of width 32.
TINY_MODEL = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                  num_groups=4, attention=("none",), mid_attention="none")
TINY_DIT = dict(hidden_size=32, depth=2, num_heads=4)
_SHARED_DATA = _ROOT / ".." / "shared" / "data"


def environment() -> dict:
  devices = jax.devices()
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  cpu = platform.processor()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
    cpu = next((l.split(":", 1)[1].strip()
                for l in out.splitlines()
                if l.startswith("Model name")), cpu)
  except OSError:
    pass
  return dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      backend=jax.default_backend(), device_kind=devices[0].device_kind,
      device_count=len(devices), process_count=jax.process_count(),
      jax=jax.__version__,
      jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      flax=flax.__version__, python=platform.python_version(), cpu=cpu,
      cpu_count=os.cpu_count(), load_average=load, xla_flags=os.environ.get(
          "XLA_FLAGS", ""), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      ld_preload=os.environ.get("LD_PRELOAD", ""))


def _stats(times: list[float]) -> dict:
  q = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
  return dict(median_s=statistics.median(times), min_s=min(times),
              max_s=max(times), iqr_s=float(q[1] - q[0]), n=len(times))


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function (`cost_analysis()`), or None where XLA gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  out = {}
  if m is not None:
    out = dict(argument_bytes=int(m.argument_size_in_bytes),
               output_bytes=int(m.output_size_in_bytes),
               temp_bytes=int(m.temp_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes))
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] +
                         out["temp_bytes"] - out["alias_bytes"])
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  out["process_peak_rss_bytes"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def _peak_fraction(flops_per_s: float, dtype: str) -> float | None:
  if jax.default_backend() != "gpu":
    return None
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name in kind:
      return flops_per_s / peaks.get(dtype, peaks["float32"])
  return None


def make_config(preset: str, batch: int, *, tiny: bool,
                num_timesteps: int | None = None, diffusion: dict | None = None,
                **model_overrides):
  """The training config of one benchmark row (base_config plus overrides;
  `diffusion`: `config.diffusion` fields, e.g. another process)."""
  config = config_lib.base_config()
  h, _, c = IMAGE_SHAPES[preset]
  if preset.startswith("dit_"):
    model = dict(in_channels=c, **(TINY_DIT if tiny else {}))
  else:
    model = TINY_MODEL if tiny else {}
  config.model = dict(preset=preset, **model, **model_overrides)
  config.data.image_size, config.data.channels = h, c
  config.train.batch_size = batch
  config.optimizer.warmup_steps = 10
  if num_timesteps is not None:
    config.diffusion.num_timesteps = num_timesteps
  config.diffusion.update(diffusion or {})
  return config


def bench_train(preset: str, batch: int, *, steps: int, warmup: int,
                tiny: bool) -> dict:
  compiled, state, batch_arr, rng, compile_s, model = build_train_step(
      preset, batch, tiny=tiny)
  for _ in range(warmup):
    state, metrics = compiled(state, batch_arr, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arr, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return _train_row(preset, batch, compiled, state, metrics, model, compile_s,
                    times)


def build_train_step(preset: str, batch: int, *, tiny: bool,
                     diffusion: dict | None = None, **model_overrides):
  """(compiled step, state, batch, rng, compile seconds, model) of the library's train step."""
  config = make_config(preset, batch, tiny=tiny, diffusion=diffusion,
                       **model_overrides)
  model = builders.build_model(config)
  tx = builders.build_optimizer(config)
  mesh = parallel.create_mesh()
  rng = jax.random.key(0)
  shape = IMAGE_SHAPES[preset]
  state = train_step.create_train_state(model, tx, rng, image_shape=shape,
                                        mesh=mesh)
  step_fn = train_step.jit_train_step(
      builders.build_train_step(config, model, tx), mesh, state)
  images = jax.random.uniform(jax.random.key(1), (batch,) + shape, jnp.float32,
                              -1, 1)
  batch_arr = {"image": images, "label": jnp.zeros((batch,), jnp.int32)}
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arr, rng).compile()
  compile_s = time.perf_counter() - start
  return compiled, state, batch_arr, rng, compile_s, model


def _train_row(preset, batch, compiled, state, metrics, model, compile_s,
               times) -> dict:
  row = dict(preset=preset, batch=batch, params=count_params(state.params),
             dtype=model.config.dtype, compile_s=compile_s, **_stats(times),
             loss=float(metrics["loss"]))
  row["images_per_s"] = batch / row["median_s"]
  flops = compiled_flops(compiled)
  if flops is not None:
    row["flops_per_step"] = flops
    row["flops_per_image"] = flops / batch
    row["achieved_flops_per_s"] = flops / row["median_s"]
    row["peak_fraction"] = _peak_fraction(row["achieved_flops_per_s"],
                                          model.config.dtype)
  row["memory"] = _memory(compiled)
  return row


def _compile(fn, args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  return compiled, compile_s


def _time_once(compiled, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def bench_sample(preset: str, batch: int, *, ddpm_steps: int | None,
                 ddim_steps: int, num_timesteps: int, runs: int,
                 tiny: bool) -> dict:
  config = make_config(preset, batch, tiny=tiny, num_timesteps=num_timesteps)
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  shape = (batch,) + IMAGE_SHAPES[preset]
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros(
      shape), jnp.zeros((batch,), jnp.int32), train=False))()["params"]
  params = jax.tree.map(
      lambda p: p + 0.01 * jax.random.normal(jax.random.key(3), p.shape, p.dtype
                                            ), params)
  key = jax.random.key(1)
  x_T = jax.random.normal(jax.random.key(2), shape)

  def model_fn(p):
    return lambda x, t: model.apply({"params": p}, x, t, train=False)

  def bare(p, x, n):

    def body(x, t):
      return model_fn(p)(x, jnp.full((x.shape[0],), t, jnp.int32)), None

    return jax.lax.scan(body, x, jnp.arange(n - 1, -1, -1, dtype=jnp.int32))[0]

  ddpm_n = ddpm_steps or schedule.num_timesteps
  # A shorter DDPM chain than T runs the same sampler on a schedule of that many steps.
  ddpm_schedule = schedule if ddpm_n == schedule.num_timesteps else builders.build_schedule(
      make_config(preset, batch, tiny=tiny, num_timesteps=ddpm_n))
  chains = {
      "ddpm": (ddpm_n, lambda p, x: samplers.ddpm_sample(
          model_fn(p), ddpm_schedule, x_T=x, key=key).images),
      "ddim": (ddim_steps, lambda p, x: samplers.ddim_sample(
          model_fn(p), schedule, x_T=x, key=key, num_steps=ddim_steps).images),
  }
  row = dict(preset=preset, batch=batch, num_timesteps=schedule.num_timesteps)
  for name, (n, fn) in chains.items():
    sampler, sampler_compile = _compile(fn, (params, x_T))
    bare_scan, bare_compile = _compile(lambda p, x, n=n: bare(p, x, n),
                                       (params, x_T))
    # Sampler and bare scan alternate, so that load from other processes hits both alike;
    # the overhead is the median of the per-pair ratios.
    sampler_times, bare_times = [], []
    for _ in range(runs):
      sampler_times.append(_time_once(sampler, (params, x_T)))
      bare_times.append(_time_once(bare_scan, (params, x_T)))
    s = statistics.median(sampler_times)
    row[name] = dict(
        steps=n, compile_s=sampler_compile, **_stats(sampler_times),
        images_per_s=batch / s, per_step_s=s / n, bare_compile_s=bare_compile,
        bare_median_s=statistics.median(bare_times),
        overhead_ratio=statistics.median(
            [a / b for a, b in zip(sampler_times, bare_times)]))
  return row


def _input_sources(tiny: bool):
  sources = [("digits", dict(image_size=16, resize=True))]
  if not tiny:
    mnist = _SHARED_DATA / "mnist.npz"
    cifar = _SHARED_DATA / "cifar10_jpg.tar.gz"
    if mnist.exists():
      sources.append((f"npz:{mnist}", {}))
      sources.append((f"npz:{mnist}", dict(image_size=32, resize=True)))
    if cifar.exists():
      sources.append((f"folder:{cifar}", {}))
  return sources


def bench_input(*, batch: int, steps: int, runs: int, tiny: bool) -> list[dict]:
  rows = []
  for source, options in _input_sources(tiny):
    start = time.perf_counter()
    it = pipeline.create_dataset(
        source, batch_size=batch, random_flip=True, seed=0, **{
            "image_size": None,
            "channels": None,
            **options
        })
    load_s = time.perf_counter() - start

    def rate():
      start = time.perf_counter()
      for _ in range(steps):
        next(it)  # noqa: B023 (rate runs in this iteration)
      return steps * batch / (time.perf_counter() - start)

    rate()  # warm-up
    rates = [rate() for _ in range(runs)]
    rows.append(
        dict(source=source.replace(str(_SHARED_DATA),
                                   "shared/data"), options=options, batch=batch,
             load_s=load_s, images_per_s=statistics.median(rates),
             min_images_per_s=min(rates), max_images_per_s=max(rates)))
  return rows


def _fmt_bytes(n):
  return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(result: dict) -> str:
  env = result["environment"]
  lines = [
      f"Backend {env['backend']} ({env['device_kind']} x{env['device_count']}), "
      f"JAX {env['jax']}, Flax {env['flax']}, {env['cpu']} ({env['cpu_count']} cores), "
      f"load average {env['load_average']}, {env['date']}, "
      f"kernels {result['settings']['kernels']}", ""
  ]
  if result.get("train"):
    lines += [
        "| train | batch | params | step median (min-max) | images/s | compile | "
        "XLA peak mem | peak RSS | GFLOP/image | peak frac |",
        "|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in result["train"]:
      m = r["memory"]
      frac = "-" if r.get(
          "peak_fraction") is None else f"{r['peak_fraction']:.1%}"
      gf = "-" if r.get(
          "flops_per_image") is None else f"{r['flops_per_image'] / 1e9:.2f}"
      lines.append(
          f"| {r['preset']} | {r['batch']} | {r['params']:,} | {r['median_s']:.3f} s "
          f"({r['min_s']:.3f}-{r['max_s']:.3f}, n={r['n']}) | {r['images_per_s']:.1f} | "
          f"{r['compile_s']:.1f} s | {_fmt_bytes(m.get('peak_bytes'))} | "
          f"{_fmt_bytes(m.get('process_peak_rss_bytes'))} | {gf} | {frac} |")
    lines.append("")
  if result.get("sample"):
    lines += [
        "| sample | batch | sampler | steps | time median | images/s | per step | "
        "bare scan | overhead | compile |",
        "|---|---|---|---|---|---|---|---|---|---|"
    ]
    for r in result["sample"]:
      for name in ("ddpm", "ddim"):
        s = r[name]
        lines.append(
            f"| {r['preset']} | {r['batch']} | {name} | {s['steps']} | {s['median_s']:.3f} s | "
            f"{s['images_per_s']:.2f} | {s['per_step_s'] * 1e3:.1f} ms | "
            f"{s['bare_median_s']:.3f} s | {s['overhead_ratio']:.3f}x | {s['compile_s']:.1f} s |"
        )
    lines.append("")
  if result.get("input"):
    lines += [
        "| input source | options | batch | load | images/s (min-max) |",
        "|---|---|---|---|---|"
    ]
    for r in result["input"]:
      lines.append(
          f"| {r['source']} | {r['options'] or ''} | {r['batch']} | {r['load_s']:.1f} s | "
          f"{r['images_per_s']:,.0f} ({r['min_images_per_s']:,.0f}-"
          f"{r['max_images_per_s']:,.0f}) |")
    lines.append("")
  return "\n".join(lines)


def _parse_preset(text: str) -> tuple[str, int]:
  name, _, batch = text.partition(":")
  if name not in IMAGE_SHAPES or not batch.isdigit():
    raise argparse.ArgumentTypeError(
        f"expected PRESET:BATCH with PRESET in {sorted(IMAGE_SHAPES)}")
  return name, int(batch)


def _run_sections(result: dict, args, sections: set[str], train_rows,
                  sample_rows) -> None:
  """Fills `result` with the rows of each requested section."""
  if "train" in sections:
    result["train"] = []
    for preset, batch in train_rows:
      result["train"].append(
          bench_train(preset, batch, steps=args.steps, warmup=args.warmup,
                      tiny=args.tiny))
      print(
          f"train {preset}:{batch} {result['train'][-1]['median_s']:.3f} s/step",
          file=sys.stderr, flush=True)
  if "sample" in sections:
    result["sample"] = []
    for preset, batch in sample_rows:
      result["sample"].append(
          bench_sample(preset, batch, ddpm_steps=args.ddpm_steps,
                       ddim_steps=args.ddim_steps,
                       num_timesteps=args.num_timesteps, runs=args.sample_runs,
                       tiny=args.tiny))
      print(f"sample {preset}:{batch} done", file=sys.stderr, flush=True)
  if "input" in sections:
    result["input"] = bench_input(batch=args.input_batch,
                                  steps=args.input_steps, runs=args.input_runs,
                                  tiny=args.tiny)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--preset", action="append", type=_parse_preset,
      help="PRESET:BATCH for the train section (repeatable); default "
      "tutorial:128 and ddpm_cifar10:16")
  parser.add_argument(
      "--sample-preset", action="append", type=_parse_preset, help=
      "PRESET:BATCH for the sample section; default tutorial:16 and ddpm_cifar10:4"
  )
  parser.add_argument("--sections", default="train,sample,input")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed train steps after warm-up")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num-timesteps", type=int, default=1000,
                      help="T of the sampling schedule")
  parser.add_argument(
      "--ddpm-steps", type=int, default=None, help=
      "DDPM chain length (default T); a shorter chain uses a schedule of that length"
  )
  parser.add_argument("--ddim-steps", type=int, default=50)
  parser.add_argument("--sample-runs", type=int, default=3)
  parser.add_argument("--input-batch", type=int, default=128)
  parser.add_argument("--input-steps", type=int, default=50)
  parser.add_argument("--input-runs", type=int, default=5)
  parser.add_argument(
      "--kernels", choices=kernels.IMPLEMENTATIONS, default="auto", help=
      "ddpm_jax.models.kernels.implementation for every section: 'auto' (the "
      "library's default) or 'xla' (XLA's own convolutions and GroupNorm "
      "gradient, the reference)")
  parser.add_argument(
      "--tiny", action="store_true", help=
      "CI smoke setting: tiny nets, batch 2-4, 2 steps, T=10, one preset per section"
  )
  parser.add_argument(
      "--default-malloc", action="store_true",
      help="run as a script: keep glibc's default malloc (otherwise it restarts "
      "with huge pages for large blocks, as the CLI does: "
      "ddpm_jax.infra.hugepages)")
  parser.add_argument(
      "--out", default=None,
      help="JSON path (default benchmarks/results/<backend>_<date>.json)")
  parser.add_argument("--md", default=None,
                      help="also write the markdown table here")
  args = parser.parse_args(argv)
  sections = set(args.sections.split(","))
  train_rows = args.preset or [("tutorial", 128), ("ddpm_cifar10", 16)]
  sample_rows = args.sample_preset or [("tutorial", 16), ("ddpm_cifar10", 4)]
  if args.tiny:
    # One layout per section keeps the compile-bound smoke run short.
    train_rows = args.preset or [("tutorial", 4)]
    sample_rows = args.sample_preset or [("ddpm_cifar10", 2)]
    args.steps, args.warmup, args.num_timesteps, args.ddim_steps = 2, 1, 10, 5
    args.sample_runs, args.input_steps, args.input_runs, args.input_batch = 1, 3, 1, 16

  result = dict(
      environment=environment(), settings=vars(args) | {
          "preset": train_rows,
          "sample_preset": sample_rows
      })
  with kernels.implementation(args.kernels):
    _run_sections(result, args, sections, train_rows, sample_rows)
  result["environment"]["load_average_end"] = os.getloadavg()

  out = pathlib.Path(args.out) if args.out else (
      _ROOT / "benchmarks" / "results" /
      f"{jax.default_backend()}_{datetime.date.today().isoformat()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, default=str))
  table = markdown(result)
  print(table)
  if args.md:
    pathlib.Path(args.md).write_text(table)
  print(f"wrote {out}", file=sys.stderr)
  return result


if __name__ == "__main__":
  if "--default-malloc" not in sys.argv[1:]:
    hugepages.reexec_with_huge_page_malloc()
  cpu_flags.add_to_environment()
  main()
