"""Typed, frozen configuration of the U-Net and its named presets."""

import dataclasses
from typing import Any

import jax.numpy as jnp

LAYOUTS = ("ddpm", "tutorial")
BLOCK_TYPES = ("resnet", "convnext")
ATTENTION_TYPES = ("none", "linear", "full")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
  """Network-only configuration of `UNet` (hashable: a Module attribute and a jit static arg).

  Attributes:
    layout: Macro-architecture. 'ddpm': the network of Ho et al. (2020): 3x3
      input conv, a skip after every block and every downsampling, one more
      block per level on the way up, stride-2 3x3 down convs, nearest-neighbour
      upsampling + 3x3 conv, GroupNorm -> swish -> 3x3 conv head; its
      'resnet' block is pre-activation (`layers.ResnetBlock`) and its 'full'
      attention is single-headed with biased q/k/v. 'tutorial': the U-Net of
      "The Annotated Diffusion Model": 7x7 input conv to `base_channels // 3 * 2`
      channels, one skip per level (after its attention), 4x4 stride-2 down
      convs and 4x4 stride-2 transposed up convs, a final block and 1x1 conv;
      its 'resnet' block is conv -> norm -> act (`layers.PostNormResnetBlock`)
      and its 'full' attention has 4 heads of 32 and no q/k/v bias.
    in_channels: Image channels.
    base_channels: Width of the first level; also the sinusoidal embedding width.
    channel_mults: Width of level i is `base_channels * channel_mults[i]`;
      the number of levels is `len(channel_mults)`, and the image height and
      width must be divisible by `2 ** (len(channel_mults) - 1)`.
    num_res_blocks: Blocks per level on the way down ('ddpm' adds one on the
      way up).
    block_type: 'resnet' or 'convnext' (`layers.ConvNextBlock`).
    attention: Attention after the blocks of each level, one of 'none',
      'linear', 'full' per level (the level at index i works at resolution
      `image_size / 2 ** i`). 'ddpm' attends after every block of a level,
      'tutorial' once per level.
    mid_attention: Attention between the two middle blocks.
    num_groups: GroupNorm groups of the 'resnet' blocks and of the 'ddpm'
      attention and head; it must divide every level width.
    convnext_mult: Hidden width multiplier of the 'convnext' blocks.
    dropout: Dropout rate inside every block, active only with `train=True`.
    time_embed_dim: Width of the time-embedding MLP; None gives
      `4 * base_channels`.
    learned_variance: Output twice `in_channels` channels (mean and variance
      parameters) instead of `in_channels`.
    num_classes: If set, a learned class embedding is added to the time
      embedding and `UNet` requires labels `y`.
    dtype: Compute dtype, 'float32' or 'bfloat16'.
    param_dtype: Parameter dtype, 'float32' or 'bfloat16'.
  """

  layout: str = "ddpm"
  in_channels: int = 3
  base_channels: int = 128
  channel_mults: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  block_type: str = "resnet"
  attention: tuple[str, ...] = ("none", "full", "none", "none")
  mid_attention: str = "full"
  num_groups: int = 32
  convnext_mult: int = 2
  dropout: float = 0.0
  time_embed_dim: int | None = None
  learned_variance: bool = False
  num_classes: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    # Configs built from ml_collections / JSON carry lists; store tuples so the config stays hashable.
    for name in ("channel_mults", "attention"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    self._validate()

  def _validate(self) -> None:

    def check(ok: bool, message: str) -> None:
      if not ok:
        raise ValueError(f"UNetConfig: {message}")

    def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
      check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")

    def positive(name: str, value: Any) -> None:
      check(
          isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{name} must be a positive int, got {value!r}")

    choice("layout", self.layout, LAYOUTS)
    choice("block_type", self.block_type, BLOCK_TYPES)
    choice("mid_attention", self.mid_attention, ATTENTION_TYPES)
    choice("dtype", self.dtype, DTYPES)
    choice("param_dtype", self.param_dtype, DTYPES)
    for name in ("in_channels", "base_channels", "num_res_blocks", "num_groups",
                 "convnext_mult"):
      positive(name, getattr(self, name))
    check(len(self.channel_mults) > 0, "channel_mults must not be empty")
    for mult in self.channel_mults:
      positive("every channel_mults entry", mult)
    check(
        len(self.attention) == len(self.channel_mults),
        f"attention needs one entry per level ({len(self.channel_mults)}), got {self.attention}"
    )
    for kind in self.attention:
      choice("every attention entry", kind, ATTENTION_TYPES)
    check(
        self.base_channels >= 4 and self.base_channels % 2 == 0,
        f"base_channels must be even and at least 4 (sinusoidal embedding), got {self.base_channels}"
    )
    check(
        isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
        f"dropout must be in [0, 1), got {self.dropout!r}")
    if self.time_embed_dim is not None:
      positive("time_embed_dim", self.time_embed_dim)
    if self.num_classes is not None:
      positive("num_classes", self.num_classes)
    check(isinstance(self.learned_variance, bool),
          f"learned_variance must be a bool, got {self.learned_variance!r}")
    if self.layout == "ddpm" or self.block_type == "resnet":
      for width in self.level_widths:
        check(
            width % self.num_groups == 0,
            f"num_groups={self.num_groups} must divide every level width {self.level_widths}, "
            f"not {width}")

  @property
  def level_widths(self) -> tuple[int, ...]:
    """Channels of each level: `base_channels * mult`."""
    return tuple(self.base_channels * mult for mult in self.channel_mults)

  @property
  def out_channels(self) -> int:
    """Channels of the network output."""
    return 2 * self.in_channels if self.learned_variance else self.in_channels

  @property
  def temb_dim(self) -> int:
    """Width of the time embedding (`time_embed_dim` or `4 * base_channels`)."""
    return self.time_embed_dim or 4 * self.base_channels

  @property
  def compute_dtype(self) -> jnp.dtype:
    """`dtype` as a JAX dtype."""
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self) -> jnp.dtype:
    """`param_dtype` as a JAX dtype."""
    return jnp.dtype(self.param_dtype)

  def to_dict(self) -> dict[str, Any]:
    """Plain dict of the fields (tuples as lists), inverse of `from_dict`."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(self).items()
    }

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "UNetConfig":
    """Builds a config from a plain dict (e.g. `ml_collections.ConfigDict.to_dict()`).

    Raises:
      ValueError: For a key that is not a field, or an invalid value.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(
          f"UNetConfig: unknown fields {unknown}; known fields are {sorted(known)}"
      )
    return cls(**fields)


PRESETS: dict[str, UNetConfig] = {
    # "The Annotated Diffusion Model" for Fashion-MNIST: 2,996,315 parameters.
    # With block_type="resnet", base_channels=32: 2,179,337 parameters.
    "tutorial":
        UNetConfig(
            layout="tutorial",
            in_channels=1,
            base_channels=28,
            channel_mults=(1, 2, 4),
            num_res_blocks=2,
            block_type="convnext",
            attention=("linear", "linear", "linear"),
            mid_attention="full",
            num_groups=8,
        ),
    # DDPM (Ho et al., 2020) CIFAR-10 network: 35,746,307 parameters.
    "ddpm_cifar10":
        UNetConfig(
            layout="ddpm",
            in_channels=3,
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            block_type="resnet",
            attention=("none", "full", "none", "none"),
            mid_attention="full",
            num_groups=32,
            dropout=0.1,
        ),
    # DDPM 256x256 network (CelebA-HQ, LSUN church/cat/bedroom): attention at 16x16.
    "ddpm_256":
        UNetConfig(
            layout="ddpm",
            in_channels=3,
            base_channels=128,
            channel_mults=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            block_type="resnet",
            attention=("none", "none", "none", "none", "full", "none"),
            mid_attention="full",
            num_groups=32,
            dropout=0.0,
        ),
}


def unet_config(preset: str, **overrides: Any) -> UNetConfig:
  """Returns the named preset with some fields replaced.

  Args:
    preset: One of `PRESETS`: 'tutorial', 'ddpm_cifar10', 'ddpm_256'.
    **overrides: Fields to replace, e.g. `block_type='resnet'`.

  Returns:
    The validated config.

  Raises:
    ValueError: For an unknown preset or field, or an invalid value.
  """
  if preset not in PRESETS:
    raise ValueError(
        f"unet_config: unknown preset {preset!r}; choose from {sorted(PRESETS)}"
    )
  return UNetConfig.from_dict({**PRESETS[preset].to_dict(), **overrides})
