"""diffusers `DiTTransformer2DModel` weights as a ddpm_jax `DiT`.

A diffusers DiT folder (`config.json` and `diffusion_pytorch_model.
safetensors`; or a pipeline folder with them in `transformer/`), e.g. the
transformer of `facebook/DiT-XL-2-256` downloaded with `huggingface_hub`,
becomes a `DiTConfig` and a Flax parameter tree. Nothing is downloaded here
and torch is never required.

Every field of `config.json` that changes the network is checked and every
tensor is used: a setting the ddpm_jax DiT cannot express, or a missing,
extra or mis-shaped tensor, raises `PretrainedError` naming it.
diffusers keeps one copy of the timestep and class embedders per block and
conditions the final layer on block 0's; the DiT has one, so the copies must
be equal (they are in the conversions of the authors' checkpoints).

diffusers' timestep embedding divides by `half - 1` (`time_freq_shift=1`),
the authors' code by `half`, and its blocks' LayerNorm before the MLP takes
`norm_eps` (default 1e-5; `mlp_norm_epsilon`), the authors' 1e-6 like every
other; the imported config keeps diffusers' values.

Example:
  >>> net = load_diffusers_dit("DiT-XL-2-256/transformer")
  >>> out = DiT(config=net.config).apply({"params": net.params}, x, t, y=y,
  ...                                     train=False)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.dit import DiT
from ddpm_jax.models.dit_config import DiTConfig
from ddpm_jax.models.pretrained import common, diffusers
from ddpm_jax.typing import PyTree

# config.json fields, with diffusers' defaults, and the only values the DiT
# computes.
_FIXED = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "upcast_attention": False,
}


class PretrainedDiT(NamedTuple):
  """An imported DiT."""
  config: DiTConfig
  params: PyTree  # float32 Flax parameters of `DiT(config=config)`
  image_size: Optional[int]  # height = width it was built for (sample_size)


def _fail(source: str, message: str) -> common.PretrainedError:
  return common.PretrainedError(f"{source}: {message}")


def dit_config_from_diffusers(
    fields: Mapping[str, Any], *,
    source: str = diffusers.CONFIG_FILE) -> tuple[DiTConfig, Optional[int]]:
  """Maps a diffusers `DiTTransformer2DModel` config.json to a `DiTConfig`.

  Args:
    fields: the parsed config.json.
    source: its name for error messages.

  Returns:
    (the config, the sample size or None). `num_classes` is
    `num_embeds_ada_norm + 1`: the classes and diffusers' null class.

  Raises:
    common.PretrainedError: a field the DiT cannot express, named.

  Example:
    >>> config, size = dit_config_from_diffusers(json.load(open(path)))
  """
  name = fields.get("_class_name", "DiTTransformer2DModel")
  if name != "DiTTransformer2DModel":
    raise _fail(source, f"_class_name {name!r} is not DiTTransformer2DModel")
  for key, value in _FIXED.items():
    if fields.get(key, value) != value:
      raise _fail(
          source, f"{key}={fields[key]!r} is not supported (the DiT has "
          f"{value!r})")
  in_channels = int(fields.get("in_channels", 4))
  out_channels = fields.get("out_channels")
  out_channels = in_channels if out_channels is None else int(out_channels)
  if out_channels not in (in_channels, 2 * in_channels):
    raise _fail(
        source, f"out_channels={out_channels} must be in_channels "
        f"({in_channels}) or twice it (learned variance)")
  classes = fields.get("num_embeds_ada_norm", 1000)
  if classes is None:
    raise _fail(source, "num_embeds_ada_norm is None: no class embedding")
  heads = int(fields.get("num_attention_heads", 16))
  options = dict(in_channels=in_channels,
                 patch_size=int(fields.get("patch_size", 2)),
                 hidden_size=heads * int(fields.get("attention_head_dim", 72)),
                 depth=int(fields.get("num_layers",
                                      28)), num_heads=heads, time_freq_shift=1,
                 mlp_norm_epsilon=float(fields.get("norm_eps", 1e-5)),
                 dropout=float(fields.get("dropout",
                                          0.0)), learned_variance=out_channels
                 != in_channels, num_classes=int(classes) + 1)
  try:
    config = DiTConfig(**options)
  except ValueError as e:
    raise _fail(source, str(e)) from None
  size = fields.get("sample_size")
  return config, None if size is None else int(size)


def _diffusers_names(config: DiTConfig) -> dict[tuple[str, ...], str]:
  """Flax parameter path -> diffusers tensor name, for the tensors that map
  one to one (everything but the fused qkv)."""
  emb = "transformer_blocks.0.norm1.emb."
  names = {
      ("t_embed_1",): emb + "timestep_embedder.linear_1",
      ("t_embed_2",): emb + "timestep_embedder.linear_2",
      ("final_modulation",): "proj_out_1",
      ("final_linear",): "proj_out_2",
  }
  for i in range(config.depth):
    block = f"transformer_blocks.{i}."
    names.update({
        (f"block_{i}", "adaLN_modulation"): block + "norm1.linear",
        (f"block_{i}", "proj"): block + "attn1.to_out.0",
        (f"block_{i}", "fc1"): block + "ff.net.0.proj",
        (f"block_{i}", "fc2"): block + "ff.net.2",
    })
  return names


def dit_params_from_diffusers(
    tensors: Mapping[str, np.ndarray], config: DiTConfig, *,
    source: str = diffusers.SAFETENSORS_FILE) -> PyTree:
  """Converts a `DiTTransformer2DModel` state dict (numpy arrays) to `DiT` parameters.

  Linear layers are transposed, the patch convolution [D, C, p, p] becomes a
  dense kernel over patches flattened (row, column, channel), and each
  block's q, k, v projections are fused into one kernel.

  Args:
    tensors: name -> array of the weights file.
    config: the network (from `dit_config_from_diffusers`).
    source: the weights file's name for error messages.

  Returns:
    The float32 parameter tree of `DiT(config=config)`.

  Raises:
    common.PretrainedError: a tensor is missing, extra, of the wrong
      shape, or a per-block embedder copy differs from block 0's (named).

  Example:
    >>> params = dit_params_from_diffusers(read_tensors(path), config)
  """
  used = set()

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise _fail(source, f"missing tensor {name}")
    used.add(name)
    return np.asarray(tensors[name], np.float32)

  def dense(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

  params = {path: dense(name) for path, name in _diffusers_names(config).items()}
  conv = get("pos_embed.proj.weight")
  params[("patch_embed",)] = {
      "kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
      "bias": get("pos_embed.proj.bias")
  }
  if config.num_classes is not None:
    params[("y_embed",)] = {
        "embedding":
            get("transformer_blocks.0.norm1.emb.class_embedder."
                "embedding_table.weight")
    }
  for i in range(config.depth):
    attn = f"transformer_blocks.{i}.attn1."
    parts = [dense(attn + p) for p in ("to_q", "to_k", "to_v")]
    params[(f"block_{i}", "qkv")] = {
        k: np.concatenate([p[k] for p in parts], axis=-1)
        for k in ("kernel", "bias")
    }
  for name in sorted(set(tensors) - used):
    if name == "pos_embed.pos_embed":  # the fixed sin-cos embedding
      continue
    block, _, rest = name.partition(".norm1.emb.")
    first = "transformer_blocks.0.norm1.emb." + rest
    if rest and first in used:
      if not np.array_equal(get(name), get(first)):
        raise _fail(
            source, f"{name} differs from {first}: the DiT has one embedder "
            f"for all blocks, diffusers' {block} has its own")
      continue
    raise _fail(source, f"unexpected tensor {name}")

  shapes = jax.eval_shape(lambda: DiT(config=config).init(
      jax.random.key(0),
      jnp.zeros((1, config.patch_size, config.patch_size, config.in_channels)),
      jnp.zeros((1,)), y=None if config.num_classes is None else jnp.zeros(
          (1,), jnp.int32), train=False))["params"]

  def leaf(path, shape):
    keys = tuple(k.key for k in path)
    value = params[keys[:-1]][keys[-1]]
    if value.shape != shape.shape:
      raise _fail(
          source, f"tensor for {'/'.join(keys)} has shape {value.shape}, the "
          f"config needs {shape.shape}")
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def load_diffusers_dit(folder: str | os.PathLike) -> PretrainedDiT:
  """Imports a diffusers `DiTTransformer2DModel` folder from disk.

  Args:
    folder: holds config.json and diffusion_pytorch_model.safetensors, or
      is a pipeline folder with them in transformer/.

  Returns:
    `PretrainedDiT(config, params, image_size)`.

  Raises:
    common.PretrainedError: a missing, unreadable or unsupported file,
      field or tensor, named on one line.

  Example:
    >>> config, params, size = load_diffusers_dit("DiT-XL-2-256/transformer")
  """
  folder = os.fspath(folder)
  if not os.path.isfile(os.path.join(folder, diffusers.CONFIG_FILE)):
    nested = os.path.join(folder, "transformer")
    if not os.path.isfile(os.path.join(nested, diffusers.CONFIG_FILE)):
      raise _fail(
          folder, f"no {diffusers.CONFIG_FILE} (nor transformer/"
          f"{diffusers.CONFIG_FILE}): not a diffusers DiT folder")
    folder = nested
  config_path = os.path.join(folder, diffusers.CONFIG_FILE)
  weights = os.path.join(folder, diffusers.SAFETENSORS_FILE)
  config, size = dit_config_from_diffusers(_read_json(config_path),
                                           source=config_path)
  params = dit_params_from_diffusers(diffusers.read_tensors(weights), config,
                                     source=weights)
  return PretrainedDiT(config, params, size)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _fail(path, f"not a readable JSON file ({e})") from None
  if not isinstance(fields, dict):
    raise _fail(path, f"holds a JSON {type(fields).__name__}, not an object")
  return fields
