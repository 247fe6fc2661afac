"""Published DDPM weights as ddpm_jax networks: diffusers folders, TF checkpoints.

A diffusers `UNet2DModel` folder (`config.json`, `diffusion_pytorch_model.
safetensors` and, beside it or in `../scheduler/`, `scheduler_config.json`),
e.g. `google/ddpm-cifar10-32` downloaded with `huggingface_hub`, becomes a
`UNetConfig`, a Flax parameter tree and the diffusion settings of
`config.diffusion`. Nothing is downloaded here; torch is never required
(safetensors files are read with the `safetensors` package's numpy API; a
`diffusion_pytorch_model.bin` is read only when torch is installed).

Every field of `config.json` that changes the network is checked: a value the
ddpm_jax U-Net cannot express raises `PretrainedError` naming the file, the
field and the value, never a silently different network. Every tensor of the
weights file is used exactly once; a missing, extra or mis-shaped tensor is
named.

The DDPM authors' original TensorFlow checkpoints (`diffusion_cifar10_model`,
the LSUN and CelebA-HQ models) are read with `tf.train.load_checkpoint` by
`load_tf_checkpoint` (TensorFlow needed); the network is inferred from the
variable shapes.

Example:
  >>> net = load_diffusers("ddpm-cifar10-32")  # a downloaded folder
  >>> net.config == unet_config("ddpm_cifar10", dropout=0.0)
  True
  >>> eps = UNet(config=net.config).apply({"params": net.params}, x, t,
  ...                                     train=False)
  >>> net.diffusion.var_type, net.image_size
  ('fixed_large', 32)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import UNet, UNetConfig

PyTree = Any

CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"


class PretrainedError(ValueError):
  """A pretrained model cannot be imported; the one-line message names the
  file and the field, tensor or value."""


class DiffusionSettings(NamedTuple):
  """The diffusion process of a pretrained model, as `config.diffusion` fields.

  Example: `config.diffusion.update(settings._asdict())`.
  """
  schedule: str  # 'linear' | 'quadratic' | 'sigmoid' (schedules.SCHEDULE_NAMES)
  num_timesteps: int  # T
  beta_start: float
  beta_end: float
  var_type: str  # 'fixed_small' | 'fixed_large' | 'learned_range'
  clip_x0: bool  # clip the predicted x_0 to [-1, 1]
  target: str  # 'eps' | 'x0' | 'v'
  mean_form: str  # 'x0': the posterior mean from the (clipped) predicted x_0


class Pretrained(NamedTuple):
  """A pretrained network with everything needed to sample from it."""
  config: UNetConfig  # the network (layout 'ddpm')
  params: PyTree  # float32 Flax parameters of `UNet(config=config)`
  diffusion: DiffusionSettings
  image_size: Optional[int]  # height = width it was trained at (None: unknown)


# --- config.json -> UNetConfig ---------------------------------------------

# UNet2DModel's defaults (diffusers 0.42): a field missing from config.json
# takes this value when diffusers builds the network, so it does here too.
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                      "AttnDownBlock2D"), mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                    "UpBlock2D"), block_out_channels=(224, 448, 672, 896),
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)

# The values ddpm_jax's 'ddpm' layout is built with (what DDPM used).
_FIXED_UNET_FIELDS: dict[str, tuple[Any, str]] = {
    "center_input_sample": (False, "the network takes inputs in [-1, 1] as "
                            "they are"),
    "time_embedding_type": ("positional", "the time embedding is DDPM's "
                            "sinusoidal one"),
    "flip_sin_to_cos": (False, "the sinusoidal embedding is [sin, cos]"),
    "freq_shift": (1, "the embedding frequencies are 10000**(-k / (d/2 - 1))"),
    "mid_block_type": ("UNetMidBlock2D", "the middle is resnet, attention, "
                       "resnet"),
    "mid_block_scale_factor": (1, "residuals are not rescaled"),
    "downsample_padding": (0, "downsampling pads like TF 'SAME': (0, 1)"),
    "downsample_type": ("conv", "downsampling is a stride-2 3x3 conv"),
    "upsample_type": ("conv", "upsampling is nearest-neighbour + 3x3 conv"),
    "norm_eps": (1e-6, "every GroupNorm has epsilon 1e-6"),
    "resnet_time_scale_shift": ("default", "the time embedding is added, not "
                                "a scale and shift"),
    "class_embed_type": (None, "class labels use a learned embedding "
                         "(num_class_embeds) or none"),
}
_DOWN_TYPES = {"DownBlock2D": "none", "AttnDownBlock2D": "full"}
_UP_TYPES = {"UpBlock2D": "none", "AttnUpBlock2D": "full"}


def _fail(source: str, message: str) -> PretrainedError:
  return PretrainedError(f"{source}: {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _equal(value: Any, expected: Any) -> bool:
  """JSON value equality: numbers by value (1 == 1.0, never a bool)."""
  if _is_number(expected):
    return _is_number(value) and math.isclose(value, expected, rel_tol=1e-9)
  return type(value) is type(expected) and value == expected


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def unet_config_from_diffusers(
    fields: Mapping[str, Any], *,
    source: str = CONFIG_FILE) -> tuple[UNetConfig, Optional[int]]:
  """Maps a diffusers `UNet2DModel` config.json to a `UNetConfig`.

  Args:
    fields: the parsed config.json.
    source: the file's name for error messages.

  Returns:
    (config, image_size): the 'ddpm'-layout network, and `sample_size` (None
    when the file has none).

  Raises:
    PretrainedError: an unknown field, or a value the ddpm_jax U-Net cannot
      express, naming the field and value.

  Example:
    >>> config, size = unet_config_from_diffusers(json.load(open(path)))
  """
  class_name = fields.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise _fail(
        source, f"_class_name={class_name!r}: only UNet2DModel "
        "networks can be imported")
  unknown = sorted(
      k for k in fields if not k.startswith("_") and k not in UNET_DEFAULTS)
  if unknown:
    raise _fail(
        source, f"unknown field(s) {', '.join(unknown)} (not "
        "UNet2DModel fields of diffusers 0.42; they may change the "
        "network)")
  f = {**UNET_DEFAULTS, **fields}

  def unsupported(name: str, why: str) -> PretrainedError:
    return _fail(source, f"{name}={f[name]!r} is not supported: {why}")

  for name, (value, why) in _FIXED_UNET_FIELDS.items():
    if not _equal(f[name], value):
      raise unsupported(name, f"ddpm_jax's DDPM network has {value!r} "
                        f"({why})")
  if f["act_fn"] not in ("silu", "swish"):
    raise unsupported("act_fn", "the network uses SiLU (swish)")

  widths = f["block_out_channels"]
  if (not isinstance(widths, (list, tuple)) or not widths or
      not all(_is_int(w) and w > 0 for w in widths)):
    raise unsupported("block_out_channels", "expected a list of positive "
                      "ints")
  base = widths[0]
  if any(w % base for w in widths):
    raise unsupported(
        "block_out_channels", f"every width must be a multiple "
        f"of the first ({base}): ddpm_jax's widths are "
        "base_channels * channel_mults")
  levels = len(widths)
  down, up = f["down_block_types"], f["up_block_types"]
  for name, types, table in (("down_block_types", down, _DOWN_TYPES),
                             ("up_block_types", up, _UP_TYPES)):
    if not isinstance(types, (list, tuple)) or len(types) != levels:
      raise unsupported(
          name, f"expected one block type per "
          f"block_out_channels entry ({levels})")
    bad = [t for t in types if t not in table]
    if bad:
      raise unsupported(
          name, f"block type {bad[0]!r}; ddpm_jax's DDPM "
          f"network has {' and '.join(table)}")
  attention = tuple(_DOWN_TYPES[t] for t in down)
  mirrored = tuple(_UP_TYPES[t] for t in reversed(up))
  if mirrored != attention:
    raise unsupported(
        "up_block_types", "attention must sit at the same "
        f"levels on the way up as on the way down {tuple(down)}")

  add_attention = f["add_attention"]
  if not isinstance(add_attention, bool):
    raise unsupported("add_attention", "expected true or false")
  head_dim = f["attention_head_dim"]
  attention_widths = {w for w, kind in zip(widths, attention) if kind == "full"}
  if add_attention:
    attention_widths.add(widths[-1])
  if head_dim is not None and (not _is_int(head_dim) or
                               {head_dim} != attention_widths | {head_dim}):
    raise unsupported(
        "attention_head_dim", "ddpm_jax's DDPM attention has "
        "one head as wide as its layer (null, or the width of "
        f"every attention layer {sorted(attention_widths)})")
  groups = f["norm_num_groups"]
  if f["attn_norm_num_groups"] not in (None, groups):
    raise unsupported(
        "attn_norm_num_groups", "the middle attention's "
        f"GroupNorm has norm_num_groups={groups!r} groups")
  in_channels, out_channels = f["in_channels"], f["out_channels"]
  if not _is_int(in_channels) or out_channels not in (in_channels,
                                                      2 * in_channels):
    raise unsupported(
        "out_channels", f"expected in_channels "
        f"({in_channels!r}) or twice that (a learned variance)")
  num_classes = f["num_class_embeds"]
  time_embed_dim = f["time_embedding_dim"]
  if time_embed_dim == 4 * base:
    time_embed_dim = None
  dropout = f["dropout"]
  try:
    config = UNetConfig(
        layout="ddpm", in_channels=in_channels, base_channels=base,
        channel_mults=tuple(w // base for w in widths),
        num_res_blocks=f["layers_per_block"], block_type="resnet",
        attention=attention, mid_attention="full" if add_attention else "none",
        num_groups=groups,
        dropout=float(dropout) if isinstance(dropout,
                                             (int, float)) else dropout,
        time_embed_dim=time_embed_dim,
        learned_variance=out_channels == 2 * in_channels,
        num_classes=num_classes)
  except ValueError as e:
    raise _fail(source, f"not a valid ddpm_jax network: {e}") from None
  return config, _image_size(f["sample_size"], source)


def _image_size(sample_size: Any, source: str) -> Optional[int]:
  if isinstance(
      sample_size,
      (list, tuple)) and len(sample_size) == 2 and (sample_size[0]
                                                    == sample_size[1]):
    sample_size = sample_size[0]
  if sample_size is not None and not (_is_int(sample_size) and sample_size > 0):
    raise _fail(
        source, f"sample_size={sample_size!r} is not supported: "
        "expected a positive int (square images)")
  return sample_size


# --- scheduler_config.json -> DiffusionSettings ----------------------------

# DDPMScheduler's defaults (diffusers 0.42), used for missing fields.
SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
    beta_schedule="linear", trained_betas=None, variance_type="fixed_small",
    clip_sample=True, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
    sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
    rescale_betas_zero_snr=False, set_alpha_to_one=True)
# Fields that choose how a diffusers pipeline samples, not the diffusion
# process; ddpm_jax's samplers have their own (config.sample).
_SAMPLER_FIELDS = ("timestep_spacing", "steps_offset", "set_alpha_to_one")
_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "quadratic",
    "sigmoid": "sigmoid"
}
_VAR_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range"
}
_TARGETS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def diffusion_settings_from_diffusers(
    fields: Mapping[str,
                    Any], *, source: str = SCHEDULER_FILE) -> DiffusionSettings:
  """Maps a diffusers DDPMScheduler / DDIMScheduler config to `config.diffusion`.

  'linear', 'scaled_linear' (ddpm_jax's 'quadratic') and 'sigmoid' betas map
  exactly; 'squaredcos_cap_v2' does not ('cosine' here clips the betas to
  [1e-4, 0.9999], diffusers to (0, 0.999]). A DDIMScheduler config has no
  variance type: it gets 'fixed_small', the posterior variance (DDIM with
  eta = 1). Sampler-only fields (timestep_spacing, steps_offset,
  set_alpha_to_one) are not part of the diffusion process and are ignored.

  Raises:
    PretrainedError: an unknown field or an unsupported value, named.
  """
  class_name = fields.get("_class_name", "DDPMScheduler")
  if class_name not in ("DDPMScheduler", "DDIMScheduler"):
    raise _fail(
        source, f"_class_name={class_name!r}: only DDPMScheduler and "
        "DDIMScheduler configs can be imported")
  unknown = sorted(k for k in fields
                   if not k.startswith("_") and k not in SCHEDULER_DEFAULTS)
  if unknown:
    raise _fail(
        source, f"unknown field(s) {', '.join(unknown)} (they may "
        "change the diffusion process)")
  f = {**SCHEDULER_DEFAULTS, **fields}

  def unsupported(name: str, why: str) -> PretrainedError:
    return _fail(source, f"{name}={f[name]!r} is not supported: {why}")

  steps = f["num_train_timesteps"]
  if not _is_int(steps) or steps < 1:
    raise unsupported("num_train_timesteps", "expected an int >= 1")
  if f["trained_betas"] is not None:
    raise unsupported(
        "trained_betas", "config.diffusion holds a named "
        "schedule, not a list of betas")
  if f["rescale_betas_zero_snr"] is not False:
    raise unsupported(
        "rescale_betas_zero_snr", "ddpm_jax's schedules are "
        "not rescaled to zero terminal SNR")
  if f["beta_schedule"] not in _SCHEDULES:
    raise unsupported(
        "beta_schedule", "ddpm_jax has the same betas only for "
        f"{', '.join(_SCHEDULES)} (its 'cosine' clips "
        "differently from squaredcos_cap_v2)")
  for name in ("beta_start", "beta_end"):
    value = f[name]
    if not _is_number(value) or not 0 < value < 1:
      raise unsupported(name, "expected a number in (0, 1)")
  if class_name == "DDIMScheduler":
    var_type = "fixed_small"
  elif f["variance_type"] in _VAR_TYPES:
    var_type = _VAR_TYPES[f["variance_type"]]
  else:
    raise unsupported(
        "variance_type", "ddpm_jax has "
        f"{', '.join(_VAR_TYPES)} (diffusers' 'learned' reads "
        "the output as a variance, ddpm_jax's as a "
        "log-variance)")
  if not isinstance(f["clip_sample"], bool):
    raise unsupported("clip_sample", "expected true or false")
  if f["clip_sample"] and f["clip_sample_range"] != 1.0:
    raise unsupported("clip_sample_range", "ddpm_jax clips x_0 to [-1, 1]")
  if f["thresholding"] is not False:
    raise unsupported("thresholding", "dynamic thresholding is not "
                      "implemented")
  if f["prediction_type"] not in _TARGETS:
    raise unsupported("prediction_type", f"expected one of "
                      f"{', '.join(_TARGETS)}")
  return DiffusionSettings(
      schedule=_SCHEDULES[f["beta_schedule"]], num_timesteps=steps,
      beta_start=float(f["beta_start"]), beta_end=float(f["beta_end"]),
      var_type=var_type, clip_x0=f["clip_sample"],
      target=_TARGETS[f["prediction_type"]], mean_form="x0")


# --- weights -> Flax parameters --------------------------------------------


class _Leaf(NamedTuple):
  """How one Flax parameter is made from tensors of a weights file."""
  keys: tuple[str, ...]  # the file's tensors, in order
  shapes: Callable[[tuple[int, ...]], tuple[tuple[int, ...], ...]]
  combine: Callable[..., np.ndarray]


def _same(name: str) -> _Leaf:
  return _Leaf((name,), lambda s: (s,), lambda w: w)


def _torch_conv(name: str) -> _Leaf:  # [O, I, kh, kw] -> HWIO
  return _Leaf((name,), lambda s: ((s[3], s[2], s[0], s[1]),),
               lambda w: w.transpose(2, 3, 1, 0))


def _torch_linear(name: str) -> _Leaf:  # [O, I] -> [I, O]
  return _Leaf((name,), lambda s: ((s[1], s[0]),), lambda w: w.T)


def _torch_conv1x1(name: str) -> _Leaf:  # [O, I, 1, 1] -> Dense [I, O]
  return _Leaf((name,), lambda s: ((s[1], s[0], 1, 1),),
               lambda w: w[:, :, 0, 0].T)


def _fused(names: tuple[str, str, str], *, kernel: bool,
           transpose: bool) -> _Leaf:
  """q, k, v projections fused into one Dense: [C, 3C] kernel, [3C] bias."""
  if not kernel:
    return _Leaf(names, lambda s: ((s[0] // 3,),) * 3,
                 lambda *ws: np.concatenate(ws))
  if transpose:
    return _Leaf(names, lambda s: ((s[1] // 3, s[0]),) * 3,
                 lambda *ws: np.concatenate([w.T for w in ws], axis=1))
  return _Leaf(names, lambda s: ((s[0], s[1] // 3),) * 3,
               lambda *ws: np.concatenate(ws, axis=1))


def _diffusers_modules(tensors: Mapping[str, np.ndarray],
                       config: UNetConfig) -> dict[tuple[str, ...], tuple]:
  """Flax module path -> (kind, diffusers prefix), in `UNet._ddpm`'s order."""
  plan: dict[tuple[str, ...], tuple] = {
      ("TimeEmbedding_0", "Dense_0"): ("linear", "time_embedding.linear_1"),
      ("TimeEmbedding_0", "Dense_1"): ("linear", "time_embedding.linear_2"),
      ("Conv_0",): ("conv", "conv_in"),
      ("GroupNorm_0",): ("norm", "conv_norm_out"),
      ("Conv_1",): ("conv", "conv_out"),
  }
  if config.num_classes is not None:
    plan[("Embed_0",)] = ("embed", "class_embedding")
  counts: dict[str, int] = {}

  def add(kind: str, module: str, prefix: str) -> None:
    index = counts.get(module, 0)
    counts[module] = index + 1
    path = (f"{module}_{index}",)
    if module in ("Downsample", "NearestUpsample"):
      path += ("Conv_0",)
    plan[path] = (kind, prefix)

  def attention(prefix: str) -> None:
    legacy = f"{prefix}.query.weight" in tensors
    add("attention_legacy" if legacy else "attention", "Attention", prefix)

  last = len(config.channel_mults) - 1
  for level in range(last + 1):
    for j in range(config.num_res_blocks):
      add("resnet", "ResnetBlock", f"down_blocks.{level}.resnets.{j}")
      if config.attention[level] == "full":
        attention(f"down_blocks.{level}.attentions.{j}")
    if level != last:
      add("conv", "Downsample", f"down_blocks.{level}.downsamplers.0.conv")
  add("resnet", "ResnetBlock", "mid_block.resnets.0")
  if config.mid_attention == "full":
    attention("mid_block.attentions.0")
  add("resnet", "ResnetBlock", "mid_block.resnets.1")
  for level in reversed(range(last + 1)):
    block = last - level
    for j in range(config.num_res_blocks + 1):
      add("resnet", "ResnetBlock", f"up_blocks.{block}.resnets.{j}")
      if config.attention[level] == "full":
        attention(f"up_blocks.{block}.attentions.{j}")
    if level != 0:
      add("conv", "NearestUpsample", f"up_blocks.{block}.upsamplers.0.conv")
  return plan


def _diffusers_leaf(kind: str, prefix: str, rest: tuple[str, ...]) -> _Leaf:
  p = prefix + "."
  if kind in ("attention", "attention_legacy"):
    q, k, v, out = (("query", "key", "value",
                     "proj_attn") if kind == "attention_legacy" else
                    ("to_q", "to_k", "to_v", "to_out.0"))
    table = {
        ("GroupNorm_0", "scale"):
            _same(p + "group_norm.weight"),
        ("GroupNorm_0", "bias"):
            _same(p + "group_norm.bias"),
        ("Dense_0", "kernel"):
            _fused((p + q + ".weight", p + k + ".weight", p + v + ".weight"),
                   kernel=True, transpose=True),
        ("Dense_0", "bias"):
            _fused((p + q + ".bias", p + k + ".bias", p + v + ".bias"),
                   kernel=False, transpose=True),
        ("Dense_1", "kernel"):
            _torch_linear(p + out + ".weight"),
        ("Dense_1", "bias"):
            _same(p + out + ".bias"),
    }
  elif kind == "resnet":
    table = {
        ("GroupNorm_0", "scale"): _same(p + "norm1.weight"),
        ("GroupNorm_0", "bias"): _same(p + "norm1.bias"),
        ("Conv_0", "kernel"): _torch_conv(p + "conv1.weight"),
        ("Conv_0", "bias"): _same(p + "conv1.bias"),
        ("Dense_0", "kernel"): _torch_linear(p + "time_emb_proj.weight"),
        ("Dense_0", "bias"): _same(p + "time_emb_proj.bias"),
        ("GroupNorm_1", "scale"): _same(p + "norm2.weight"),
        ("GroupNorm_1", "bias"): _same(p + "norm2.bias"),
        ("Conv_1", "kernel"): _torch_conv(p + "conv2.weight"),
        ("Conv_1", "bias"): _same(p + "conv2.bias"),
        ("Dense_1", "kernel"): _torch_conv1x1(p + "conv_shortcut.weight"),
        ("Dense_1", "bias"): _same(p + "conv_shortcut.bias"),
    }
  else:
    weight = {
        "conv": _torch_conv,
        "linear": _torch_linear,
        "norm": _same,
        "embed": _same
    }[kind](p + "weight")
    table = {
        ("kernel",): weight,
        ("scale",): weight,
        ("embedding",): weight,
        ("bias",): _same(p + "bias")
    }
  return table[rest]


def _flax_shapes(config: UNetConfig) -> PyTree:
  """`jax.ShapeDtypeStruct`s of `UNet(config=config)`'s parameters."""
  size = 2**(len(config.channel_mults) - 1)
  x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = None if config.num_classes is None else jnp.zeros((1,), jnp.int32)
  model = UNet(config=config)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, t, y=y, train=False))["params"]


def _assemble(tensors: Mapping[str, np.ndarray], config: UNetConfig,
              leaf_for: Callable[[tuple[str, ...]],
                                 _Leaf], *, source: str, hint: str) -> PyTree:
  """The Flax parameter tree of `config`, each leaf made by `leaf_for(path)`
  from `tensors`; every tensor must be used exactly once."""
  shapes = _flax_shapes(config)
  used: set[str] = set()
  missing: list[str] = []
  wrong: list[str] = []
  built = {}
  for path, abstract in jax.tree_util.tree_leaves_with_path(shapes):
    names = tuple(k.key for k in path)
    leaf = leaf_for(names)
    expected = leaf.shapes(tuple(abstract.shape))
    arrays = []
    for key, shape in zip(leaf.keys, expected):
      if key not in tensors:
        missing.append(key)
        continue
      used.add(key)
      array = tensors[key]
      if tuple(array.shape) != shape:
        wrong.append(f"{key} has shape {tuple(array.shape)}, the network "
                     f"needs {shape}")
      arrays.append(array)
    if len(arrays) == len(leaf.keys) and not wrong:
      built[names] = np.asarray(leaf.combine(*arrays), np.float32)
  extra = sorted(set(tensors) - used)

  def listing(items: list[str]) -> str:
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return "; ".join(items[:3]) + more

  if wrong:
    raise _fail(
        source, f"{len(wrong)} tensor(s) do not fit the network of "
        f"{hint}: {listing(wrong)}")
  if missing:
    raise _fail(
        source, f"{len(missing)} tensor(s) of the network of {hint} "
        f"are missing: {listing(missing)}")
  if extra:
    raise _fail(
        source, f"{len(extra)} tensor(s) are not part of the network "
        f"of {hint}: {listing(extra)}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.asarray(built[tuple(k.key for k in path)]), shapes)


def params_from_diffusers(tensors: Mapping[str, np.ndarray], config: UNetConfig,
                          *, source: str = SAFETENSORS_FILE,
                          hint: str = CONFIG_FILE) -> PyTree:
  """Converts a `UNet2DModel` state dict (numpy arrays) to `UNet` parameters.

  Convolutions go from OIHW to HWIO, linear layers are transposed, the 1x1
  shortcut convolutions become Dense kernels and each attention's q, k, v
  projections are fused into one Dense. Both attention namings are read:
  `to_q/to_k/to_v/to_out.0` and the older `query/key/value/proj_attn`.

  Args:
    tensors: name -> array of the weights file.
    config: the network (from `unet_config_from_diffusers`).
    source: the weights file's name for error messages.
    hint: what defines the network, for error messages.

  Returns:
    The float32 parameter tree of `UNet(config=config)`.

  Raises:
    PretrainedError: a tensor is missing, extra or of the wrong shape (named).
  """
  plan = _diffusers_modules(tensors, config)

  def leaf_for(names: tuple[str, ...]) -> _Leaf:
    for cut in (2, 1):
      if names[:cut] in plan:
        kind, prefix = plan[names[:cut]]
        return _diffusers_leaf(kind, prefix, names[cut:])
    raise AssertionError(f"no diffusers tensor for parameter {names}")

  return _assemble(tensors, config, leaf_for, source=source, hint=hint)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file (numpy API; bfloat16 files through
  JAX) or, with torch installed, of a PyTorch `.bin` state dict.

  Raises:
    PretrainedError: the file cannot be read (truncated, not a weights file),
      or a `.bin` file without torch.
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    # pylint: disable=g-import-not-at-top
    from safetensors import flax as safetensors_flax
    from safetensors import numpy as safetensors_numpy
    try:
      try:
        return dict(safetensors_numpy.load_file(path))
      except TypeError:  # bfloat16, which numpy lacks: read it with JAX.
        return {
            k: np.asarray(v, np.float32)
            for k, v in safetensors_flax.load_file(path).items()
        }
    except Exception as e:  # pylint: disable=broad-except
      # safetensors raises its own SafetensorError, OSError and others.
      raise _fail(
          path, f"not a readable safetensors file "
          f"({type(e).__name__}: {_one_line(e)})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise _fail(
        path, "reading a PyTorch .bin file needs torch (pip install "
        f"torch), or a {SAFETENSORS_FILE} beside it") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _fail(
        path, f"not a readable PyTorch state dict "
        f"({type(e).__name__}: {_one_line(e)})") from None
  if not isinstance(state, Mapping):
    raise _fail(path, f"holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = " ".join(str(error).split())
  return text[:limit] + ("..." if len(text) > limit else "")


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
  except FileNotFoundError:
    raise _fail(path, "no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _fail(path, f"not a readable JSON file ({_one_line(e)})") from None
  if not isinstance(fields, dict):
    raise _fail(path, f"holds a JSON {type(fields).__name__}, not an object")
  return fields


def _locate(folder: str) -> tuple[str, str]:
  """(the UNet folder, the scheduler config path) of a model folder: the two
  side by side (as google/ddpm-*), or a pipeline's unet/ and scheduler/."""
  if not os.path.isdir(folder):
    raise _fail(folder, "not a directory")
  if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
    return folder, os.path.join(folder, SCHEDULER_FILE)
  unet = os.path.join(folder, "unet")
  if os.path.isfile(os.path.join(unet, CONFIG_FILE)):
    return unet, os.path.join(folder, "scheduler", SCHEDULER_FILE)
  raise _fail(
      folder, f"no {CONFIG_FILE} (nor unet/{CONFIG_FILE}): not a "
      "diffusers UNet2DModel folder")


def load_diffusers(folder: str | os.PathLike) -> Pretrained:
  """Imports a diffusers `UNet2DModel` folder from disk.

  Args:
    folder: holds config.json, diffusion_pytorch_model.safetensors (or .bin,
      read when torch is installed) and scheduler_config.json; or a pipeline
      folder with unet/ and scheduler/ subfolders.

  Returns:
    `Pretrained(config, params, diffusion, image_size)`.

  Raises:
    PretrainedError: a missing, unreadable or unsupported file, field or
      tensor, named on one line.

  Example:
    >>> config, params, diffusion, size = load_diffusers("ddpm-cifar10-32")
  """
  folder = os.fspath(folder)
  unet_dir, scheduler_path = _locate(folder)
  config_path = os.path.join(unet_dir, CONFIG_FILE)
  config, image_size = unet_config_from_diffusers(_read_json(config_path),
                                                  source=config_path)
  diffusion = diffusion_settings_from_diffusers(_read_json(scheduler_path),
                                                source=scheduler_path)
  if diffusion.var_type.startswith("learned") != config.learned_variance:
    raise _fail(
        scheduler_path, f"variance_type gives {diffusion.var_type!r} "
        f"but {config_path} has out_channels="
        f"{config.out_channels} (in_channels={config.in_channels})")
  weights = os.path.join(unet_dir, SAFETENSORS_FILE)
  if not os.path.isfile(weights):
    weights = os.path.join(unet_dir, BIN_FILE)
    if not os.path.isfile(weights):
      raise _fail(unet_dir, f"no {SAFETENSORS_FILE} (nor {BIN_FILE})")
  params = params_from_diffusers(read_tensors(weights), config, source=weights,
                                 hint=config_path)
  return Pretrained(config=config, params=params, diffusion=diffusion,
                    image_size=image_size)


# --- the DDPM authors' TensorFlow checkpoints -------------------------------

TF_EMA_SUFFIX = "/ExponentialMovingAverage"
_TF_LEAVES = ("W", "b", "gamma", "beta")  # nn.conv2d / dense / nin, group_norm


def _tf_network_config(shapes: Mapping[str, list[int]],
                       source: str) -> UNetConfig:
  """The `UNetConfig` of `diffusion_tf.models.unet.model`'s variables."""

  def shape(name: str) -> list[int]:
    if name not in shapes:
      raise _fail(
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
    raise _fail(
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
    raise _fail(source, f"not a valid ddpm_jax network: {e}") from None


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


def _tf_leaf(kind: str, scope: str, rest: tuple[str, ...]) -> _Leaf:
  """TF kernels are already HWIO / [in, out]: only names change."""
  s = scope + "/"
  if kind == "attention":
    table = {
        ("GroupNorm_0", "scale"):
            _same(s + "norm/gamma"),
        ("GroupNorm_0", "bias"):
            _same(s + "norm/beta"),
        ("Dense_0", "kernel"):
            _fused((s + "q/W", s + "k/W", s + "v/W"), kernel=True,
                   transpose=False),
        ("Dense_0", "bias"):
            _fused((s + "q/b", s + "k/b", s + "v/b"), kernel=False,
                   transpose=False),
        ("Dense_1", "kernel"):
            _same(s + "proj_out/W"),
        ("Dense_1", "bias"):
            _same(s + "proj_out/b"),
    }
  elif kind == "resnet":
    table = {
        ("GroupNorm_0", "scale"): _same(s + "norm1/gamma"),
        ("GroupNorm_0", "bias"): _same(s + "norm1/beta"),
        ("Conv_0", "kernel"): _same(s + "conv1/W"),
        ("Conv_0", "bias"): _same(s + "conv1/b"),
        ("Dense_0", "kernel"): _same(s + "temb_proj/W"),
        ("Dense_0", "bias"): _same(s + "temb_proj/b"),
        ("GroupNorm_1", "scale"): _same(s + "norm2/gamma"),
        ("GroupNorm_1", "bias"): _same(s + "norm2/beta"),
        ("Conv_1", "kernel"): _same(s + "conv2/W"),
        ("Conv_1", "bias"): _same(s + "conv2/b"),
        ("Dense_1", "kernel"): _same(s + "nin_shortcut/W"),
        ("Dense_1", "bias"): _same(s + "nin_shortcut/b"),
    }
  elif kind == "norm":
    table = {("scale",): _same(s + "gamma"), ("bias",): _same(s + "beta")}
  else:
    table = {("kernel",): _same(s + "W"), ("bias",): _same(s + "b")}
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
    raise _fail(
        source, f"not a readable TensorFlow checkpoint "
        f"({type(e).__name__}: {_one_line(e)})") from None
  network = {
      name for name in shapes
      if name.startswith("model/") and name.rsplit("/", 1)[-1] in _TF_LEAVES
  }
  strays = sorted(name for name in shapes if name.startswith("model/") and
                  name not in network and name.rsplit("/", 1)[0] not in network)
  if strays:
    raise _fail(
        source, f"variable {strays[0]} is not part of the DDPM "
        f"authors' U-Net ({len(strays)} such)")
  config = _tf_network_config(shapes, source)
  if ema:
    no_ema = sorted(n for n in network if n + TF_EMA_SUFFIX not in shapes)
    if no_ema:
      raise _fail(
          source, f"no moving average of {no_ema[0]} "
          f"({len(no_ema)} variables without one); use ema=False "
          "for the raw weights")
  tensors = {
      name: reader.get_tensor(name + (TF_EMA_SUFFIX if ema else ""))
      for name in network
  }
  plan = _tf_modules(config)

  def leaf_for(names: tuple[str, ...]) -> _Leaf:
    for cut in (2, 1):
      if names[:cut] in plan:
        kind, scope = plan[names[:cut]]
        return _tf_leaf(kind, scope, names[cut:])
    raise AssertionError(f"no TF variable for parameter {names}")

  params = _assemble(tensors, config, leaf_for, source=source,
                     hint="this checkpoint")
  return config, params
