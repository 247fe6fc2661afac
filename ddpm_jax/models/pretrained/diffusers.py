"""diffusers `UNet2DModel` folders as ddpm_jax networks.

A folder (`config.json`, `diffusion_pytorch_model.safetensors` and, beside it
or in `../scheduler/`, `scheduler_config.json`), e.g. `google/ddpm-cifar10-32`
downloaded with `huggingface_hub`, becomes a `UNetConfig`, a Flax parameter
tree and the diffusion settings of `config.diffusion`. Nothing is downloaded
here; torch is never required (safetensors files are read with the
`safetensors` package's numpy API; a `diffusion_pytorch_model.bin` is read
only when torch is installed).

Every field of `config.json` that changes the network is checked: a value the
ddpm_jax U-Net cannot express raises `PretrainedError` naming the file, the
field and the value, never a silently different network. Every tensor of the
weights file is used exactly once; a missing, extra or mis-shaped tensor is
named.

Example:
  >>> net = load_diffusers("ddpm-cifar10-32")  # a downloaded folder
  >>> net.config == unet_config("ddpm_cifar10", dropout=0.0)
  True
  >>> net.diffusion.var_type, net.image_size
  ('fixed_large', 32)
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any, Optional

import numpy as np

from ddpm_jax.models import UNetConfig
from ddpm_jax.models.pretrained.common import (
    DiffusionSettings,
    Leaf,
    LeafFor,
    Pretrained,
    PretrainedError,
    PyTree,
    assemble,
    equal,
    fail,
    fused,
    is_int,
    is_number,
    one_line,
    same,
)

CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"

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
FIXED_UNET_FIELDS: dict[str, tuple[Any, str]] = {
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
DOWN_TYPES = {"DownBlock2D": "none", "AttnDownBlock2D": "full"}
UP_TYPES = {"UpBlock2D": "none", "AttnUpBlock2D": "full"}


def _unsupported(f: Mapping[str, Any], source: str, name: str,
                 why: str) -> PretrainedError:
  return fail(source, f"{name}={f[name]!r} is not supported: {why}")


def _unet_fields(fields: Mapping[str, Any], source: str) -> dict[str, Any]:
  """config.json's fields over `UNET_DEFAULTS`, checked for the class name
  and for fields diffusers does not have."""
  class_name = fields.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise fail(
        source, f"_class_name={class_name!r}: only UNet2DModel "
        "networks can be imported")
  unknown = sorted(
      k for k in fields if not k.startswith("_") and k not in UNET_DEFAULTS)
  if unknown:
    raise fail(
        source, f"unknown field(s) {', '.join(unknown)} (not "
        "UNet2DModel fields of diffusers 0.42; they may change the "
        "network)")
  return {**UNET_DEFAULTS, **fields}


def _check_fixed_fields(f: Mapping[str, Any], source: str) -> None:
  """The fields whose only value ddpm_jax's 'ddpm' layout has."""
  for name, (value, why) in FIXED_UNET_FIELDS.items():
    if not equal(f[name], value):
      raise _unsupported(f, source, name, f"ddpm_jax's DDPM network has "
                         f"{value!r} ({why})")
  if f["act_fn"] not in ("silu", "swish"):
    raise _unsupported(f, source, "act_fn", "the network uses SiLU (swish)")


def _level_widths(f: Mapping[str, Any], source: str) -> list[int]:
  """`block_out_channels`: positive multiples of the first width."""
  widths = f["block_out_channels"]
  if (not isinstance(widths, (list, tuple)) or not widths or
      not all(is_int(w) and w > 0 for w in widths)):
    raise _unsupported(f, source, "block_out_channels",
                       "expected a list of positive ints")
  base = widths[0]
  if any(w % base for w in widths):
    raise _unsupported(
        f, source, "block_out_channels", f"every width must be a multiple "
        f"of the first ({base}): ddpm_jax's widths are "
        "base_channels * channel_mults")
  return list(widths)


def _level_attention(f: Mapping[str, Any], source: str,
                     levels: int) -> tuple[str, ...]:
  """`UNetConfig.attention` of the down and up block types, which must
  mirror each other."""
  down, up = f["down_block_types"], f["up_block_types"]
  for name, types, table in (("down_block_types", down, DOWN_TYPES),
                             ("up_block_types", up, UP_TYPES)):
    if not isinstance(types, (list, tuple)) or len(types) != levels:
      raise _unsupported(
          f, source, name, f"expected one block type per "
          f"block_out_channels entry ({levels})")
    bad = [t for t in types if t not in table]
    if bad:
      raise _unsupported(
          f, source, name, f"block type {bad[0]!r}; ddpm_jax's DDPM "
          f"network has {' and '.join(table)}")
  attention = tuple(DOWN_TYPES[t] for t in down)
  if tuple(UP_TYPES[t] for t in reversed(up)) != attention:
    raise _unsupported(
        f, source, "up_block_types", "attention must sit at the same "
        f"levels on the way up as on the way down {tuple(down)}")
  return attention


def _check_attention_layers(f: Mapping[str, Any], source: str,
                            widths: list[int], attention: tuple[str,
                                                                ...]) -> None:
  """One head as wide as each attention layer, normalised like the rest."""
  if not isinstance(f["add_attention"], bool):
    raise _unsupported(f, source, "add_attention", "expected true or false")
  head_dim = f["attention_head_dim"]
  attention_widths = {w for w, kind in zip(widths, attention) if kind == "full"}
  if f["add_attention"]:
    attention_widths.add(widths[-1])
  if head_dim is not None and (not is_int(head_dim) or
                               {head_dim} != attention_widths | {head_dim}):
    raise _unsupported(
        f, source, "attention_head_dim", "ddpm_jax's DDPM attention has "
        "one head as wide as its layer (null, or the width of "
        f"every attention layer {sorted(attention_widths)})")
  groups = f["norm_num_groups"]
  if f["attn_norm_num_groups"] not in (None, groups):
    raise _unsupported(
        f, source, "attn_norm_num_groups", "the middle attention's "
        f"GroupNorm has norm_num_groups={groups!r} groups")


def _check_channels(f: Mapping[str, Any], source: str) -> None:
  in_channels, out_channels = f["in_channels"], f["out_channels"]
  if not is_int(in_channels) or out_channels not in (in_channels,
                                                     2 * in_channels):
    raise _unsupported(
        f, source, "out_channels", f"expected in_channels "
        f"({in_channels!r}) or twice that (a learned variance)")


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
  f = _unet_fields(fields, source)
  _check_fixed_fields(f, source)
  widths = _level_widths(f, source)
  attention = _level_attention(f, source, len(widths))
  _check_attention_layers(f, source, widths, attention)
  _check_channels(f, source)
  base, dropout = widths[0], f["dropout"]
  time_embed_dim = f["time_embedding_dim"]
  try:
    config = UNetConfig(
        layout="ddpm", in_channels=f["in_channels"], base_channels=base,
        channel_mults=tuple(w // base for w in widths),
        num_res_blocks=f["layers_per_block"], block_type="resnet",
        attention=attention,
        mid_attention="full" if f["add_attention"] else "none",
        num_groups=f["norm_num_groups"],
        dropout=float(dropout) if is_number(dropout) else dropout,
        time_embed_dim=None if time_embed_dim == 4 * base else time_embed_dim,
        learned_variance=f["out_channels"] == 2 * f["in_channels"],
        num_classes=f["num_class_embeds"])
  except ValueError as e:
    raise fail(source, f"not a valid ddpm_jax network: {e}") from None
  return config, _image_size(f["sample_size"], source)


def _image_size(sample_size: Any, source: str) -> Optional[int]:
  if isinstance(
      sample_size,
      (list, tuple)) and len(sample_size) == 2 and (sample_size[0]
                                                    == sample_size[1]):
    sample_size = sample_size[0]
  if sample_size is not None and not (is_int(sample_size) and sample_size > 0):
    raise fail(
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
SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "quadratic",
    "sigmoid": "sigmoid"
}
VAR_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range"
}
TARGETS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def _scheduler_fields(fields: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The scheduler config's fields over `SCHEDULER_DEFAULTS`, checked for
  the class name and for fields diffusers' schedulers do not have."""
  class_name = fields.get("_class_name", "DDPMScheduler")
  if class_name not in ("DDPMScheduler", "DDIMScheduler"):
    raise fail(
        source, f"_class_name={class_name!r}: only DDPMScheduler and "
        "DDIMScheduler configs can be imported")
  unknown = sorted(k for k in fields
                   if not k.startswith("_") and k not in SCHEDULER_DEFAULTS)
  if unknown:
    raise fail(
        source, f"unknown field(s) {', '.join(unknown)} (they may "
        "change the diffusion process)")
  return {**SCHEDULER_DEFAULTS, **fields}


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
  f = _scheduler_fields(fields, source)

  def unsupported(name: str, why: str) -> PretrainedError:
    return fail(source, f"{name}={f[name]!r} is not supported: {why}")

  steps = f["num_train_timesteps"]
  if not is_int(steps) or steps < 1:
    raise unsupported("num_train_timesteps", "expected an int >= 1")
  if f["trained_betas"] is not None:
    raise unsupported(
        "trained_betas", "config.diffusion holds a named "
        "schedule, not a list of betas")
  if f["rescale_betas_zero_snr"] is not False:
    raise unsupported(
        "rescale_betas_zero_snr", "ddpm_jax's schedules are "
        "not rescaled to zero terminal SNR")
  if f["beta_schedule"] not in SCHEDULES:
    raise unsupported(
        "beta_schedule", "ddpm_jax has the same betas only for "
        f"{', '.join(SCHEDULES)} (its 'cosine' clips "
        "differently from squaredcos_cap_v2)")
  for name in ("beta_start", "beta_end"):
    value = f[name]
    if not is_number(value) or not 0 < value < 1:
      raise unsupported(name, "expected a number in (0, 1)")
  if class_name == "DDIMScheduler":
    var_type = "fixed_small"
  elif f["variance_type"] in VAR_TYPES:
    var_type = VAR_TYPES[f["variance_type"]]
  else:
    raise unsupported(
        "variance_type", "ddpm_jax has "
        f"{', '.join(VAR_TYPES)} (diffusers' 'learned' reads "
        "the output as a variance, ddpm_jax's as a "
        "log-variance)")
  if not isinstance(f["clip_sample"], bool):
    raise unsupported("clip_sample", "expected true or false")
  if f["clip_sample"] and f["clip_sample_range"] != 1.0:
    raise unsupported("clip_sample_range", "ddpm_jax clips x_0 to [-1, 1]")
  if f["thresholding"] is not False:
    raise unsupported("thresholding", "dynamic thresholding is not "
                      "implemented")
  if f["prediction_type"] not in TARGETS:
    raise unsupported("prediction_type", f"expected one of "
                      f"{', '.join(TARGETS)}")
  return DiffusionSettings(schedule=SCHEDULES[f["beta_schedule"]],
                           num_timesteps=steps,
                           beta_start=float(f["beta_start"]),
                           beta_end=float(f["beta_end"]), var_type=var_type,
                           clip_x0=f["clip_sample"],
                           target=TARGETS[f["prediction_type"]], mean_form="x0")


# --- weights -> Flax parameters --------------------------------------------


def _torch_conv(name: str) -> Leaf:  # [O, I, kh, kw] <-> HWIO
  return Leaf((name,), lambda s: (
      (s[3], s[2], s[0], s[1]),), lambda w: w.transpose(2, 3, 1, 0), lambda p:
              (p.transpose(3, 2, 0, 1),))


def _torch_linear(name: str) -> Leaf:  # [O, I] <-> [I, O]
  return Leaf((name,), lambda s: ((s[1], s[0]),), lambda w: w.T, lambda p:
              (p.T,))


def _torch_conv1x1(name: str) -> Leaf:  # [O, I, 1, 1] <-> Dense [I, O]
  return Leaf((name,), lambda s: ((s[1], s[0], 1, 1),),
              lambda w: w[:, :, 0, 0].T, lambda p: (p.T[:, :, None, None],))


def _module_plan(config: UNetConfig,
                 tensors: Collection[str]) -> dict[tuple[str, ...], tuple]:
  """Flax module path -> (kind, diffusers prefix), in `UNet._ddpm`'s order;
  an attention is in the legacy naming where `tensors` has its query."""
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


def _leaf(kind: str, prefix: str, rest: tuple[str, ...]) -> Leaf:
  p = prefix + "."
  if kind in ("attention", "attention_legacy"):
    q, k, v, out = (("query", "key", "value",
                     "proj_attn") if kind == "attention_legacy" else
                    ("to_q", "to_k", "to_v", "to_out.0"))
    table = {
        ("GroupNorm_0", "scale"):
            same(p + "group_norm.weight"),
        ("GroupNorm_0", "bias"):
            same(p + "group_norm.bias"),
        ("Dense_0", "kernel"):
            fused((p + q + ".weight", p + k + ".weight", p + v + ".weight"),
                  kernel=True, transpose=True),
        ("Dense_0", "bias"):
            fused((p + q + ".bias", p + k + ".bias", p + v + ".bias"),
                  kernel=False, transpose=True),
        ("Dense_1", "kernel"):
            _torch_linear(p + out + ".weight"),
        ("Dense_1", "bias"):
            same(p + out + ".bias"),
    }
  elif kind == "resnet":
    table = {
        ("GroupNorm_0", "scale"): same(p + "norm1.weight"),
        ("GroupNorm_0", "bias"): same(p + "norm1.bias"),
        ("Conv_0", "kernel"): _torch_conv(p + "conv1.weight"),
        ("Conv_0", "bias"): same(p + "conv1.bias"),
        ("Dense_0", "kernel"): _torch_linear(p + "time_emb_proj.weight"),
        ("Dense_0", "bias"): same(p + "time_emb_proj.bias"),
        ("GroupNorm_1", "scale"): same(p + "norm2.weight"),
        ("GroupNorm_1", "bias"): same(p + "norm2.bias"),
        ("Conv_1", "kernel"): _torch_conv(p + "conv2.weight"),
        ("Conv_1", "bias"): same(p + "conv2.bias"),
        ("Dense_1", "kernel"): _torch_conv1x1(p + "conv_shortcut.weight"),
        ("Dense_1", "bias"): same(p + "conv_shortcut.bias"),
    }
  else:
    weight = {
        "conv": _torch_conv,
        "linear": _torch_linear,
        "norm": same,
        "embed": same
    }[kind](p + "weight")
    table = {
        ("kernel",): weight,
        ("scale",): weight,
        ("embedding",): weight,
        ("bias",): same(p + "bias")
    }
  return table[rest]


def leaf_for(config: UNetConfig, tensors: Collection[str] = ()) -> LeafFor:
  """Flax parameter path of `UNet(config=config)` -> its `Leaf` of diffusers
  tensors; attentions whose query is in `tensors` under the legacy name
  (`query/key/value/proj_attn`) get that naming, the others
  `to_q/to_k/to_v/to_out.0` (what diffusers writes today)."""
  plan = _module_plan(config, tensors)

  def leaf_of(names: tuple[str, ...]) -> Leaf:
    for cut in (2, 1):
      if names[:cut] in plan:
        kind, prefix = plan[names[:cut]]
        return _leaf(kind, prefix, names[cut:])
    raise AssertionError(f"no diffusers tensor for parameter {names}")

  return leaf_of


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
  return assemble(tensors, config, leaf_for(config, tensors), source=source,
                  hint=hint)


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
      raise fail(
          path, f"not a readable safetensors file "
          f"({type(e).__name__}: {one_line(e)})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise fail(
        path, "reading a PyTorch .bin file needs torch (pip install "
        f"torch), or a {SAFETENSORS_FILE} beside it") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise fail(
        path, f"not a readable PyTorch state dict "
        f"({type(e).__name__}: {one_line(e)})") from None
  if not isinstance(state, Mapping):
    raise fail(path, f"holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
  except FileNotFoundError:
    raise fail(path, "no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise fail(path, f"not a readable JSON file ({one_line(e)})") from None
  if not isinstance(fields, dict):
    raise fail(path, f"holds a JSON {type(fields).__name__}, not an object")
  return fields


def _locate(folder: str) -> tuple[str, str]:
  """(the UNet folder, the scheduler config path) of a model folder: the two
  side by side (as google/ddpm-*), or a pipeline's unet/ and scheduler/."""
  if not os.path.isdir(folder):
    raise fail(folder, "not a directory")
  if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
    return folder, os.path.join(folder, SCHEDULER_FILE)
  unet = os.path.join(folder, "unet")
  if os.path.isfile(os.path.join(unet, CONFIG_FILE)):
    return unet, os.path.join(folder, "scheduler", SCHEDULER_FILE)
  raise fail(
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
    raise fail(
        scheduler_path, f"variance_type gives {diffusion.var_type!r} "
        f"but {config_path} has out_channels="
        f"{config.out_channels} (in_channels={config.in_channels})")
  weights = os.path.join(unet_dir, SAFETENSORS_FILE)
  if not os.path.isfile(weights):
    weights = os.path.join(unet_dir, BIN_FILE)
    if not os.path.isfile(weights):
      raise fail(unet_dir, f"no {SAFETENSORS_FILE} (nor {BIN_FILE})")
  params = params_from_diffusers(read_tensors(weights), config, source=weights,
                                 hint=config_path)
  return Pretrained(config=config, params=params, diffusion=diffusion,
                    image_size=image_size)
