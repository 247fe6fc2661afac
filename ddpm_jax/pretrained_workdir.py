"""Moved to `ddpm_jax.tools.pretrained_workdir` (kept for one release)."""
from ddpm_jax import _moved

if __name__ == "__main__":
  _moved.run_main("ddpm_jax.pretrained_workdir",
                  "ddpm_jax.tools.pretrained_workdir")
else:
  _moved.alias(__name__, "ddpm_jax.tools.pretrained_workdir")
