"""Moved to `ddpm_jax.metrics.inception` (kept for one release)."""
from ddpm_jax import _moved

_moved.alias(__name__, "ddpm_jax.metrics.inception")
