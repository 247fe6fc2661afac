"""Samples from a model, many at a time: the sharded batch driver
`generate`, sample grids during training and `--mode=sample`'s files.

The samplers themselves are the pure functions of `ddpm_jax.samplers`;
`builders.build_sampler` binds one to the run's options (respacing and
classifier-free guidance included), once per run, in the run's
`builders.Sampling` with the sample settings. Here a sampler runs over
the 'data' mesh and its images are written as PNG grids, GIFs and .npz.
Class-conditional runs sample the classes of `Sampling.labels`; their
grids show one row per class (unless `sample.class_id` picks one). Every
process of a multi-host run calls these functions; process 0 writes.

Example:
  >>> run = builders.build_run(config)
  >>> trained = inference.restore_trained(run, workdir)
  >>> images = generate(trained.bind, trained.params, trained.schedule,
  ...                   sample_fn=run.sampling.sampler.fn,
  ...                   num_images=1000, batch_size=250,
  ...                   image_shape=run.image_shape, key=jax.random.key(0),
  ...                   mesh=trained.mesh, labels=run.sampling.labels(1000))
  >>> images.shape  # uint8
  (1000, 32, 32, 3)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import samplers
from ddpm_jax.diffusion.schedules import Schedule
from ddpm_jax.engine import builders
from ddpm_jax.engine.inference import Trained
from ddpm_jax.infra import images, parallel, storage
from ddpm_jax.typing import PyTree


def generate(make_model_fn_: Callable[[PyTree], Callable[..., jax.Array]],
             params: PyTree, schedule: Schedule, *,
             sample_fn: Callable[..., samplers.SampleOutput], num_images: int,
             batch_size: int, image_shape: tuple[int, ...], key: jax.Array,
             mesh: Mesh, labels: Optional[np.ndarray] = None) -> np.ndarray:
  """Samples `num_images` uint8 images in batches sharded over `mesh`.

  One function is jitted and compiled once for all batches; batch i uses key
  `fold_in(key, i)` and equals `sample_fn(model_fn, schedule, x_T=x_T,
  key=that key)` with x_T ~ N(0, I) (times the process's `prior_std`,
  sigma_max on EDM) drawn from `split(that key)[0]` (what
  the samplers draw themselves for `shape=(batch_size,) + image_shape`),
  plus `labels=` its slice of `labels` when given.
  x_T (and the labels) are sharded over the mesh's 'data' axis on the batch
  dimension; `params` and `schedule` are jit arguments, replicated over the
  mesh. The last batch is sampled in full (its labels continued from the
  start of `labels`) and cut to `num_images`. Every process gets all images.

  Args:
    make_model_fn_: params -> denoiser, called inside the jitted function
      (e.g. `inference.make_model_fn(unet)` or `Trained.bind`).
    params: pytree of model parameters.
    schedule: the diffusion schedule.
    sample_fn: a sampler with its options bound
      (`builders.build_sampler(config).fn`, or e.g.
      `functools.partial(samplers.ddim_sample, num_steps=50)`).
    num_images: N >= 1.
    batch_size: images per batch, a multiple of the mesh's 'data' size.
    image_shape: (H, W, C).
    key: PRNG key.
    mesh: a `Mesh` with a 'data' axis.
    labels: optional int [N], the class of each image, passed to
      `sample_fn` as `labels` (class-conditional runs).

  Returns:
    uint8 numpy array [N, H, W, C].

  Raises:
    ValueError: for bad counts, labels that are not N, a mesh without 'data'
      or a batch size the 'data' axis does not divide.
  """
  for name, value in (("num_images", num_images), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  if labels is not None and np.shape(labels) != (num_images,):
    raise ValueError(f"labels must have shape ({num_images},), got "
                     f"{np.shape(labels)}.")
  if parallel.DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh needs a '{parallel.DATA_AXIS}' axis, got axes "
                     f"{mesh.axis_names}.")
  if batch_size % mesh.shape[parallel.DATA_AXIS]:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the "
                     f"mesh's '{parallel.DATA_AXIS}' size "
                     f"{mesh.shape[parallel.DATA_AXIS]}.")
  shape = (batch_size,) + tuple(image_shape)
  batch_sharding = parallel.data_sharded(mesh)
  replicated = parallel.replicated(mesh)
  num_batches = math.ceil(num_images / batch_size)

  def one_batch(params, schedule, batch_key, batch_labels):
    x_T = jax.random.normal(jax.random.split(batch_key)[0], shape)
    if samplers.prior_std(schedule) != 1.0:
      x_T = samplers.prior_std(schedule) * x_T  # EDM: sigma_max.
    x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    label_kwargs = {}
    if batch_labels is not None:
      label_kwargs["labels"] = jax.lax.with_sharding_constraint(
          batch_labels, batch_sharding)
    out = sample_fn(make_model_fn_(params), schedule, x_T=x_T, key=batch_key,
                    **label_kwargs)
    return images.to_uint8(out.images)

  if labels is None:
    batch_labels = [None] * num_batches
  else:
    batch_labels = np.resize(np.asarray(labels, np.int32),
                             num_batches * batch_size).reshape(
                                 num_batches, batch_size)
  # Gathered to every device, so every host can read the whole batch.
  sample_batch = jax.jit(one_batch, out_shardings=replicated)
  params, schedule = jax.device_put((params, schedule), replicated)
  batches = [
      parallel.host_value(
          sample_batch(params, schedule, jax.random.fold_in(key, i),
                       batch_labels[i])) for i in range(num_batches)
  ]
  return np.concatenate(batches)[:num_images]


def sample_with_trajectory(
    trained: Trained, sampler: builders.Sampler, *, image_shape: tuple[int, int,
                                                                       int],
    num_images: int, num_frames: int, key: jax.Array,
    labels: Optional[np.ndarray] = None) -> samplers.SampleOutput:
  """One batch of samples and about `num_frames` frames of their chain,
  replicated on every device of the run's mesh (all processes call it);
  `labels` int [num_images] for a class-conditional run."""
  every = max(1, math.ceil(sampler.num_steps / max(1, num_frames)))
  label_kwargs = {} if labels is None else {"labels": labels}

  def run(params, schedule, key, label_kwargs):
    return sampler.fn(trained.bind(params), schedule,
                      shape=(num_images,) + tuple(image_shape), key=key,
                      trajectory_every=every, **label_kwargs)

  out = jax.jit(run, out_shardings=parallel.replicated(trained.mesh))(
      trained.params, trained.schedule, key, label_kwargs)
  return jax.tree.map(parallel.host_value, out)


def class_rows(labels: np.ndarray, num_classes: int, *,
               max_images: int = 64) -> tuple[np.ndarray, int]:
  """The images a grid of samples of every class shows, one row per class.

  Args:
    labels: int [N], the class of each sample.
    num_classes: C.
    max_images: the grid shows at most this many images.

  Returns:
    (indices into the N samples, images per row): per class in order, its
    first max(1, min(N, max_images) // C) samples.

  Example:
    >>> class_rows(np.arange(25) % 10, 10)
    (array([ 0, 10,  1, 11,  2, 12, ...,  9, 19]), 2)
  """
  labels = np.asarray(labels)
  per_row = max(1, min(len(labels), max_images) // num_classes)
  indices = [np.flatnonzero(labels == c)[:per_row] for c in range(num_classes)]
  return np.concatenate(indices), per_row


def write_samples(out: samplers.SampleOutput, directory: epath.PathLike,
                  name: str, *, gif: bool,
                  nrow: Optional[int] = None) -> list[epath.Path]:
  """Writes `name.png` (a grid of the final images, `nrow` per row, default
  about square) and optionally `name.gif` (the denoising chain) to
  `directory`. Returns the paths."""
  directory = storage.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  final = np.asarray(out.images)
  nrow = images.grid_nrow(len(final)) if nrow is None else nrow
  paths = [directory / f"{name}.png"]
  images.save_image_grid(final, paths[0], nrow=nrow)
  if gif:
    paths.append(directory / f"{name}.gif")
    images.save_gif(np.asarray(out.trajectory), paths[1], nrow=nrow)
  return paths


def save_data_grid(batch_images, workdir: epath.PathLike) -> epath.Path:
  """Writes `<workdir>/samples/data.png`: up to 64 real images of a data
  batch [N, H, W, C] (floats in [-1, 1] or uint8) drawn as the sample grids
  are (`images.data_grid`), to compare them with. Returns the path."""
  directory = storage.as_path(workdir) / "samples"
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / "data.png"
  images.save_png(images.data_grid(batch_images), path)
  return path


def save_training_samples(trained: Trained, sampling: builders.Sampling, *,
                          key: jax.Array, workdir: epath.PathLike,
                          gif: bool) -> None:
  """A grid of up to 64 samples from the EMA parameters in
  `<workdir>/samples/step_N.png` (and `.gif`); process 0 writes. A
  class-conditional run's grid has one row per class of 64 // C samples (at
  least one), or shows `sample.class_id` alone.

  Args:
    trained: the model with the train state's EMA parameters, at its step.
    sampling: the run's sampler and sample settings
      (`builders.build_run(config).sampling`).
    key: the run's sample stream; the grid of step N uses `fold_in(key, N)`.
    workdir: the training workdir.
    gif: also write the GIF of the denoising chain.
  """
  count = min(sampling.num_images, 64)
  if sampling.by_class:
    count = trained.num_classes * max(1, count // trained.num_classes)
  labels = sampling.labels(count)
  out = sample_with_trajectory(trained, sampling.sampler,
                               image_shape=sampling.image_shape,
                               num_images=count, num_frames=sampling.gif_frames,
                               key=jax.random.fold_in(key, trained.step),
                               labels=labels)
  nrow = None
  if sampling.by_class:
    order, nrow = class_rows(labels, trained.num_classes)
    out = out._replace(
        images=out.images[order],
        trajectory=None if out.trajectory is None else out.trajectory[:, order])
  if jax.process_index() == 0:
    paths = write_samples(out,
                          storage.as_path(workdir) / "samples",
                          f"step_{trained.step:08d}", gif=gif, nrow=nrow)
    logging.info("Step %d: wrote %s.", trained.step, ", ".join(map(str, paths)))


def _write_sample_files(uint8: np.ndarray, labels: Optional[np.ndarray],
                        chains: Optional[samplers.SampleOutput], *,
                        by_class: bool, num_classes: int, directory: epath.Path,
                        stem: str) -> list[str]:
  """`stem`.npz, .png (and .gif of `chains`) in `directory`; their paths."""
  directory.mkdir(parents=True, exist_ok=True)
  npz_path = directory / f"{stem}.npz"
  arrays = dict(images=uint8)
  if labels is not None:
    arrays["labels"] = labels
  with npz_path.open("wb") as f:
    np.savez_compressed(f, **arrays)
  grid_path = directory / f"{stem}.png"
  if by_class:
    order, nrow = class_rows(labels, num_classes)
    shown = uint8[order]
  else:
    shown = uint8[:64]
    nrow = images.grid_nrow(len(shown))
  images.save_image_grid(shown, grid_path, nrow=nrow)
  paths = [str(npz_path), str(grid_path)]
  if chains is not None:
    gif_path = directory / f"{stem}.gif"
    images.save_gif(chains.trajectory, gif_path,
                    nrow=images.grid_nrow(chains.images.shape[0]))
    paths.append(str(gif_path))
  return paths


def sample_to_files(trained: Trained, sampling: builders.Sampling, *, seed: int,
                    workdir: epath.PathLike) -> dict[str, Any]:
  """`--mode=sample`: `sampling.num_images` images from `trained`.

  Writes `<workdir>/samples/sample_step_N.npz` (uint8 'images' [N, H, W, C],
  and for a class-conditional run int32 'labels' [N]), a PNG grid of the
  first 64 (of a class-conditional run over all classes: one row per class)
  and, with `sampling.gif`, a GIF of 16 chains. Every process must call it;
  process 0 writes.

  Args:
    trained: the model and its EMA parameters (`inference.load_trained`).
    sampling: the run's sampler and sample settings
      (`builders.build_run(config).sampling`).
    seed: the run's seed; the images use `fold_in(PRNGKey(seed), N)`.
    workdir: the training workdir.

  Returns:
    {'images_per_sec': float, 'paths': [str], 'num_images': int}.

  Example:
    >>> run = builders.build_run(config)
    >>> result = sample_to_files(inference.restore_trained(run, workdir),
    ...                          run.sampling, seed=run.seed, workdir=workdir)
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), trained.step)
  grid_key, sample_key = jax.random.split(key)
  sampler, num_images = sampling.sampler, sampling.num_images
  labels = sampling.labels(num_images)
  start = time.perf_counter()
  uint8 = generate(trained.bind, trained.params, trained.schedule,
                   sample_fn=sampler.fn, num_images=num_images,
                   batch_size=sampling.batch_size,
                   image_shape=sampling.image_shape, key=sample_key,
                   mesh=trained.mesh, labels=labels)
  seconds = time.perf_counter() - start
  result = dict(images_per_sec=num_images / seconds, num_images=num_images,
                paths=[])
  chains = None
  if sampling.gif:
    num_chains = min(num_images, 16)
    chains = sample_with_trajectory(trained, sampler,
                                    image_shape=sampling.image_shape,
                                    num_images=num_chains,
                                    num_frames=sampling.gif_frames,
                                    key=grid_key,
                                    labels=sampling.labels(num_chains))
  if jax.process_index() == 0:
    result["paths"] = _write_sample_files(
        uint8, labels, chains, by_class=sampling.by_class,
        num_classes=trained.num_classes,
        directory=storage.as_path(workdir) / "samples",
        stem=f"sample_step_{trained.step:08d}")
    guided = (f", guidance scale {sampling.guidance_scale:g}"
              if trained.num_classes else "")
    logging.info(
        "Sampled %d images with %s (%d network calls each%s) in "
        "%.1f s (%.1f images/s, compilation included): %s", num_images,
        sampler.name, sampler.num_calls, guided, seconds,
        result["images_per_sec"], ", ".join(result["paths"]))
  return result
