"""Sample-quality metrics: FID, Inception Score and KID, with feature caching.

All statistics are computed in float64 numpy on features from the FID
Inception (`ddpm_jax.metrics.inception`), following the conventions of
TF's original FID / pytorch-fid (FID on the 2048-d pool features), of the
original Inception Score code (1008 logits, 10 splits) and of Binkowski et
al.'s KID (unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
random subsets; defaults of torch-fidelity).

Statistics files (`write_statistics`, `load_statistics`) are `.npz` files
with `mu` [D] and `sigma` [D, D], as TF's FID, pytorch-fid, clean-fid and
NVIDIA's EDM write them, plus optionally `features` [N, D] (needed for KID)
and `preprocessing` (the Inception input convention they were computed
with; see `ddpm_jax.metrics.inception`).

Example:
  >>> extract = make_fid_inception_extractor(variables)
  >>> ref = reference_statistics(extract, load_train_images, cache_dir="stats",
  ...                            dataset="cifar10", split="train",
  ...                            num_images=50000, batch_size=250,
  ...                            preprocessing="tensorflow")
  >>> gen = extract_features(extract, samples_uint8, batch_size=250)
  >>> mu, sigma = feature_statistics(gen.pool)
  >>> fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
  >>> inception_score(gen.logits).mean  # needs weights with the output layer
  >>> kernel_inception_distance(gen.pool, ref.features).mean
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ddpm_jax.infra import storage

# Input conventions of the FID Inception (`inception.preprocess_images`):
# the TensorFlow reference's (the default) or pytorch-fid's.
INCEPTION_PREPROCESSING = ("tensorflow", "pytorch_fid")


class FeatureStatistics(NamedTuple):
  """Gaussian moments of a feature set.

  Attributes:
    mu: mean, float64 [D].
    sigma: unbiased covariance (divisor N - 1), float64 [D, D].
  """
  mu: np.ndarray
  sigma: np.ndarray


class ScoreWithStd(NamedTuple):
  """A metric averaged over splits or subsets, with its standard deviation.

  Attributes:
    mean: the mean over splits/subsets (the reported value).
    std: their standard deviation.
  """
  mean: float
  std: float


class Features(NamedTuple):
  """Inception outputs of an image set.

  Attributes:
    pool: float32 [N, 2048] pool features.
    logits: float32 [N, 1008] logits, or None for Inception weights without
      the output layer.
  """
  pool: np.ndarray
  logits: np.ndarray | None


class ReferenceStatistics(NamedTuple):
  """Cached Inception statistics of a reference data set.

  Attributes:
    mu: float64 [D] mean of the pool features.
    sigma: float64 [D, D] covariance of the pool features.
    features: float32 [N, D] the pool features themselves (for KID), or None
      for statistics files without them.
  """
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None


def _as_feature_matrix(name: str, features) -> np.ndarray:
  """float64 [N, D] view of `features`, or a ValueError naming `name`."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"{name} must be a [N, D] matrix; got shape "
                     f"{features.shape}.")
  return features


def feature_statistics(features) -> FeatureStatistics:
  """Mean and unbiased covariance of features, in float64.

  Args:
    features: [N, D] with N >= 2.

  Returns:
    `FeatureStatistics(mu [D], sigma [D, D])`.

  Example:
    >>> mu, sigma = feature_statistics(np.random.randn(100, 8))
    >>> mu.shape, sigma.shape
    ((8,), (8, 8))
  """
  features = _as_feature_matrix("features", features)
  if features.shape[0] < 2:
    raise ValueError("Too few images: a covariance (FID) needs at least 2 "
                     f"feature vectors; got {features.shape[0]}.")
  return FeatureStatistics(mu=features.mean(axis=0),
                           sigma=np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues,
  from round-off, are clipped to 0)."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID).

  d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  The trace of the matrix square root is computed from symmetric
  eigen-decompositions, tr (sigma1 sigma2)^(1/2) = sum_i sqrt(lambda_i) with
  lambda_i the eigenvalues of the PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2)
  (similar to sigma1 sigma2). This is real by construction and exact for
  singular covariances (e.g. fewer samples than dimensions), so it needs
  neither scipy's `sqrtm` nor pytorch-fid's eps * I retry; round-off
  eigenvalues below 0 are clipped to 0.

  Args:
    mu1: mean, [D].
    sigma1: symmetric PSD covariance, [D, D].
    mu2: mean, [D].
    sigma2: symmetric PSD covariance, [D, D].

  Returns:
    The squared Fréchet distance (what FID reports) as a float.

  Example:
    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
    2.0
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  d = mu1.shape[0]
  sigma1 = _gaussian_part("sigma1", sigma1, (d, d), "mu1")
  mu2 = _gaussian_part("mu2", mu2, (d,), "mu1")
  sigma2 = _gaussian_part("sigma2", sigma2, (d, d), "mu1")
  sqrt1 = _psd_sqrt(sigma1)
  inner = sqrt1 @ sigma2 @ sqrt1
  eigvals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  tr_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) -
               2.0 * tr_covmean)


def frechet_distance_from_features(features, mu, sigma) -> float:
  """FID between the Gaussian fitted to `features` and N(mu, sigma).

  The value of `frechet_distance(*feature_statistics(features), mu, sigma)`.
  With no more feature vectors N than dimensions D it needs no D x D
  decomposition: with B the centred features divided by sqrt(N - 1), so that
  their covariance is sigma1 = B^T B, the nonzero eigenvalues of sigma1 sigma
  = B^T (B sigma) are those of the N x N PSD matrix B sigma B^T, and
  tr (sigma1 sigma)^(1/2) is the sum of their square roots (exact; one
  N x N eigenvalue problem instead of two D x D ones, milliseconds instead
  of seconds for 2,048 Inception features of a few hundred samples).

  Args:
    features: [N, D] with N >= 2.
    mu: mean, [D].
    sigma: symmetric PSD covariance, [D, D].

  Returns:
    The squared Fréchet distance as a float.

  Example:
    >>> x = np.random.default_rng(0).normal(size=(10, 64))
    >>> fid = frechet_distance_from_features(x, np.zeros(64), np.eye(64))
    >>> np.isclose(fid, frechet_distance(*feature_statistics(x), np.zeros(64),
    ...                                  np.eye(64)))
    True
  """
  features = _as_feature_matrix("features", features)
  num, d = features.shape
  if num < 2:
    feature_statistics(features)  # Its error names the count.
  mu = _gaussian_part("mu", mu, (d,), "features")
  sigma = _gaussian_part("sigma", sigma, (d, d), "features")
  if num > d:
    return frechet_distance(*feature_statistics(features), mu, sigma)
  mean = features.mean(axis=0)
  scaled = (features - mean) / np.sqrt(num - 1)
  gram = scaled @ sigma @ scaled.T
  eigvals = np.linalg.eigvalsh(0.5 * (gram + gram.T))
  tr_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
  diff = mean - mu
  return float(diff @ diff + np.sum(scaled * scaled) + np.trace(sigma) -
               2.0 * tr_covmean)


def _gaussian_part(name: str, value, shape: tuple[int, ...],
                   source: str) -> np.ndarray:
  """`value` as float64 of `shape`, or a ValueError naming it."""
  value = np.asarray(value, dtype=np.float64)
  value = np.atleast_1d(value) if len(shape) == 1 else np.atleast_2d(value)
  if value.shape != shape:
    raise ValueError(f"{name} has shape {value.shape}; expected {shape} "
                     f"for feature dimension {shape[0]} (from {source}).")
  return value


def inception_score(logits, *, splits: int = 10) -> ScoreWithStd:
  """Inception Score exp(E_x KL(p(y|x) || p(y))), over splits.

  The samples are cut into `splits` contiguous parts (sizes differ by at most
  one); in each, p(y) is the mean of p(y|x) = softmax(logits) over the part.
  The result is the mean and standard deviation of the per-part scores, as
  in the original code, which uses the 1008 FID Inception logits without
  the output bias (`InceptionOutputs.logits`).

  Args:
    logits: [N, K] class logits with N >= splits. For probabilities, pass
      their logarithm (zeros becoming -inf are fine).
    splits: number of parts.

  Returns:
    `ScoreWithStd(mean, std)`; the score lies in [1, K].

  Example:
    >>> inception_score(np.zeros((100, 1008)), splits=10).mean  # uniform
    1.0
  """
  logits = _as_feature_matrix("logits", logits)
  if splits < 1 or logits.shape[0] < splits:
    raise ValueError(f"inception_score needs 1 <= splits <= N; got "
                     f"splits={splits} with N={logits.shape[0]} samples.")
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, splits):
    p = np.exp(part)
    py = p.mean(axis=0)
    # A class with p(y) = 0 has p(y|x) = 0 for every x: it adds 0 to the KL.
    log_py = np.log(np.where(py > 0, py, 1.0))
    kl = np.multiply(p, part - log_py, where=p > 0,
                     out=np.zeros_like(p)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return ScoreWithStd(mean=float(np.mean(scores)), std=float(np.std(scores)))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of equal-size sets with k(a, b) = (a.b / d + 1)^3."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1.0)**3
  k_yy = (y @ y.T / d + 1.0)**3
  k_xy = (x @ y.T / d + 1.0)**3
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy))
  return float(within / (m * (m - 1)) - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(features1, features2, *, subsets: int = 100,
                              subset_size: int = 1000,
                              seed: int = 0) -> ScoreWithStd:
  """Kernel Inception Distance (Binkowski et al., 2018).

  For each of `subsets` rounds, draws `subset_size` rows of each feature set
  without replacement and computes the unbiased MMD^2 with the cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3:

    (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1))
      - 2 sum_{i,j} k(x_i, y_j) / m^2.

  Being unbiased, it can be slightly negative for equal distributions.
  Defaults are torch-fidelity's (100 subsets of 1000).

  Args:
    features1: [N1, D].
    features2: [N2, D].
    subsets: number of random subsets.
    subset_size: rows per subset, 2 <= subset_size <= min(N1, N2).
    seed: seed of the numpy generator that draws the subsets.

  Returns:
    `ScoreWithStd(mean, std)` over the subsets.

  Example:
    >>> f = np.random.randn(200, 16)
    >>> kernel_inception_distance(f[:100], f[100:], subsets=10,
    ...                           subset_size=50).mean  # close to 0
  """
  x = _as_feature_matrix("features1", features1)
  y = _as_feature_matrix("features2", features2)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"Feature dimensions differ: features1 has {x.shape[1]}, "
                     f"features2 has {y.shape[1]}.")
  if not 2 <= subset_size <= min(x.shape[0], y.shape[0]):
    raise ValueError(f"subset_size={subset_size} must be in [2, min(N1, N2)] "
                     f"= [2, {min(x.shape[0], y.shape[0])}].")
  if subsets < 1:
    raise ValueError(f"subsets must be >= 1; got {subsets}.")
  rng = np.random.default_rng(seed)
  values = [
      _polynomial_mmd2(x[rng.choice(x.shape[0], subset_size, replace=False)],
                       y[rng.choice(y.shape[0], subset_size, replace=False)])
      for _ in range(subsets)
  ]
  return ScoreWithStd(mean=float(np.mean(values)), std=float(np.std(values)))


def check_images(images, name: str = "images") -> np.ndarray:
  """Checks an image batch for the Inception and returns it as an array.

  Args:
    images: [N, H, W, 3] with N >= 1, uint8 in [0, 255] or float in [-1, 1].
    name: what to call them in errors.

  Returns:
    `np.asarray(images)`.

  Raises:
    ValueError: naming `name`, the shape, dtype or value range.

  Example:
    >>> check_images(np.zeros((2, 32, 32, 3), np.uint8)).shape
    (2, 32, 32, 3)
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] != 3:
    raise ValueError(f"{name} must be a non-empty RGB [N, H, W, 3] array; "
                     f"got shape {images.shape}.")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1]; "
                     f"got dtype {images.dtype}.")
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{name} contain NaN or infinity.")
  low, high = float(images.min()), float(images.max())
  if low < -1.0 or high > 1.0:
    raise ValueError(f"{name} are float in [{low:g}, {high:g}]; expected "
                     "[-1, 1] (or uint8 in [0, 255]).")
  return images


def extract_features(extract_fn: Callable, images: np.ndarray, *,
                     batch_size: int) -> Features:
  """Runs an Inception extractor over many images in fixed-size batches.

  The last batch is padded (by repeating its last image) to `batch_size` so
  that a jitted `extract_fn` compiles once; the padding is dropped.

  Args:
    extract_fn: `images [B, H, W, 3] -> (pool [B, D], logits [B, K] or
      None)`, e.g. `make_fid_inception_extractor(variables)`.
    images: uint8 [N, H, W, 3] (or float in [-1, 1]), N >= 1; checked by
      `check_images`.
    batch_size: images per call.

  Returns:
    `Features(pool [N, D], logits [N, K] or None)`, float32 numpy.

  Example:
    >>> feats = extract_features(extract, images_uint8, batch_size=100)
  """
  images = check_images(images)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  n = images.shape[0]
  pools, logits = [], []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    size = batch.shape[0]
    if size < batch_size:
      batch = np.concatenate(
          [batch, np.repeat(batch[-1:], batch_size - size, axis=0)])
    pool, logit = extract_fn(batch)
    pools.append(np.asarray(pool, dtype=np.float32)[:size])
    if logit is not None:
      logits.append(np.asarray(logit, dtype=np.float32)[:size])
  return Features(pool=np.concatenate(pools),
                  logits=np.concatenate(logits) if logits else None)


def write_statistics(path: str | os.PathLike, stats: ReferenceStatistics, *,
                     preprocessing: str) -> None:
  """Writes statistics to an `.npz` (atomically; the directory is created).

  Args:
    path: the file, ending in .npz.
    stats: mu, sigma and (unless None) the features.
    preprocessing: the Inception preprocessing they were computed with.

  Example:
    >>> write_statistics("cifar10_train.npz", ref, preprocessing="tensorflow")
  """
  path = storage.as_path(path)
  if not path.name.endswith(".npz"):
    raise ValueError(f"A statistics file must end in .npz; got {path}.")
  arrays = dict(mu=stats.mu, sigma=stats.sigma,
                preprocessing=np.array(preprocessing))
  if stats.features is not None:
    arrays["features"] = stats.features
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name[:-len(".npz")] + ".tmp.npz")
  with tmp.open("wb") as f:
    np.savez(f, **arrays)
  tmp.replace(path)


def load_statistics(path: str | os.PathLike, *,
                    preprocessing: str | None = None) -> ReferenceStatistics:
  """Reads a statistics `.npz`: `mu`, `sigma`, optionally `features`.

  Args:
    path: the file (ours, or TF's / pytorch-fid's / EDM's `mu`, `sigma`).
    preprocessing: if given, and the file records another preprocessing,
      that is an error (such statistics are not comparable).

  Returns:
    `ReferenceStatistics`; `features` is None when the file has none.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: for an unreadable file, missing or mis-shaped arrays, or a
      preprocessing mismatch.

  Example:
    >>> ref = load_statistics("cifar10_train.npz", preprocessing="tensorflow")
  """
  path = storage.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Statistics file not found: {path}")
  try:
    with path.open("rb") as f, np.load(f) as data:
      arrays = {name: data[name] for name in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"Cannot read {path} as .npz ({type(e).__name__}: {e}); "
                     "truncated or corrupt?") from e
  missing = {"mu", "sigma"} - set(arrays)
  if missing:
    raise ValueError(f"{path} is not a statistics file: it lacks "
                     f"{sorted(missing)} (it holds {sorted(arrays)}).")
  mu = np.asarray(arrays["mu"], np.float64)
  sigma = np.asarray(arrays["sigma"], np.float64)
  features = arrays.get("features")
  d = mu.shape[0] if mu.ndim == 1 else -1
  if (mu.ndim != 1 or sigma.shape != (d, d) or
      (features is not None and
       (features.ndim != 2 or features.shape[1] != d))):
    raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape} and "
                     f"features {None if features is None else features.shape}"
                     " do not fit together ([D], [D, D], [N, D]).")
  recorded = str(arrays["preprocessing"]) if "preprocessing" in arrays else None
  if preprocessing and recorded and recorded != preprocessing:
    raise ValueError(f"{path} was computed with {recorded!r} preprocessing, "
                     f"not {preprocessing!r}: the features are not "
                     "comparable.")
  return ReferenceStatistics(mu=mu, sigma=sigma, features=features)


def reference_cache_path(cache_dir: str | os.PathLike, *, dataset: str,
                         split: str, num_images: int,
                         preprocessing: str) -> str:
  """The `.npz` file caching the statistics of `num_images` of a split.

  Characters other than letters, digits, '.', '_' and '-' in the data set
  and split names become '_' (e.g. "tfds:cifar10" -> "tfds_cifar10").

  Example:
    >>> reference_cache_path("stats", dataset="cifar10", split="train",
    ...                      num_images=50000, preprocessing="tensorflow")
    'stats/fid_inception_tensorflow_cifar10_train_50000.npz'
  """

  def clean(name):
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

  return os.fspath(
      storage.as_path(cache_dir) /
      (f"fid_inception_{clean(preprocessing)}_{clean(dataset)}_{clean(split)}_"
       f"{num_images}.npz"))


def reference_statistics(extract_fn: Callable,
                         load_images: Callable[[], np.ndarray], *,
                         cache_dir: str | os.PathLike, dataset: str, split: str,
                         num_images: int, batch_size: int, preprocessing: str,
                         write: bool = True) -> ReferenceStatistics:
  """Inception statistics of a reference data set, cached on disk.

  If `reference_cache_path(cache_dir, ...)` exists it is loaded and neither
  `load_images` nor `extract_fn` is called; otherwise the features of
  `load_images()` are computed, and mu, sigma and the features are written
  there (the directory is created; the file is written atomically). The
  cache may be local or gs:// (any `etils.epath` path).

  Args:
    extract_fn: as in `extract_features`.
    load_images: returns the uint8 [num_images, H, W, 3] reference images;
      called only when the cache is missing.
    cache_dir: directory of the cache files.
    dataset: data set name (part of the cache key).
    split: split name (part of the cache key).
    num_images: number of reference images (part of the cache key).
    batch_size: images per `extract_fn` call.
    preprocessing: the Inception preprocessing `extract_fn` uses (part of
      the cache key, and recorded in the file).
    write: False to compute without writing the cache (all processes of a
      multi-host run but the one that writes).

  Returns:
    `ReferenceStatistics(mu [D], sigma [D, D], features [N, D])`.

  Example:
    >>> ref = reference_statistics(extract, lambda: train_images,
    ...                            cache_dir="stats", dataset="cifar10",
    ...                            split="train", num_images=50000,
    ...                            batch_size=250, preprocessing="tensorflow")
  """
  path = reference_cache_path(cache_dir, dataset=dataset, split=split,
                              num_images=num_images,
                              preprocessing=preprocessing)
  if storage.as_path(path).exists():
    stats = load_statistics(path, preprocessing=preprocessing)
    if stats.features is None:
      raise ValueError(f"Reference statistics cache {path} lacks "
                       "['features']; delete it to recompute.")
    return stats
  images = np.asarray(load_images())
  if images.shape[0] != num_images:
    raise ValueError(f"load_images returned {images.shape[0]} images for "
                     f"{dataset}/{split}; expected num_images={num_images}.")
  features = extract_features(extract_fn, images, batch_size=batch_size).pool
  mu, sigma = feature_statistics(features)
  stats = ReferenceStatistics(mu=mu, sigma=sigma, features=features)
  if write:
    write_statistics(path, stats, preprocessing=preprocessing)
  return stats
