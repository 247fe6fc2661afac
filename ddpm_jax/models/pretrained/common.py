"""What both readers share: the result types, the errors and the assembly of
a Flax parameter tree from named tensors (and back).

A reader describes each Flax parameter of `UNet(config=config)` as a `Leaf`:
the tensors of its weights file it is made from, their expected shapes, how
they combine into the parameter and how the parameter splits back into them
(the writer's direction). `assemble` and `disassemble` walk the parameter
tree with such a description.

Example:
  >>> params = assemble(tensors, config, leaf_for, source=path, hint=path)
  >>> disassemble(params, config, leaf_for) == tensors
  True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import UNet, UNetConfig
from ddpm_jax.typing import PyTree


class PretrainedError(ValueError):
  """A pretrained model cannot be imported or exported; the one-line message
  names the file and the field, tensor or value."""


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


class Leaf(NamedTuple):
  """How one Flax parameter is made from tensors of a weights file."""
  keys: tuple[str, ...]  # the file's tensors, in order
  shapes: Callable[[tuple[int, ...]], tuple[tuple[int, ...], ...]]
  combine: Callable[..., np.ndarray]  # tensors -> the parameter
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # its inverse


LeafFor = Callable[[tuple[str, ...]], Leaf]


def fail(source: str, message: str) -> PretrainedError:
  """`PretrainedError('<source>: <message>')`."""
  return PretrainedError(f"{source}: {message}")


def one_line(error: BaseException, limit: int = 200) -> str:
  """The message of `error` on one line, cut at `limit` characters."""
  text = " ".join(str(error).split())
  return text[:limit] + ("..." if len(text) > limit else "")


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  """An int or float that is not a bool."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def equal(value: Any, expected: Any) -> bool:
  """JSON value equality: numbers by value (1 == 1.0, never a bool)."""
  if is_number(expected):
    return is_number(value) and math.isclose(value, expected, rel_tol=1e-9)
  return type(value) is type(expected) and value == expected


def same(name: str) -> Leaf:
  """A tensor stored as the parameter is."""
  return Leaf((name,), lambda s: (s,), lambda w: w, lambda p: (p,))


def fused(names: tuple[str, str, str], *, kernel: bool,
          transpose: bool) -> Leaf:
  """q, k, v projections fused into one Dense: [C, 3C] kernel, [3C] bias;
  `transpose`: the file's kernels are [out, in] (PyTorch's Linear)."""
  if not kernel:
    return Leaf(names, lambda s: ((s[0] // 3,),) * 3,
                lambda *ws: np.concatenate(ws), lambda p: tuple(np.split(p, 3)))
  if transpose:
    return Leaf(names, lambda s: ((s[1] // 3, s[0]),) * 3,
                lambda *ws: np.concatenate([w.T for w in ws], axis=1),
                lambda p: tuple(w.T for w in np.split(p, 3, axis=1)))
  return Leaf(names, lambda s: (
      (s[0], s[1] // 3),) * 3, lambda *ws: np.concatenate(ws, axis=1),
              lambda p: tuple(np.split(p, 3, axis=1)))


def flax_shapes(config: UNetConfig) -> PyTree:
  """`jax.ShapeDtypeStruct`s of `UNet(config=config)`'s parameters."""
  size = 2**(len(config.channel_mults) - 1)
  x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = None if config.num_classes is None else jnp.zeros((1,), jnp.int32)
  model = UNet(config=config)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, t, y=y, train=False))["params"]


def _listing(items: list[str]) -> str:
  more = f" and {len(items) - 3} more" if len(items) > 3 else ""
  return "; ".join(items[:3]) + more


def assemble(tensors: Mapping[str, np.ndarray], config: UNetConfig,
             leaf_for: LeafFor, *, source: str, hint: str) -> PyTree:
  """The Flax parameter tree of `config`, each leaf made by `leaf_for(path)`
  from `tensors`; every tensor must be used exactly once.

  Raises:
    PretrainedError: tensors that are missing, extra or of the wrong shape,
      named (`source`: the weights, `hint`: what defines the network).
  """
  shapes = flax_shapes(config)
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
  if wrong:
    raise fail(
        source, f"{len(wrong)} tensor(s) do not fit the network of "
        f"{hint}: {_listing(wrong)}")
  if missing:
    raise fail(
        source, f"{len(missing)} tensor(s) of the network of {hint} "
        f"are missing: {_listing(missing)}")
  if extra:
    raise fail(
        source, f"{len(extra)} tensor(s) are not part of the network "
        f"of {hint}: {_listing(extra)}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.asarray(built[tuple(k.key for k in path)]), shapes)


def disassemble(params: PyTree, config: UNetConfig,
                leaf_for: LeafFor) -> dict[str, np.ndarray]:
  """The inverse of `assemble`: the float32 tensors each parameter splits
  into (`leaf_for(path).split`), C-contiguous, by name.

  Raises:
    PretrainedError: `params` is not the parameter tree of
      `UNet(config=config)` (a missing, extra or mis-shaped leaf is named).
  """
  shapes = flax_shapes(config)
  expected = {
      tuple(k.key for k in path): tuple(
          leaf.shape
      ) for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  }
  given = {
      tuple(getattr(k, "key", k) for k in path):
          leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  wrong = sorted(f"params/{'/'.join(map(str, path))} has shape "
                 f"{tuple(np.shape(given[path]))}, the network needs {shape}"
                 for path, shape in expected.items()
                 if path in given and tuple(np.shape(given[path])) != shape)
  missing = sorted("/".join(path) for path in set(expected) - set(given))
  extra = sorted(
      "/".join(map(str, path)) for path in set(given) - set(expected))
  for problems, what in ((wrong, "do not fit the network"),
                         (missing, "of the network are missing"),
                         (extra, "are not part of the network")):
    if problems:
      raise fail(
          "params", f"{len(problems)} parameter(s) {what} of the "
          f"config: {_listing(problems)}")
  tensors = {}
  for path in expected:
    leaf = leaf_for(path)
    parts = leaf.split(np.asarray(given[path], np.float32))
    tensors.update((key, np.ascontiguousarray(part))
                   for key, part in zip(leaf.keys, parts))
  return tensors
