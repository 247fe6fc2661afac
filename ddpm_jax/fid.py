"""Moved to `ddpm_jax.tools.fid` (kept for one release)."""
from ddpm_jax import _moved

if __name__ == "__main__":
  _moved.run_main("ddpm_jax.fid", "ddpm_jax.tools.fid")
else:
  _moved.alias(__name__, "ddpm_jax.tools.fid")
