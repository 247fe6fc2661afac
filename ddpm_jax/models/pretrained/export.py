"""ddpm_jax networks as diffusers folders: the inverse of the diffusers reader.

`to_diffusers` maps a `UNetConfig` and its parameters to a `UNet2DModel`
config.json and state dict (numpy arrays), `scheduler_config_to_diffusers`
maps the diffusion settings to a `DDPMScheduler` config, and
`save_diffusers` writes a `DDPMPipeline` folder (local or gs://) that
PyTorch users load with `DDPMPipeline.from_pretrained(folder)`. Only numpy
and safetensors are used; torch is never needed.

The mapping is field by field the inverse of `unet_config_from_diffusers`,
`params_from_diffusers` and `diffusion_settings_from_diffusers`: importing an
export gives bit-identical parameters and the same network and settings. A
network or setting that diffusers cannot express (the 'tutorial' layout,
ConvNeXt blocks, linear attention, a cosine schedule, ...) is a
`PretrainedError` naming the field, raised before anything is written.
Precision is not part of a diffusers config: the weights are written in
float32 whatever `dtype` and `param_dtype` are (diffusers users choose
`torch_dtype` when loading), and the import has their defaults, as it has
for `convnext_mult` (unused by 'resnet' blocks) and for a `time_embed_dim`
of `4 * base_channels` (None).

Example:
  >>> fields, tensors = to_diffusers(config, params, image_size=32)
  >>> save_diffusers("/tmp/my-ddpm", config, params, settings, image_size=32)
  >>> load_diffusers("/tmp/my-ddpm").params  # == params, bit for bit
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from ddpm_jax.infra import storage
from ddpm_jax.models import UNetConfig
from ddpm_jax.models.pretrained.common import (
    DiffusionSettings,
    PretrainedError,
    PyTree,
    disassemble,
    fail,
    is_int,
    is_number,
)
from ddpm_jax.models.pretrained.diffusers import (
    CONFIG_FILE,
    DOWN_TYPES,
    FIXED_UNET_FIELDS,
    SAFETENSORS_FILE,
    SCHEDULER_DEFAULTS,
    SCHEDULER_FILE,
    SCHEDULES,
    TARGETS,
    UP_TYPES,
    leaf_for,
)

# The diffusers release whose UNet2DModel and DDPMScheduler fields are
# written (the reader's UNET_DEFAULTS and SCHEDULER_DEFAULTS).
DIFFUSERS_VERSION = "0.42.1"
MODEL_INDEX_FILE = "model_index.json"
MODEL_CARD_FILE = "README.md"
UNET_FOLDER = "unet"
SCHEDULER_FOLDER = "scheduler"

_UP_BLOCKS = {kind: name for name, kind in UP_TYPES.items()}
_DOWN_BLOCKS = {kind: name for name, kind in DOWN_TYPES.items()}
_SCHEDULE_NAMES = {ours: theirs for theirs, ours in SCHEDULES.items()}
_PREDICTION_TYPES = {ours: theirs for theirs, ours in TARGETS.items()}
# The variance types of diffusers that ddpm_jax's equal (the reader also maps
# 'fixed_small_log' to 'fixed_small'; the export writes the plain one).
_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
# DDPMScheduler's fields: the reader's defaults less DDIMScheduler's own.
_DDPM_SCHEDULER_FIELDS = tuple(
    k for k in SCHEDULER_DEFAULTS if k != "set_alpha_to_one")


def _cannot(source: str, name: str, value: Any, why: str) -> PretrainedError:
  return fail(source, f"{name}={value!r} cannot be exported: {why}")


def _check_exportable(config: UNetConfig) -> None:
  """The fields of `config` that diffusers' UNet2DModel cannot express."""
  source = "UNetConfig"
  if config.layout != "ddpm":
    raise _cannot(
        source, "layout", config.layout, "diffusers' UNet2DModel "
        "holds DDPM's network, layout 'ddpm'")
  if config.block_type != "resnet":
    raise _cannot(source, "block_type", config.block_type, "UNet2DModel's "
                  "blocks are DDPM's 'resnet' blocks")
  if any(kind not in _DOWN_BLOCKS for kind in config.attention):
    raise _cannot(
        source, "attention", config.attention, "UNet2DModel's "
        "levels have DDPM's 'full' attention or 'none'")
  if config.mid_attention not in _DOWN_BLOCKS:
    raise _cannot(
        source, "mid_attention", config.mid_attention, "UNet2DModel's "
        "middle has DDPM's 'full' attention or 'none'")


def unet_config_to_diffusers(
    config: UNetConfig, *, image_size: Optional[int] = None) -> dict[str, Any]:
  """The `UNet2DModel` config.json of `config` (every field written).

  Args:
    config: a 'ddpm'-layout network with 'resnet' blocks and 'full' or no
      attention (the ddpm_cifar10 and ddpm_256 presets and those built on
      them, class-conditional or with a learned variance).
    image_size: the image side it was trained at (`sample_size`); None
      writes null.

  Raises:
    PretrainedError: a field UNet2DModel cannot express, named.

  Example:
    >>> unet_config_to_diffusers(unet_config("ddpm_cifar10"))["down_block_types"]
    ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D']
  """
  _check_exportable(config)
  if image_size is not None and not (is_int(image_size) and image_size > 0):
    raise fail(
        "image_size", f"{image_size!r} cannot be exported as "
        "sample_size: expected a positive int")
  fixed = {name: value for name, (value, _) in FIXED_UNET_FIELDS.items()}
  return {
      "_class_name": "UNet2DModel",
      "_diffusers_version": DIFFUSERS_VERSION,
      **fixed,
      "sample_size": image_size,
      "in_channels": config.in_channels,
      "out_channels": config.out_channels,
      "time_embedding_dim": config.time_embed_dim,
      "down_block_types": [_DOWN_BLOCKS[kind] for kind in config.attention],
      "up_block_types": [
          _UP_BLOCKS[kind] for kind in reversed(config.attention)
      ],
      "block_out_channels": list(config.level_widths),
      "layers_per_block": config.num_res_blocks,
      "dropout": float(config.dropout),
      "act_fn": "silu",
      "attention_head_dim": None,
      "norm_num_groups": config.num_groups,
      "attn_norm_num_groups": None,
      "add_attention": config.mid_attention == "full",
      "num_class_embeds": config.num_classes,
      "num_train_timesteps": None,
  }


def to_diffusers(
    unet_config: UNetConfig, params: PyTree, *, image_size: Optional[int] = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """A ddpm_jax network as a diffusers `UNet2DModel`: config and state dict.

  HWIO convolutions become OIHW, Dense kernels are transposed (the 1x1
  shortcuts become 1x1 convolutions) and each attention's fused q, k, v
  Dense is split into `to_q`, `to_k`, `to_v`: the exact inverse of
  `params_from_diffusers`, so no value changes (float32 throughout).

  Args:
    unet_config: the network (see `unet_config_to_diffusers`).
    params: its Flax parameters (`UNet(config=unet_config)`'s tree; arrays of
      any kind that numpy reads, e.g. on devices).
    image_size: the image side, written as `sample_size`.

  Returns:
    (config.json's fields, {tensor name: float32 numpy array}).

  Raises:
    PretrainedError: a field UNet2DModel cannot express, or params that are
      not those of `unet_config` (the parameter is named).

  Example:
    >>> fields, tensors = to_diffusers(config, params, image_size=32)
    >>> tensors["conv_in.weight"].shape  # [O, I, kh, kw]
    (128, 3, 3, 3)
  """
  fields = unet_config_to_diffusers(unet_config, image_size=image_size)
  return fields, disassemble(params, unet_config, leaf_for(unet_config))


def scheduler_config_to_diffusers(
    settings: DiffusionSettings) -> dict[str, Any]:
  """The `DDPMScheduler` config of `settings` (every field written): the
  inverse of `diffusion_settings_from_diffusers`.

  'linear', 'quadratic' (diffusers' 'scaled_linear') and 'sigmoid' betas,
  the variance types 'fixed_small', 'fixed_large' and 'learned_range', the
  three targets, clipping to [-1, 1] and any T map exactly. The sampler
  fields (timestep_spacing, steps_offset) get DDPMScheduler's defaults.

  Raises:
    PretrainedError: a setting diffusers' DDPMScheduler cannot express
      (e.g. the 'cosine' schedule, 'learned' variance, mean_form 'eps'),
      named.

  Example:
    >>> scheduler_config_to_diffusers(settings)["beta_schedule"]
    'linear'
  """
  source = "config.diffusion"
  steps = settings.num_timesteps
  if not is_int(steps) or steps < 1:
    raise _cannot(source, "num_timesteps", steps, "expected an int >= 1")
  if settings.schedule not in _SCHEDULE_NAMES:
    raise _cannot(
        source, "schedule", settings.schedule, "diffusers has the same "
        f"betas only for {', '.join(_SCHEDULE_NAMES)} (its "
        "squaredcos_cap_v2 clips differently from 'cosine')")
  for name in ("beta_start", "beta_end"):
    value = getattr(settings, name)
    if not is_number(value) or not 0 < value < 1:
      raise _cannot(source, name, value, "expected a number in (0, 1)")
  if settings.var_type not in _VARIANCE_TYPES:
    raise _cannot(
        source, "var_type", settings.var_type, "diffusers has "
        f"{', '.join(_VARIANCE_TYPES)} (its 'learned' reads the output as "
        "a variance, ddpm_jax's as a log-variance)")
  if settings.target not in _PREDICTION_TYPES:
    raise _cannot(source, "target", settings.target,
                  f"expected one of {', '.join(_PREDICTION_TYPES)}")
  if settings.mean_form != "x0":
    raise _cannot(
        source, "mean_form", settings.mean_form, "DDPMScheduler "
        "takes the posterior mean from the (clipped) predicted x_0 ('x0')")
  if not isinstance(settings.clip_x0, bool):
    raise _cannot(source, "clip_x0", settings.clip_x0, "expected a bool")
  return {
      "_class_name": "DDPMScheduler",
      "_diffusers_version": DIFFUSERS_VERSION,
      **{
          k: SCHEDULER_DEFAULTS[k] for k in _DDPM_SCHEDULER_FIELDS
      },
      "num_train_timesteps": steps,
      "beta_start": float(settings.beta_start),
      "beta_end": float(settings.beta_end),
      "beta_schedule": _SCHEDULE_NAMES[settings.schedule],
      "variance_type": settings.var_type,
      "clip_sample": settings.clip_x0,
      "prediction_type": _PREDICTION_TYPES[settings.target],
  }


def model_index() -> dict[str, Any]:
  """`model_index.json` of a `DDPMPipeline` folder (unet/ and scheduler/)."""
  return {
      "_class_name": "DDPMPipeline",
      "_diffusers_version": DIFFUSERS_VERSION,
      SCHEDULER_FOLDER: ["diffusers", "DDPMScheduler"],
      UNET_FOLDER: ["diffusers", "UNet2DModel"],
  }


def _json(fields: Mapping[str, Any]) -> str:
  return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def pipeline_files(unet_config: UNetConfig, params: PyTree,
                   settings: DiffusionSettings, *,
                   image_size: Optional[int] = None,
                   model_card: Optional[str] = None) -> dict[str, bytes]:
  """The files of a `DDPMPipeline` folder, by relative path, as bytes.

  Everything is mapped and checked here, so a writer that gets the files
  has nothing left to fail on but storage.

  Raises:
    PretrainedError: as `to_diffusers` and `scheduler_config_to_diffusers`.
  """
  fields, tensors = to_diffusers(unet_config, params, image_size=image_size)
  scheduler = scheduler_config_to_diffusers(settings)
  weights = safetensors_numpy.save(tensors, metadata={"format": "pt"})
  files = {
      MODEL_INDEX_FILE: _json(model_index()).encode(),
      f"{UNET_FOLDER}/{CONFIG_FILE}": _json(fields).encode(),
      f"{UNET_FOLDER}/{SAFETENSORS_FILE}": weights,
      f"{SCHEDULER_FOLDER}/{SCHEDULER_FILE}": _json(scheduler).encode(),
  }
  if model_card is not None:
    files[MODEL_CARD_FILE] = model_card.encode()
  return files


def save_diffusers(folder: epath.PathLike, unet_config: UNetConfig,
                   params: PyTree, settings: DiffusionSettings, *,
                   image_size: Optional[int] = None,
                   model_card: Optional[str] = None) -> epath.Path:
  """Writes a `DDPMPipeline` folder (local or gs://), all or nothing.

  The files (`pipeline_files`) go to a temporary folder beside `folder`,
  which is renamed to `folder` at the end (`storage.move_tree`); on any
  error the temporary folder is removed and nothing is left.

  Args:
    folder: the folder to create; it must not exist.
    unet_config, params, image_size: the network (see `to_diffusers`).
    settings: its diffusion process (see `scheduler_config_to_diffusers`).
    model_card: the text of `README.md`, if any.

  Returns:
    The written folder.

  Raises:
    PretrainedError: `folder` exists, or the network or settings cannot be
      exported (nothing is written).
    storage.StorageError: a gs:// folder that cannot be written.

  Example:
    >>> save_diffusers("gs://bucket/my-ddpm", config, params, settings)
    >>> # PyTorch: DDPMPipeline.from_pretrained(local copy of the folder)
  """
  folder = storage.as_path(folder)
  if storage.exists(folder):
    raise fail(os.fspath(folder), "exists: export into a new folder (nothing "
               "was written)")
  files = pipeline_files(unet_config, params, settings, image_size=image_size,
                         model_card=model_card)
  tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    for name, data in files.items():
      path = tmp / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
    try:
      storage.move_tree(tmp, folder)
    except BaseException:
      # On gs:// the move is a copy: remove what of it was made.
      if storage.exists(folder, directory=True):
        folder.rmtree()
      raise
  finally:
    if storage.exists(tmp, directory=True):
      tmp.rmtree()
  return folder
