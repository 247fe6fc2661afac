"""Moved to `ddpm_jax.tools.convert_inception` (kept for one release)."""
from ddpm_jax import _moved

if __name__ == "__main__":
  _moved.run_main("ddpm_jax.convert_inception",
                  "ddpm_jax.tools.convert_inception")
else:
  _moved.alias(__name__, "ddpm_jax.tools.convert_inception")
