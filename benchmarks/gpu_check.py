"""The GPU figures of issue 29 in one timed run: train, sample, quality, profile.

Run by `benchmarks/gpu_check.sh` (which also runs the GPU numerics tests and
installs the wheels the GPU image lacks); by hand, from the repository root:

  python -m benchmarks.gpu_check --out DIR [--budget-s 300]
  python -m benchmarks.gpu_check --dry-run --out DIR   # tiny sizes, any backend (CI)

Sections, in order of priority; a section that would start after `--budget-s`
seconds is recorded as skipped, so that the run fits its lease (a dry run
has no budget: every section runs, however slow the machine):

* train: the library's train step (`benchmarks.run.build_train_step`: Adam,
  EMA, donated state) of `ddpm_cifar10` at batch 128, 256 and 512 in
  bfloat16 compute (parameters, optimizer state, EMA and loss stay float32,
  checked on the returned state): compile time, median step time after
  warm-up, images/s, XLA's FLOPs and the fraction of the device's peak
  (`run.PEAK_FLOPS`), XLA's memory estimate and the device's peak bytes.
* sample: DDIM with 50 steps and DPM-Solver++(2M) with 20 network calls (the
  samplers as `builders.build_sampler` makes them) at a large batch,
  bfloat16: images/s and the time that 50,000 samples would take.
* quality: `configs/cifar10_flow.py` (rectified flow on the DDPM network,
  the best process on CPU MNIST) trained for `--quality-minutes` in bfloat16
  on the CIFAR-10 archive (`--cifar10`, carried with the run), then 2,000
  samples with DPM-Solver++(2M) at 20 calls, written to
  DIR/quality_samples.npz with a grid (quality_grid.png). Their FID is
  computed afterwards on this machine, against the training set:

    python -m ddpm_jax.tools.fid --weights=fid_inception.npz \
      --samples=DIR/quality_samples.npz \
      --reference=folder:../shared/data/cifar10_jpg.tar.gz \
      --reference_split=train

* DiT: the train row of DiT-B/2 (unconditional, 32x32x3, 256 tokens) at
  batch 256 in bfloat16; its peak fraction is the model FLOP utilisation of
  issue 27 (target 40%), from XLA's FLOP count of the step.
* the float32 train rows at the same batches.
* processes: the bfloat16 train row at batch 256 on the EDM and
  flow-matching processes (`diffusion.process` and `diffusion.target` as
  configs/cifar10_edm.py and configs/cifar10_flow.py set them).
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
import math
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
import numpy as np  # noqa: E402

from benchmarks import mnist_quality, run  # noqa: E402
from ddpm_jax.engine import builders, inference, train  # noqa: E402
from ddpm_jax.engine import config as config_lib  # noqa: E402
from ddpm_jax.infra import images, parallel  # noqa: E402
from ddpm_jax.models import kernels  # noqa: E402

PRESET = "ddpm_cifar10"
#: The transformer of issue 27, trained in bfloat16 for its model FLOP utilisation.
DIT_PRESET = "dit_b_2"
#: The processes of issue 26 on the same network, as their CIFAR-10 recipes
#: set them (`diffusion.process` and `diffusion.target` of these files).
PROCESS_RECIPES = {"edm": "cifar10_edm.py", "flow": "cifar10_flow.py"}
#: (train batches, train steps, sampler batch, samplers ('NAME:STEPS'),
#: kernels A/B batch, profiled steps, DiT batch, the quality run's samples
#: and sampler).
FULL = dict(batches=(128, 256, 512), steps=10, sample_batch=5000,
            samplers=("ddim:50", "dpmpp_2m:20"), ab_batch=256, profile_steps=3,
            dit_batch=256, quality_images=2000, quality_sampler="dpmpp_2m:20")
DRY_RUN = dict(batches=(2,), steps=2, sample_batch=2,
               samplers=("ddim:5", "dpmpp_2m:3"), ab_batch=2, profile_steps=1,
               dit_batch=2, quality_images=8, quality_sampler="dpmpp_2m:3")
TARGET_SAMPLES = 50_000
#: The short quality run of issue 29: the CIFAR-10 recipe of the process that
#: did best on CPU MNIST (benchmarks/HISTORY.md, 2026-12-08: flow matching,
#: classifier FID 21.0 against DDPM's 25.6 and EDM's 36.9 in 30 minutes), in
#: bfloat16, its EMA warmed up (decay min(0.9999, (1 + n) / (10 + n))) so
#: that a few thousand steps are not averaged with the initial weights.
QUALITY_RECIPE = "cifar10_flow.py"
QUALITY_OVERRIDES = ("model.dtype=bfloat16", "train.ema_warmup=True",
                     "train.sample_every=0")


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


def process_diffusion(process: str) -> dict:
  """The `config.diffusion` fields that `PROCESS_RECIPES[process]` sets."""
  recipe = config_lib.load_config(
      str(_ROOT / "configs" / PROCESS_RECIPES[process])).diffusion
  return dict(process=recipe.process, target=recipe.target)


def _train(batch: int, dtype: str, *, steps: int, tiny: bool,
           implementation: str = "auto", preset: str = PRESET,
           process: str = "ddpm"):
  """One train row, and what the profile section needs to run the same step again."""
  diffusion = process_diffusion(process) if process != "ddpm" else None
  with kernels.implementation(implementation):
    compiled, state, batch_arr, rng, compile_s, model = run.build_train_step(
        preset, batch, tiny=tiny, dtype=dtype, diffusion=diffusion)
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
  row["process"] = process
  row["loss_dtype"] = str(metrics["loss"].dtype)
  row["state_float_dtypes"] = {
      "params": _float_dtypes(state.params),
      "opt_state": _float_dtypes(state.opt_state),
      "ema_params": _float_dtypes(state.ema_params)
  }
  return row, (compiled, state, batch_arr, rng)


def _sample(spec: str, batch: int, *, tiny: bool) -> dict:
  """One sampling row: the sampler of 'NAME:STEPS' (as the config and the
  command line build it) on the untrained network, bfloat16."""
  config = run.make_config(PRESET, batch, tiny=tiny, dtype="bfloat16")
  sample_fn, calls = mnist_quality.build_sample_fn(spec, config)
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  shape = (batch,) + run.IMAGE_SHAPES[PRESET]
  params = jax.jit(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape[1:]),
                         jnp.zeros((1,), jnp.int32), train=False))()["params"]
  x_T = jax.random.normal(jax.random.key(2), shape)

  def sample(params, x_T):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    return sample_fn(model_fn, schedule, x_T=x_T, key=jax.random.key(1)).images

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
  name, _, steps = spec.partition(":")
  return dict(preset=PRESET, sampler=name, steps=int(steps),
              network_calls=calls, batch=batch, dtype="bfloat16",
              compile_s=compile_s, median_s=median, times_s=times,
              images_per_s=batch / median,
              seconds_for_50k=TARGET_SAMPLES / (batch / median))


def _quality(out: pathlib.Path, *, source: str, tiny: bool, minutes: float,
             num_images: int, sampler: str) -> dict:
  """The short quality run: `QUALITY_RECIPE` with `QUALITY_OVERRIDES`,
  trained for `minutes` (for a dry run the whole `:tiny` recipe, on
  `run.TINY_MODEL`) on
  `source`, then `num_images` samples of its EMA parameters, written to
  out/quality_samples.npz (key 'images', as `--mode=sample` writes them) with
  a 64-image grid beside them."""
  config = config_lib.load_config(
      str(_ROOT / "configs" / QUALITY_RECIPE) + (":tiny" if tiny else ""))
  config.data.source = source
  mnist_quality.apply_overrides(config, QUALITY_OVERRIDES)
  if tiny:  # The smoke U-Net of benchmarks/run.py: seconds to compile.
    config.model.update(run.TINY_MODEL)
  else:
    config.train.max_time = minutes * 60
  config_lib.validate_config(config)
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    state = train.train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - start
    trained = inference.load_trained(config, workdir)
  steps = int(parallel.host_value(state.step))
  sample_fn, calls = mnist_quality.build_sample_fn(sampler, config)
  imgs, sample_s = mnist_quality.sample_images(
      trained, sample_fn, image_shape=builders.image_shape(config),
      num_images=num_images, batch_size=min(num_images, 500))
  np.savez_compressed(out / "quality_samples.npz", images=imgs)
  images.save_image_grid(imgs[:64], out / "quality_grid.png", nrow=8)
  return dict(recipe=QUALITY_RECIPE, overrides=list(QUALITY_OVERRIDES),
              source=source, minutes=minutes, steps=steps,
              images_seen=steps * int(config.train.batch_size), train_s=train_s,
              sampler=sampler, network_calls=calls, num_images=len(imgs),
              sample_s=sample_s, samples="quality_samples.npz")


def _fixture_source(folder: pathlib.Path) -> str:
  """A Keras-layout .npz of 16 random 32x32 RGB images (the dry run's data)."""
  rng = np.random.default_rng(0)
  path = folder / "fixture_cifar.npz"
  np.savez(path, x_train=rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
           y_train=np.arange(16, dtype=np.uint8) % 10)
  return f"npz:{path}"


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
      process = "" if r["process"] == "ddpm" else f" ({r['process']})"
      dtypes = ",".join(
          sorted({d for v in r["state_float_dtypes"].values() for d in v}))
      lines.append(
          f"| {r['preset']}{process} | {r['dtype']} | {r['kernels']} | {r['batch']} | "
          f"{r['median_s'] * 1e3:.1f} ms | {r['images_per_s']:,.0f} | {r['compile_s']:.1f} s | "
          f"{gf} | {frac} | {run._fmt_bytes(m.get('peak_bytes'))} | "  # pylint: disable=protected-access
          f"{run._fmt_bytes(m.get('device_peak_bytes_in_use'))} | {dtypes}, loss {r['loss_dtype']} |"
      )  # pylint: disable=protected-access
    lines.append("")
  if result["samples"]:
    lines += [
        "| sample | steps | network calls | batch | dtype | time | images/s | "
        "50,000 samples | compile |", "|---|---|---|---|---|---|---|---|---|"
    ]
    lines += [
        f"| {s['sampler']} | {s['steps']} | {s['network_calls']} | {s['batch']} | "
        f"{s['dtype']} | {s['median_s']:.2f} s | {s['images_per_s']:,.0f} | "
        f"{s['seconds_for_50k']:.1f} s | {s['compile_s']:.1f} s |"
        for s in result["samples"]
    ]
    lines.append("")
  if result.get("quality"):
    q = result["quality"]
    lines += [
        f"Quality run: `configs/{q['recipe']}` ({', '.join(q['overrides'])}) "
        f"on {q['source']}: {q['steps']:,} steps ({q['images_seen']:,} images) "
        f"in {q['train_s']:.0f} s, start-up and compilation included; "
        f"{q['num_images']:,} samples ({q['sampler']}, {q['network_calls']} "
        f"calls) in {q['sample_s']:.1f} s -> {q['samples']} (FID: see the "
        "module docstring)", ""
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
    lines += ["Skipped: " + ", ".join(result["skipped"]), ""]
  return "\n".join(lines)


def _sections(args, sizes: dict, result: dict, out: pathlib.Path):
  """(name, thunk) of each section in order of priority; each thunk adds its
  figures to `result`."""
  steps, tiny, ab = sizes["steps"], args.dry_run, sizes["ab_batch"]
  profiled = []  # The bfloat16 step at the A/B batch, for the profile.

  def train_row(batch, dtype, **options):

    def section():
      row, step = _train(batch, dtype, steps=steps, tiny=tiny, **options)
      result["train"].append(row)
      if (dtype, batch, options) == ("bfloat16", ab, {}):
        profiled.append(step)

    return section

  def sample_row(spec):
    return lambda: result["samples"].append(
        _sample(spec, sizes["sample_batch"], tiny=tiny))

  def quality():
    source = (_fixture_source(out) if tiny else
              f"folder:{args.cifar10}" if args.cifar10.exists() else None)
    if source is None:
      result["skipped"].append(f"quality (no CIFAR-10 archive at "
                               f"{args.cifar10})")
      return
    result["quality"] = _quality(out, source=source, tiny=tiny,
                                 minutes=args.quality_minutes,
                                 num_images=sizes["quality_images"],
                                 sampler=sizes["quality_sampler"])

  def profile():
    if profiled:
      result["profile"] = _profile(profiled[0], steps=sizes["profile_steps"])

  for batch in sizes["batches"]:
    yield f"train bfloat16 b{batch}", train_row(batch, "bfloat16")
  for spec in sizes["samplers"]:
    yield f"sample {spec} b{sizes['sample_batch']}", sample_row(spec)
  yield "quality", quality
  yield (f"train {DIT_PRESET} bfloat16 b{sizes['dit_batch']}",
         train_row(sizes["dit_batch"], "bfloat16", preset=DIT_PRESET))
  for batch in sizes["batches"]:
    yield f"train float32 b{batch}", train_row(batch, "float32")
  for process in PROCESS_RECIPES:
    yield (f"train {process} bfloat16 b{ab}",
           train_row(ab, "bfloat16", process=process))
  yield (f"train bfloat16 b{ab} kernels=xla",
         train_row(ab, "bfloat16", implementation="xla"))
  yield "profile", profile


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="folder for gpu_check.json and gpu_check.md")
  parser.add_argument(
      "--dry-run", action="store_true",
      help="tiny network and sizes, for CI on the CPU (the figures mean nothing)"
  )
  parser.add_argument(
      "--budget-s", type=float, default=300.0,
      help="start no section after this many seconds (not with --dry-run)")
  parser.add_argument(
      "--pytest-log", default=None,
      help="log of the numerics tests; its last line goes into the report")
  parser.add_argument(
      "--cifar10", type=pathlib.Path,
      default=_ROOT / ".data" / "cifar10_jpg.tar.gz",
      help="the CIFAR-10 JPEG archive of the quality run (carried to the GPU "
      "machine)")
  parser.add_argument("--quality-minutes", type=float, default=1.5,
                      help="training minutes of the quality run")
  args = parser.parse_args(argv)
  sizes = DRY_RUN if args.dry_run else FULL
  budget = Budget(math.inf if args.dry_run else args.budget_s)
  result = dict(environment=run.environment(), dry_run=args.dry_run,
                sizes=sizes, train=[], samples=[], skipped=[])
  if args.pytest_log and pathlib.Path(args.pytest_log).exists():
    log = pathlib.Path(args.pytest_log).read_text().strip().splitlines()
    result["pytest"] = log[-1] if log else "(empty log)"

  def due(name: str) -> bool:
    if budget.left() > 0:
      print(f"gpu_check: {name} ({budget.left():.0f} s of budget left)",
            file=sys.stderr, flush=True)
      return True
    result["skipped"].append(f"{name} (time budget)")
    return False

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, section in _sections(args, sizes, result, out):
    if due(name):
      section()
  result["elapsed_s"] = time.perf_counter() - budget.start

  (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
  table = markdown(result)
  (out / "gpu_check.md").write_text(table)
  print(table)
  return result


if __name__ == "__main__":
  main()
