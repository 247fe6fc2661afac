"""Moved to `ddpm_jax.engine.checkpoint` (kept for one release)."""
from ddpm_jax import _moved

_moved.alias(__name__, "ddpm_jax.engine.checkpoint")
