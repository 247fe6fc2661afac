"""Samplers of the reverse process, each one `lax.scan` over any denoiser.

Ancestral DDPM (`ddpm`), DDIM and its inversion (`ddim`), the few-step
ODE/SDE solvers Euler, Heun and DPM-Solver++ 2M / 2M-SDE / 3M (`solvers`),
EDM's stochastic sampler (`edm`), the core they share (`chain`) and the
registry by name (`registry`).

Every sampler is a pure function of a denoiser `model_fn(x_t, t)`, a
`Schedule` (or, for the solvers and edm, a continuous process of
`ddpm_jax.diffusion.processes`: `EDM`, `Flow`, where t is a float32 time;
`PROCESS_SAMPLERS` lists which sampler runs on which) and keyword options.
The whole reverse chain runs in ONE `lax.scan`, so `model_fn` is traced once
per call whatever the number of steps. Nothing is jitted here: wrap a sampler
in your own `jax.jit`, closing over `model_fn` and the options. Static
(Python) arguments: `shape`, `num_steps`, `spacing`, `eta`, `target`,
`var_type`, `mean_form`, `clip_x0`, `s_churn`, `s_tmin`, `s_tmax`,
`s_noise`, `trajectory_every`; the schedule, `key` and `x_T` may be traced.

Keys: `key` is split once into (initial-noise key, chain key); step t draws
its noise from `jax.random.fold_in(chain_key, t)`, so no key is used twice.

Sharding: the samplers only see global arrays. Give `x_T` (or constrain it
with `jax.lax.with_sharding_constraint`) sharded over a mesh's 'data' axis on
the batch dimension and the chain runs data-parallel;
`ddpm_jax.engine.generation.generate` does this.

`ddpm_jax.diffusion.respace` runs `ddpm_sample` over fewer steps.

Guidance composes with `model_fn`: any `(x_t, t) -> output` callable works, so
a guided denoiser is a wrapper (classifier-free guidance:
`ddpm_jax.diffusion.guidance.classifier_free_guidance`). For example classifier guidance
on eps
(Dhariwal & Nichol 2021, eq. 14), for a classifier `log_p_y(x_t, t) -> [B]`:

  >>> def guided_fn(x_t, t):
  ...   grad = jax.grad(lambda x: log_p_y(x, t).sum())(x_t)
  ...   sigma = gaussian.extract(sched.sqrt_one_minus_alphas_cumprod, t,
  ...                             x_t.shape)
  ...   return model_fn(x_t, t) - scale * sigma * grad
  >>> out = ddim_sample(guided_fn, sched, shape=(8, 32, 32, 3), key=key,
  ...                   num_steps=50)

Example:
  >>> sched = schedules.make_schedule("linear", 1000)
  >>> model_fn = lambda x_t, t: unet.apply({"params": params}, x_t, t,
  ...                                       train=False)
  >>> sample = jax.jit(lambda key: ddim_sample(
  ...     model_fn, sched, shape=(16, 32, 32, 3), key=key, num_steps=50))
  >>> images = sample(jax.random.key(0)).images  # [16, 32, 32, 3]
"""

from ddpm_jax.samplers.chain import SampleOutput, prior_std
from ddpm_jax.samplers.ddim import SPACINGS as DDIM_SPACINGS
from ddpm_jax.samplers.ddim import ddim_invert, ddim_sample, ddim_timesteps
from ddpm_jax.samplers.ddpm import ddpm_sample
from ddpm_jax.samplers.edm import edm_sample
from ddpm_jax.samplers.registry import (
    PROCESS_SAMPLERS,
    SAMPLER_FNS,
    SAMPLER_NAMES,
    SAMPLER_OPTIONS,
    STOCHASTIC_SAMPLERS,
    check_sampler_process,
    get_sampler,
    num_model_calls,
)
from ddpm_jax.samplers.solvers import SPACINGS as SOLVER_SPACINGS
from ddpm_jax.samplers.solvers import (
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    dpmpp_3m_sample,
    euler_sample,
    heun_sample,
    solver_timesteps,
)

__all__ = [
    "DDIM_SPACINGS",
    "PROCESS_SAMPLERS",
    "SAMPLER_FNS",
    "SAMPLER_NAMES",
    "SAMPLER_OPTIONS",
    "SOLVER_SPACINGS",
    "STOCHASTIC_SAMPLERS",
    "SampleOutput",
    "check_sampler_process",
    "ddim_invert",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "dpmpp_2m_sample",
    "dpmpp_2m_sde_sample",
    "dpmpp_3m_sample",
    "edm_sample",
    "euler_sample",
    "get_sampler",
    "heun_sample",
    "num_model_calls",
    "prior_std",
    "solver_timesteps",
]
