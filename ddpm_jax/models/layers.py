"""Building blocks of the U-Net: time embedding, residual blocks, attention, resampling.

All tensors are NHWC. Every module takes a compute `dtype` and a `param_dtype`;
normalisation statistics and softmaxes are computed in float32 whatever the
compute dtype.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

#: Kernel initialiser of every convolution and dense layer (the DDPM default).
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
#: DDPM's near-zero initialiser (scale 1e-10) of the layers that close a
#: residual branch and of the network's output, so that each block starts as
#: the identity and the initial prediction is about 0 (initial L_simple ~ 1).
ZERO_INIT = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")

DEPTHWISE_METHODS = ("auto", "shifted_sum", "lax")


def sinusoidal_embedding(t: Array, dim: int) -> Array:
  """Transformer-style sinusoidal embedding of (possibly fractional) time steps.

  Args:
    t: Time steps, shape [B], integer or float.
    dim: Embedding width, even and at least 4.

  Returns:
    Float32 array [B, dim]: sines of `t * f_k` then cosines, for
    `f_k = 10000 ** (-k / (dim // 2 - 1))`, k = 0 .. dim // 2 - 1.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _depthwise_lax(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1, 1),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
  )


def _shifted_sum(x: Array, kernel: Array) -> Array:
  """Depthwise 'SAME' correlation as a sum of shifted slices times per-channel taps."""
  kh, kw = kernel.shape[:2]
  height, width = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = xp[:, :height, :width, :] * kernel[0, 0, 0]
  for i in range(kh):
    for j in range(kw):
      if i or j:
        out = out + xp[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
  return out


def _shifted_sum_kernel_grad(x: Array, g: Array, kernel_shape: tuple[int, ...]) -> Array:
  """Gradient of `_shifted_sum` with respect to its kernel.

  For each kernel row i, one batched matmul over channels contracts the batch
  and height axes: `o[c, i, u, w] = sum_{b,h} xp[b, h+i, u, c] * g[b, h, w, c]`;
  the kernel gradient is then the diagonal sum `dk[i, j, c] = sum_w o[c, i, w+j, w]`.
  This reads the activations once per kernel row instead of once per tap.
  """
  kh, kw = kernel_shape[:2]
  height, width = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  rows = jnp.stack([xp[:, i : i + height] for i in range(kh)], axis=1)  # [B, kh, H, Wp, C]
  o = jnp.einsum("bihuc,bhwc->ciuw", rows, g, preferred_element_type=jnp.float32)
  taps = jnp.stack(
      [jnp.trace(o[:, :, j : j + width, :], axis1=2, axis2=3) for j in range(kw)], axis=-1
  )  # [C, kh, kw]
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


_depthwise_shifted_sum.defvjp(_depthwise_shifted_sum_fwd, _depthwise_shifted_sum_bwd)


def depthwise_conv2d(x: Array, kernel: Array, *, method: str) -> Array:
  """Depthwise 'SAME' 2-D correlation, stride 1 (a grouped conv with one group per channel).

  Args:
    x: Input [B, H, W, C].
    kernel: Taps [kh, kw, 1, C] (the HWIO layout of `nn.Conv(feature_group_count=C)`),
      kh and kw odd.
    method: 'lax' calls `jax.lax.conv_general_dilated(feature_group_count=C)`;
      'shifted_sum' adds kh * kw shifted slices of the input times per-channel
      taps, with a hand-written gradient; 'auto' is 'shifted_sum' on the CPU
      backend and 'lax' on GPU/TPU (decided at trace time). Same result; XLA
      on CPU runs 'shifted_sum' many times faster than its grouped convolution.

  Returns:
    Output [B, H, W, C].

  Raises:
    ValueError: For an unknown method, an even kernel or a kernel/input mismatch.
  """
  if method not in DEPTHWISE_METHODS:
    raise ValueError(f"depthwise_conv2d: method must be one of {DEPTHWISE_METHODS}, got {method!r}")
  kh, kw, kin, channels = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0 or kin != 1 or channels != x.shape[-1]:
    raise ValueError(
        f"depthwise_conv2d: kernel must have shape [odd, odd, 1, C={x.shape[-1]}], got {kernel.shape}"
    )
  if method == "auto":
    method = "shifted_sum" if jax.default_backend() == "cpu" else "lax"
  if method == "lax":
    return _depthwise_lax(x, kernel)
  return _depthwise_shifted_sum(x, kernel)


CONV_METHODS = ("auto", "lax", "im2col")


def _conv_same(x: Array, kernel: Array) -> Array:
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col(x: Array, kh: int, kw: int) -> Array:
  """[B, H, W, kh * kw * C]: the 'SAME' stride-1 windows of x, ordered (i, j, c) as HWIO."""
  height, width = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return jnp.concatenate(
      [xp[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)], axis=-1)


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
  g2 = g.reshape(-1, cout)
  dk = jnp.dot(g2.T, _im2col(x, kh, kw).reshape(-1, kh * kw * cin),
               preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.T.reshape(kh, kw, cin, cout).astype(kernel.dtype)


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)


def _resolve_conv_method(method: str) -> str:
  if method not in CONV_METHODS:
    raise ValueError(f"conv method must be one of {CONV_METHODS}, got {method!r}")
  if method == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  return method


def conv_general_dilated(method: str) -> Callable[..., Array]:
  """A drop-in for `lax.conv_general_dilated` (`nn.Conv(conv_general_dilated=...)`).

  With method 'im2col' (or 'auto' on the CPU backend, decided at trace time)
  a stride-1, undilated, ungrouped NHWC/HWIO convolution with odd kernel and
  symmetric 'SAME' padding keeps XLA's forward convolution but gets a
  hand-written gradient: the input gradient as a forward convolution with the
  flipped kernel, the kernel gradient as one matmul of the im2col windows
  (XLA:CPU runs its own kernel-gradient convolution several times slower).
  Every other call, and 'lax', is `lax.conv_general_dilated` itself. Same
  parameters and math; results equal up to float rounding.
  """
  _resolve_conv_method(method)

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    eligible = (
        _resolve_conv_method(method) == "im2col" and lhs.ndim == 4 and rhs.ndim == 4
        and not kwargs and precision is None and feature_group_count == 1
        and tuple(window_strides) == (1, 1)
        and all(d in (None, 1) for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
        and kh % 2 == 1 and kw % 2 == 1
        and (padding == "SAME" or [tuple(p) for p in padding] == [(kh // 2, kh // 2), (kw // 2, kw // 2)])
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    if eligible:
      return _conv_im2col_grad(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)

  return conv


_CONV_FNS = {m: conv_general_dilated(m) for m in CONV_METHODS}


class DepthwiseConv(nn.Module):
  """Depthwise 'SAME' convolution with bias; parameters as `nn.Conv(feature_group_count=C)`.

  Attributes:
    kernel_size: Odd spatial size of the square kernel.
    method: Implementation, see `depthwise_conv2d`.
  """

  kernel_size: int
  method: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H, W, C]."""
    channels = x.shape[-1]
    kernel = self.param(
        "kernel", KERNEL_INIT, (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return depthwise_conv2d(x, kernel, method=self.method) + bias


class TimeEmbedding(nn.Module):
  """Sinusoidal embedding of the time step followed by a two-layer MLP.

  Attributes:
    sinusoid_dim: Width of the sinusoidal embedding.
    features: Width of both dense layers (the time-embedding width).
    activation: Nonlinearity between the dense layers.
  """

  sinusoid_dim: int
  features: int
  activation: Callable[[Array], Array]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    """Maps time steps [B] to embeddings [B, features]."""
    dense = functools.partial(
        nn.Dense, self.features, kernel_init=KERNEL_INIT, dtype=self.dtype, param_dtype=self.param_dtype
    )
    h = dense()(sinusoidal_embedding(t, self.sinusoid_dim))
    return dense()(self.activation(h))


def _group_norm(num_groups: int, epsilon: float, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock(nn.Module):
  """Pre-activation residual block of DDPM (Ho et al., 2020).

  GroupNorm -> swish -> conv3x3 -> + dense(swish(temb)) -> GroupNorm -> swish
  -> dropout -> conv3x3, plus the input (through a 1x1 projection when the
  channel count changes).

  Attributes:
    features: Output channels.
    num_groups: GroupNorm groups; must divide the input and output channels.
    dropout: Dropout rate before the second convolution.
  """

  features: int
  num_groups: int
  dropout: float
  conv_method: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, self.features, (3, 3),
                             conv_general_dilated=_CONV_FNS[self.conv_method], **kw)
    h = conv(kernel_init=KERNEL_INIT)(nn.swish(_group_norm(self.num_groups, 1e-6, **kw)(x)))
    if temb is not None:
      h = h + nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_group_norm(self.num_groups, 1e-6, **kw)(h))
    h = conv(kernel_init=ZERO_INIT)(nn.Dropout(self.dropout, deterministic=not train)(h))
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(x)
    return x + h


class PostNormResnetBlock(nn.Module):
  """Residual block of "The Annotated Diffusion Model" (conv -> norm -> act order).

  conv3x3 -> GroupNorm -> SiLU -> + dense(SiLU(temb)) -> dropout -> conv3x3
  -> GroupNorm -> SiLU, plus the input (through a 1x1 projection when the
  channel count changes).

  Attributes:
    features: Output channels.
    num_groups: GroupNorm groups; must divide `features`.
    dropout: Dropout rate before the second convolution.
  """

  features: int
  num_groups: int
  dropout: float
  conv_method: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, self.features, (3, 3), kernel_init=KERNEL_INIT,
                             conv_general_dilated=_CONV_FNS[self.conv_method], **kw)
    h = nn.silu(_group_norm(self.num_groups, 1e-5, **kw)(conv()(x)))
    if temb is not None:
      h = h + nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(nn.silu(temb))[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.silu(_group_norm(self.num_groups, 1e-5, **kw)(conv()(h)))
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(x)
    return x + h


class ConvNextBlock(nn.Module):
  """ConvNeXt-style block of "The Annotated Diffusion Model".

  depthwise conv7x7 -> + dense(GELU(temb)) -> GroupNorm(1) -> conv3x3 to
  `features * mult` -> GELU -> GroupNorm(1) -> dropout -> conv3x3 to
  `features`, plus the input (through a 1x1 projection when the channel count
  changes).

  Attributes:
    features: Output channels.
    mult: Width multiplier of the hidden convolution.
    dropout: Dropout rate before the last convolution.
    depthwise_method: Implementation of the 7x7 depthwise convolution, see
      `depthwise_conv2d`.
  """

  features: int
  mult: int
  dropout: float
  depthwise_method: str = "auto"
  conv_method: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = functools.partial(nn.gelu, approximate=False)
    h = DepthwiseConv(7, method=self.depthwise_method, **kw)(x)
    if temb is not None:
      h = h + nn.Dense(x.shape[-1], kernel_init=KERNEL_INIT, **kw)(gelu(temb))[:, None, None, :]
    h = _group_norm(1, 1e-5, **kw)(h)
    conv_fn = _CONV_FNS[self.conv_method]
    h = nn.Conv(self.features * self.mult, (3, 3), kernel_init=KERNEL_INIT,
                conv_general_dilated=conv_fn, **kw)(h)
    h = _group_norm(1, 1e-5, **kw)(gelu(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.features, (3, 3), kernel_init=KERNEL_INIT, conv_general_dilated=conv_fn, **kw)(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(x)
    return x + h


class Attention(nn.Module):
  """Pre-norm multi-head softmax self-attention over all positions, with a residual.

  Attributes:
    heads: Number of heads.
    head_dim: Width of each head; None gives `channels // heads`.
    qkv_bias: Whether the query/key/value projection has a bias.
    num_groups: Groups of the input GroupNorm.
    epsilon: Epsilon of the input GroupNorm.
  """

  heads: int
  head_dim: int | None
  qkv_bias: bool
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H, W, C]."""
    batch, height, width, channels = x.shape
    head_dim = self.head_dim or channels // self.heads
    kw = dict(kernel_init=KERNEL_INIT, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _group_norm(self.num_groups, self.epsilon, self.dtype, self.param_dtype)(x)
    qkv = nn.Dense(3 * self.heads * head_dim, use_bias=self.qkv_bias, **kw)(h)
    q, k, v = jnp.split(qkv.reshape(batch, height * width, 3 * self.heads, head_dim), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, height, width, -1)
    return x + nn.Dense(channels, **kw)(out)


class LinearAttention(nn.Module):
  """Pre-norm linear attention of "The Annotated Diffusion Model", with a residual.

  Queries are softmaxed over their features and keys over positions, so the
  cost is linear in the number of positions. GroupNorm(1) before and after.

  Attributes:
    heads: Number of heads.
    head_dim: Width of each head.
  """

  heads: int = 4
  head_dim: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H, W, C]."""
    batch, height, width, channels = x.shape
    kw = dict(kernel_init=KERNEL_INIT, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _group_norm(1, 1e-5, self.dtype, self.param_dtype)(x)
    qkv = nn.Dense(3 * self.heads * self.head_dim, use_bias=False, **kw)(h)
    q, k, v = jnp.split(qkv.reshape(batch, height * width, 3 * self.heads, self.head_dim), 3, axis=2)
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * self.head_dim**-0.5
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bnhd,bnhe->bhde", k, v.astype(jnp.float32))
    out = jnp.einsum("bhde,bnhd->bnhe", context, q).astype(self.dtype)
    out = nn.Dense(channels, **kw)(out.reshape(batch, height, width, -1))
    return x + _group_norm(1, 1e-5, self.dtype, self.param_dtype)(out)


class Downsample(nn.Module):
  """Stride-2 convolution halving an even height and width ('SAME' padding).

  With kernel_size 4 the padding is (1, 1) per axis, as in the tutorial's
  `Conv2d(C, C, 4, 2, 1)`; with 3 it is (0, 1), as in DDPM's TF 'SAME'.

  Attributes:
    kernel_size: Spatial size of the square kernel.
  """

  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H/2, W/2, C]."""
    return nn.Conv(
        x.shape[-1],
        (self.kernel_size, self.kernel_size),
        strides=(2, 2),
        padding="SAME",
        kernel_init=KERNEL_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(x)


class TransposedConvUpsample(nn.Module):
  """4x4 stride-2 transposed convolution doubling height and width.

  Equal to PyTorch's `ConvTranspose2d(C, C, 4, 2, 1)` (the tutorial's Upsample).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, 2H, 2W, C]."""
    return nn.ConvTranspose(
        x.shape[-1],
        (4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        transpose_kernel=True,
        kernel_init=KERNEL_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(x)


class NearestUpsample(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (DDPM)."""

  conv_method: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(
        x.shape[-1], (3, 3), kernel_init=KERNEL_INIT, conv_general_dilated=_CONV_FNS[self.conv_method],
        dtype=self.dtype, param_dtype=self.param_dtype,
    )(x)
