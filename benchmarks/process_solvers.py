"""Sample quality against network calls on the continuous processes (EDM,
flow matching), for every sampler that runs on them, on the mixture of
`benchmarks/solvers.py`.

The denoiser is exact (`testing.process_denoiser`), so every error is the
sampler's. For each process, sampler, spacing and budget of network calls
(default 5, 10, 20, 50) it reports the fit error (`benchmarks.solvers`'s:
the largest relative error of the mixture's weights, means per std and stds
fitted to the samples) and, for the deterministic samplers, the RMS distance
to the converged probability-flow ODE solution from the same x_T
(DPM-Solver++ 3M on 1000 'logsnr' levels of the same process).

  python -m benchmarks.process_solvers --md out.md

The `edm` sampler runs with S_churn = `--churn` in [0.05, 50], S_noise
1.003 (EDM's ImageNet-64 settings; churn 0 is Heun).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))  # `python benchmarks/process_solvers.py`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.solvers import MIX, fit_error  # noqa: E402
from ddpm_jax import samplers  # noqa: E402
from ddpm_jax.diffusion import processes, testing  # noqa: E402

PROCESSES = {"edm": processes.EDM(), "flow": processes.Flow()}
TARGETS = {"edm": "x0", "flow": "velocity"}
STOCHASTIC = ("dpmpp_2m_sde", "edm")


def steps_for_calls(name: str, calls: int) -> int:
  """The most steps whose network calls fit in `calls`."""
  return (calls + 1) // 2 if name in ("heun", "edm") else calls


def make_sampler(name, process_name, num_steps, spacing, *, churn=0.0):
  """A jitted x_T -> samples."""
  process = PROCESSES[process_name]
  target = TARGETS[process_name]
  model_fn = testing.process_denoiser(MIX, process, target=target)
  options = dict(num_steps=num_steps, spacing=spacing, target=target)
  if name == "edm":
    options.update(s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  fn = samplers.get_sampler(name)
  return jax.jit(lambda x: fn(model_fn, process, x_T=x, key=jax.random.key(5),
                              **options).images)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--points", type=int, default=20_000)
  parser.add_argument("--calls", default="5,10,20,50")
  parser.add_argument("--processes", default="edm,flow")
  parser.add_argument("--spacings", default=",".join(processes.SPACINGS))
  parser.add_argument("--reference-steps", type=int, default=1000)
  parser.add_argument("--churn", type=float, default=40.0)
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--md", help="write the markdown table here")
  args = parser.parse_args(argv)

  noise = jax.random.normal(jax.random.key(3), (args.points, 2))
  data, _ = testing.sample(MIX, jax.random.key(1), args.points)
  result = dict(points=args.points, floor=fit_error(data), rows=[])
  calls = [int(c) for c in args.calls.split(",")]
  for process_name in args.processes.split(","):
    x_T = PROCESSES[process_name].prior_std * noise
    reference = make_sampler("dpmpp_3m", process_name, args.reference_steps,
                             "logsnr")(x_T)
    result[f"{process_name}_ode_fit_error"] = fit_error(reference)
    for name in samplers.PROCESS_SAMPLERS[process_name]:
      for spacing in args.spacings.split(","):
        for budget in calls:
          num_steps = steps_for_calls(name, budget)
          images = make_sampler(name, process_name, num_steps, spacing,
                                churn=args.churn)(x_T)
          row = dict(process=process_name, sampler=name, spacing=spacing,
                     budget=budget, steps=num_steps,
                     calls=samplers.num_model_calls(name, num_steps),
                     fit_error=fit_error(images))
          if name not in STOCHASTIC:
            row["rms_to_ode"] = float(
                jnp.sqrt(jnp.mean(jnp.square(images - reference))))
          result["rows"].append(row)
          print(json.dumps(row), flush=True)
  table = markdown(result, calls)
  print(table)
  if args.md:
    pathlib.Path(args.md).write_text(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


def markdown(result: dict, calls: list[int]) -> str:
  """One table per process: a row per (sampler, spacing), a column per
  budget (Heun and edm: 2S - 1 <= budget calls), cells 'fit error / RMS to
  ODE'."""
  lines = [
      f"{result['points']} points; fit error of a data sample "
      f"{result['floor']:.3f}."
  ]
  by_process: dict[str, dict] = {}
  for r in result["rows"]:
    cells = by_process.setdefault(r["process"], {}).setdefault(
        (r["sampler"], r["spacing"]), {})
    rms = f" / {r['rms_to_ode']:.1e}" if "rms_to_ode" in r else ""
    cells[r["budget"]] = f"{r['fit_error']:.3f}{rms}"
  for process_name, rows in by_process.items():
    lines += [
        "", f"{process_name} (converged ODE: fit error "
        f"{result[f'{process_name}_ode_fit_error']:.3f}):", "",
        "| sampler (spacing) | " + " | ".join(f"{c} calls" for c in calls) +
        " |", "|---|" + "---|" * len(calls)
    ]
    for (name, spacing), cells in rows.items():
      row = [cells.get(c, "") for c in calls]
      lines.append(f"| {name} ({spacing}) | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
