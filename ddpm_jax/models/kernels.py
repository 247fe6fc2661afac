"""How the U-Net's convolutions, norms and attention run on each backend: same math, faster code.

The network (`layers`, `unet`) only states the math, e.g.
`nn.Conv(..., conv_general_dilated=kernels.conv_general_dilated)`,
`kernels.group_norm(x, scale, bias, num_groups=32, epsilon=1e-6,
activation=jax.nn.silu)` and `kernels.dot_product_attention(q, k, v)`. This
module decides, when a function is traced, which code computes it:

- On the CPU backend, a stride-1 'SAME' NHWC convolution with an odd kernel
  keeps XLA's forward convolution but gets a hand-written gradient: the input
  gradient is a forward convolution with the flipped kernel and the kernel
  gradient one matmul of the im2col windows (XLA:CPU's own kernel-gradient
  convolution is several times slower). A depthwise one
  (`feature_group_count` = channels) runs as a sum of shifted slices times
  per-channel taps, with a hand-written gradient (XLA:CPU's grouped
  convolution is many times slower).
- Every other convolution, and every one on GPU and TPU, is
  `lax.conv_general_dilated` itself.
- On the CPU backend, GroupNorm, with the elementwise activation that
  follows it if any, is one function with a hand-written gradient: the
  forward pass saves only its input and the per-group statistics; the
  backward pass recomputes the normalised values, reduces once over space
  per (batch, channel) and computes the input gradient in one elementwise
  pass. Elsewhere it is the same formula, differentiated by JAX.
- On GPU, softmax attention in bfloat16 or float16 runs as cuDNN's fused
  (flash) attention when cuDNN takes the head width; everywhere else it is
  XLA's (`jax.nn.dot_product_attention(implementation='xla')`).

`implementation('xla')` turns the hand-written and cuDNN code off (the
reference, for A/B benchmarks and equivalence tests); the default, 'auto',
is the above. Parameters never depend on it; the dense convolution's forward
pass is bit-identical, everything else agrees to float rounding (bfloat16
rounding for cuDNN's attention).

The choice is part of JAX's tracing and compilation cache key
(`jax.make_user_context`), as `jax.default_matmul_precision` is: a jitted
function called under another setting is traced and compiled again.

Example:
  >>> with kernels.implementation("xla"):
  ...   reference = jax.jit(loss_fn).lower(params).compile()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ContextManager

import jax
import jax.numpy as jnp

Array = jax.Array

#: Values of `implementation`: 'auto' (the fastest known code per backend)
#: or 'xla' (XLA's own convolution, autodiff GroupNorm and attention everywhere).
IMPLEMENTATIONS = ("auto", "xla")

_IMPLEMENTATION = jax.make_user_context(default_value="auto")


def implementation(name: str) -> ContextManager[None]:
  """A context in which JAX traces with implementation `name`.

  Args:
    name: 'auto' (hand-written convolutions and GroupNorm gradient on the
      CPU backend, cuDNN attention on GPU, XLA's elsewhere) or 'xla'
      (XLA's everywhere).

  Returns:
    A context manager; leaving it restores the previous setting.

  Raises:
    ValueError: For any other name.

  Example:
    >>> with implementation("xla"):
    ...   y = jax.jit(model.apply)(variables, x, t, train=False)
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(
        f"kernels.implementation: name must be one of {IMPLEMENTATIONS}, got {name!r}"
    )
  return _IMPLEMENTATION(name)


def _cpu_kernels_active() -> bool:
  return _IMPLEMENTATION.value == "auto" and jax.default_backend() == "cpu"


# --- dense stride-1 'SAME' convolution: im2col kernel gradient ---------------------------------


def _conv_same(x: Array, kernel: Array) -> Array:
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _padded(x: Array, kh: int, kw: int) -> Array:
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def _im2col(x: Array, kh: int, kw: int) -> Array:
  """[B, H, W, kh * kw * C]: the 'SAME' stride-1 windows of x, ordered (i, j, c) as HWIO."""
  height, width = x.shape[1:3]
  xp = _padded(x, kh, kw)
  return jnp.concatenate([
      xp[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)
  ], axis=-1)


@jax.custom_vjp
def _conv_im2col_grad(x: Array, kernel: Array) -> Array:
  return _conv_same(x, kernel)


def _conv_im2col_grad_fwd(x, kernel):
  return _conv_same(x, kernel), (x, kernel)


def _conv_im2col_grad_bwd(residuals, g):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  # Input gradient: the 'SAME' correlation of g with the flipped, in/out-swapped kernel.
  dx = _conv_same(g, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
  # Kernel gradient: one matmul of the im2col windows with g, contracting batch and space.
  dk = jnp.dot(
      g.reshape(-1, cout).T,
      _im2col(x, kh, kw).reshape(-1, kh * kw * cin),
      preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.T.reshape(kh, kw, cin,
                                          cout).astype(kernel.dtype)


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)

# --- depthwise stride-1 'SAME' convolution: shifted sums ------------------------------------------


def _shifted_sum(x: Array, kernel: Array) -> Array:
  """Depthwise 'SAME' correlation as a sum of shifted slices times per-channel taps."""
  kh, kw = kernel.shape[:2]
  height, width = x.shape[1:3]
  xp = _padded(x, kh, kw)
  out = xp[:, :height, :width, :] * kernel[0, 0, 0]
  for i in range(kh):
    for j in range(kw):
      if i or j:
        out = out + xp[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
  return out


def _shifted_sum_kernel_grad(x: Array, g: Array,
                             kernel_shape: tuple[int, ...]) -> Array:
  """Gradient of `_shifted_sum` with respect to its kernel.

  For each kernel row i, one batched matmul over channels contracts the batch
  and height axes: `o[c, i, u, w] = sum_{b,h} xp[b, h+i, u, c] * g[b, h, w, c]`;
  the kernel gradient is then the diagonal sum `dk[i, j, c] = sum_w o[c, i, w+j, w]`.
  This reads the activations once per kernel row instead of once per tap.
  """
  kh, kw = kernel_shape[:2]
  height, width = x.shape[1:3]
  xp = _padded(x, kh, kw)
  rows = jnp.stack([xp[:, i:i + height] for i in range(kh)],
                   axis=1)  # [B, kh, H, Wp, C]
  o = jnp.einsum("bihuc,bhwc->ciuw", rows, g,
                 preferred_element_type=jnp.float32)
  taps = jnp.stack(
      [jnp.trace(o[:, :, j:j + width, :], axis1=2, axis2=3) for j in range(kw)],
      axis=-1)  # [C, kh, kw]
  return jnp.transpose(taps, (1, 2, 0))[:, :, None, :]


@jax.custom_vjp
def _depthwise_shifted_sum(x: Array, kernel: Array) -> Array:
  return _shifted_sum(x, kernel)


def _depthwise_shifted_sum_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_shifted_sum_bwd(residuals, g):
  x, kernel = residuals
  dx = _shifted_sum(g, kernel[::-1, ::-1])
  dk = _shifted_sum_kernel_grad(x, g, kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise_shifted_sum.defvjp(_depthwise_shifted_sum_fwd,
                              _depthwise_shifted_sum_bwd)

# --- the drop-in ------------------------------------------------------------------------------------


def _same_stride1_nhwc(lhs, rhs, window_strides, padding, lhs_dilation,
                       rhs_dilation, dimension_numbers, batch_group_count,
                       precision, preferred_element_type) -> bool:
  """Whether the call is a stride-1, undilated, odd-kernel 'SAME' NHWC/HWIO convolution."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  kh, kw = rhs.shape[:2]
  same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  return (
      kh % 2 == 1 and kw % 2 == 1 and tuple(window_strides) == (1, 1) and
      all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      and batch_group_count == 1 and precision is None and
      preferred_element_type is None and
      (padding == "SAME" or
       (not isinstance(padding, str) and [tuple(p) for p in padding] == same))
      and
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ("NHWC", "HWIO", "NHWC")))


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> Array:
  """`jax.lax.conv_general_dilated`, computed by the fastest known code for the backend.

  A drop-in for `nn.Conv(conv_general_dilated=...)` and for direct calls:
  same arguments, same result (up to float rounding), same gradients. Under
  `implementation('auto')` (the default) on the CPU backend, a stride-1,
  undilated, odd-kernel 'SAME' NHWC/HWIO convolution gets the hand-written
  code described in the module docstring: dense ones
  (`feature_group_count=1`) an im2col kernel gradient, depthwise ones
  (`feature_group_count` = input channels = output channels) shifted sums.
  Everything else is `jax.lax.conv_general_dilated`.

  Example:
    >>> conv = nn.Conv(64, (3, 3), conv_general_dilated=conv_general_dilated)
  """
  if _cpu_kernels_active() and _same_stride1_nhwc(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, batch_group_count, precision, preferred_element_type):
    if feature_group_count == 1:
      return _conv_im2col_grad(lhs, rhs)
    if rhs.shape[
        2] == 1 and feature_group_count == lhs.shape[-1] == rhs.shape[-1]:
      return _depthwise_shifted_sum(lhs, rhs)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


# --- GroupNorm (+ activation) -------------------------------------------------------------------


def _group_stats(x: Array, num_groups: int,
                 epsilon: float) -> tuple[Array, Array]:
  """float32 mean and 1/sqrt(var + epsilon) of each group, broadcast per channel: [B, 1, ..., C].

  As `nn.GroupNorm`: the mean and the mean of squares over all but the batch
  axis within each group, var = E[x^2] - E[x]^2 clipped at 0.
  """
  group_size = x.shape[-1] // num_groups
  xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (num_groups, group_size))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(xg), axis=axes) - jnp.square(mean))
  per_channel = lambda a: jnp.expand_dims(jnp.repeat(a, group_size, axis=-1),
                                          axes[:-1])
  return per_channel(mean), per_channel(jax.lax.rsqrt(var + epsilon))


def _normalized(x, mean, rstd, scale, bias, dtype):
  """((x - mean) * rstd * scale + bias) in `dtype`, statistics and parameters float32."""
  scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
  return ((x - mean) * (rstd * scale) + bias).astype(dtype)


def _group_norm_plain(x, scale, bias, num_groups, epsilon, activation, dtype):
  y = _normalized(x, *_group_stats(x, num_groups, epsilon), scale, bias, dtype)
  return y if activation is None else activation(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm_fused(x, scale, bias, num_groups, epsilon, activation, dtype):
  return _group_norm_plain(x, scale, bias, num_groups, epsilon, activation,
                           dtype)


def _group_norm_fused_fwd(x, scale, bias, num_groups, epsilon, activation,
                          dtype):
  mean, rstd = _group_stats(x, num_groups, epsilon)
  y = _normalized(x, mean, rstd, scale, bias, dtype)
  return (y if activation is None else activation(y)), (x, mean, rstd, scale,
                                                        bias)


def _group_norm_fused_bwd(num_groups, epsilon, activation, dtype, residuals, g):
  """Gradients from x and the statistics: the normalised values are recomputed, not stored.

  With xhat = (x - mean) * rstd and gy the gradient at the norm's output, per
  (batch, channel) s1 = sum gy and s2 = sum gy * xhat over space give
  dbias and dscale (summed over the batch) and, averaged with the scale over
  each group's channels, m1 and m2 of
  dx = rstd * (gy * scale - m1 - xhat * m2): one reduction pass over (x, g),
  one elementwise pass for dx.
  """
  del epsilon
  x, mean, rstd, scale, bias = residuals
  if activation is None:
    gy = g.astype(jnp.float32)
  else:
    gy = jax.vjp(activation, _normalized(x, mean, rstd, scale, bias,
                                         dtype))[1](g)[0]
    gy = gy.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  space = tuple(range(1, x.ndim - 1))
  s1 = jnp.sum(gy, axis=space, keepdims=True)
  s2 = (jnp.sum(gy * x32, axis=space, keepdims=True) - mean * s1) * rstd
  scale32 = scale.astype(jnp.float32)
  group_size = x.shape[-1] // num_groups
  count = group_size * (x.size // (x.shape[0] * x.shape[-1]))

  def group_mean(
      a
  ):  # [B, 1.., C] -> mean over each group's channels, repeated per channel
    a = a.reshape(a.shape[:-1] + (num_groups, group_size))
    return jnp.repeat(jnp.sum(a, axis=-1) / count, group_size, axis=-1)

  m1, m2 = group_mean(s1 * scale32), group_mean(s2 * scale32)
  dx = gy * (rstd * scale32) + (x32 * (-rstd * rstd * m2) + rstd *
                                (rstd * m2 * mean - m1))
  dscale = jnp.sum(s2, axis=(0,) + space).reshape(scale.shape)
  dbias = jnp.sum(s1, axis=(0,) + space).reshape(bias.shape)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(
      bias.dtype)


_group_norm_fused.defvjp(_group_norm_fused_fwd, _group_norm_fused_bwd)


def group_norm(x: Array, scale: Array, bias: Array, *, num_groups: int,
               epsilon: float,
               activation: Callable[[Array], Array] | None = None,
               dtype=None) -> Array:
  """`activation(GroupNorm(x) * scale + bias)`, by the fastest known code for the backend.

  The statistics are float32 (`nn.GroupNorm`'s: mean and the fast variance
  E[x^2] - E[x]^2 over all but the batch axis within each group of
  `channels / num_groups` channels); the normalised, scaled and shifted values
  are cast to `dtype` before the activation, as `activation(nn.GroupNorm(...)(x))`
  does. Under `implementation('auto')` on the CPU backend it has the
  hand-written gradient described in the module docstring.

  Args:
    x: [B, ..., C] (batch first, channels last).
    scale: [C].
    bias: [C].
    num_groups: Number of groups; must divide C.
    epsilon: Added to the variance.
    activation: An elementwise function applied after the norm, or None.
    dtype: Dtype of the result; None gives x's.

  Returns:
    Array of x's shape.

  Raises:
    ValueError: If num_groups does not divide the channels, or scale or bias
      is not [C].

  Example:
    >>> h = group_norm(x, scale, bias, num_groups=32, epsilon=1e-6, activation=jax.nn.silu)
  """
  channels = x.shape[-1]
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(
        f"kernels.group_norm: num_groups={num_groups} must divide the {channels} channels"
    )
  if scale.shape != (channels,) or bias.shape != (channels,):
    raise ValueError(
        f"kernels.group_norm: scale and bias must be [{channels}], "
        f"got {scale.shape} and {bias.shape}")
  dtype = x.dtype if dtype is None else dtype
  norm = _group_norm_fused if _cpu_kernels_active() else _group_norm_plain
  return norm(x, scale, bias, num_groups, epsilon, activation, dtype)


# --- attention ----------------------------------------------------------------------------------------


def _cudnn_takes(query: Array) -> bool:
  """Whether cuDNN's fused attention takes this query: NVIDIA GPU, 16-bit floats, head width."""
  if _IMPLEMENTATION.value != "auto" or jax.default_backend() != "gpu":
    return False
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  try:
    capability = float(
        jax.devices()[0].compute_capability)  # NVIDIA only, e.g. '9.0'
  except (AttributeError, ValueError):
    return False
  head_dim = query.shape[-1]
  return head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def dot_product_attention(query: Array, key: Array, value: Array) -> Array:
  """Softmax attention `softmax(q k^T / sqrt(d)) v` per head, by the fastest code for the backend.

  Under `implementation('auto')` on GPU, bfloat16/float16 inputs with a head
  width cuDNN takes (a multiple of 8, at most 128, or 256 on Hopper and
  later) run as cuDNN's fused flash attention; everything else is XLA's
  `jax.nn.dot_product_attention` (logits and softmax in float32).

  Args:
    query: [B, T, N, H] (batch, positions, heads, head width).
    key: [B, S, N, H].
    value: [B, S, N, H].

  Returns:
    [B, T, N, H] of the inputs' dtype.

  Example:
    >>> out = dot_product_attention(q, k, v)  # q, k, v: [2, 256, 1, 256]
  """
  return jax.nn.dot_product_attention(
      query, key, value,
      implementation="cudnn" if _cudnn_takes(query) else "xla")
