"""The Diffusion Transformer (DiT) of Peebles & Xie (2023), beside the U-Net.

The image is cut into p x p patches, each linearly embedded to a token, plus
a fixed 2-D sin-cos position embedding. The time step (a sinusoidal
embedding through a two-layer SiLU MLP) and the class label (a learned
embedding with a row for guidance's null class) are summed into one
conditioning vector c, which steers every block by adaLN-Zero: from c a
zero-initialised dense layer gives the shift, scale and gate of each
residual branch, so an untrained block is the identity. A final adaLN layer
and a zero-initialised dense layer map each token back to a p x p patch of
the output (the prediction, and the variance channels if learned).

`DiT` takes the U-Net's inputs and call, `model.apply(variables, x, t, y=y,
train=False)`, so every loss, sampler, guidance mode and checkpoint takes it
unchanged.

Example:
  >>> from ddpm_jax.models import DiT, dit_config
  >>> net = DiT(config=dit_config("dit_s_2", in_channels=3, num_classes=11))
  >>> x, t, y = jnp.zeros((2, 32, 32, 3)), jnp.array([0, 999]), jnp.array([3, 10])
  >>> params = net.init(jax.random.key(0), x, t, y=y, train=False)["params"]
  >>> net.apply({"params": params}, x, t, y=y, train=False).shape
  (2, 32, 32, 3)
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import kernels, layers
from ddpm_jax.models.dit_config import DiTConfig

Array = jax.Array

XAVIER_INIT = layers.KERNEL_INIT
# The timestep MLP and the class embedding: N(0, 0.02^2), as the authors.
NORMAL_INIT = nn.initializers.normal(0.02)
ZEROS = nn.initializers.zeros_init()
LAYER_NORM_EPSILON = 1e-6


def timestep_embedding(t: Array, dim: int, *, freq_shift: int = 0,
                       max_period: float = 10000.0) -> Array:
  """DiT's sinusoidal embedding of (possibly fractional) time steps.

  Args:
    t: Time steps [B], integer or float.
    dim: Embedding width, even.
    freq_shift: 0 (the authors' code) or 1 (diffusers' DiT).
    max_period: The longest period.

  Returns:
    Float32 [B, dim]: cosines of `t * f_k` then sines, for
    `f_k = max_period ** (-k / (dim // 2 - freq_shift))`, k < dim // 2.

  Example:
    >>> timestep_embedding(jnp.array([0, 10]), 256).shape
    (2, 256)
  """
  half = dim // 2
  # Rounded once from float64, the same on every backend: at t ~ 1000 an
  # ulp of a float32 frequency moves the phase by ~6e-5.
  freqs = np.exp(-math.log(max_period) * np.arange(half) /
                 (half - freq_shift)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_position_embedding(dim: int, height: int, width: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding of a height x width token grid.

  As MAE's and DiT's `get_2d_sincos_pos_embed`: the first half of the
  channels embeds the token's column, the second half its row, each as
  `[sin(pos w_k), cos(pos w_k)]` with `w_k = 10000 ** (-k / (dim / 4))`.

  Args:
    dim: Token width, divisible by 4.
    height: Token rows.
    width: Token columns.

  Returns:
    Float32 [height * width, dim], tokens in row-major order.

  Example:
    >>> sincos_position_embedding(384, 16, 16).shape
    (256, 384)
  """
  omega = 1.0 / 10000**(np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def embed(pos: np.ndarray) -> np.ndarray:
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing="ij")
  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: `x * (1 + scale) + shift` per example ([B, N, D] by [B, D])."""
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning.

  `x + gate_a * Attn(modulate(LN(x), shift_a, scale_a))`, then the same with
  the MLP; the six vectors come from `Dense(6 D)(silu(c))`, zero-initialised.

  Attributes:
    num_heads: Attention heads.
    mlp_ratio: MLP hidden width in multiples of the token width.
    dropout: Dropout rate after the attention projection and in the MLP.
    mlp_norm_epsilon: Epsilon of the LayerNorm before the MLP.
  """

  num_heads: int
  mlp_ratio: int
  dropout: float
  mlp_norm_epsilon: float = LAYER_NORM_EPSILON
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array, *, train: bool) -> Array:
    """Maps tokens [B, N, D] and conditioning [B, D] to tokens [B, N, D]."""
    batch, length, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, kernel_init=XAVIER_INIT, **kw)
    norm = functools.partial(nn.LayerNorm, use_bias=False, use_scale=False,
                             **kw)
    dropout = nn.Dropout(self.dropout, deterministic=not train)
    (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = jnp.split(
        nn.Dense(6 * width, kernel_init=ZEROS, name="adaLN_modulation",
                 **kw)(nn.silu(c)), 6, axis=-1)

    h = modulate(
        norm(epsilon=LAYER_NORM_EPSILON, name="norm1")(x), shift_a, scale_a)
    q, k, v = layers.QKVProjection(self.num_heads, width // self.num_heads,
                                   True, name="qkv", **kw)(h)
    h = kernels.dot_product_attention(q, k, v).reshape(batch, length, width)
    h = dropout(dense(width, name="proj")(h))
    x = x + gate_a[:, None] * h

    h = modulate(
        norm(epsilon=self.mlp_norm_epsilon, name="norm2")(x), shift_m, scale_m)
    h = nn.gelu(dense(self.mlp_ratio * width, name="fc1")(h), approximate=True)
    h = dense(width, name="fc2")(dropout(h))
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """Diffusion Transformer mapping noisy images and time steps to a prediction of the image's shape.

  Use it as the U-Net: `model.apply(variables, x, t, y=y, train=False)`, a
  pure function inside jit, grad or `lax.scan`; with `train=True` and
  `config.dropout > 0`, dropout needs `rngs={'dropout': key}`.

  Attributes:
    config: The network configuration (see `DiTConfig`).
  """

  config: DiTConfig

  @nn.compact
  def __call__(self, x: Array, t: Array, *, y: Array | None = None,
               train: bool) -> Array:
    """Predicts from noisy images.

    Args:
      x: Images [B, H, W, in_channels], floating point; H and W divisible by
        `patch_size`.
      t: Time steps [B], integer or float.
      y: Class labels [B] in [0, num_classes); required exactly when
        `config.num_classes` is set.
      train: Whether dropout is active.

    Returns:
      Array [B, H, W, config.out_channels] of x's dtype.

    Raises:
      ValueError: If an input's shape or dtype does not fit the config.
    """
    cfg = self.config
    self._check_inputs(x, t, y)
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype)
    batch, height, width, channels = x.shape
    p, dim = cfg.patch_size, cfg.hidden_size
    rows, cols = height // p, width // p

    # Patches [B, rows * cols, p * p * C], each flattened (row, column,
    # channel), embedded as one dense layer (the authors' stride-p conv).
    grid = x.reshape(batch, rows, p, cols, p, channels)
    patches = grid.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, -1)
    embed = nn.Dense(dim, kernel_init=XAVIER_INIT, name="patch_embed", **kw)
    # The residual stream of tokens stays float32; the layers compute in
    # `dtype`.
    positions = sincos_position_embedding(dim, rows, cols)
    h = embed(patches).astype(jnp.float32) + positions

    temb = timestep_embedding(t, cfg.time_embed_dim,
                              freq_shift=cfg.time_freq_shift)
    temb = nn.Dense(dim, kernel_init=NORMAL_INIT, name="t_embed_1", **kw)(temb)
    c = nn.Dense(dim, kernel_init=NORMAL_INIT, name="t_embed_2",
                 **kw)(nn.silu(temb))
    if cfg.num_classes is not None:
      c = c + nn.Embed(cfg.num_classes, dim, embedding_init=NORMAL_INIT,
                       name="y_embed", **kw)(y)

    for i in range(cfg.depth):
      h = DiTBlock(cfg.num_heads, cfg.mlp_ratio, cfg.dropout,
                   cfg.mlp_norm_epsilon, name=f"block_{i}", **kw)(h, c,
                                                                  train=train)

    shift, scale = jnp.split(
        nn.Dense(2 * dim, kernel_init=ZEROS, name="final_modulation",
                 **kw)(nn.silu(c)), 2, axis=-1)
    h = modulate(
        nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_bias=False,
                     use_scale=False, name="final_norm", **kw)(h), shift, scale)
    out = nn.Dense(p * p * cfg.out_channels, kernel_init=ZEROS,
                   name="final_linear", **kw)(h)
    out = out.reshape(batch, rows, cols, p, p, cfg.out_channels)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)
    return out.astype(x.dtype)

  def _check_inputs(self, x: Array, t: Array, y: Array | None) -> None:
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"DiT: x must have shape [B, H, W, {cfg.in_channels}], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"DiT: x must be floating point, got {x.dtype}")
    height, width = x.shape[1:3]
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"DiT: image size {height}x{width} must be divisible by "
                       f"patch_size={cfg.patch_size}")
    if t.shape != x.shape[:1]:
      raise ValueError(
          f"DiT: t must have shape [B]=[{x.shape[0]}], got {t.shape}")
    if cfg.num_classes is None:
      if y is not None:
        raise ValueError("DiT: y was given but config.num_classes is None")
    elif y is None or y.shape != x.shape[:1] or not jnp.issubdtype(
        y.dtype, jnp.integer):
      shape = None if y is None else y.shape
      raise ValueError(
          f"DiT: config.num_classes={cfg.num_classes} needs integer labels y "
          f"of shape [{x.shape[0]}], got {shape}")
