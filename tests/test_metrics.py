"""FID, Inception Score, KID and reference-statistics caching."""

import chex
import numpy as np
import pytest
from scipy import linalg

from ddpm_jax import metrics


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


# ---------------------------------------------------------------- statistics


def test_feature_statistics_matches_numpy():
  f = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(f)
  chex.assert_shape([mu, sigma], [(6,), (6, 6)])
  assert mu.dtype == sigma.dtype == np.float64
  f64 = f.astype(np.float64)
  np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma,
                             (f64 - f64.mean(0)).T @ (f64 - f64.mean(0)) / 49,
                             rtol=1e-10)


@pytest.mark.parametrize("shape, message", [((1, 4), "Too few images"),
                                            ((4,), "features")])
def test_feature_statistics_rejects_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    metrics.feature_statistics(np.zeros(shape))


# ----------------------------------------------------------------------- FID


def test_frechet_distance_of_a_set_to_itself_is_zero():
  f = np.random.default_rng(1).normal(size=(200, 16))
  mu, sigma = metrics.feature_statistics(f)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-10


@pytest.mark.parametrize(
    "s1, s2",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        ([0.5, 4.0, 1.0], [2.0, 1.0, 9.0]),
        ([0.0, 2.0, 3.0], [4.0, 0.0, 1.0]),  # singular covariances
    ])
def test_frechet_distance_closed_form_for_diagonal_gaussians(s1, s2):
  s1, s2 = np.array(s1), np.array(s2)
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.5, 1.0, 0.5])
  expected = (np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2)))
  np.testing.assert_allclose(
      metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), expected,
      rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d, rank", [(8, None), (32, None), (32, 10)])
def test_frechet_distance_matches_scipy_sqrtm(d, rank):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d)
  covmean = linalg.sqrtm(s1 @ s2).real
  expected = (np.sum(
      (mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             expected, rtol=1e-7)


@pytest.mark.parametrize("n, d, rank", [(5, 64, None), (20, 64, 10),
                                        (64, 64, None), (100, 16, None)])
def test_frechet_distance_from_features_equals_the_covariance_form(n, d, rank):
  # n <= d takes the n x n Gram form; n > d the covariance form. Both against
  # the D x D computation and scipy's sqrtm of the fitted covariance. With
  # n < d the D x D form carries d - n round-off eigenvalues (about 1e-13
  # each), whose square roots add up to about 1e-5 here: rtol 1e-7.
  rng = np.random.default_rng(n + d)
  features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1.0
  mu, sigma = rng.normal(size=d), _random_spd(rng, d, rank)
  got = metrics.frechet_distance_from_features(features, mu, sigma)
  stats = metrics.feature_statistics(features)
  np.testing.assert_allclose(
      got, metrics.frechet_distance(stats.mu, stats.sigma, mu, sigma),
      rtol=1e-7)
  covmean = linalg.sqrtm(stats.sigma @ sigma).real
  expected = (np.sum((stats.mu - mu)**2) + np.trace(stats.sigma) +
              np.trace(sigma) - 2.0 * np.trace(covmean))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("features, mu, sigma, message", [
    (np.zeros((1, 4)), np.zeros(4), np.eye(4), "Too few images"),
    (np.zeros((3, 4)), np.zeros(5), np.eye(4), "mu has shape"),
    (np.zeros((3, 4)), np.zeros(4), np.eye(3), "sigma has shape"),
    (np.zeros((9, 4)), np.zeros(4), np.eye(3), "sigma has shape"),
    (np.zeros((3, 4, 1)), np.zeros(4), np.eye(4), "features must be"),
])
def test_frechet_distance_from_features_rejects_bad_shapes(
    features, mu, sigma, message):
  with pytest.raises(ValueError, match=message):
    metrics.frechet_distance_from_features(features, mu, sigma)


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12, rank=5)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             metrics.frechet_distance(mu2, s2, mu1, s1),
                             rtol=1e-8)


def test_frechet_distance_rejects_mismatched_dims():
  with pytest.raises(ValueError, match="sigma2"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="mu2"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


# ------------------------------------------------------------ Inception Score


def test_inception_score_of_uniform_predictions_is_one():
  score = metrics.inception_score(np.zeros((100, 1008)), splits=10)
  np.testing.assert_allclose(score, (1.0, 0.0), atol=1e-12)


@pytest.mark.parametrize("k, splits", [(10, 10), (7, 3), (1008, 1)])
def test_inception_score_of_one_hot_over_k_classes_is_k(k, splits):
  labels = np.arange(k * splits * 2) % k  # every split uses all k evenly
  logits = 1e4 * np.eye(1008)[labels]  # softmax is exactly one-hot
  score = metrics.inception_score(logits, splits=splits)
  np.testing.assert_allclose(score.mean, k, rtol=1e-10)
  np.testing.assert_allclose(score.std, 0.0, atol=1e-9)


def test_inception_score_of_log_probabilities_with_zeros():
  one_hot = np.eye(4)[np.arange(40) % 4]
  with np.errstate(divide="ignore"):
    log_probs = np.log(one_hot)
  with np.errstate(all="raise"):
    score = metrics.inception_score(log_probs, splits=5)
  np.testing.assert_allclose(score, (4.0, 0.0), atol=1e-12)


def test_inception_score_matches_direct_formula():
  logits = np.random.default_rng(4).normal(size=(30, 5)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in (p[:10], p[10:20], p[20:]):
    py = part.mean(0)
    scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
  score = metrics.inception_score(logits, splits=3)
  np.testing.assert_allclose(score, (np.mean(scores), np.std(scores)),
                             rtol=1e-10)


def test_inception_score_rejects_too_few_samples():
  with pytest.raises(ValueError, match="splits=10"):
    metrics.inception_score(np.zeros((5, 3)), splits=10)


# ----------------------------------------------------------------------- KID


def _mmd2_direct(x, y):
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 by explicit sums."""
  m, d = x.shape
  k = lambda a, b: (a @ b / d + 1.0)**3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return (xx + yy) / (m * (m - 1)) - 2.0 * xy / m**2


def test_kid_matches_direct_unbiased_mmd():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(12, 4)), rng.normal(0.3, 1.2, size=(12, 4))
  # One subset of all rows is a permutation, which MMD^2 does not see.
  kid = metrics.kernel_inception_distance(x, y, subsets=1, subset_size=12,
                                          seed=0)
  np.testing.assert_allclose(kid.mean, _mmd2_direct(x, y), rtol=1e-10)
  assert kid.std == 0.0


def test_kid_averages_subsets_drawn_by_seed():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(15, 3))
  kid = metrics.kernel_inception_distance(x, y, subsets=4, subset_size=6,
                                          seed=7)
  draw = np.random.default_rng(7)
  values = []
  for _ in range(4):
    xi = draw.choice(20, 6, replace=False)
    yi = draw.choice(15, 6, replace=False)
    values.append(_mmd2_direct(x[xi], y[yi]))
  np.testing.assert_allclose(kid, (np.mean(values), np.std(values)), rtol=1e-10)
  assert kid == metrics.kernel_inception_distance(x, y, subsets=4,
                                                  subset_size=6, seed=7)


def test_kid_of_identical_distributions_is_near_zero_and_grows_with_shift():
  rng = np.random.default_rng(8)
  x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  kids = [
      metrics.kernel_inception_distance(x, y + shift, subsets=20,
                                        subset_size=100, seed=0).mean
      for shift in (0.0, 0.25, 0.5, 1.0)
  ]
  assert abs(kids[0]) < 0.02
  assert kids[0] < kids[1] < kids[2] < kids[3]
  assert kids[1] > 0.1


@pytest.mark.parametrize("y_shape, subset_size, message", [
    ((10, 5), 5, "Feature dimensions"),
    ((10, 4), 11, "subset_size"),
    ((10, 4), 1, "subset_size"),
])
def test_kid_rejects_bad_input(y_shape, subset_size, message):
  with pytest.raises(ValueError, match=message):
    metrics.kernel_inception_distance(np.zeros(
        (20, 4)), np.zeros(y_shape), subsets=2, subset_size=subset_size, seed=0)


# ------------------------------------------------- features and the cache


class _CountingExtractor:
  """A stand-in for the Inception: features are per-image means."""

  def __init__(self):
    self.calls = 0
    self.batch_shapes = set()

  def __call__(self, images):
    self.calls += 1
    self.batch_shapes.add(images.shape)
    x = images.astype(np.float32)
    pool = np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], 1)
    return pool, -pool[:, :2]


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), np.uint8)


def test_extract_features_batches_with_one_shape():
  images = _images(10)
  extract = _CountingExtractor()
  feats = metrics.extract_features(extract, images, batch_size=4)
  assert extract.calls == 3
  assert extract.batch_shapes == {(4, 4, 4, 3)}
  whole_pool, whole_logits = _CountingExtractor()(images)
  chex.assert_shape([feats.pool, feats.logits], [(10, 3), (10, 2)])
  np.testing.assert_array_equal(feats.pool, whole_pool)
  np.testing.assert_array_equal(feats.logits, whole_logits)


def test_reference_statistics_are_cached(tmp_path):
  images = _images(9)
  loads = []

  def load():
    loads.append(1)
    return images

  kwargs = dict(cache_dir=tmp_path / "stats", dataset="tfds:cifar10",
                split="train", num_images=9, batch_size=4,
                preprocessing="tensorflow")
  extract = _CountingExtractor()
  first = metrics.reference_statistics(extract, load, **kwargs)
  assert (extract.calls, len(loads)) == (3, 1)
  path = metrics.reference_cache_path(tmp_path / "stats",
                                      dataset="tfds:cifar10", split="train",
                                      num_images=9, preprocessing="tensorflow")
  assert path.endswith("fid_inception_tensorflow_tfds_cifar10_train_9.npz")
  assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == [
      "fid_inception_tensorflow_tfds_cifar10_train_9.npz"
  ]

  second = metrics.reference_statistics(extract, load, **kwargs)
  assert (extract.calls, len(loads)) == (3, 1)  # loaded, not recomputed
  chex.assert_trees_all_equal(tuple(first), tuple(second))
  mu, sigma = metrics.feature_statistics(_CountingExtractor()(images)[0])
  np.testing.assert_allclose(second.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(second.sigma, sigma, rtol=1e-12)

  metrics.reference_statistics(extract, load, **{**kwargs, "split": "test"})
  assert (extract.calls, len(loads)) == (6, 2)  # another key recomputes
  metrics.reference_statistics(extract, load, **{
      **kwargs, "preprocessing": "pytorch_fid"
  })
  assert (extract.calls, len(loads)) == (9, 3)  # so does another convention


def test_reference_statistics_checks_the_image_count(tmp_path):
  with pytest.raises(ValueError, match="num_images=8"):
    metrics.reference_statistics(_CountingExtractor(), lambda: _images(9),
                                 cache_dir=tmp_path, dataset="d", split="s",
                                 num_images=8, batch_size=4,
                                 preprocessing="tensorflow")


def test_extract_features_without_logits():

  def pool_only(images):
    return images.reshape(len(images), -1)[:, :5].astype(np.float32), None

  feats = metrics.extract_features(pool_only, _images(5), batch_size=2)
  assert feats.logits is None
  np.testing.assert_array_equal(feats.pool, _images(5).reshape(5, -1)[:, :5])


@pytest.mark.parametrize("images, message", [
    (np.zeros((0, 4, 4, 3), np.uint8), r"non-empty RGB \[N, H, W, 3\]"),
    (np.zeros((2, 4, 4, 1), np.uint8), r"got shape \(2, 4, 4, 1\)"),
    (np.zeros((2, 4, 4, 3), np.int32), "got dtype int32"),
    (np.linspace(0, 255, 96, dtype=np.float32).reshape(
        2, 4, 4, 3), r"float in \[0, 255\]; expected \[-1, 1\]"),
    (np.full((2, 4, 4, 3), np.nan, np.float32), "NaN"),
])
def test_extract_features_rejects_bad_images(images, message):
  with pytest.raises(ValueError, match=message):
    metrics.extract_features(_CountingExtractor(), images, batch_size=2)


def test_statistics_files_round_trip(tmp_path):
  f = np.random.default_rng(9).normal(size=(6, 3))
  mu, sigma = metrics.feature_statistics(f)
  stats = metrics.ReferenceStatistics(mu=mu, sigma=sigma, features=f)
  path = tmp_path / "s.npz"
  metrics.write_statistics(path, stats, preprocessing="tensorflow")
  back = metrics.load_statistics(path, preprocessing="tensorflow")
  chex.assert_trees_all_equal(tuple(back), tuple(stats))
  with pytest.raises(ValueError, match="'tensorflow' preprocessing, not "
                     "'pytorch_fid'"):
    metrics.load_statistics(path, preprocessing="pytorch_fid")
  # Published files have only mu and sigma: no features, any preprocessing.
  np.savez(tmp_path / "published.npz", mu=mu, sigma=sigma)
  published = metrics.load_statistics(tmp_path / "published.npz",
                                      preprocessing="pytorch_fid")
  assert published.features is None
  np.testing.assert_array_equal(published.sigma, sigma)


def test_load_statistics_rejects_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    metrics.load_statistics(tmp_path / "absent.npz")
  np.savez(tmp_path / "images.npz", x_train=np.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
    metrics.load_statistics(tmp_path / "images.npz")
  np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
  with pytest.raises(ValueError, match="do not fit together"):
    metrics.load_statistics(tmp_path / "shapes.npz")
  good = tmp_path / "good.npz"
  np.savez(good, mu=np.zeros(300), sigma=np.eye(300))
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:5000])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    metrics.load_statistics(truncated)
