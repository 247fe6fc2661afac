"""The training configuration: every field, its default and its meaning.

Config files in `configs/` start from `base_config()` and change what their
recipe needs; `python -m ddpm_jax.main --config=FILE --config.GROUP.FIELD=V`
overrides any field from the command line.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The default configuration; the groups mirror the library's modules."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Input pipeline (`ddpm_jax.input_pipeline.create_dataset`).
  config.data = ml_collections.ConfigDict(dict(
      source="digits",  # 'digits', 'npz:PATH', 'folder:PATH', 'tfds:NAME'
      split="train",
      eval_split="test",
      image_size=16,
      channels=1,
      resize=True,  # center-crop and resize to image_size
      random_flip=False,
      skip_bad_files=False,
  ))

  # Network: a preset of `ddpm_jax.models.unet_config` plus field overrides.
  config.model = ml_collections.ConfigDict(dict(preset="tutorial"))

  # Diffusion process and loss (`ddpm_jax.schedules`, `ddpm_jax.losses`).
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",  # linear | cosine | quadratic | sigmoid
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      loss_type="l2",  # l2 (L_simple) | l1 | huber
      target="eps",  # eps | x0 | v
      var_type="fixed_large",  # fixed_large | fixed_small
      mean_form="x0",  # x0 (clipped, DDPM) | eps (Algorithm 2)
      clip_x0=True,
  ))

  # Adam(W) with linear warm-up, optional cosine decay and clipping.
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-4,
      warmup_steps=5000,
      decay="constant",  # constant | cosine
      grad_clip_norm=1.0,  # 0 turns clipping off
      weight_decay=0.0,  # > 0 uses AdamW
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=128,  # global, over all devices and hosts
      num_steps=800_000,
      ema_decay=0.9999,
      ema_warmup=False,  # decay min(ema_decay, (1 + step) / (10 + step))
      log_every=100,
      checkpoint_every=5000,
      keep_checkpoints=3,
      # A sample grid from the EMA parameters every N steps and at the end
      # (with a GIF of the chain there when sample.gif); 0 = never.
      sample_every=10_000,
      max_nonfinite_steps=20,  # stop after this many skipped updates in a row
  ))

  # Sampling (`ddpm_jax.sampling`), for grids during training and --mode=sample.
  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddpm",  # ddpm | ddim
      ddim_steps=50,
      ddim_spacing="uniform",  # uniform | quadratic
      eta=0.0,
      num_images=64,
      batch_size=64,  # global
      gif=True,  # animated GIF of the denoising trajectory
      gif_frames=40,
  ))

  # Evaluation (--mode=eval): bits/dim of the eval split; with Inception
  # weights also FID, Inception Score and KID of samples vs. data.split.
  config.eval = ml_collections.ConfigDict(dict(
      num_images=1000,  # bits/dim images; 0 = the whole split
      batch_size=64,  # global
      inception_weights="",  # pt_inception-2015-12-05-6726825d.pth or .npz
      num_samples=10_000,  # generated images for FID / IS / KID
      num_reference=10_000,  # images of data.split for the reference stats
  ))
  return config


VARIANTS = ("", "tiny")


def apply_variant(config: ml_collections.ConfigDict, variant: str, *,
                  tiny_model: dict) -> ml_collections.ConfigDict:
  """Applies a config-file variant (`--config=FILE:VARIANT`).

  Args:
    config: the recipe's full-size config.
    variant: '' (the recipe as it is) or 'tiny' (the same recipe with a small
      network, T = 20 and a few steps of batch 8: a run takes seconds, for
      smoke tests and CI).
    tiny_model: `config.model` overrides that make the recipe's network small.

  Returns:
    `config`, changed in place.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; expected 'tiny' "
                     "or none.")
  if variant == "tiny":
    config.model.update(tiny_model)
    config.diffusion.num_timesteps = 20
    config.optimizer.warmup_steps = 2
    config.train.update(dict(batch_size=8, num_steps=4, log_every=2,
                             checkpoint_every=2, sample_every=4))
    config.sample.update(dict(num_images=8, batch_size=8, ddim_steps=5,
                              gif_frames=5))
    config.eval.update(dict(num_images=8, batch_size=8))
  return config
