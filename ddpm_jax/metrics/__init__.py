"""Sample-quality metrics: FID, Inception Score and KID (`scores`), and the
FID Inception network they read features from (`inception`, which needs
flax and is imported on its own).

The statistics of `scores` are re-exported here.
"""

from ddpm_jax.metrics.scores import (
    INCEPTION_PREPROCESSING,
    Features,
    FeatureStatistics,
    ReferenceStatistics,
    ScoreWithStd,
    check_images,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    load_statistics,
    reference_cache_path,
    reference_statistics,
    write_statistics,
)

__all__ = [
    "FeatureStatistics",
    "Features",
    "INCEPTION_PREPROCESSING",
    "ReferenceStatistics",
    "ScoreWithStd",
    "check_images",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "kernel_inception_distance",
    "load_statistics",
    "reference_cache_path",
    "reference_statistics",
    "write_statistics",
]
