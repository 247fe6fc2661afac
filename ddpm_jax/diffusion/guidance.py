"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of a denoiser.

A class-conditional network `cond_fn(x_t, t, y)` trained with label dropout
(`drop_labels`: the label is replaced by a null class with probability
p_uncond) is both the conditional model (y in [0, C)) and the unconditional
one (y = null). Guidance with scale w samples with

  out~(x_t, t) = (1 + w) out(x_t, t, y) - w out(x_t, t, null)
               = out(x_t, t, y) + w (out(x_t, t, y) - out(x_t, t, null)),

Ho & Salimans' eq. 6: w = 0 is the conditional model, w > 0 sharpens it
towards the class, w = -1 is the unconditional model. The weights sum to 1,
so guiding eps, x0 or v predictions gives the same sampler update. With a
learned variance (2C output channels) only the prediction channels are
guided; the variance channels are the conditional model's.

`classifier_free_guidance` returns a plain `model_fn(x_t, t)`, so every
sampler guides without knowing it; the conditional and unconditional inputs
go through the network in one call on a batch of 2B (with a Python scale of
0, the conditional model itself, one call on B).

Example:
  >>> cond_fn = lambda x_t, t, y: unet.apply({"params": params}, x_t, t, y=y,
  ...                                         train=False)
  >>> labels = jnp.repeat(jnp.arange(10), 8)  # 8 images per class
  >>> model_fn = classifier_free_guidance(cond_fn, labels=labels,
  ...                                     num_classes=10, scale=3.0)
  >>> out = solvers.dpmpp_2m_sample(model_fn, sched, shape=(80, 28, 28, 1),
  ...                               key=key, num_steps=20)
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import gaussian

# A class-conditional denoiser: (x_t [B, ...], t [B], y int [B]) -> output.
CondModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check_num_classes(num_classes) -> None:
  if isinstance(num_classes,
                bool) or not isinstance(num_classes,
                                        (int, np.integer)) or num_classes < 1:
    raise ValueError("num_classes must be an integer >= 1, got "
                     f"{num_classes!r}.")


def _null(num_classes: int, null_label: Optional[int]) -> int:
  """The null label (default `num_classes`), checked outside [0, C)."""
  if null_label is None:
    return num_classes
  if isinstance(null_label, bool) or not isinstance(
      null_label, (int, np.integer)) or 0 <= null_label < num_classes:
    raise ValueError(f"null_label must be an integer outside the classes "
                     f"[0, {num_classes}), got {null_label!r}.")
  return int(null_label)


def _check_labels(labels, num_classes: int) -> None:
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be a 1-D integer array [B], got dtype "
                     f"{labels.dtype} and shape {labels.shape}.")
  if isinstance(labels, jax.core.Tracer) or labels.size == 0:
    return
  values = np.asarray(labels)
  if values.min() < 0 or values.max() >= num_classes:
    raise ValueError(f"class ids must lie in [0, {num_classes}), got values "
                     f"in [{values.min()}, {values.max()}].")


def classifier_free_guidance(
    cond_fn: CondModelFn, *, labels: jnp.ndarray, num_classes: int, scale,
    null_label: Optional[int] = None) -> gaussian.ModelFn:
  """The guided denoiser `(x_t, t) -> out + w (out - out_null)`.

  Args:
    cond_fn: class-conditional denoiser `(x_t [2B, ...], t [2B], y [2B])`,
      called once per `model_fn` call on the conditional batch followed by the
      unconditional one.
    labels: int [B] class of each sample, in [0, num_classes) (checked when
      concrete).
    num_classes: C, the number of real classes.
    scale: guidance scale w: a Python number (checked finite) or a scalar
      array (traced is fine). 0 is the conditional model; a Python 0 calls
      `cond_fn` on the B conditional inputs only.
    null_label: the label of the unconditional model; default C, the extra
      class of an embedding with C + 1 entries.

  Returns:
    `model_fn(x_t [B, ...], t [B]) -> output` with `cond_fn`'s output shape.

  Raises:
    ValueError: for labels that are not a 1-D integer array or are out of
      range, a bad `num_classes`, `null_label` or `scale`; when called, for a
      batch that is not B.

  Example:
    >>> model_fn = classifier_free_guidance(cond_fn, labels=jnp.array([3, 7]),
    ...                                     num_classes=10, scale=2.0)
  """
  _check_num_classes(num_classes)
  null = _null(num_classes, null_label)
  labels = jnp.asarray(labels)
  _check_labels(labels, num_classes)
  if isinstance(
      scale,
      bool) or (isinstance(scale, numbers.Number) and
                not (isinstance(scale, numbers.Real) and math.isfinite(scale))):
    raise ValueError(f"scale must be a finite real number, got {scale!r}.")
  both_labels = jnp.concatenate([labels, jnp.full_like(labels, null)])
  conditional_only = isinstance(scale, numbers.Real) and scale == 0

  def model_fn(x_t, t):
    if x_t.shape[0] != labels.shape[0]:
      raise ValueError(f"guidance has {labels.shape[0]} labels for a batch "
                       f"of {x_t.shape[0]}.")
    if conditional_only:
      return cond_fn(x_t, t, labels)
    both = cond_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                   both_labels)
    cond, uncond = jnp.split(both, 2, axis=0)
    channels = x_t.shape[-1]
    if cond.shape[-1] == 2 * channels:  # Learned variance: guide the mean.
      guided = cond[..., :channels] + scale * (cond[..., :channels] -
                                               uncond[..., :channels])
      return jnp.concatenate([guided, cond[..., channels:]], axis=-1)
    return cond + scale * (cond - uncond)

  return model_fn


def drop_labels(labels: jnp.ndarray, key: jax.Array, *, p_uncond: float,
                num_classes: int,
                null_label: Optional[int] = None) -> jnp.ndarray:
  """Label dropout for classifier-free guidance training.

  Each label independently becomes the null label with probability
  `p_uncond` (Ho & Salimans train with 0.1 or 0.2).

  Args:
    labels: int [B] in [0, num_classes) (checked when concrete).
    key: PRNG key of the drops.
    p_uncond: a Python number in [0, 1].
    num_classes: C.
    null_label: default C.

  Returns:
    int [B], the labels with some replaced by the null label.

  Raises:
    ValueError: for a bad `p_uncond`, `num_classes` or `null_label`, or
      labels out of range.

  Example:
    >>> y = drop_labels(batch["label"], key, p_uncond=0.1, num_classes=10)
  """
  if isinstance(p_uncond, bool) or not isinstance(
      p_uncond, numbers.Real) or not 0.0 <= p_uncond <= 1.0:
    raise ValueError(f"p_uncond must be a number in [0, 1], got "
                     f"{p_uncond!r}.")
  _check_num_classes(num_classes)
  null = _null(num_classes, null_label)
  labels = jnp.asarray(labels)
  _check_labels(labels, num_classes)
  drop = jax.random.bernoulli(key, p_uncond, labels.shape)
  return jnp.where(drop, jnp.asarray(null, labels.dtype), labels)
