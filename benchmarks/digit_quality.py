"""Sample quality of 28x28 digits, scored by a small MNIST classifier.

The FID Inception network has no use for 28x28 grey digits, and its weights
cannot be downloaded here; a small convolutional classifier trained once on
MNIST's 60,000 training digits (a few minutes on 2 CPU cores, ~99% test
accuracy) gives features that know what a digit is. Given uint8 images
[N, 28, 28, 1] it reports:

* `fid`: the Fréchet distance between Gaussians fitted to the classifier's
  128-d penultimate features of the images and of 8,000 held-out MNIST test
  digits (`ddpm_jax.metrics.frechet_distance`);
* `kid`: the kernel distance on the same features
  (`ddpm_jax.metrics.kernel_inception_distance`, 100 subsets of 1,000);
* `confidence`: the mean of the classifier's largest softmax probability
  (how digit-like each image is);
* `class_entropy`: the entropy in nats of the histogram of predicted classes
  (ln 10 = 2.303 when all ten digits are equally frequent);
* `class_counts`: that histogram.

The trained classifier is cached in `benchmarks/results/` (ignored by git),
keyed by its recipe and the data file's SHA-256, so every benchmark that
imports this module shares one.

Example:
  >>> scorer = DigitScorer.create("../shared/data/mnist.npz")
  >>> scores = scorer.score(samples_uint8)  # [N, 28, 28, 1]
  >>> scores.fid, scores.class_entropy
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_jax import metrics

#: Bump when the classifier or its training changes (part of the cache key,
#: with the number of epochs and the batch size).
RECIPE = "digit-cnn-v1:16-16-32-32-128,adam1e-3,batch{batch_size}," \
    "epochs{epochs},seed0"
EPOCHS = 3
BATCH_SIZE = 128
#: The first HELD_OUT of the MNIST test digits in `test_order` are never in
#: the reference statistics: calibration rows draw from them.
HELD_OUT = 2000
FEATURE_DIM = 128
#: Where the trained classifier is cached (ignored by git).
CACHE_DIR = pathlib.Path(__file__).resolve().parent / "results"


class DigitClassifier(nn.Module):
  """conv 16, 16, pool, conv 32, 32, pool, dense 128 (features), dense 10."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x: float [B, 28, 28, 1] in [0, 1] -> (features [B, 128], logits
    [B, 10])."""
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(10)(features)


class DigitScores(NamedTuple):
  """Quality of a set of generated digits (see the module docstring)."""
  fid: float
  kid: float  # mean over subsets
  kid_std: float
  confidence: float
  class_entropy: float  # nats; ln 10 = 2.303 is uniform
  class_counts: tuple[int, ...]  # [10]
  num_images: int


class MnistSplits(NamedTuple):
  """MNIST as uint8 [N, 28, 28, 1] images and int labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_mnist(path: str | os.PathLike) -> MnistSplits:
  """Reads a Keras-layout MNIST .npz (x_train, y_train, x_test, y_test)."""
  with np.load(path) as data:

    def images(name):
      x = np.asarray(data[name])
      if x.shape[1:3] != (28, 28) or x.dtype != np.uint8:
        raise ValueError(f"{path}: {name} must be uint8 [N, 28, 28], got "
                         f"{x.dtype} {x.shape}.")
      return x.reshape(-1, 28, 28, 1)

    return MnistSplits(images("x_train"), np.asarray(data["y_train"], np.int32),
                       images("x_test"), np.asarray(data["y_test"], np.int32))


def test_order(num_test: int) -> np.ndarray:
  """A fixed shuffle of the test indices: MNIST's test set is ordered by
  writer pool (its first half is cleaner), so contiguous slices differ."""
  return np.random.default_rng(0).permutation(num_test)


def _as_input(images: jnp.ndarray) -> jnp.ndarray:
  return images.astype(jnp.float32) / 255.0


def train_classifier(x: np.ndarray, y: np.ndarray, *, epochs: int = EPOCHS,
                     batch_size: int = BATCH_SIZE, lr: float = 1e-3,
                     seed: int = 0) -> Any:
  """Trains `DigitClassifier` with Adam on uint8 images x [N, 28, 28, 1].

  Returns:
    The parameters (a pytree).
  """
  model = DigitClassifier()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros(
      (1, 28, 28, 1)))["params"]
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):

    def loss_fn(p):
      logits = model.apply({"params": p}, _as_input(xb))[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  steps = len(x) // batch_size
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(steps):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
  return params


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def classifier_cache_path(cache_dir, data_sha256: str, *, epochs: int = EPOCHS,
                          batch_size: int = BATCH_SIZE) -> pathlib.Path:
  """Where the classifier trained by `RECIPE` on that data file is cached."""
  recipe = RECIPE.format(epochs=epochs, batch_size=batch_size)
  key = hashlib.sha256(f"{recipe}|{data_sha256}".encode()).hexdigest()[:16]
  return pathlib.Path(cache_dir) / f"digit_classifier_{key}.npz"


def load_or_train_classifier(mnist_path, *, cache_dir=None, log=print,
                             epochs: int = EPOCHS,
                             batch_size: int = BATCH_SIZE) -> tuple[Any, float]:
  """The cached classifier of `mnist_path`, trained (and cached) if missing.

  Args:
    mnist_path: a Keras-layout MNIST .npz.
    cache_dir: default `CACHE_DIR`.
    log: called with one line when the classifier is trained.
    epochs: training epochs over x_train.
    batch_size: training batch.

  Returns:
    (params, test accuracy on the file's test digits).
  """
  cache_dir = CACHE_DIR if cache_dir is None else cache_dir
  path = classifier_cache_path(cache_dir, _sha256(mnist_path), epochs=epochs,
                               batch_size=batch_size)
  if path.exists():
    with np.load(path) as data:
      flat = {
          tuple(k.split("/")): data[k]
          for k in data.files
          if k != "test_accuracy"
      }
      return (traverse_util.unflatten_dict(flat), float(data["test_accuracy"]))
  data = load_mnist(mnist_path)
  start = time.perf_counter()
  params = train_classifier(data.x_train, data.y_train, epochs=epochs,
                            batch_size=batch_size)
  logits = classify(params, data.x_test).logits
  accuracy = float(np.mean(np.argmax(logits, axis=1) == data.y_test))
  log(f"Trained the digit classifier in {time.perf_counter() - start:.0f} s:"
      f" test accuracy {accuracy:.4f}; cached in {path}.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  flat = {
      "/".join(k): np.asarray(v)
      for k, v in traverse_util.flatten_dict(params).items()
  }
  np.savez(tmp, test_accuracy=accuracy, **flat)
  os.replace(tmp, path)
  return params, accuracy


def classify(params, images: np.ndarray, *,
             batch_size: int = 500) -> metrics.Features:
  """Penultimate features and logits of uint8 digits [N, 28, 28, 1].

  Returns:
    `metrics.Features(pool=features [N, 128], logits [N, 10])`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != (28, 28, 1) or (images.dtype
                                                             != np.uint8):
    raise ValueError("images must be uint8 [N, 28, 28, 1], got "
                     f"{images.dtype} {images.shape}.")
  model = DigitClassifier()
  apply = jax.jit(lambda x: model.apply({"params": params}, _as_input(x)))
  batch_size = min(batch_size, len(images))
  features, logits = [], []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    size = len(batch)
    # The last batch is padded to the same shape: one compilation.
    batch = np.concatenate(
        [batch, np.repeat(batch[-1:], batch_size - size, axis=0)])
    f, l = apply(batch)
    features.append(np.asarray(f, np.float32)[:size])
    logits.append(np.asarray(l, np.float32)[:size])
  return metrics.Features(pool=np.concatenate(features),
                          logits=np.concatenate(logits))


def class_entropy(counts: np.ndarray) -> float:
  """Entropy in nats of a histogram (0 ln 0 = 0).

  Example:
    >>> round(class_entropy(np.ones(10)), 4)
    2.3026
  """
  p = np.asarray(counts, np.float64)
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())


def scores_of(features: metrics.Features, reference: np.ndarray) -> DigitScores:
  """`DigitScores` of classifier outputs against reference features [M, 128]."""
  mu, sigma = metrics.feature_statistics(features.pool)
  ref_mu, ref_sigma = metrics.feature_statistics(reference)
  n = len(features.pool)
  kid = metrics.kernel_inception_distance(
      features.pool, reference, subsets=100,
      subset_size=min(1000, n, len(reference)))
  logits = features.logits.astype(np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  counts = np.bincount(np.argmax(p, axis=1), minlength=10)
  return DigitScores(fid=metrics.frechet_distance(mu, sigma, ref_mu,
                                                  ref_sigma), kid=kid.mean,
                     kid_std=kid.std, confidence=float(p.max(axis=1).mean()),
                     class_entropy=class_entropy(counts),
                     class_counts=tuple(int(c) for c in counts), num_images=n)


class DigitScorer(NamedTuple):
  """A trained classifier and the features of the reference digits.

  Attributes:
    params: the classifier's parameters.
    test_accuracy: its accuracy on MNIST's 10,000 test digits.
    reference: float32 [8000, 128] features of the test digits
      `test_order(10000)[HELD_OUT:]`.
    data: the MNIST splits it was built from.
  """
  params: Any
  test_accuracy: float
  reference: np.ndarray
  data: MnistSplits

  @classmethod
  def create(cls, mnist_path, *, cache_dir=None, log=print) -> DigitScorer:
    """Loads (or trains once and caches) the classifier of `mnist_path`."""
    params, accuracy = load_or_train_classifier(mnist_path, cache_dir=cache_dir,
                                                log=log)
    data = load_mnist(mnist_path)
    order = test_order(len(data.x_test))
    reference = classify(params, data.x_test[order[HELD_OUT:]]).pool
    return cls(params, accuracy, reference, data)

  def score(self, images: np.ndarray) -> DigitScores:
    """Scores uint8 digits [N, 28, 28, 1], N >= 2."""
    return scores_of(classify(self.params, images), self.reference)


def gaussian_blur(images: np.ndarray, *, sigma: float) -> np.ndarray:
  """uint8 [N, H, W, 1] blurred by a separable Gaussian (zero padding)."""
  radius = max(1, int(np.ceil(3 * sigma)))
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma)**2)
  kernel /= kernel.sum()
  x = images.astype(np.float64)[..., 0]
  for axis in (1, 2):
    padded = np.pad(x, [(0, 0)] +
                    [(radius, radius) if a == axis else (0, 0) for a in (1, 2)])
    x = sum(w * np.take(padded, np.arange(k, k + x.shape[axis]), axis=axis)
            for k, w in enumerate(kernel))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]


def calibration_sets(data: MnistSplits, *, num_images: int = HELD_OUT,
                     seed: int = 0) -> dict[str, np.ndarray]:
  """Image sets whose scores say what the numbers mean, uint8 [N, 28, 28, 1].

  All drawn from the held-out test digits `test_order(N)[:HELD_OUT]` (never
  in the reference) or the training digits:

  * 'real test digits': the held-out test digits (the floor for N images);
  * 'real training digits': as many training digits (what the diffusion
    models learn from);
  * 'blurred digits (sigma 1)', '(sigma 2)': the held-out digits blurred;
  * 'digits 0-4 only': held-out and training digits of half the classes;
  * 'uniform noise': pixels uniform in 0..255.
  """
  if not 2 <= num_images <= HELD_OUT:
    raise ValueError(f"num_images must be in [2, {HELD_OUT}], got "
                     f"{num_images}.")
  rng = np.random.default_rng(seed)
  held_out = test_order(len(data.x_test))[:HELD_OUT]
  test = data.x_test[held_out[:num_images]]
  train = data.x_train[rng.choice(len(data.x_train), num_images, replace=False)]
  held_out_labels = data.y_test[held_out]
  half_pool = np.concatenate([
      data.x_test[held_out[held_out_labels < 5]], data.x_train[data.y_train < 5]
  ])
  return {
      "real test digits": test,
      "real training digits": train,
      "blurred digits (sigma 1)": gaussian_blur(test, sigma=1.0),
      "blurred digits (sigma 2)": gaussian_blur(test, sigma=2.0),
      "digits 0-4 only": half_pool[:num_images],
      "uniform noise": rng.integers(0, 256, test.shape, dtype=np.uint8),
  }


def markdown_row(name: str, scores: DigitScores, *extra: str) -> str:
  """One row: name, FID, KID, confidence, class entropy, extras."""
  cells = [
      name, f"{scores.fid:.1f}", f"{scores.kid:.2f} ± {scores.kid_std:.2f}",
      f"{scores.confidence:.3f}", f"{scores.class_entropy:.3f}", *extra
  ]
  return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = ("| images | FID (classifier) | KID | mean confidence "
                   "| class entropy (nats) |")
