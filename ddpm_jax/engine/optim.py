"""Optimizer, learning-rate schedule and EMA decay of training.

Pure functions with keyword-only options; `builders.build_optimizer` reads
them from `config.optimizer`.

Example:
  >>> tx = create_optimizer(lr=2e-4, warmup_steps=5000, num_steps=800_000,
  ...                       grad_clip_norm=1.0)
  >>> opt_state = tx.init(params)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ddpm_jax._checks import check_choice

DECAYS = ("constant", "cosine")


def learning_rate_schedule(*, lr: float, warmup_steps: int, num_steps: int,
                           decay: str = "constant") -> optax.Schedule:
  """lr(step): linear warm-up from 0, then constant or cosine decay to 0.

  As in DDPM, lr(step) = lr * min(1, step / warmup_steps) during warm-up
  (lr(0) = 0 when warmup_steps > 0); cosine decay runs from the end of the
  warm-up to `num_steps`.

  Args:
    lr: the peak learning rate.
    warmup_steps: steps of the linear warm-up (0: none).
    num_steps: total training steps (the end of the cosine).
    decay: 'constant' or 'cosine'.

  Returns:
    An optax schedule (jittable function of the int step).

  Example:
    >>> lr_fn = learning_rate_schedule(lr=1e-3, warmup_steps=10,
    ...                                num_steps=110, decay="cosine")
    >>> float(lr_fn(5)), float(lr_fn(10)), float(lr_fn(110))
    (0.0005, 0.001, 0.0)
  """
  check_choice("decay", decay, DECAYS)
  lr, warmup = float(lr), int(warmup_steps)
  decay_steps = max(1, int(num_steps) - warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.ones((), jnp.float32)
    if warmup > 0:
      factor = jnp.minimum(1.0, step / warmup)
    if decay == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return lr * factor

  return schedule


def create_optimizer(*, lr: float, warmup_steps: int, num_steps: int,
                     decay: str = "constant", grad_clip_norm: float = 0.0,
                     weight_decay: float = 0.0, b1: float = 0.9,
                     b2: float = 0.999,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping (when grad_clip_norm > 0), then Adam (weight_decay
  == 0) or AdamW (decoupled weight decay > 0) on `learning_rate_schedule`.

  DDPM: lr 2e-4, warmup_steps 5000, grad_clip_norm 1.0, Adam.

  Args:
    lr, warmup_steps, num_steps, decay: see `learning_rate_schedule`.
    grad_clip_norm: clip the global gradient norm to this (0: no clipping).
    weight_decay: AdamW's decoupled weight decay (0: plain Adam).
    b1, b2, eps: Adam's moments and epsilon.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> tx = create_optimizer(lr=2e-4, warmup_steps=5000, num_steps=800_000,
    ...                       grad_clip_norm=1.0)
  """
  lr_fn = learning_rate_schedule(lr=lr, warmup_steps=warmup_steps,
                                 num_steps=num_steps, decay=decay)
  kwargs = dict(b1=float(b1), b2=float(b2), eps=float(eps))
  if weight_decay > 0:
    opt = optax.adamw(lr_fn, weight_decay=float(weight_decay), **kwargs)
  else:
    opt = optax.adam(lr_fn, **kwargs)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(grad_clip_norm)), opt)
  return opt


def ema_decay_at(step: jax.Array, *, ema_decay: float,
                 ema_warmup: bool) -> jax.Array:
  """EMA decay at `step`: min(ema_decay, (1 + step) / (10 + step)) with
  warm-up, else ema_decay. float32 [].

  Example:
    >>> float(ema_decay_at(0, ema_decay=0.9999, ema_warmup=True))  # 1 / 10
    0.1
  """
  decay = jnp.asarray(ema_decay, jnp.float32)
  if ema_warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay
