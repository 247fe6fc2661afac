"""Command-line tools besides `python -m ddpm_jax.main`, each run as
`python -m ddpm_jax.tools.NAME`: `fid` (metrics of image sets),
`convert_inception` (the FID Inception weights, once),
`pretrained_workdir` (a diffusers model into a workdir) and `export` (a
trained run as a diffusers folder)."""
