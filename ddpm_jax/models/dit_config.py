"""Typed, frozen configuration of the DiT and its named presets.

The presets are the models of Peebles & Xie (2023), "Scalable Diffusion Models
with Transformers", Table 1: DiT-S, B, L and XL (width, depth, heads) with
patch sizes 2, 4 and 8, named 'dit_s_2' ... 'dit_xl_8'. They fix the
architecture only: the image channels, learned variance and classes come from
the run (`dit_config(preset, in_channels=..., num_classes=...)`).

Example:
  >>> config = dit_config("dit_xl_2", in_channels=4, learned_variance=True,
  ...                     num_classes=1001)  # 1000 classes + the null class
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

PATCH_SIZES = (2, 4, 8)
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
  """Network-only configuration of `DiT` (hashable: a Module attribute and a jit static arg).

  Attributes:
    in_channels: Image channels.
    patch_size: Side of the square patches the image is cut into: 2, 4 or 8;
      the image height and width must be divisible by it.
    hidden_size: Width of the tokens.
    depth: Number of transformer blocks.
    num_heads: Attention heads; they must divide `hidden_size`.
    mlp_ratio: Hidden width of each block's MLP, in multiples of
      `hidden_size`.
    time_embed_dim: Width of the sinusoidal timestep embedding fed to the
      timestep MLP (256 in the paper).
    time_freq_shift: The timestep embedding's frequencies are
      `10000 ** (-k / (time_embed_dim // 2 - time_freq_shift))`: 0 in the
      authors' code, 1 in diffusers' `DiTTransformer2DModel`.
    mlp_norm_epsilon: Epsilon of each block's LayerNorm before its MLP: 1e-6
      in the authors' code (as every other LayerNorm of the DiT); diffusers'
      `DiTTransformer2DModel` uses its `norm_eps` there (default 1e-5).
    dropout: Dropout rate after the attention output projection and inside
      the MLP, active only with `train=True` (0 in the paper).
    learned_variance: Output twice `in_channels` channels (mean and variance
      parameters) instead of `in_channels`.
    num_classes: If set, a learned class embedding of this many rows (the
      classes and the null class of guidance) is added to the timestep
      embedding and `DiT` requires labels `y`.
    dtype: Compute dtype, 'float32' or 'bfloat16'.
    param_dtype: Parameter dtype, 'float32' or 'bfloat16'.
  """

  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: int = 4
  time_embed_dim: int = 256
  time_freq_shift: int = 0
  mlp_norm_epsilon: float = 1e-6
  dropout: float = 0.0
  learned_variance: bool = False
  num_classes: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    self._validate()

  def _validate(self) -> None:

    def check(ok: bool, message: str) -> None:
      if not ok:
        raise ValueError(f"DiTConfig: {message}")

    def positive(name: str, value: Any) -> None:
      check(
          isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{name} must be a positive int, got {value!r}")

    for name in ("in_channels", "hidden_size", "depth", "num_heads",
                 "mlp_ratio", "time_embed_dim"):
      positive(name, getattr(self, name))
    check(self.patch_size in PATCH_SIZES,
          f"patch_size must be one of {PATCH_SIZES}, got {self.patch_size!r}")
    check(
        self.hidden_size % self.num_heads == 0,
        f"num_heads={self.num_heads} must divide hidden_size="
        f"{self.hidden_size}")
    check(
        self.hidden_size % 4 == 0,
        f"hidden_size must be divisible by 4 (2-D sin-cos position "
        f"embedding), got {self.hidden_size}")
    check(
        self.time_embed_dim % 2 == 0 and self.time_freq_shift in (0, 1) and
        self.time_embed_dim // 2 > self.time_freq_shift,
        f"time_embed_dim must be even and time_freq_shift 0 or 1 below half "
        f"of it, got {self.time_embed_dim} and {self.time_freq_shift!r}")
    check(
        isinstance(self.mlp_norm_epsilon, (int, float)) and
        not isinstance(self.mlp_norm_epsilon, bool) and
        self.mlp_norm_epsilon > 0,
        f"mlp_norm_epsilon must be a positive number, got "
        f"{self.mlp_norm_epsilon!r}")
    check(
        isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
        f"dropout must be in [0, 1), got {self.dropout!r}")
    if self.num_classes is not None:
      positive("num_classes", self.num_classes)
    check(isinstance(self.learned_variance, bool),
          f"learned_variance must be a bool, got {self.learned_variance!r}")
    for name in ("dtype", "param_dtype"):
      check(
          getattr(self, name) in DTYPES,
          f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

  @property
  def out_channels(self) -> int:
    """Channels of the network output."""
    return 2 * self.in_channels if self.learned_variance else self.in_channels

  @property
  def head_dim(self) -> int:
    """Width of each attention head."""
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    """`dtype` as a JAX dtype."""
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self) -> jnp.dtype:
    """`param_dtype` as a JAX dtype."""
    return jnp.dtype(self.param_dtype)

  def to_dict(self) -> dict[str, Any]:
    """Plain dict of the fields, inverse of `from_dict`."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "DiTConfig":
    """Builds a config from a plain dict (e.g. `ml_collections.ConfigDict.to_dict()`).

    Raises:
      ValueError: For a key that is not a field, or an invalid value.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"DiTConfig: unknown fields {unknown}; known fields are "
                       f"{sorted(known)}")
    return cls(**fields)


# Peebles & Xie (2023), Table 1: (hidden_size, depth, num_heads).
_SIZES = {
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "xl": (1152, 28, 16),
}

DIT_PRESETS: dict[str, DiTConfig] = {
    f"dit_{size}_{patch}":
        DiTConfig(hidden_size=width, depth=depth, num_heads=heads,
                  patch_size=patch)
    for size, (width, depth, heads) in _SIZES.items() for patch in PATCH_SIZES
}


def dit_config(preset: str, **overrides: Any) -> DiTConfig:
  """Returns the named DiT preset with some fields replaced.

  Args:
    preset: One of `DIT_PRESETS`: 'dit_s_2', 'dit_s_4', 'dit_s_8', 'dit_b_2',
      ..., 'dit_xl_8' (DiT-S/2 ... DiT-XL/8).
    **overrides: Fields to replace, e.g. `in_channels=3`.

  Returns:
    The validated config.

  Raises:
    ValueError: For an unknown preset or field, or an invalid value.

  Example:
    >>> dit_config("dit_s_2", in_channels=3).hidden_size
    384
  """
  if preset not in DIT_PRESETS:
    raise ValueError(f"dit_config: unknown preset {preset!r}; choose from "
                     f"{sorted(DIT_PRESETS)}")
  return DiTConfig.from_dict({**DIT_PRESETS[preset].to_dict(), **overrides})
