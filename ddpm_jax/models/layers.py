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

from ddpm_jax.models import kernels

Array = jax.Array
Dtype = Any

#: Kernel initialiser of every convolution and dense layer (the DDPM default).
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
#: DDPM's near-zero initialiser (scale 1e-10) of the layers that close a
#: residual branch and of the network's output, so that each block starts as
#: the identity and the initial prediction is about 0 (initial L_simple ~ 1).
ZERO_INIT = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
#: The network's convolution: `nn.Conv` (same parameters) computed by
#: `kernels.conv_general_dilated`, XLA's convolution or faster code for the
#: backend with the same results.
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=kernels.conv_general_dilated)


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
  freqs = jnp.exp(
      jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class DepthwiseConv(nn.Module):
  """Depthwise 'SAME' convolution with bias; parameters as `nn.Conv(feature_group_count=C)`.

  Attributes:
    kernel_size: Odd spatial size of the square kernel.
  """

  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H, W, C]."""
    channels = x.shape[-1]
    kernel = self.param("kernel", KERNEL_INIT,
                        (self.kernel_size, self.kernel_size, 1, channels),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return kernels.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels) + bias


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
    dense = functools.partial(nn.Dense, self.features, kernel_init=KERNEL_INIT,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense()(sinusoidal_embedding(t, self.sinusoid_dim))
    return dense()(self.activation(h))


class GroupNorm(nn.Module):
  """GroupNorm over the channels of [B, ..., C], then an optional activation.

  The parameters are `nn.GroupNorm`'s ('scale' ones, 'bias' zeros, [C]) and
  so are the auto-assigned names ('GroupNorm_0', ...); the output equals
  `activation(nn.GroupNorm(num_groups, epsilon=epsilon)(x))`. Computed by
  `kernels.group_norm`, which fuses the norm with the activation on CPU.

  Attributes:
    num_groups: Number of groups; must divide the channels.
    epsilon: Added to the variance.
    activation: Elementwise function applied after the norm, or None.

  Example:
    >>> h = GroupNorm(32, 1e-6, activation=nn.swish)(x)
  """

  num_groups: int
  epsilon: float
  activation: Callable[[Array], Array] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, ..., C] to [B, ..., C] of `dtype`."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,),
                      self.param_dtype)
    return kernels.group_norm(x, scale, bias, num_groups=self.num_groups,
                              epsilon=self.epsilon, activation=self.activation,
                              dtype=self.dtype)


def _group_norm(
    num_groups: int, epsilon: float, dtype: Dtype, param_dtype: Dtype,
    activation: Callable[[Array], Array] | None = None) -> GroupNorm:
  return GroupNorm(num_groups, epsilon, activation, dtype=dtype,
                   param_dtype=param_dtype)


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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(Conv, self.features, (3, 3), **kw)
    h = conv(kernel_init=KERNEL_INIT)(_group_norm(self.num_groups, 1e-6, **kw,
                                                  activation=nn.swish)(x))
    if temb is not None:
      h = h + nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(
          nn.swish(temb))[:, None, None, :]
    h = _group_norm(self.num_groups, 1e-6, **kw, activation=nn.swish)(h)
    h = conv(kernel_init=ZERO_INIT)(nn.Dropout(self.dropout,
                                               deterministic=not train)(h))
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(Conv, self.features, (3, 3),
                             kernel_init=KERNEL_INIT, **kw)
    h = _group_norm(self.num_groups, 1e-5, **kw, activation=nn.silu)(conv()(x))
    if temb is not None:
      h = h + nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(
          nn.silu(temb))[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _group_norm(self.num_groups, 1e-5, **kw, activation=nn.silu)(conv()(h))
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
  """

  features: int
  mult: int
  dropout: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, *, train: bool) -> Array:
    """Maps [B, H, W, C_in] (and temb [B, T] or None) to [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gelu = functools.partial(nn.gelu, approximate=False)
    h = DepthwiseConv(7, **kw)(x)
    if temb is not None:
      h = h + nn.Dense(x.shape[-1], kernel_init=KERNEL_INIT, **kw)(
          gelu(temb))[:, None, None, :]
    h = _group_norm(1, 1e-5, **kw)(h)
    conv = functools.partial(Conv, kernel_size=(3, 3), kernel_init=KERNEL_INIT,
                             **kw)
    h = conv(self.features * self.mult)(h)
    h = _group_norm(1, 1e-5, **kw)(gelu(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.features)(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, kernel_init=KERNEL_INIT, **kw)(x)
    return x + h


class QKVProjection(nn.Module):
  """Queries, keys and values [B, N, heads, head_dim] from [B, N, C], by one `nn.Dense`'s parameters.

  The parameters are those of `nn.Dense(3 * heads * head_dim, use_bias=use_bias)`
  ('kernel' [C, 3 * heads * head_dim], then 'bias'), with the queries', keys'
  and values' columns in that order, so checkpoints and pretrained loaders see
  one fused projection. It is applied as three projections by slices of the
  kernel: slicing the kernel, rather than the projected [B, N, 3 * heads *
  head_dim] output, saves copying the output into three (and, in the backward
  pass, concatenating their gradients), 5% of the tutorial net's CPU train
  step (BENCHMARKS.md).

  Attributes:
    heads: Number of heads.
    head_dim: Width of each head.
    use_bias: Whether the projection has a bias.

  Example:
    >>> q, k, v = QKVProjection(4, 32, False, name="Dense_0")(h)  # h: [B, N, C]
  """

  heads: int
  head_dim: int
  use_bias: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> tuple[Array, Array, Array]:
    """Maps [B, N, C] to three [B, N, heads, head_dim] arrays of `dtype`: queries, keys, values."""
    channels, inner = h.shape[-1], self.heads * self.head_dim
    kernel = self.param("kernel", KERNEL_INIT, (channels, 3 * inner),
                        self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros_init(),
                       (3 *
                        inner,), self.param_dtype) if self.use_bias else None)
    h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)

    def project(i: int) -> Array:
      columns = slice(i * inner, (i + 1) * inner)
      out = jnp.einsum(
          "bnc,chd->bnhd", h,
          kernel[:, columns].reshape(channels, self.heads, self.head_dim))
      return out if bias is None else out + bias[columns].reshape(
          self.heads, self.head_dim)

    return project(0), project(1), project(2)


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
    kw = dict(kernel_init=KERNEL_INIT, dtype=self.dtype,
              param_dtype=self.param_dtype)
    h = _group_norm(self.num_groups, self.epsilon, self.dtype,
                    self.param_dtype)(x)
    q, k, v = QKVProjection(self.heads, head_dim, self.qkv_bias,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name="Dense_0")(h.reshape(batch, height * width,
                                                      channels))
    out = kernels.dot_product_attention(q, k,
                                        v).reshape(batch, height, width, -1)
    return x + nn.Dense(channels, name="Dense_1", **kw)(out)


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
    kw = dict(kernel_init=KERNEL_INIT, dtype=self.dtype,
              param_dtype=self.param_dtype)
    h = _group_norm(1, 1e-5, self.dtype, self.param_dtype)(x)
    q, k, v = QKVProjection(self.heads, self.head_dim, False, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            name="Dense_0")(h.reshape(batch, height * width,
                                                      channels))
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * self.head_dim**-0.5
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bnhd,bnhe->bhde", k, v.astype(jnp.float32))
    out = jnp.einsum("bhde,bnhd->bnhe", context, q).astype(self.dtype)
    out = nn.Dense(channels, name="Dense_1",
                   **kw)(out.reshape(batch, height, width, -1))
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
    return Conv(
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

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], (3, 3), kernel_init=KERNEL_INIT, dtype=self.dtype,
                param_dtype=self.param_dtype)(x)
