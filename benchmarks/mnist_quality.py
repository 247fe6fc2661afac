"""MNIST sample quality per CPU-minute: train, sample, score with a classifier.

Run from the repository root, each heavy command alone on the machine (the
figures are per wall-clock minute):

  python -m benchmarks.mnist_quality calibrate
  python -m benchmarks.mnist_quality speed --variant cpu --variant seed
  python -m benchmarks.mnist_quality train --recipe cpu --workdir /tmp/mq_cpu \
      --checkpoint-every 250
  python -m benchmarks.mnist_quality evaluate --recipe cpu \
      --workdir /tmp/mq_cpu --sampler dpmpp_2m:20 --grid-dir /tmp/mq_grids

Recipes (`--recipe NAME`, or `NAME:tiny` for the config files' small variant
that runs in seconds, plus `--set GROUP.FIELD=VALUE` overrides):

* `cpu`: `configs/mnist_cpu.py`, the CPU recipe of this repository.
* `edm`, `flow`, `dit`: `configs/mnist_cpu_edm.py`, `configs/mnist_cpu_flow.py`
  and `configs/mnist_cpu_dit.py`: the same budget trained as EDM, as flow
  matching, and with a small DiT instead of the U-Net.
* `seed`: the PyTorch tutorial this project started from ("The Annotated
  Diffusion Model", run on MNIST), through this library:
  `configs/fashion_mnist.py` (tutorial U-Net, dim 28, dim_mults (1, 2, 4),
  ConvNeXt blocks, Huber loss, Adam 1e-3 without warm-up or clipping, batch
  128, random flips, Algorithm 2 with the posterior variance) with the
  tutorial's T = 200 linear betas and no EMA (the tutorial samples its raw
  weights).
* `mnist`: `configs/mnist.py` as it is.
* `digits`: `configs/digits.py` (scikit-learn's digits; `speed` only).

Commands:

* `calibrate` scores reference image sets (`digit_quality.calibration_sets`).
* `speed` times the train step of each `--variant` ('RECIPE [FIELD=VALUE
  ...]'), alternating between them step by step (median after warm-up,
  compilation apart), with the load average.
* `train` runs the library's `train.train_and_evaluate` with a checkpoint
  every `--checkpoint-every` steps (all kept) and writes
  `<workdir>/benchmark_train.json` (launch time, load averages, steps done,
  seconds), so `evaluate` can put each checkpoint at its minute of training
  (the time its write finished, counted from the launch: start-up and
  compilation included).
* `evaluate` samples `--num-images` from the EMA parameters of every
  checkpoint (or `--steps`) with each `--sampler` ('NAME:STEPS', e.g.
  'dpmpp_2m:20', 'ddim:50'; 'ddpm:0' runs all T steps; default: the config's
  sampler), times it, scores the images with `digit_quality.DigitScorer`,
  writes a 64-image grid per checkpoint and sampler to `--grid-dir` and
  prints markdown rows (JSON lines with `--out`).

As a script it restarts with huge pages for malloc's large blocks, as the CLI
does for training.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import digit_quality
from ddpm_jax import samplers
from ddpm_jax.engine import (
    builders,
    checkpoint,
    generation,
    inference,
    train,
    train_step,
)
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import cpu_flags, hugepages, images, parallel

_ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = _ROOT / ".." / "shared" / "data" / "mnist.npz"
#: Recipes that are a config file as it is.
RECIPE_FILES = {
    "cpu": "mnist_cpu.py",
    "edm": "mnist_cpu_edm.py",
    "flow": "mnist_cpu_flow.py",
    "dit": "mnist_cpu_dit.py",
    "mnist": "mnist.py",
    "digits": "digits.py"
}
RECIPES = ("seed", *RECIPE_FILES)
TRAIN_RECORD = "benchmark_train.json"


def seed_recipe_config(variant: str = ""):
  """The tutorial's recipe on MNIST (see the module docstring)."""
  config = config_lib.load_config(
      f"{_ROOT / 'configs' / 'fashion_mnist.py'}:{variant}")
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 200
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.train.ema_decay = 0.0
  return config


def apply_overrides(config, overrides):
  """Sets each 'GROUP.FIELD=VALUE' (a Python literal, else a string).

  Example:
    >>> apply_overrides(config, ["diffusion.target=v", "optimizer.lr=1e-3"])
  """
  for item in overrides:
    path, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"Override {item!r} is not GROUP.FIELD=VALUE.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *groups, field = path.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def recipe_config(recipe: str, *, mnist_path: pathlib.Path, overrides=()):
  """The config of `recipe` ('NAME' or 'NAME:tiny', the config files' small
  variant) reading MNIST from `mnist_path`."""
  name, _, variant = recipe.partition(":")
  if name == "seed":
    config = seed_recipe_config(variant)
  elif name in RECIPE_FILES:
    config = config_lib.load_config(
        f"{_ROOT / 'configs' / RECIPE_FILES[name]}:{variant}")
  else:
    raise ValueError(f"Unknown recipe {name!r}; expected one of {RECIPES}.")
  if name != "digits":
    config.data.source = f"npz:{mnist_path}"
  config = apply_overrides(config, overrides)
  config_lib.validate_config(config)
  return config


def load_text() -> str:
  return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def cmd_calibrate(args) -> None:
  scorer = digit_quality.DigitScorer.create(args.mnist,
                                            cache_dir=args.cache_dir)
  print(f"Classifier test accuracy {scorer.test_accuracy:.4f}; reference: "
        f"{len(scorer.reference)} held-out test digits.")
  print(digit_quality.MARKDOWN_HEADER + " predicted classes |")
  print("|---|---|---|---|---|---|")
  for name, imgs in digit_quality.calibration_sets(
      scorer.data, num_images=args.num_images).items():
    scores = scorer.score(imgs)
    print(
        digit_quality.markdown_row(
            f"{name} ({len(imgs)})", scores,
            " ".join(str(c) for c in scores.class_counts)), flush=True)


def _compiled_train_step(config):
  """(compiled step, state, batch, rng, compile seconds, parameter count)."""
  model = builders.build_model(config)
  tx = builders.build_optimizer(config)
  mesh = parallel.create_mesh()
  shape = builders.image_shape(config)
  state = train_step.create_train_state(model, tx, jax.random.PRNGKey(0),
                                        image_shape=shape, mesh=mesh)
  step = train_step.jit_train_step(builders.build_train_step(config, model, tx),
                                   mesh, state)
  batch = int(config.train.batch_size)
  data = {
      "image":
          jax.random.uniform(jax.random.PRNGKey(1), (batch,) + shape,
                             jnp.float32, -1, 1)
  }
  rng = jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = step.lower(state, data, rng).compile()
  compile_s = time.perf_counter() - start
  params = sum(p.size for p in jax.tree.leaves(state.params))
  return compiled, state, data, rng, compile_s, params


def cmd_speed(args) -> None:
  """Times train steps of each `--variant`, alternating between them."""
  variants = []
  for text in args.variant or [" ".join([args.recipe, *args.set])]:
    recipe, *overrides = text.split()
    config = recipe_config(recipe, mnist_path=args.mnist, overrides=overrides)
    compiled, state, data, rng, compile_s, params = _compiled_train_step(config)
    for _ in range(args.warmup):
      state, metrics = compiled(state, data, rng)
    jax.block_until_ready(metrics)
    variants.append(
        dict(name=text, compiled=compiled, state=state, data=data, rng=rng,
             compile_s=compile_s, params=params,
             batch=int(config.train.batch_size), wall=[], cpu=[]))
  load_before = load_text()
  for _ in range(args.timed_steps):
    for v in variants:
      cpu0, start = time.process_time(), time.perf_counter()
      v["state"], metrics = v["compiled"](v["state"], v["data"], v["rng"])
      jax.block_until_ready(metrics)
      v["wall"].append(time.perf_counter() - start)
      v["cpu"].append(time.process_time() - cpu0)
  print(f"{args.timed_steps} alternating steps each after {args.warmup} "
        f"warm-up; load average {load_before} -> {load_text()}")
  for v in variants:
    wall, cpu = statistics.median(v["wall"]), statistics.median(v["cpu"])
    print(
        f"{v['name']}: {v['params']:,} parameters, batch {v['batch']}: "
        f"median {wall:.3f} s/step (min {min(v['wall']):.3f}, max "
        f"{max(v['wall']):.3f}) = {1 / wall:.3f} steps/s, "
        f"{v['batch'] / wall:.1f} images/s, {1800 / wall:.0f} steps in 30 "
        f"min; CPU time {cpu:.3f} s/step; compile {v['compile_s']:.1f} s",
        flush=True)


def cmd_train(args) -> None:
  config = recipe_config(args.recipe, mnist_path=args.mnist, overrides=args.set)
  if args.steps:
    config.train.num_steps = args.steps
  if args.max_time:
    config.train.max_time = args.max_time
  config.train.checkpoint_every = args.checkpoint_every
  config.train.keep_checkpoints = 1000
  config.train.sample_every = 0
  config.train.log_every = args.log_every
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = dict(recipe=args.recipe, overrides=list(args.set),
                num_steps=int(config.train.num_steps),
                max_time=float(config.train.max_time), start_time=time.time(),
                load_start=load_text())
  (workdir / TRAIN_RECORD).write_text(json.dumps(record))
  state = train.train_and_evaluate(config, workdir)
  record.update(steps_done=int(parallel.host_value(state.step)),
                seconds=time.time() - record["start_time"],
                load_end=load_text())
  (workdir / TRAIN_RECORD).write_text(json.dumps(record))
  print(
      f"Trained {record['steps_done']} steps in {record['seconds']:.0f} s "
      f"(start-up and compilation included); load average "
      f"{record['load_start']} -> {record['load_end']}.", flush=True)


def build_sample_fn(spec: str, config):
  """(sampler function, network calls) of 'NAME:STEPS' (any of
  `solvers.SAMPLER_NAMES`; for 'ddpm' STEPS are the respaced steps, 0 all
  T), built by `builders.build_sampler` with the rest of `config.sample`.

  Example:
    >>> fn, calls = build_sample_fn("dpmpp_2m:20", config)  # 20 calls
  """
  name, _, steps = spec.partition(":")
  if name not in samplers.SAMPLER_NAMES or not steps.isdigit():
    raise ValueError(f"Sampler {spec!r}: give NAME:STEPS with NAME one of "
                     f"{samplers.SAMPLER_NAMES}, e.g. dpmpp_2m:20.")
  config = config.copy_and_resolve_references()
  config.sample.sampler = name
  if name == "ddpm":
    config.sample.ddpm_steps = int(steps)
  else:
    config.sample.num_steps = int(steps)
  sampler = builders.build_sampler(config)
  return sampler.fn, sampler.num_calls


def config_sampler_spec(config) -> str:
  """The config's own sampler as a 'NAME:STEPS' spec."""
  if config.sample.sampler == "ddpm":
    return f"ddpm:{int(config.sample.ddpm_steps)}"
  return f"{config.sample.sampler}:{int(config.sample.num_steps)}"


def sample_images(trained: inference.Trained, sample_fn, *, image_shape,
                  num_images: int, batch_size: int,
                  seed: int = 0) -> tuple[np.ndarray, float]:
  """uint8 samples [N, H, W, C] and the seconds they took
  (`generation.generate`, its compilation included)."""
  start = time.perf_counter()
  out = generation.generate(inference.make_model_fn(trained.model),
                            trained.params, trained.schedule,
                            sample_fn=sample_fn, num_images=num_images,
                            batch_size=batch_size, image_shape=image_shape,
                            key=jax.random.PRNGKey(seed), mesh=trained.mesh)
  return out, time.perf_counter() - start


def checkpoint_minutes(workdir: pathlib.Path, step: int) -> float | None:
  """Minutes from the launch `train` recorded to checkpoint `step`'s
  finished write; None without a record."""
  record = workdir / TRAIN_RECORD
  if not record.exists():
    return None
  start = json.loads(record.read_text())["start_time"]
  marker = workdir / "checkpoints" / str(step) / checkpoint.COMMIT_MARKER
  return (marker.stat().st_mtime - start) / 60


def cmd_evaluate(args) -> None:
  config = recipe_config(args.recipe, mnist_path=args.mnist, overrides=args.set)
  workdir = pathlib.Path(args.workdir)
  scorer = digit_quality.DigitScorer.create(args.mnist,
                                            cache_dir=args.cache_dir)
  model = builders.build_model(config)
  mesh = parallel.create_mesh()
  with checkpoint.CheckpointManager(workdir / "checkpoints",
                                    writable=False) as ckpt:
    steps = args.steps or ckpt.all_steps()
  specs = args.sampler or [config_sampler_spec(config)]
  label = args.label or args.recipe.replace(":", "_")
  print(digit_quality.MARKDOWN_HEADER + " step | minutes | sampler | network "
        "calls | sample time | predicted classes |")
  for step in steps:
    trained = inference.load_trained(config, workdir, model=model, mesh=mesh,
                                     step=step)
    minutes = checkpoint_minutes(workdir, step)
    for spec in specs:
      sample_fn, calls = build_sample_fn(spec, config)
      load = os.getloadavg()[0]
      imgs, seconds = sample_images(trained, sample_fn,
                                    image_shape=builders.image_shape(config),
                                    num_images=args.num_images,
                                    batch_size=args.sample_batch)
      scores = scorer.score(imgs)
      print(
          digit_quality.markdown_row(
              f"{label} ({len(imgs)})", scores,
              str(step), "?" if minutes is None else f"{minutes:.1f}", spec,
              str(calls), f"{seconds:.0f} s",
              " ".join(str(c) for c in scores.class_counts)), flush=True)
      name = f"{label}_step_{step:06d}_{spec.replace(':', '')}"
      if args.grid_dir:
        os.makedirs(args.grid_dir, exist_ok=True)
        images.save_image_grid(imgs[:64],
                               os.path.join(args.grid_dir, f"{name}.png"),
                               nrow=8)
        if args.save_samples:
          np.savez_compressed(os.path.join(args.grid_dir, f"{name}.npz"),
                              images=imgs)
      if args.out:
        with open(args.out, "a") as f:
          f.write(
              json.dumps(
                  dict(label=label, recipe=args.recipe, overrides=list(
                      args.set), step=step, minutes=minutes, sampler=spec,
                       network_calls=calls, sample_batch=args.sample_batch,
                       sample_seconds=seconds, load_average=load,
                       **scores._asdict())) + "\n")


def _steps(text: str) -> list[int]:
  return [int(x) for x in text.split(",")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command",
                      choices=("calibrate", "speed", "train", "evaluate"))
  parser.add_argument("--recipe", default="cpu",
                      help=f"one of {', '.join(RECIPES)}, or NAME:tiny")
  parser.add_argument("--set", action="append", default=[],
                      help="GROUP.FIELD=VALUE config override (repeatable)")
  parser.add_argument(
      "--variant", action="append",
      help="speed: 'RECIPE [GROUP.FIELD=VALUE ...]' "
      "(repeatable; the steps alternate between them)")
  parser.add_argument("--mnist", type=pathlib.Path, default=MNIST,
                      help="Keras-layout MNIST .npz")
  parser.add_argument("--cache-dir", type=pathlib.Path,
                      default=digit_quality.CACHE_DIR,
                      help="where the trained classifier is cached")
  parser.add_argument("--workdir", help="train/evaluate: the run's workdir")
  parser.add_argument(
      "--steps", help="train: steps to train (default the "
      "config's); evaluate: comma-separated checkpoint steps "
      "(default all)")
  parser.add_argument(
      "--max-time", type=float, default=0.0,
      help="train: wall-clock budget in seconds "
      "(train.max_time)")
  parser.add_argument("--checkpoint-every", type=int, default=250)
  parser.add_argument("--log-every", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timed-steps", type=int, default=10)
  parser.add_argument("--num-images", type=int, default=2000)
  parser.add_argument("--sample-batch", type=int, default=500)
  parser.add_argument(
      "--sampler", action="append",
      help="evaluate: NAME:STEPS (repeatable), e.g. "
      "dpmpp_2m:20, ddim:50, or ddpm:0 (all T); default the "
      "config's")
  parser.add_argument("--grid-dir")
  parser.add_argument("--save-samples", action="store_true")
  parser.add_argument("--label")
  parser.add_argument("--out", help="evaluate: append JSON lines here")
  args = parser.parse_args(argv)
  if args.steps is not None:
    args.steps = (int(args.steps)
                  if args.command == "train" else _steps(args.steps))
  {
      "calibrate": cmd_calibrate,
      "speed": cmd_speed,
      "train": cmd_train,
      "evaluate": cmd_evaluate
  }[args.command](args)


if __name__ == "__main__":
  hugepages.reexec_with_huge_page_malloc()
  cpu_flags.add_to_environment()
  sys.exit(main())
