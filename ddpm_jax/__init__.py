"""ddpm_jax: denoising diffusion models (DDPM, DDIM and fast solvers) in JAX.

The names research code uses, one import away:

  >>> import ddpm_jax as dj
  >>> sched = dj.make_schedule("cosine", 1000)
  >>> x_t = dj.q_sample(sched, x0, t, noise)
  >>> out = dj.ddim_sample(model_fn, sched, shape=(16, 32, 32, 3),
  ...                      key=jax.random.key(0), num_steps=50)

Subpackages, along the layers of the library:
  diffusion: schedules, the forward process, the continuous processes (EDM,
    flow matching), losses, likelihoods, respacing, guidance and test
    oracles; no network in sight.
  samplers: every sampler (one `lax.scan` each) and the registry by name.
  models: the U-Net, its typed config and presets, pretrained readers.
  metrics: FID, Inception Score, KID and the FID Inception.
  data: `create_dataset` over every input source.
  engine: the run config and its builders, train state and step, the loop,
    checkpoints, inference, generation, evaluation.
  infra: paths (local or gs://), devices and hosts, image files, CPU flags.
  tools: command-line tools besides `python -m ddpm_jax.main`.

Importing `ddpm_jax` imports nothing else: each name below loads its module on
first use, so JAX and Flax settings can still be made after the import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    # Schedules and the forward process.
    "Schedule": "ddpm_jax.diffusion.schedules",
    "make_schedule": "ddpm_jax.diffusion.schedules",
    "q_sample": "ddpm_jax.diffusion.gaussian",
    "predict_x0_eps": "ddpm_jax.diffusion.gaussian",
    "p_mean_variance": "ddpm_jax.diffusion.gaussian",
    # Losses and likelihood.
    "training_losses": "ddpm_jax.diffusion.losses",
    "process_loss": "ddpm_jax.diffusion.losses",
    "EDM": "ddpm_jax.diffusion.processes",
    "Flow": "ddpm_jax.diffusion.processes",
    "precondition": "ddpm_jax.diffusion.processes",
    "ode_log_likelihood": "ddpm_jax.diffusion.ode_likelihood",
    "denoising_loss": "ddpm_jax.diffusion.losses",
    "loss_weights": "ddpm_jax.diffusion.losses",
    "variational_bound": "ddpm_jax.diffusion.likelihood",
    # Guidance.
    "classifier_free_guidance": "ddpm_jax.diffusion.guidance",
    "drop_labels": "ddpm_jax.diffusion.guidance",
    # Samplers.
    "SampleOutput": "ddpm_jax.samplers.chain",
    "ddpm_sample": "ddpm_jax.samplers.ddpm",
    "ddim_sample": "ddpm_jax.samplers.ddim",
    "ddim_invert": "ddpm_jax.samplers.ddim",
    "euler_sample": "ddpm_jax.samplers.solvers",
    "heun_sample": "ddpm_jax.samplers.solvers",
    "dpmpp_2m_sample": "ddpm_jax.samplers.solvers",
    "dpmpp_2m_sde_sample": "ddpm_jax.samplers.solvers",
    "dpmpp_3m_sample": "ddpm_jax.samplers.solvers",
    "edm_sample": "ddpm_jax.samplers.edm",
    "get_sampler": "ddpm_jax.samplers.registry",
    "num_model_calls": "ddpm_jax.samplers.registry",
    # Networks.
    "UNet": "ddpm_jax.models.unet",
    "count_params": "ddpm_jax.models.unet",
    "UNetConfig": "ddpm_jax.models.config",
    "unet_config": "ddpm_jax.models.config",
    "PRESETS": "ddpm_jax.models.config",
    "DiT": "ddpm_jax.models.dit",
    "DiTConfig": "ddpm_jax.models.dit_config",
    "dit_config": "ddpm_jax.models.dit_config",
    "DIT_PRESETS": "ddpm_jax.models.dit_config",
    "load_diffusers": "ddpm_jax.models.pretrained",
    # Data.
    "create_dataset": "ddpm_jax.data.pipeline",
    # Runs: config, training, a trained model.
    "load_config": "ddpm_jax.engine.config",
    "validate_config": "ddpm_jax.engine.config",
    "train_and_evaluate": "ddpm_jax.engine.train",
    "Trained": "ddpm_jax.engine.inference",
    "load_trained": "ddpm_jax.engine.inference",
    "generate": "ddpm_jax.engine.generation",
    # Images.
    "make_grid": "ddpm_jax.infra.images",
    "save_image_grid": "ddpm_jax.infra.images",
    "save_gif": "ddpm_jax.infra.images",
}
_SUBPACKAGES = ("data", "diffusion", "engine", "infra", "metrics", "models",
                "samplers", "tools")

__all__ = sorted(_API) + list(_SUBPACKAGES)


def __getattr__(name: str) -> Any:
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
  elif name in _SUBPACKAGES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # What editors and type checkers see.
  from ddpm_jax import (
      data,
      diffusion,
      engine,
      infra,
      metrics,
      models,
      samplers,
      tools,
  )
  from ddpm_jax.data.pipeline import create_dataset
  from ddpm_jax.diffusion.gaussian import (
      p_mean_variance,
      predict_x0_eps,
      q_sample,
  )
  from ddpm_jax.diffusion.guidance import classifier_free_guidance, drop_labels
  from ddpm_jax.diffusion.likelihood import variational_bound
  from ddpm_jax.diffusion.losses import (
      denoising_loss,
      loss_weights,
      process_loss,
      training_losses,
  )
  from ddpm_jax.diffusion.ode_likelihood import ode_log_likelihood
  from ddpm_jax.diffusion.processes import EDM, Flow, precondition
  from ddpm_jax.diffusion.schedules import Schedule, make_schedule
  from ddpm_jax.engine.config import load_config, validate_config
  from ddpm_jax.engine.generation import generate
  from ddpm_jax.engine.inference import Trained, load_trained
  from ddpm_jax.engine.train import train_and_evaluate
  from ddpm_jax.infra.images import make_grid, save_gif, save_image_grid
  from ddpm_jax.models.config import PRESETS, UNetConfig, unet_config
  from ddpm_jax.models.dit import DiT
  from ddpm_jax.models.dit_config import DIT_PRESETS, DiTConfig, dit_config
  from ddpm_jax.models.pretrained import load_diffusers
  from ddpm_jax.models.unet import UNet, count_params
  from ddpm_jax.samplers.chain import SampleOutput
  from ddpm_jax.samplers.ddim import ddim_invert, ddim_sample
  from ddpm_jax.samplers.ddpm import ddpm_sample
  from ddpm_jax.samplers.edm import edm_sample
  from ddpm_jax.samplers.registry import get_sampler, num_model_calls
  from ddpm_jax.samplers.solvers import (
      dpmpp_2m_sample,
      dpmpp_2m_sde_sample,
      dpmpp_3m_sample,
      euler_sample,
      heun_sample,
  )
