"""The DDPM authors' original TensorFlow checkpoints as ddpm_jax networks.

`diffusion_cifar10_model`, the LSUN and CelebA-HQ models: checkpoints of
`diffusion_tf.models.unet.model`, read with `tf.train.load_checkpoint`
(TensorFlow needed). The network is inferred from the variable shapes.

Example:
  >>> config, params = load_tf_checkpoint("cifar10/model.ckpt-790000")
  >>> config == unet_config("ddpm_cifar10", dropout=0.0)
  True
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ddpm_jax.models import UNetConfig
from ddpm_jax.models.pretrained.common import (
    Leaf,
    PyTree,
    assemble,
    fail,
    fused,
    one_line,
    same,
)

TF_EMA_SUFFIX = "/ExponentialMovingAverage"
_TF_LEAVES = ("W", "b", "gamma", "beta")  # nn.conv2d / dense / nin, group_norm


def _tf_network_config(shapes: Mapping[str, list[int]],
                       source: str) -> UNetConfig:
  """The `UNetConfig` of `diffusion_tf.models.unet.model`'s variables."""

  def shape(name: str) -> list[int]:
    if name not in shapes:
      raise fail(
          source, f"no variable {name}: not a checkpoint of the DDPM "
          "authors' U-Net (diffusion_tf.models.unet)")
    return shapes[name]

  _, _, in_channels, base = shape("model/conv_in/W")
  shape("model/down_0/block_0/conv1/W")  # at least one level and block
  levels = blocks = 1
  while f"model/down_{levels}/block_0/conv1/W" in shapes:
    levels += 1
  while f"model/down_0/block_{blocks}/conv1/W" in shapes:
    blocks += 1
  widths = [shape(f"model/down_{i}/block_0/conv1/W")[3] for i in range(levels)]
  if any(w % base for w in widths):
    raise fail(
        source, f"level widths {widths} are not multiples of "
        f"conv_in's {base}")
  out_channels = shape("model/conv_out/W")[3]
  temb = shape("model/temb/dense0/W")[1]
  try:
    return UNetConfig(
        layout="ddpm",
        in_channels=in_channels,
        base_channels=base,
        channel_mults=tuple(w // base for w in widths),
        num_res_blocks=blocks,
        attention=tuple(
            "full" if f"model/down_{i}/attn_0/q/W" in shapes else "none"
            for i in range(levels)),
        mid_attention="full" if "model/mid/attn_1/q/W" in shapes else "none",
        num_groups=32,  # tf.contrib.layers.group_norm's default
        dropout=0.0,
        time_embed_dim=None if temb == 4 * base else temb,
        learned_variance=out_channels == 2 * in_channels)
  except ValueError as e:
    raise fail(source, f"not a valid ddpm_jax network: {e}") from None


def _tf_modules(config: UNetConfig) -> dict[tuple[str, ...], tuple]:
  """Flax module path -> (kind, TF variable scope), in `UNet._ddpm`'s order."""
  plan: dict[tuple[str, ...], tuple] = {
      ("TimeEmbedding_0", "Dense_0"): ("plain", "model/temb/dense0"),
      ("TimeEmbedding_0", "Dense_1"): ("plain", "model/temb/dense1"),
      ("Conv_0",): ("plain", "model/conv_in"),
      ("GroupNorm_0",): ("norm", "model/norm_out"),
      ("Conv_1",): ("plain", "model/conv_out"),
  }
  counts: dict[str, int] = {}

  def add(kind: str, module: str, scope: str) -> None:
    index = counts.get(module, 0)
    counts[module] = index + 1
    path = (f"{module}_{index}",)
    if module in ("Downsample", "NearestUpsample"):
      path += ("Conv_0",)
    plan[path] = (kind, scope)

  last = len(config.channel_mults) - 1
  for level in range(last + 1):
    for j in range(config.num_res_blocks):
      add("resnet", "ResnetBlock", f"model/down_{level}/block_{j}")
      if config.attention[level] == "full":
        add("attention", "Attention", f"model/down_{level}/attn_{j}")
    if level != last:
      add("plain", "Downsample", f"model/down_{level}/downsample/conv")
  add("resnet", "ResnetBlock", "model/mid/block_1")
  if config.mid_attention == "full":
    add("attention", "Attention", "model/mid/attn_1")
  add("resnet", "ResnetBlock", "model/mid/block_2")
  for level in reversed(range(last + 1)):
    for j in range(config.num_res_blocks + 1):
      add("resnet", "ResnetBlock", f"model/up_{level}/block_{j}")
      if config.attention[level] == "full":
        add("attention", "Attention", f"model/up_{level}/attn_{j}")
    if level != 0:
      add("plain", "NearestUpsample", f"model/up_{level}/upsample/conv")
  return plan


def _tf_leaf(kind: str, scope: str, rest: tuple[str, ...]) -> Leaf:
  """TF kernels are already HWIO / [in, out]: only names change."""
  s = scope + "/"
  if kind == "attention":
    table = {
        ("GroupNorm_0", "scale"):
            same(s + "norm/gamma"),
        ("GroupNorm_0", "bias"):
            same(s + "norm/beta"),
        ("Dense_0", "kernel"):
            fused((s + "q/W", s + "k/W", s + "v/W"), kernel=True,
                  transpose=False),
        ("Dense_0", "bias"):
            fused((s + "q/b", s + "k/b", s + "v/b"), kernel=False,
                  transpose=False),
        ("Dense_1", "kernel"):
            same(s + "proj_out/W"),
        ("Dense_1", "bias"):
            same(s + "proj_out/b"),
    }
  elif kind == "resnet":
    table = {
        ("GroupNorm_0", "scale"): same(s + "norm1/gamma"),
        ("GroupNorm_0", "bias"): same(s + "norm1/beta"),
        ("Conv_0", "kernel"): same(s + "conv1/W"),
        ("Conv_0", "bias"): same(s + "conv1/b"),
        ("Dense_0", "kernel"): same(s + "temb_proj/W"),
        ("Dense_0", "bias"): same(s + "temb_proj/b"),
        ("GroupNorm_1", "scale"): same(s + "norm2/gamma"),
        ("GroupNorm_1", "bias"): same(s + "norm2/beta"),
        ("Conv_1", "kernel"): same(s + "conv2/W"),
        ("Conv_1", "bias"): same(s + "conv2/b"),
        ("Dense_1", "kernel"): same(s + "nin_shortcut/W"),
        ("Dense_1", "bias"): same(s + "nin_shortcut/b"),
    }
  elif kind == "norm":
    table = {("scale",): same(s + "gamma"), ("bias",): same(s + "beta")}
  else:
    table = {("kernel",): same(s + "W"), ("bias",): same(s + "b")}
  return table[rest]


def load_tf_checkpoint(path: str | os.PathLike, *,
                       ema: bool = True) -> tuple[UNetConfig, PyTree]:
  """Imports a checkpoint of the DDPM authors' TensorFlow code.

  The network (`diffusion_tf.models.unet.model`, the variables under
  `model/`) is inferred from the variable shapes: widths, levels, blocks per
  level, where attention sits, learned variance. GroupNorm has 32 groups
  (their default) and dropout is not recorded (0.0 here; DDPM trained CIFAR-10
  with 0.1). The checkpoint holds no diffusion settings: DDPM used the linear
  schedule 1e-4..0.02 with T = 1000, 'fixed_large' for CIFAR-10 and
  'fixed_small' for LSUN and CelebA-HQ. Every network variable is used
  exactly once; optimizer slots and counters are not part of it.

  Needs TensorFlow. Checked against checkpoints written in the authors'
  variable naming (read from their code), not against the published files.

  Args:
    path: a checkpoint prefix (e.g. `.../model.ckpt-790000`) or a directory
      with a `checkpoint` file.
    ema: read the exponential moving averages (`<var>/ExponentialMovingAverage`,
      what the authors sampled and evaluated with) instead of the raw weights.

  Returns:
    (config, float32 params of `UNet(config=config)`).

  Raises:
    PretrainedError: the checkpoint cannot be read, or its variables are not
      those of the authors' U-Net (the variable is named).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  source = os.fspath(path)
  try:
    reader = tf.train.load_checkpoint(source)
    shapes = reader.get_variable_to_shape_map()
  except Exception as e:  # pylint: disable=broad-except
    # tf.errors.NotFoundError, DataLossError, ValueError, ...
    raise fail(
        source, f"not a readable TensorFlow checkpoint "
        f"({type(e).__name__}: {one_line(e)})") from None
  network = {
      name for name in shapes
      if name.startswith("model/") and name.rsplit("/", 1)[-1] in _TF_LEAVES
  }
  strays = sorted(name for name in shapes if name.startswith("model/") and
                  name not in network and name.rsplit("/", 1)[0] not in network)
  if strays:
    raise fail(
        source, f"variable {strays[0]} is not part of the DDPM "
        f"authors' U-Net ({len(strays)} such)")
  config = _tf_network_config(shapes, source)
  if ema:
    no_ema = sorted(n for n in network if n + TF_EMA_SUFFIX not in shapes)
    if no_ema:
      raise fail(
          source, f"no moving average of {no_ema[0]} "
          f"({len(no_ema)} variables without one); use ema=False "
          "for the raw weights")
  tensors = {
      name: reader.get_tensor(name + (TF_EMA_SUFFIX if ema else ""))
      for name in network
  }
  plan = _tf_modules(config)

  def leaf_for(names: tuple[str, ...]) -> Leaf:
    for cut in (2, 1):
      if names[:cut] in plan:
        kind, scope = plan[names[:cut]]
        return _tf_leaf(kind, scope, names[cut:])
    raise AssertionError(f"no TF variable for parameter {names}")

  params = assemble(tensors, config, leaf_for, source=source,
                    hint="this checkpoint")
  return config, params
