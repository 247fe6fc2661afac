"""The config, turned into objects: model, schedule, optimizer, train step,
dataset and sampler.

These are the only functions that read a run config (`ddpm_jax.engine.config`);
everything they build is plain library objects with keyword options, so
research code can skip them and call the library directly.

Example:
  >>> model = build_model(config)
  >>> schedule = build_schedule(config)
  >>> tx = build_optimizer(config)
  >>> sampler = build_sampler(config)
  >>> out = sampler.fn(model_fn, schedule, shape=(16, 32, 32, 3), key=key)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import numpy as np
import optax
from jax.sharding import Mesh

from ddpm_jax import samplers
from ddpm_jax.data.common import DatasetIterator
from ddpm_jax.diffusion import (
    guidance,
    losses,
    processes,
    respace,
    thresholding,
)
from ddpm_jax.diffusion.schedules import Schedule, make_schedule
from ddpm_jax.engine import optim, train_step
from ddpm_jax.engine.config import model_config
from ddpm_jax.infra import parallel


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the run's images."""
  size = int(config.data.image_size)
  return (size, size, int(config.data.channels))


def build_model(config) -> nn.Module:
  """The U-Net, or for a DiT preset the DiT, of `config.model` (a preset
  name plus field overrides)."""
  # Imported here: importing the models touches the XLA backend, which must
  # wait for `parallel.initialize_distributed`.
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  net = model_config(config)
  if isinstance(net, models.DiTConfig):
    return models.DiT(config=net)
  return models.UNet(config=net)


def build_mesh(config, devices=None) -> Mesh:
  """The run's mesh over `devices` (default all): data parallel, or FSDP
  over `config.train.fsdp` devices (`parallel.create_mesh`)."""
  return parallel.create_mesh(devices, fsdp=int(config.train.fsdp))


def build_schedule(config) -> processes.Process:
  """The process of `config.diffusion`: the `Schedule` for process 'ddpm',
  else `processes.EDM` or `processes.Flow` with its options (what the train
  step, samplers and `Trained.schedule` take)."""
  diff = config.diffusion
  if diff.process == "edm":
    edm = diff.edm
    return processes.EDM(sigma_min=float(edm.sigma_min),
                         sigma_max=float(edm.sigma_max), rho=float(edm.rho),
                         sigma_data=float(edm.sigma_data),
                         p_mean=float(edm.p_mean), p_std=float(edm.p_std))
  if diff.process == "flow":
    flow = diff.flow
    return processes.Flow(time_sampling=flow.time_sampling,
                          location=float(flow.location),
                          scale=float(flow.scale), shift=float(flow.shift))
  return make_schedule(diff.schedule, int(diff.num_timesteps),
                       beta_start=float(diff.beta_start),
                       beta_end=float(diff.beta_end))


def _optimizer_options(config) -> dict[str, Any]:
  opt = config.optimizer
  return dict(lr=float(opt.lr), warmup_steps=int(opt.warmup_steps),
              num_steps=int(config.train.num_steps), decay=opt.decay)


def build_learning_rate_fn(config) -> optax.Schedule:
  """The learning-rate schedule of `config.optimizer`."""
  return optim.learning_rate_schedule(**_optimizer_options(config))


def build_optimizer(config) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer` (see `optim.create_optimizer`)."""
  opt = config.optimizer
  return optim.create_optimizer(**_optimizer_options(config),
                                grad_clip_norm=float(opt.grad_clip_norm),
                                weight_decay=float(opt.weight_decay),
                                b1=float(opt.b1), b2=float(opt.b2),
                                eps=float(opt.eps))


def build_train_step(config, model: nn.Module, tx: optax.GradientTransformation,
                     *, schedule: Optional[Schedule] = None,
                     axis_name: Optional[str] = None) -> Callable:
  """`train_step.train_step` with the loss, EMA and optimizer settings of
  `config` bound: `step(state, batch, rng) -> (state, metrics)`."""
  schedule = build_schedule(config) if schedule is None else schedule
  diff = config.diffusion
  t_weights = None
  if diff.process == "ddpm":
    t_weights = losses.loss_weights(schedule, weighting=diff.loss_weighting,
                                    target=diff.target,
                                    gamma=float(diff.min_snr_gamma))
  return train_step.make_train_step(
      model, tx, schedule, learning_rate_fn=build_learning_rate_fn(config),
      loss_type=diff.loss_type, target=diff.target, t_weights=t_weights,
      var_type=diff.var_type, num_classes=int(config.data.num_classes),
      p_uncond=float(config.train.p_uncond),
      ema_decay=float(config.train.ema_decay),
      ema_warmup=bool(config.train.ema_warmup), axis_name=axis_name)


def build_dataset(config, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1, training: bool = True,
                  split: Optional[str] = None) -> DatasetIterator:
  """This host's iterator over `config.data`.

  Args:
    config: the run config (`data`, `seed`).
    batch_size: images per batch on this host.
    process_index: this host's index.
    process_count: number of hosts.
    training: True: shuffled, flipped as configured, forever. False: in
      order, unflipped, one padded pass whose batches carry a 'mask'.
    split: the split to read; default `data.split` for training,
      `data.eval_split` otherwise.

  Returns:
    An iterator of {'image', 'label'(, 'mask')} batches with
    `get_state()` / `set_state()`.
  """
  from ddpm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  if split is None:
    split = data.split if training else data.eval_split
  return pipeline.create_dataset(
      data.source, split=split, batch_size=batch_size,
      image_size=int(data.image_size), channels=int(data.channels),
      resize=bool(data.resize), random_flip=bool(data.random_flip) and training,
      seed=int(config.seed), shuffle=training, repeat=training,
      process_index=process_index, process_count=process_count,
      num_classes=int(data.num_classes) or None, skip_bad_files=bool(
          data.skip_bad_files), data_dir=data.tfds_data_dir or None)


class Sampler(NamedTuple):
  """A sampler of `ddpm_jax.samplers.SAMPLER_FNS` with the run's options,
  respacing and guidance bound.

  `fn(model_fn, schedule, *, key, shape=None, x_T=None,
  trajectory_every=None, labels=None) -> samplers.SampleOutput`, where
  `schedule` is the run's process (`build_schedule(config)`: the T-step
  schedule, or EDM / Flow, whose network `model_fn` is wrapped here by
  `processes.network_model_fn`). For an
  unconditional run `model_fn` is the denoiser `(x_t, t)` and `labels` is
  None. For a class-conditional run `model_fn` is the conditional denoiser
  `(x_t, t, y)` (`inference.make_model_fn(model, conditional=True)`) and
  `labels` int [B] the class of each sample (`sample_labels`); the sampler
  runs on `guidance.classifier_free_guidance` of it with the run's scale.
  """
  name: str  # a name of samplers.SAMPLER_NAMES.
  fn: Callable[..., samplers.SampleOutput]
  num_steps: int  # steps of the reverse chain (trajectory frames count them).
  num_calls: int  # network calls per sample (each on 2B inputs if guided).


def _guided_respaced(solver: Callable[..., samplers.SampleOutput],
                     model_fn: Callable, schedule: Schedule, *,
                     num_classes: int, guidance_scale: float,
                     respaced: Optional[respace.Respaced], num_timesteps: int,
                     labels: Optional[np.ndarray] = None,
                     dynamic_threshold: float = 0.0, target: str = "eps",
                     **kwargs) -> samplers.SampleOutput:
  """`solver` on the guided (conditional runs) and respaced (respaced
  ddpm) denoiser; `schedule` is the run's, respaced here when asked."""
  if num_classes:
    if labels is None:
      raise ValueError("labels [B] are required: the run is "
                       f"class-conditional ({num_classes} classes).")
    model_fn = guidance.classifier_free_guidance(model_fn, labels=labels,
                                                 num_classes=num_classes,
                                                 scale=guidance_scale)
  elif labels is not None:
    raise ValueError("labels were given to the sampler of an unconditional "
                     "run.")
  if not isinstance(schedule, Schedule):
    model_fn = processes.network_model_fn(schedule, model_fn)
  if respaced is not None:
    if schedule.num_timesteps != num_timesteps:
      raise ValueError(f"This respaced sampler was built for the run's "
                       f"schedule of {num_timesteps} steps, got "
                       f"{schedule.num_timesteps}.")
    model_fn = respace.map_timesteps(model_fn, respaced.timesteps)
    schedule = respaced.schedule
  if dynamic_threshold:
    model_fn = thresholding.dynamic_thresholding(model_fn, schedule,
                                                 target=target,
                                                 percentile=dynamic_threshold)
  return solver(model_fn, schedule, **kwargs)


def build_sampler(config) -> Sampler:
  """The sampler of `config.sample` with its options from `config.sample`
  and `config.diffusion`, respaced DDPM (`sample.ddpm_steps`) and guidance
  (`data.num_classes`, `sample.guidance_scale`): the one place a config
  becomes a sampler."""
  sample, diff = config.sample, config.diffusion
  name = sample.sampler
  num_timesteps = int(diff.num_timesteps)
  options = dict(target=diff.target, clip_x0=bool(diff.clip_x0))
  respaced = None
  if name == "ddpm":
    options.update(var_type=diff.var_type, mean_form=diff.mean_form)
    num_steps = int(sample.ddpm_steps) or num_timesteps
    if num_steps < num_timesteps:
      # Its last step is the run's: the run's schedule warns if it misses
      # noise.
      respaced = respace.respace(
          build_schedule(config),
          respace.spaced_timesteps(num_timesteps, num_steps), warn=False)
  else:
    num_steps = int(sample.num_steps)
    options["num_steps"] = num_steps
    if name == "ddim":
      options.update(eta=float(sample.eta), spacing=sample.ddim_spacing)
    else:
      options["spacing"] = sample.solver_spacing
    if name == "edm":
      options.update(s_churn=float(sample.s_churn), s_tmin=float(sample.s_tmin),
                     s_tmax=float(sample.s_tmax) or float("inf"),
                     s_noise=float(sample.s_noise))
  fn = functools.partial(
      _guided_respaced, functools.partial(samplers.get_sampler(name),
                                          **options),
      num_classes=int(config.data.num_classes),
      guidance_scale=float(sample.guidance_scale), respaced=respaced,
      num_timesteps=num_timesteps,
      dynamic_threshold=float(sample.dynamic_threshold), target=diff.target)
  return Sampler(name=name, fn=fn, num_steps=num_steps,
                 num_calls=samplers.num_model_calls(name, num_steps))


def sample_labels(config, num_images: int) -> Optional[np.ndarray]:
  """The class of each of `num_images` samples of a class-conditional run.

  Returns:
    None for an unconditional run; else int32 [num_images]: every image of
    class `sample.class_id`, or with class_id = -1 image i of class i mod C.
  """
  num_classes = int(config.data.num_classes)
  if not num_classes:
    return None
  class_id = int(config.sample.class_id)
  if class_id >= 0:
    return np.full((num_images,), class_id, np.int32)
  return (np.arange(num_images) % num_classes).astype(np.int32)
