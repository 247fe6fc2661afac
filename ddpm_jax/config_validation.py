"""Checks of a run config before anything is built or compiled.

One place for the config checks `main.py` and `train.train_and_evaluate`
run: each failure is a `ValueError` naming the field, its value and the
allowed range.

Example:
  >>> validate_train_config(config, num_devices=jax.device_count())
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ddpm_jax import diffusion, losses, schedules

DECAYS = ("constant", "cosine")


def _get(config, path: str):
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"config.{path} is missing.") from None
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def _int_at_least(config, path: str, low: int) -> int:
  value = _get(config, path)
  if not _is_int(value) or value < low:
    raise ValueError(f"config.{path} must be an integer >= {low}, got "
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
    raise ValueError(f"config.{path} must be a number in {interval}, got "
                     f"{value!r}.")
  return value


def _choice(config, path: str, choices) -> str:
  value = _get(config, path)
  if value not in choices:
    raise ValueError(f"config.{path} must be one of {', '.join(choices)}; got "
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
    ValueError: naming the first bad field and its allowed range.
  """
  seed = _get(config, "seed")
  if not _is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"config.seed must be an integer in [0, 2**32), got "
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
    raise ValueError(f"config.train.ema_warmup must be True or False, got "
                     f"{ema_warmup!r}.")
  _int_at_least(config, "train.log_every", 1)
  _int_at_least(config, "train.checkpoint_every", 1)
  _int_at_least(config, "train.keep_checkpoints", 1)
  _int_at_least(config, "train.max_nonfinite_steps", 0)
  warmup = _get(config, "optimizer.warmup_steps")
  if _get(config, "optimizer.decay") == "cosine" and warmup >= num_steps:
    raise ValueError(
        f"config.optimizer.warmup_steps ({warmup}) must be < "
        f"config.train.num_steps ({num_steps}) with cosine decay.")
  if num_devices is not None and batch_size % num_devices:
    raise ValueError(
        f"config.train.batch_size ({batch_size}) must be divisible by the "
        f"number of devices ({num_devices}).")
  if process_count is not None and batch_size % process_count:
    raise ValueError(
        f"config.train.batch_size ({batch_size}) must be divisible by the "
        f"number of processes ({process_count}).")
