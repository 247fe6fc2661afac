"""Sampling from a trained model: grids during training and `--mode=sample`.

The samplers themselves are the pure functions of `ddpm_jax.sampling`; this
module binds them to a model, its parameters and the run's config, and writes
PNG grids, GIFs and .npz files.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, images, sampling
from ddpm_jax.schedules import Schedule


def make_model_fn(model: nn.Module) -> Callable[[Any], diffusion.ModelFn]:
  """params -> the denoiser `(x_t, t) -> output` of `model` in eval mode."""
  def bind(params):
    return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
  return bind


def sampler_options(config) -> tuple[str, dict[str, Any]]:
  """The sampler of `config.sample` and its keyword options.

  Returns:
    (sampler name, options for `ddpm_sample` / `ddim_sample` other than the
    shape, key, start and trajectory).
  """
  sample, diff = config.sample, config.diffusion
  if sample.sampler == "ddim":
    return "ddim", dict(num_steps=int(sample.ddim_steps), eta=float(sample.eta),
                        spacing=sample.ddim_spacing, target=diff.target,
                        clip_x0=bool(diff.clip_x0))
  return "ddpm", dict(target=diff.target, var_type=diff.var_type,
                      mean_form=diff.mean_form, clip_x0=bool(diff.clip_x0))


def _num_chain_steps(config, schedule: Schedule) -> int:
  if config.sample.sampler == "ddim":
    return int(config.sample.ddim_steps)
  return schedule.num_timesteps


def sample_with_trajectory(model: nn.Module, params, schedule: Schedule,
                           config, *, num_images: int, key: jax.Array,
                           mesh: Mesh) -> sampling.SampleOutput:
  """One batch of samples and about `config.sample.gif_frames` frames of
  their denoising chain, replicated on every device of `mesh`.

  Every process must call it (the parameters live on the whole mesh).
  """
  name, options = sampler_options(config)
  frames = max(1, int(config.sample.gif_frames))
  every = max(1, math.ceil(_num_chain_steps(config, schedule) / frames))
  sample_fn = sampling.ddim_sample if name == "ddim" else sampling.ddpm_sample
  image_shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  bound = make_model_fn(model)

  def run(p, s, k):
    return sample_fn(bound(p), s, shape=(num_images,) + image_shape, key=k,
                     trajectory_every=every, **options)

  return jax.jit(run, out_shardings=NamedSharding(mesh, P()))(
      params, schedule, key)


def write_samples(out: sampling.SampleOutput, directory: str, name: str, *,
                  gif: bool) -> list[str]:
  """Writes `name.png` (a grid of the final images) and optionally
  `name.gif` (the denoising chain) to `directory`. Returns the paths."""
  os.makedirs(directory, exist_ok=True)
  final = np.asarray(out.images)
  nrow = max(1, int(math.ceil(math.sqrt(final.shape[0]))))
  paths = [os.path.join(directory, f"{name}.png")]
  images.save_image_grid(final, paths[0], nrow=nrow)
  if gif:
    paths.append(os.path.join(directory, f"{name}.gif"))
    images.save_gif(np.asarray(out.trajectory), paths[1], nrow=nrow)
  return paths


def save_training_samples(model: nn.Module, params, schedule: Schedule,
                          config, *, step: int, workdir: str, key: jax.Array,
                          mesh: Mesh, gif: bool) -> None:
  """Samples a grid from `params` (the EMA) into `<workdir>/samples/`.

  Called by every process; only process 0 writes.
  """
  num = min(int(config.sample.num_images), 64)
  out = sample_with_trajectory(model, params, schedule, config,
                               num_images=num, key=jax.random.fold_in(key, step),
                               mesh=mesh)
  if jax.process_index() == 0:
    paths = write_samples(out, os.path.join(workdir, "samples"),
                          f"step_{step:08d}", gif=gif)
    logging.info("Step %d: wrote %s.", step, ", ".join(paths))


def sample_to_files(model: nn.Module, params, schedule: Schedule, config, *,
                    step: int, workdir: str, mesh: Mesh) -> dict[str, Any]:
  """`--mode=sample`: `config.sample.num_images` images from `params`.

  Writes `<workdir>/samples/sample_step_N.npz` (uint8 'images' [N, H, W, C]),
  a PNG grid of the first 64 and, with `config.sample.gif`, a GIF of one
  chain's frames. Every process must call it; process 0 writes.

  Returns:
    {'images_per_sec': float, 'paths': [str], 'num_images': int}.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), step)
  grid_key, sample_key = jax.random.split(key)
  name, options = sampler_options(config)
  image_shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  num_images = int(config.sample.num_images)
  start = time.perf_counter()
  uint8 = sampling.generate(make_model_fn(model), params, schedule,
                            num_images=num_images,
                            batch_size=int(config.sample.batch_size),
                            image_shape=image_shape, key=sample_key,
                            sampler=name, mesh=mesh, **options)
  seconds = time.perf_counter() - start
  result = dict(images_per_sec=num_images / seconds, num_images=num_images,
                paths=[])
  directory = os.path.join(workdir, "samples")
  stem = f"sample_step_{step:08d}"
  out = None
  if config.sample.gif:
    out = sample_with_trajectory(model, params, schedule, config,
                                 num_images=min(num_images, 16), key=grid_key,
                                 mesh=mesh)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    npz_path = os.path.join(directory, f"{stem}.npz")
    np.savez_compressed(npz_path, images=uint8)
    grid_path = os.path.join(directory, f"{stem}.png")
    shown = uint8[:64]
    images.save_image_grid(shown, grid_path,
                           nrow=max(1, math.ceil(math.sqrt(len(shown)))))
    result["paths"] = [npz_path, grid_path]
    if out is not None:
      gif_path = os.path.join(directory, f"{stem}.gif")
      images.save_gif(np.asarray(out.trajectory), gif_path,
                      nrow=max(1, math.ceil(math.sqrt(out.images.shape[0]))))
      result["paths"].append(gif_path)
    logging.info("Sampled %d images with %s in %.1f s (%.1f images/s, "
                 "compilation included): %s", num_images, name, seconds,
                 result["images_per_sec"], ", ".join(result["paths"]))
  return result
