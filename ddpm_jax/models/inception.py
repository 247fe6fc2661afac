"""The FID Inception-v3 in Flax, with a loader for pytorch-fid's weights.

This is the network of TensorFlow's original FID code (the graph of
`inception-2015-12-05.tgz`) as pytorch-fid rebuilds it in `fid_inception_v3()`:
torchvision's Inception-v3 without the auxiliary head, 1008 logits, and the
FID patches: the average pools of the A, C and E blocks exclude the zero
padding (`count_include_pad=False`) and the pool branch of the last E block
(`Mixed_7c`) is a 3x3 max pool. Every convolution has no bias and is followed
by an eval-mode BatchNorm (epsilon 1e-3) and a ReLU.

Input convention (pytorch-fid's): images are NHWC RGB, either uint8 in
[0, 255] or float in [-1, 1] (uint8 maps to x / 127.5 - 1, which equals
pytorch-fid's 2 * (x / 255) - 1), and are resized bilinearly to 299x299 with
half-pixel centres and no antialiasing (`F.interpolate(..., mode="bilinear",
align_corners=False)`). For FID values comparable with published ones, quantize
generated samples to uint8 first, as saving them to PNG does.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a PyTorch
state dict. Convert it once to `.npz` (needs torch only for this step) so that
the runtime never imports torch:

  >>> import numpy as np
  >>> state = read_state_dict("pt_inception-2015-12-05-6726825d.pth")
  >>> np.savez("fid_inception.npz", **state)
  >>> variables = load_fid_inception_params("fid_inception.npz")
  >>> extract = make_fid_inception_extractor(variables)
  >>> out = extract(uint8_images)  # out.pool [B, 2048], out.logits [B, 1008]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
NUM_LOGITS = 1008
BN_EPSILON = 1e-3


class InceptionOutputs(NamedTuple):
  """What the FID Inception returns.

  Attributes:
    pool: the 2048-d global average pool features (pytorch-fid's FID
      features, TF's `pool_3`), float32 [B, 2048].
    logits: the 1008 class logits (for the Inception Score), float32
      [B, 1008].
  """
  pool: jnp.ndarray
  logits: jnp.ndarray


class BasicConv2d(nn.Module):
  """Convolution without bias, eval-mode BatchNorm (eps 1e-3), ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  """3x3/1 average pool over the unpadded pixels only (TF's `SAME` pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: pytorch-fid's `FIDInceptionA`."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1),
                     name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: torchvision's `InceptionB` (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e: pytorch-fid's `FIDInceptionC`."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: torchvision's `InceptionD` (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b/c: pytorch-fid's `FIDInceptionE_1` / `FIDInceptionE_2`.

  Attributes:
    max_pool: the pool branch uses a 3x3/1 max pool (`FIDInceptionE_2`,
      Mixed_7c) instead of the padding-excluding average pool
      (`FIDInceptionE_1`, Mixed_7b).
  """
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1),
                           padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3 (pytorch-fid's `fid_inception_v3()`), NHWC.

  Takes images already in the network's range [-1, 1] at any size of at least
  75x75 (the FID convention is 299x299: use `preprocess_images` or
  `make_fid_inception_extractor`). Submodule names are the PyTorch ones, so
  the state dict maps one to one (see `convert_state_dict`).

  Example:
    >>> model = FIDInceptionV3()
    >>> out = model.apply(variables, preprocess_images(uint8_images))
    >>> out.pool.shape, out.logits.shape  # (B, 2048), (B, 1008)
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> InceptionOutputs:
    """Runs the network.

    Args:
      x: float [B, H, W, 3] in [-1, 1] with H, W >= 75.

    Returns:
      `InceptionOutputs` with pool [B, 2048] and logits [B, 1008].
    """
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError("FIDInceptionV3 needs [B, H, W, 3] inputs with H, W >= "
                       f"{MIN_INPUT_SIZE}; got shape {tuple(x.shape)}.")
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
    x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, name="fc")(pool)
    return InceptionOutputs(pool=pool, logits=logits)


def preprocess_images(images: jnp.ndarray) -> jnp.ndarray:
  """Maps images to the FID Inception's input, pytorch-fid's convention.

  Args:
    images: RGB [B, H, W, 3], uint8 in [0, 255] or float in [-1, 1].

  Returns:
    float32 [B, 299, 299, 3] in [-1, 1], bilinearly resized with half-pixel
    centres and no antialiasing (PyTorch's `align_corners=False`).

  Example:
    >>> preprocess_images(jnp.zeros((2, 32, 32, 3), jnp.uint8)).shape
    (2, 299, 299, 3)
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError("images must be RGB [B, H, W, 3]; got shape "
                     f"{tuple(images.shape)}.")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 127.5 - 1.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError("images must be uint8 in [0, 255] or float in [-1, 1]; "
                     f"got dtype {images.dtype}.")
  return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                          method="bilinear", antialias=False)


def make_fid_inception_extractor(
    variables: Mapping) -> Callable[[jnp.ndarray], InceptionOutputs]:
  """A jitted function from images to FID Inception features and logits.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of `FIDInceptionV3`, e.g.
      from `load_fid_inception_params`.

  Returns:
    `extract(images) -> InceptionOutputs`; images as in `preprocess_images`,
    pool [B, 2048] and logits [B, 1008] float32. It compiles once per input
    shape, so feed batches of one size.

  Example:
    >>> extract = make_fid_inception_extractor(variables)
    >>> extract(uint8_images).pool.shape  # (B, 2048)
  """
  model = FIDInceptionV3()

  @jax.jit
  def extract(images):
    return model.apply(variables, preprocess_images(images))

  return extract


def _flat_template() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """PyTorch name -> (collection, Flax path, Flax shape) of every tensor."""
  shapes = jax.eval_shape(
      FIDInceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3),
                           jnp.float32))
  leaf_to_torch = {("params", "kernel"): "weight",
                   ("params", "scale"): "weight",
                   ("params", "bias"): "bias",
                   ("batch_stats", "mean"): "running_mean",
                   ("batch_stats", "var"): "running_var"}
  template = {}
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for key_path, leaf in flat:
      path = tuple(k.key for k in key_path)
      torch_name = ".".join(path[:-1] + (leaf_to_torch[collection,
                                                       path[-1]],))
      template[torch_name] = (collection, path, tuple(leaf.shape))
  return template


def _to_torch_shape(flax_shape: tuple[int, ...], path: tuple[str, ...]
                    ) -> tuple[int, ...]:
  """The PyTorch shape of a Flax tensor: HWIO -> OIHW, (in, out) -> (out, in)."""
  if path[-1] == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if path[-1] == "kernel":
    return tuple(reversed(flax_shape))
  return flax_shape


def _from_torch(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  """PyTorch layout -> Flax layout (conv OIHW -> HWIO, fc (out, in) -> (in, out))."""
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if path[-1] == "kernel":
    return value.T
  return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Maps pytorch-fid's FID Inception state dict to `FIDInceptionV3` variables.

  The mapping is exact: every tensor of the model must be present with its
  PyTorch shape, and nothing else may be (apart from BatchNorm's unused
  `num_batches_tracked` counters). Conv weights go OIHW -> HWIO, the fc
  weight is transposed, BatchNorm weight/bias/running_mean/running_var become
  scale/bias (params) and mean/var (batch_stats).

  Args:
    state_dict: name -> array (numpy arrays or CPU torch tensors), e.g.
      `read_state_dict(path)`.

  Returns:
    `{"params": ..., "batch_stats": ...}` as nested dicts of float32 arrays.

  Raises:
    ValueError: naming the missing, unexpected or mis-shaped tensors.

  Example:
    >>> variables = convert_state_dict(read_state_dict("fid_inception.npz"))
  """
  template = _flat_template()
  counters = {name[:-len("running_mean")] + "num_batches_tracked"
              for name in template if name.endswith(".running_mean")}
  names = set(state_dict) - counters
  missing = sorted(set(template) - names)
  extra = sorted(names - set(template))
  if missing or extra:
    raise ValueError("FID Inception state dict does not match the model: "
                     f"missing tensors {missing}, unexpected tensors {extra}.")
  variables = {"params": {}, "batch_stats": {}}
  for name, (collection, path, flax_shape) in template.items():
    value = np.asarray(state_dict[name], dtype=np.float32)
    expected = _to_torch_shape(flax_shape, path)
    if value.shape != expected:
      raise ValueError(f"FID Inception tensor {name!r} has shape "
                       f"{value.shape}; expected {expected}.")
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(_from_torch(value, path))
  return variables


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a FID Inception state dict from a `.pth` or an `.npz` file.

  `.pth` (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) needs torch,
  imported here only; `.npz` (the same names, e.g. written once with
  `np.savez(out, **read_state_dict(pth))`) needs only numpy.

  Args:
    path: the file (local or gs://).

  Returns:
    name -> float numpy array, in PyTorch layout.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: for another extension.
    ImportError: for a `.pth` file without torch installed.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weight file not found: {path}")
  if path.name.endswith(".npz"):
    with path.open("rb") as f, np.load(f) as data:
      return {name: data[name] for name in data.files}
  if path.name.endswith((".pth", ".pt")):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"Reading {path} needs torch; convert it once to .npz elsewhere with "
          "np.savez(out, **read_state_dict(path)) and load the .npz.") from e
    with path.open("rb") as f:
      state = torch.load(f, map_location="cpu", weights_only=True)
    return {name: t.detach().cpu().numpy() for name, t in state.items()}
  raise ValueError(f"Unknown FID Inception weight format {path!r}; expected a "
                   ".pth (PyTorch state dict) or .npz file.")


def load_fid_inception_params(path: str | os.PathLike) -> dict:
  """Loads `FIDInceptionV3` variables from a `.pth` or `.npz` state dict.

  Args:
    path: pytorch-fid's `.pth` file (needs torch) or its `.npz` conversion.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `FIDInceptionV3.apply`.

  Example:
    >>> variables = load_fid_inception_params("fid_inception.npz")
  """
  return convert_state_dict(read_state_dict(path))
