"""ddpm_jax: denoising diffusion models (DDPM, DDIM) in JAX and Flax."""

import os as _os

import fsspec as _fsspec

# gs:// paths go through gcsfs, also when TensorFlow is installed: one client
# for every path of the program (see ddpm_jax/storage.py). Set before etils
# picks a backend, which it does once.
_os.environ.setdefault("EPATH_USE_TF", "false")
# No cached directory listings: other processes (the other hosts, a trainer
# beside a sampler) write to the same bucket.
_fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache",
                                                      False)

__version__ = "0.1.0"
