"""Input sources behind `ddpm_jax.input_pipeline.create_dataset`."""
