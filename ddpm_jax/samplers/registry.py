"""Every sampler by name, its options and its number of network calls."""

from __future__ import annotations

from typing import Callable

from ddpm_jax._checks import check_choice
from ddpm_jax.diffusion import processes
from ddpm_jax.samplers import chain, ddim, ddpm, edm, solvers

# Every sampler by name. Each is called as
#   fn(model_fn, schedule, *, shape=... or x_T=..., key=...,
#      trajectory_every=None, **options)
# with the options of SAMPLER_OPTIONS[name]. 'ddpm' runs every step of the
# schedule it is given: for fewer steps pass a respaced schedule and model
# (`ddpm_jax.diffusion.respace`).
SAMPLER_FNS: dict[str, Callable[..., chain.SampleOutput]] = {
    "ddpm": ddpm.ddpm_sample,
    "ddim": ddim.ddim_sample,
    "euler": solvers.euler_sample,
    "heun": solvers.heun_sample,
    "dpmpp_2m": solvers.dpmpp_2m_sample,
    "dpmpp_2m_sde": solvers.dpmpp_2m_sde_sample,
    "dpmpp_3m": solvers.dpmpp_3m_sample,
    "edm": edm.edm_sample,
}
SAMPLER_NAMES = tuple(SAMPLER_FNS)

_SOLVER_OPTIONS = ("num_steps", "spacing", "target", "clip_x0")
# The keyword options of each sampler besides shape, key, x_T and
# trajectory_every:
#   ddpm: target, var_type ('fixed_large', 'fixed_small', 'learned',
#     'learned_range'), mean_form ('x0', 'eps'), clip_x0.
#   ddim: num_steps, eta in [0, 1], spacing ('uniform', 'quadratic'), target,
#     clip_x0.
#   euler, heun, dpmpp_*: num_steps, spacing ('uniform', 'logsnr',
#     'karras', and on a Schedule 'leading', 'trailing'), target, clip_x0.
#   edm: the solver options and s_churn, s_tmin, s_tmax, s_noise.
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddpm": ("target", "var_type", "mean_form", "clip_x0"),
    "ddim": ("num_steps", "eta", "spacing", "target", "clip_x0"),
    **{
        name: _SOLVER_OPTIONS for name in SAMPLER_NAMES[2:-1]
    },
    "edm": _SOLVER_OPTIONS + ("s_churn", "s_tmin", "s_tmax", "s_noise"),
}
# Samplers that draw noise at every step and so need `key` even with x_T
# (ddim too when eta > 0, edm when s_churn > 0).
STOCHASTIC_SAMPLERS = ("ddpm", "dpmpp_2m_sde")
# The samplers that run on each process (`processes.PROCESS_NAMES`): ddpm and
# ddim step the discrete schedule (on a continuous process euler is DDIM with
# eta = 0); edm's churn needs the EDM process's continuous sigma.
_ODE_SDE = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")
PROCESS_SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddpm", "ddim") + _ODE_SDE,
    "edm": _ODE_SDE + ("edm",),
    "flow": _ODE_SDE,
}


def check_sampler_process(name: str, process_name: str) -> None:
  """Raises a ValueError unless sampler `name` runs on process `process_name`.

  Example:
    >>> check_sampler_process("ddim", "flow")
    Traceback (most recent call last):
    ValueError: sampler 'ddim' does not apply to the 'flow' process; ...
  """
  check_choice("sampler", name, SAMPLER_NAMES)
  check_choice("process", process_name, processes.PROCESS_NAMES)
  allowed = PROCESS_SAMPLERS[process_name]
  if name not in allowed:
    raise ValueError(f"sampler {name!r} does not apply to the {process_name!r}"
                     f" process; use one of {', '.join(allowed)}.")


def get_sampler(name: str) -> Callable[..., chain.SampleOutput]:
  """The sampler function called `name` (see `SAMPLER_FNS`).

  Raises:
    ValueError: for an unknown name, listing the known ones.

  Example:
    >>> fn = get_sampler("dpmpp_2m")
    >>> out = fn(model_fn, sched, shape=(4, 32, 32, 3), key=key, num_steps=20)
  """
  check_choice("sampler", name, SAMPLER_NAMES)
  return SAMPLER_FNS[name]


def num_model_calls(name: str, num_steps: int) -> int:
  """Network calls of sampler `name` with `num_steps` steps.

  Heun and edm make two per step except the last (2S - 1); every other
  sampler one per step. For 'ddpm', `num_steps` is the number of steps of
  the (respaced) schedule it runs over.

  Raises:
    ValueError: for an unknown name or num_steps < 1.

  Example:
    >>> num_model_calls("heun", 10), num_model_calls("dpmpp_2m", 10)
    (19, 10)
  """
  check_choice("sampler", name, SAMPLER_NAMES)
  chain.check_int("num_steps", num_steps, low=1)
  return 2 * num_steps - 1 if name in ("heun", "edm") else num_steps
