"""Synthetic FID Inception weights, shared by tests/test_inception.py and the
CLI's eval test (tests/test_main.py): the real ones cannot be downloaded
here, so these have the right names and shapes and O(1) activations."""

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.metrics import inception

# PyTorch name of each Flax leaf: (collection, leaf name) -> suffix.
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var"
}


def flax_shapes():
  return jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))


def torch_layout(shapes):
  """Torch name -> (collection, flax path, torch shape) from the Flax tree."""
  layout = {}
  for collection in ("params", "batch_stats"):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(
        shapes[collection])[0]:
      path = tuple(k.key for k in key_path)
      name = ".".join(path[:-1] + (_TORCH_LEAF[collection, path[-1]],))
      shape = leaf.shape
      if path[-1] == "kernel":
        shape = ((shape[3], shape[2], shape[0],
                  shape[1]) if len(shape) == 4 else shape[::-1])
      layout[name] = (collection, path, shape)
  return layout


def random_state_dict(layout, seed=0):
  """A synthetic pytorch-fid state dict whose activations stay O(1)."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, (_, _, shape) in layout.items():
    if name.endswith("conv.weight"):
      value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif name.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name == "fc.weight":
      value = rng.normal(0, 0.05, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    state[name] = value.astype(np.float32)
  return state
