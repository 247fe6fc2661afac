"""Checks of a run config before anything is built or compiled.

One place for the config checks `main.py` and `train.train_and_evaluate`
run: each failure is a `ConfigError` naming the field, its value and the
allowed range.

Example:
  >>> validate_config(config, mode="train", num_devices=jax.device_count())
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Optional

from ddpm_jax import diffusion, losses, schedules

DECAYS = ("constant", "cosine")
MODES = ("train", "sample", "eval")


class ConfigError(ValueError):
  """A config field is missing, unknown or out of its allowed range."""


def _get(config, path: str):
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config.{path} is missing.") from None
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def _int_at_least(config, path: str, low: int) -> int:
  value = _get(config, path)
  if not _is_int(value) or value < low:
    raise ConfigError(f"config.{path} must be an integer >= {low}, got "
                     f"{value!r}.")
  return value


def _number_in(config, path: str, low: float, high: float, *,
               low_open: bool = False, high_open: bool = False) -> float:
  value = _get(config, path)
  ok = _is_number(value)
  if ok:
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
  if not ok:
    interval = (("(" if low_open else "[") + f"{low}, {high}" +
                (")" if high_open else "]"))
    raise ConfigError(f"config.{path} must be a number in {interval}, got "
                     f"{value!r}.")
  return value


def _choice(config, path: str, choices) -> str:
  value = _get(config, path)
  if value not in choices:
    raise ConfigError(f"config.{path} must be one of {', '.join(choices)}; got "
                     f"{value!r}.")
  return value


def validate_train_config(config, *, num_devices: Optional[int] = None,
                          process_count: Optional[int] = None) -> None:
  """Checks the fields training reads (seed, data shape, diffusion,
  optimizer, train).

  Args:
    config: the run's `ml_collections.ConfigDict` (or nested dicts).
    num_devices: devices the global batch is split over (checks
      divisibility); None skips that check.
    process_count: number of hosts (the batch must split evenly over them
      too); None skips.

  Raises:
    ConfigError: naming the first bad field and its allowed range.
  """
  seed = _get(config, "seed")
  if not _is_int(seed) or not 0 <= seed < 2**32:
    raise ConfigError(f"config.seed must be an integer in [0, 2**32), got "
                     f"{seed!r}.")
  # Data shape (the rest of config.data is checked by the input pipeline).
  _int_at_least(config, "data.image_size", 1)
  _int_at_least(config, "data.channels", 1)

  # Diffusion.
  _choice(config, "diffusion.schedule", schedules.SCHEDULE_NAMES)
  _int_at_least(config, "diffusion.num_timesteps", 1)
  _number_in(config, "diffusion.beta_start", 0.0, 1.0, low_open=True,
             high_open=True)
  _number_in(config, "diffusion.beta_end", 0.0, 1.0, low_open=True,
             high_open=True)
  _choice(config, "diffusion.loss_type", losses.LOSS_TYPES)
  _choice(config, "diffusion.target", diffusion.TARGETS)

  # Optimizer.
  _number_in(config, "optimizer.lr", 0.0, math.inf, high_open=True)
  _int_at_least(config, "optimizer.warmup_steps", 0)
  _number_in(config, "optimizer.grad_clip_norm", 0.0, math.inf,
             high_open=True)
  _number_in(config, "optimizer.weight_decay", 0.0, math.inf, high_open=True)
  _choice(config, "optimizer.decay", DECAYS)
  _number_in(config, "optimizer.b1", 0.0, 1.0, high_open=True)
  _number_in(config, "optimizer.b2", 0.0, 1.0, high_open=True)
  _number_in(config, "optimizer.eps", 0.0, math.inf, high_open=True)

  # Train.
  batch_size = _int_at_least(config, "train.batch_size", 1)
  num_steps = _int_at_least(config, "train.num_steps", 1)
  _number_in(config, "train.ema_decay", 0.0, 1.0, high_open=True)
  ema_warmup = _get(config, "train.ema_warmup")
  if not isinstance(ema_warmup, bool):
    raise ConfigError(f"config.train.ema_warmup must be True or False, got "
                     f"{ema_warmup!r}.")
  _int_at_least(config, "train.log_every", 1)
  _int_at_least(config, "train.checkpoint_every", 1)
  _int_at_least(config, "train.keep_checkpoints", 1)
  _int_at_least(config, "train.max_nonfinite_steps", 0)
  warmup = _get(config, "optimizer.warmup_steps")
  if _get(config, "optimizer.decay") == "cosine" and warmup >= num_steps:
    raise ConfigError(
        f"config.optimizer.warmup_steps ({warmup}) must be < "
        f"config.train.num_steps ({num_steps}) with cosine decay.")
  if num_devices is not None and batch_size % num_devices:
    raise ConfigError(
        f"config.train.batch_size ({batch_size}) must be divisible by the "
        f"number of devices ({num_devices}).")
  if process_count is not None and batch_size % process_count:
    raise ConfigError(
        f"config.train.batch_size ({batch_size}) must be divisible by the "
        f"number of processes ({process_count}).")


def _unknown_fields(config, schema, prefix: str = "") -> list[str]:
  """Dotted names in `config` that `schema` lacks (config.model excluded:
  the network config checks its own fields)."""
  unknown = []
  for name in config.keys():
    path = f"{prefix}{name}"
    if path == "model":
      continue
    if name not in schema:
      unknown.append(path)
    elif hasattr(schema[name], "keys") and hasattr(config[name], "keys"):
      unknown += _unknown_fields(config[name], schema[name], f"{path}.")
  return unknown


def model_config(config):
  """The `UNetConfig` of `config.model`, or a `ConfigError` saying why not."""
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  fields = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                else config.model)
  try:
    return models.unet_config(**fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None


def _check_data_source(source: Any) -> None:
  if not isinstance(source, str) or not source:
    raise ConfigError(f"config.data.source must be a non-empty string, got "
                      f"{source!r}.")
  scheme, _, rest = source.partition(":")
  if scheme in ("npz", "folder") and rest and not os.path.exists(rest):
    raise ConfigError(f"config.data.source {source!r}: {rest} does not exist "
                      f"(working directory {os.getcwd()}).")


def validate_config(config, *, mode: str = "train",
                    num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> None:
  """Checks a whole run config for `mode` before anything heavy starts.

  Unknown fields, wrong types and values out of range, a network that cannot
  take the image size or channels, batch sizes the devices do not divide and
  a missing dataset path each give one `ConfigError`.

  Args:
    config: the run's `ml_collections.ConfigDict`.
    mode: 'train', 'sample' or 'eval'.
    num_devices: devices batches are split over; None skips those checks.
    process_count: number of hosts; None skips those checks.

  Raises:
    ConfigError: naming the first bad field and its allowed range.
  """
  from ddpm_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
  unknown = _unknown_fields(config, base_config())
  if unknown:
    raise ConfigError(f"Unknown config field(s): {', '.join(unknown)}. See "
                      "ddpm_jax/config.py for every field.")
  validate_train_config(config, num_devices=num_devices,
                        process_count=process_count)
  _check_data_source(_get(config, "data.source"))
  for path in ("data.split", "data.eval_split"):
    if not isinstance(_get(config, path), str):
      raise ConfigError(f"config.{path} must be a string, got "
                        f"{_get(config, path)!r}.")
  for path in ("data.resize", "data.random_flip", "data.skip_bad_files",
               "diffusion.clip_x0", "sample.gif"):
    if not isinstance(_get(config, path), bool):
      raise ConfigError(f"config.{path} must be True or False, got "
                        f"{_get(config, path)!r}.")

  net = model_config(config)
  image_size = _get(config, "data.image_size")
  channels = _get(config, "data.channels")
  factor = 2**(len(net.channel_mults) - 1)
  if image_size % factor:
    raise ConfigError(
        f"config.data.image_size ({image_size}) must be divisible by "
        f"{factor}: the network halves it {len(net.channel_mults) - 1} times "
        f"(config.model.channel_mults = {net.channel_mults}).")
  if channels != net.in_channels:
    raise ConfigError(f"config.data.channels ({channels}) must equal the "
                      f"network's in_channels ({net.in_channels}); set "
                      "config.model.in_channels.")

  var_type = _choice(config, "diffusion.var_type", diffusion.VAR_TYPES)
  _choice(config, "diffusion.mean_form", diffusion.MEAN_FORMS)
  if var_type.startswith("learned") != net.learned_variance:
    raise ConfigError(
        f"config.diffusion.var_type {var_type!r} needs "
        f"config.model.learned_variance = {not net.learned_variance}.")

  num_timesteps = _get(config, "diffusion.num_timesteps")
  _choice(config, "sample.sampler", sampling.SAMPLERS)
  _choice(config, "sample.ddim_spacing", sampling.SPACINGS)
  ddim_steps = _int_at_least(config, "sample.ddim_steps", 1)
  if _get(config, "sample.sampler") == "ddim" and ddim_steps > num_timesteps:
    raise ConfigError(
        f"config.sample.ddim_steps ({ddim_steps}) must be in [1, "
        f"{num_timesteps}] (config.diffusion.num_timesteps).")
  _number_in(config, "sample.eta", 0.0, 1.0)
  _int_at_least(config, "sample.num_images", 1)
  _int_at_least(config, "sample.gif_frames", 1)
  _int_at_least(config, "train.sample_every", 0)
  _int_at_least(config, "eval.num_images", 0)
  for path in ("sample.batch_size", "eval.batch_size"):
    size = _int_at_least(config, path, 1)
    if num_devices is not None and size % num_devices:
      raise ConfigError(f"config.{path} ({size}) must be divisible by the "
                        f"number of devices ({num_devices}).")
    if process_count is not None and size % process_count:
      raise ConfigError(f"config.{path} ({size}) must be divisible by the "
                        f"number of processes ({process_count}).")
  weights = _get(config, "eval.inception_weights")
  if mode == "eval" and weights:
    if not os.path.isfile(weights):
      raise ConfigError(f"config.eval.inception_weights: {weights} is not a "
                        "file.")
    _int_at_least(config, "eval.num_samples", 2)
    _int_at_least(config, "eval.num_reference", 2)


def check_workdir(workdir: str, *, mode: str,
                  min_free_bytes: int = 100 * 2**20) -> None:
  """Fails early on a workdir that cannot hold a run.

  For training the directory is created if needed and must be writable with
  at least `min_free_bytes` free; for sampling and evaluation it must exist.

  Raises:
    ConfigError: naming the directory and the problem.
  """
  if mode != "train":
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir {workdir} does not exist: train first "
                        "with --mode=train.")
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".ddpm_jax_write_test")
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror} "
                      f"({e.filename}).") from None
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise ConfigError(f"--workdir {workdir} has only {free / 2**20:.0f} MiB "
                      f"free; at least {min_free_bytes / 2**20:.0f} MiB are "
                      "needed for checkpoints.")
