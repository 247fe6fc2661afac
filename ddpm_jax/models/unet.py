"""The noise-prediction U-Net: DDPM's network and the Annotated Diffusion tutorial's."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers
from ddpm_jax.models.config import UNetConfig

Array = jax.Array


class UNet(nn.Module):
  """U-Net mapping noisy images and time steps to a prediction of the image's shape.

  Use it as a pure function: `model.apply(variables, x, t, train=False)`, inside
  jit, grad or `lax.scan`. With `train=True` dropout is active and needs
  `rngs={'dropout': key}`.

  Attributes:
    config: The network configuration (see `UNetConfig`).
  """

  config: UNetConfig

  @nn.compact
  def __call__(self, x: Array, t: Array, *, y: Array | None = None,
               train: bool) -> Array:
    """Predicts from noisy images.

    Args:
      x: Images [B, H, W, in_channels], floating point; H and W divisible by
        `2 ** (len(channel_mults) - 1)`.
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
    temb = layers.TimeEmbedding(
        sinusoid_dim=cfg.base_channels,
        features=cfg.temb_dim,
        activation=nn.swish if cfg.layout == "ddpm" else functools.partial(
            nn.gelu, approximate=False),
        **self._dtypes,
    )(t)
    if cfg.num_classes is not None:
      temb = temb + nn.Embed(cfg.num_classes, cfg.temb_dim, **self._dtypes)(y)
    if cfg.layout == "ddpm":
      out = self._ddpm(x, temb, train=train)
    else:
      out = self._tutorial(x, temb, train=train)
    return out.astype(x.dtype)

  @property
  def _dtypes(self) -> dict[str, jnp.dtype]:
    return dict(dtype=self.config.compute_dtype,
                param_dtype=self.config.parameter_dtype)

  def _check_inputs(self, x: Array, t: Array, y: Array | None) -> None:
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"UNet: x must have shape [B, H, W, {cfg.in_channels}], got {x.shape}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"UNet: x must be floating point, got {x.dtype}")
    factor = 2**(len(cfg.channel_mults) - 1)
    height, width = x.shape[1:3]
    if height % factor or width % factor:
      raise ValueError(
          f"UNet: image size {height}x{width} cannot be halved {len(cfg.channel_mults) - 1} times "
          f"(channel_mults={cfg.channel_mults}); height and width must be divisible by {factor}"
      )
    if t.shape != x.shape[:1]:
      raise ValueError(
          f"UNet: t must have shape [B]=[{x.shape[0]}], got {t.shape}")
    if cfg.num_classes is None:
      if y is not None:
        raise ValueError("UNet: y was given but config.num_classes is None")
    elif y is None or y.shape != x.shape[:1] or not jnp.issubdtype(
        y.dtype, jnp.integer):
      shape = None if y is None else y.shape
      raise ValueError(
          f"UNet: config.num_classes={cfg.num_classes} needs integer labels y of shape "
          f"[{x.shape[0]}], got {shape}")

  def _block(self, features: int) -> nn.Module:
    cfg = self.config
    if cfg.block_type == "convnext":
      return layers.ConvNextBlock(
          features,
          mult=cfg.convnext_mult,
          dropout=cfg.dropout,
          **self._dtypes,
      )
    block = layers.ResnetBlock if cfg.layout == "ddpm" else layers.PostNormResnetBlock
    return block(features, num_groups=cfg.num_groups, dropout=cfg.dropout,
                 **self._dtypes)

  def _attention(self, kind: str) -> Callable[[Array], Array]:
    cfg = self.config
    if kind == "none":
      return lambda h: h
    if kind == "linear":
      return layers.LinearAttention(heads=4, head_dim=32, **self._dtypes)
    if cfg.layout == "ddpm":
      return layers.Attention(heads=1, head_dim=None, qkv_bias=True,
                              num_groups=cfg.num_groups, epsilon=1e-6,
                              **self._dtypes)
    return layers.Attention(heads=4, head_dim=32, qkv_bias=False, num_groups=1,
                            epsilon=1e-5, **self._dtypes)

  def _middle(self, h: Array, temb: Array, *, train: bool) -> Array:
    width = h.shape[-1]
    h = self._block(width)(h, temb, train=train)
    h = self._attention(self.config.mid_attention)(h)
    return self._block(width)(h, temb, train=train)

  def _ddpm(self, x: Array, temb: Array, *, train: bool) -> Array:
    """DDPM layout: a skip after every block and every downsampling."""
    cfg = self.config
    widths = cfg.level_widths
    last = len(widths) - 1
    hs = [
        layers.Conv(cfg.base_channels, (3, 3), kernel_init=layers.KERNEL_INIT,
                    **self._dtypes)(x)
    ]
    for level, width in enumerate(widths):
      for _ in range(cfg.num_res_blocks):
        h = self._block(width)(hs[-1], temb, train=train)
        hs.append(self._attention(cfg.attention[level])(h))
      if level != last:
        hs.append(layers.Downsample(3, **self._dtypes)(hs[-1]))
    h = self._middle(hs[-1], temb, train=train)
    for level in reversed(range(len(widths))):
      for _ in range(cfg.num_res_blocks + 1):
        h = self._block(widths[level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                       temb, train=train)
        h = self._attention(cfg.attention[level])(h)
      if level != 0:
        h = layers.NearestUpsample(**self._dtypes)(h)
    h = layers.GroupNorm(cfg.num_groups, 1e-6, nn.swish, **self._dtypes)(h)
    return layers.Conv(cfg.out_channels, (3, 3), kernel_init=layers.ZERO_INIT,
                       **self._dtypes)(h)

  def _tutorial(self, x: Array, temb: Array, *, train: bool) -> Array:
    """Annotated Diffusion layout: one skip per level, taken after its attention.

    As in the tutorial, the up path has one stage fewer than the down path, so
    the first level's skip is never consumed.
    """
    cfg = self.config
    widths = cfg.level_widths
    last = len(widths) - 1
    init_width = cfg.base_channels // 3 * 2
    h = layers.Conv(init_width, (7, 7), kernel_init=layers.KERNEL_INIT,
                    **self._dtypes)(x)
    skips = []
    for level, width in enumerate(widths):
      for _ in range(cfg.num_res_blocks):
        h = self._block(width)(h, temb, train=train)
      h = self._attention(cfg.attention[level])(h)
      skips.append(h)
      if level != last:
        h = layers.Downsample(4, **self._dtypes)(h)
    h = self._middle(h, temb, train=train)
    for level in reversed(range(1, len(widths))):
      h = jnp.concatenate([h, skips[level]], axis=-1)
      for _ in range(cfg.num_res_blocks):
        h = self._block(widths[level - 1])(h, temb, train=train)
      h = self._attention(cfg.attention[level])(h)
      h = layers.TransposedConvUpsample(**self._dtypes)(h)
    h = self._block(cfg.base_channels)(h, None, train=train)
    return nn.Dense(cfg.out_channels, kernel_init=layers.ZERO_INIT,
                    **self._dtypes)(h)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
