"""Moved to `ddpm_jax.diffusion.schedules` (kept for one release)."""
from ddpm_jax import _moved

_moved.alias(__name__, "ddpm_jax.diffusion.schedules")
