"""Sample quality against network calls, for every sampler, on a mixture.

The data is a 2-D Gaussian mixture whose exact eps is known in closed form
(`ddpm_jax.diffusion.testing`), so every error is the sampler's own. For each sampler
and budget of network calls (default 5, 10, 20, 50, and DDIM at 100 for the
target "DPM-Solver++ at 20 calls matches DDIM at 100") it reports:

* fit error: the largest relative error of the mixture's weights, means (in
  units of each component's std) and stds fitted to the samples
  (`testing.fit_components`); the same for a data sample of the same size
  gives the Monte-Carlo floor;
* SW2: the sliced 2-Wasserstein distance to an independent data sample of the
  same size (its floor: two data samples);
* RMS to ODE: the RMS distance to the converged probability-flow ODE solution
  from the same x_T (DPM-Solver++ 3M, 1000 log-SNR levels), a bound on the
  2-Wasserstein distance to the data for the deterministic samplers;
* time per sample: median wall time of the jitted sampler over `--runs` runs
  after one warm-up, divided by the number of points (compile time apart).
  The closed-form network is cheap, so this is the samplers' own cost per
  call, not a network's.

Run from the repository root, on an otherwise idle machine for the timings:

  python -m benchmarks.solvers --md out.md

`ddpm` runs on the schedule respaced to the budget (`ddpm_jax.diffusion.respace`);
`ddim` uses its own uniform spacing; the other samplers run once per spacing
of `--spacings`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))  # `python benchmarks/solvers.py`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddpm_jax import samplers
from ddpm_jax.diffusion import respace, schedules, testing

MIX = testing.gaussian_mixture(weights=[0.3, 0.5, 0.2], means=[[-0.6, -0.3],
                                                               [0.5, 0.5],
                                                               [0.2, -0.7]],
                               stds=[0.12, 0.18, 0.15])
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m")


def fit_error(x) -> float:
  """Largest relative error of the fitted weights, means (per std), stds."""
  fit = testing.fit_components(MIX, x)
  return max(
      float(jnp.max(jnp.abs(fit.weights / MIX.weights - 1.0))),
      float(jnp.max(jnp.linalg.norm(fit.means - MIX.means, axis=1) / MIX.stds)),
      float(jnp.max(jnp.abs(fit.stds / MIX.stds - 1.0))))


def steps_for_calls(name: str, calls: int) -> int:
  """The most steps whose network calls fit in `calls`."""
  return (calls + 1) // 2 if name == "heun" else calls


def make_sampler(name, schedule, num_steps, spacing):
  """A jitted x_T -> samples."""
  model_fn = testing.denoiser(MIX, schedule)
  key = jax.random.key(5)
  if name == "ddpm":
    spaced = respace.respace(
        schedule, respace.spaced_timesteps(schedule.num_timesteps, num_steps),
        warn=False)
    spaced_fn = respace.map_timesteps(model_fn, spaced.timesteps)
    return jax.jit(lambda x: samplers.ddpm_sample(
        spaced_fn, spaced.schedule, x_T=x, key=key, clip_x0=False).images)
  options = dict(num_steps=num_steps)
  if name != "ddim":
    options["spacing"] = spacing
  fn = samplers.get_sampler(name)
  return jax.jit(
      lambda x: fn(model_fn, schedule, x_T=x, key=key, **options).images)


def measure(name, schedule, calls, spacing, x_T, data, reference, *,
            runs: int) -> dict:
  num_steps = steps_for_calls(name, calls)
  sample = make_sampler(name, schedule, num_steps, spacing)
  start = time.perf_counter()
  images = jax.block_until_ready(sample(x_T))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(sample(x_T))
    times.append(time.perf_counter() - start)
  row = dict(
      sampler=name, spacing=None if name in ("ddpm", "ddim") else spacing,
      steps=num_steps, calls=samplers.num_model_calls(name, num_steps),
      fit_error=fit_error(images),
      sw2=float(testing.sliced_wasserstein(images, data,
                                           key=jax.random.key(4))),
      first_s=compile_s, median_s=statistics.median(times),
      us_per_sample=1e6 * statistics.median(times) / x_T.shape[0])
  if name in DETERMINISTIC:
    row["rms_to_ode"] = float(jnp.sqrt(jnp.mean(jnp.square(images -
                                                           reference))))
  return row


def markdown(result: dict) -> str:
  floor = result["floor"]
  lines = [
      f"Floors ({result['points']} points): fit error of a data sample "
      f"{floor['fit_error']:.3f}, SW2 between two data samples "
      f"{floor['sw2']:.4f}; the converged ODE solution: fit error "
      f"{floor['ode_fit_error']:.3f}, SW2 {floor['ode_sw2']:.4f}.", "",
      "| sampler | spacing | steps | calls | fit error | SW2 | RMS to ODE | "
      "us/sample |", "|---|---|---|---|---|---|---|---|"
  ]
  for r in result["rows"]:
    rms = f"{r['rms_to_ode']:.2e}" if "rms_to_ode" in r else "-"
    lines.append(f"| {r['sampler']} | {r['spacing'] or '-'} | {r['steps']} | "
                 f"{r['calls']} | {r['fit_error']:.3f} | {r['sw2']:.4f} | "
                 f"{rms} | {r['us_per_sample']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--points", type=int, default=20_000)
  parser.add_argument("--calls", default="5,10,20,50")
  parser.add_argument("--samplers", default=",".join(samplers.SAMPLER_NAMES))
  parser.add_argument("--spacings", default=",".join(samplers.SOLVER_SPACINGS))
  parser.add_argument("--schedule", default="linear",
                      choices=schedules.SCHEDULE_NAMES)
  parser.add_argument("--num-timesteps", type=int, default=1000)
  parser.add_argument("--reference-steps", type=int, default=1000)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--md", help="write the markdown table here")
  args = parser.parse_args(argv)

  schedule = schedules.make_schedule(args.schedule, args.num_timesteps)
  x_T = jax.random.normal(jax.random.key(3), (args.points, 2))
  data, _ = testing.sample(MIX, jax.random.key(1), args.points)
  data_2, _ = testing.sample(MIX, jax.random.key(2), args.points)
  reference = make_sampler("dpmpp_3m", schedule, args.reference_steps,
                           "logsnr")(x_T)
  result = dict(
      schedule=args.schedule, num_timesteps=args.num_timesteps,
      points=args.points, backend=jax.default_backend(),
      load_average=os.getloadavg(), floor=dict(
          fit_error=fit_error(data), sw2=float(
              testing.sliced_wasserstein(data_2, data, key=jax.random.key(4))),
          ode_fit_error=fit_error(reference), ode_sw2=float(
              testing.sliced_wasserstein(reference, data,
                                         key=jax.random.key(4)))), rows=[])
  calls = [int(c) for c in args.calls.split(",")]
  for name in args.samplers.split(","):
    budgets = calls
    if name == "ddim" and 100 not in calls and args.num_timesteps >= 100:
      budgets = calls + [100]  # The target: DPM-Solver++ at 20 vs DDIM 100.
    spacings = ([None] if name in ("ddpm",
                                   "ddim") else args.spacings.split(","))
    for spacing in spacings:
      for budget in budgets:
        row = measure(name, schedule, budget, spacing, x_T, data, reference,
                      runs=args.runs)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
  table = markdown(result)
  print(table)
  if args.md:
    pathlib.Path(args.md).write_text(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
