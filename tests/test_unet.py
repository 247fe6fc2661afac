"""Tests of the U-Net, its config and building blocks (tiny widths, each compile shared)."""

import dataclasses
import functools
import hashlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.models import (
    PRESETS,
    UNet,
    UNetConfig,
    count_params,
    layers,
    unet_config,
)

# Small versions of each layout and block type: same code paths, a few thousand parameters.
# Each one compiles twice (init and apply), so keep the list short.
TINY = {
    "tutorial_convnext":
        unet_config(
            "tutorial",
            base_channels=12,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention=("linear", "linear"),
            dropout=0.1,
        ),
    "ddpm_resnet_classes":
        unet_config(
            "ddpm_cifar10",
            base_channels=16,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention=("none", "full"),
            num_groups=4,
            num_classes=10,
        ),
}
# Shape-checked only (jax.eval_shape), to keep compilation short.
SHAPE_ONLY = {
    "tutorial_resnet":
        unet_config(
            "tutorial",
            base_channels=12,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention=("linear", "none"),
            block_type="resnet",
            num_groups=4,
            dropout=0.1,
        ),
    "ddpm_convnext":
        unet_config(
            "ddpm_cifar10",
            base_channels=16,
            channel_mults=(1, 2),
            num_res_blocks=1,
            block_type="convnext",
            attention=("linear", "full"),
            mid_attention="linear",
            num_groups=4,
        ),
}
BATCH = 2


def _inputs(config: UNetConfig, batch: int, size: int):
  x = jax.random.normal(jax.random.key(1),
                        (batch, size, size, config.in_channels))
  t = jnp.arange(batch, dtype=jnp.int32) * 37 + 5
  y = None if config.num_classes is None else jnp.arange(
      batch, dtype=jnp.int32) % config.num_classes
  return x, t, y


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
  """A tiny network with its params, inputs and jitted apply, compiled once per module."""
  config = TINY[request.param]
  model = UNet(config=config)
  x, t, y = _inputs(config, BATCH, 16)
  init = jax.jit(lambda key: model.init(key, x, t, y=y, train=False)["params"])
  init_params = init(jax.random.key(0))
  params = _perturbed(init_params, 1)

  @jax.jit
  def apply(params, x, t, y, dropout_key):
    return model.apply({"params": params}, x, t, y=y, train=True,
                       rngs={"dropout": dropout_key})

  @jax.jit
  def apply_eval(params, x, t, y):
    return model.apply({"params": params}, x, t, y=y, train=False)

  return dict(config=config, model=model, params=params, x=x, t=t, y=y,
              init=init, init_params=init_params, apply=apply,
              apply_eval=apply_eval, out=apply_eval(params, x, t, y))


def _perturbed(params, seed):
  """Parameters as after some training: the near-zero initialisation of the
  output and residual-closing layers would otherwise hide how the output
  depends on t, y and dropout."""
  rng = np.random.default_rng(
      seed)  # In numpy: nothing to compile per leaf shape.
  return jax.tree.map(
      lambda p: np.asarray(p) +
      (0.1 * rng.standard_normal(p.shape)).astype(p.dtype), params)


def test_initial_output_is_near_zero(tiny):
  """DDPM's init: output layer and residual-closing convs start near zero."""
  out = tiny["apply_eval"](tiny["init_params"], tiny["x"], tiny["t"], tiny["y"])
  assert float(np.abs(np.asarray(out)).max()) < 1e-3


# --- parameter counts and shapes of the presets (no compilation: jax.eval_shape) -----------------


def _tree_digest(params) -> str:
  """First 16 hex digits of the SHA-256 of every parameter's path, shape and dtype, sorted."""
  flat = traverse_util.flatten_dict(params, sep="/")
  text = "\n".join(
      f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(flat.items()))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# The digests pin each preset's parameter tree (paths, shapes, dtypes), so that
# checkpoints written by earlier versions still restore. A change that alters
# a tree on purpose must say so and update its digest.
@pytest.mark.parametrize(
    "preset, overrides, size, expected, digest",
    [
        ("tutorial", {}, 28, 2_996_315, "514ea3425e43a16d"),
        ("tutorial", dict(block_type="resnet",
                          base_channels=32), 28, 2_179_337, "70e57015e1c504f6"),
        ("ddpm_cifar10", {}, 32, 35_746_307, "cc0f19197e6e9e24"),
        ("ddpm_256", {}, 256, 113_673_219, "61a925072005affb"),
    ],
)
def test_preset_parameter_count_tree_and_output_shape(preset, overrides, size,
                                                      expected, digest):
  config = unet_config(preset, **overrides)
  model = UNet(config=config)
  x, t, _ = _inputs(config, 5, size)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
  assert count_params(params) == expected
  assert _tree_digest(params) == digest
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, train=False),
                       params)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)


@pytest.mark.parametrize("name", sorted({**TINY, **SHAPE_ONLY}))
@pytest.mark.parametrize(
    "size, channels, batch, learned_variance",
    [(28, 1, 1, False), (28, 3, 5, True), (32, 3, 1, False), (32, 1, 5, True)],
)
def test_output_shape(name, size, channels, batch, learned_variance):
  config = dataclasses.replace({
      **TINY,
      **SHAPE_ONLY
  }[name], in_channels=channels, learned_variance=learned_variance)
  model = UNet(config=config)
  x, t, y = _inputs(config, batch, size)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, y
                                                      =y, train=False)[0])
  chex.assert_shape(out, (batch, size, size, channels *
                          (2 if learned_variance else 1)))


def test_class_embedding_parameter_count():
  config = TINY["ddpm_resnet_classes"]
  x, t, y = _inputs(config, BATCH, 16)

  def count(config, y):
    return count_params(
        jax.eval_shape(lambda: UNet(config=config).init(jax.random.key(0), x, t,
                                                        y=y, train=False)))

  unconditional = dataclasses.replace(config, num_classes=None)
  assert count(config, y) - count(unconditional,
                                  None) == config.num_classes * config.temb_dim


def test_tiny_output_is_finite_with_input_shape(tiny):
  chex.assert_shape(tiny["out"], tiny["x"].shape)
  chex.assert_tree_all_finite(tiny["out"])


# --- determinism, jit, conditioning, dropout, dtype --------------------------------------------------


def _max_diff(a, b) -> float:
  return float(
      np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_init_and_apply_are_deterministic(tiny):
  chex.assert_trees_all_equal(tiny["init"](jax.random.key(0)),
                              tiny["init_params"])
  np.testing.assert_array_equal(
      tiny["apply_eval"](tiny["params"], tiny["x"], tiny["t"], tiny["y"]),
      tiny["out"])
  other = tiny["init"](jax.random.key(1))
  assert not all(
      jax.tree.leaves(jax.tree.map(np.array_equal, other, tiny["init_params"])))


def test_jit_matches_eager(tiny):
  eager = tiny["model"].apply({"params": tiny["params"]}, tiny["x"], tiny["t"],
                              y=tiny["y"], train=False)
  np.testing.assert_allclose(eager, tiny["out"], rtol=1e-4, atol=1e-5)


def test_time_step_changes_output(tiny):
  other = tiny["apply_eval"](tiny["params"], tiny["x"], tiny["t"] + 100,
                             tiny["y"])
  assert _max_diff(other, tiny["out"]) > 1e-3


def test_float_time_steps_match_integer_ones(tiny):
  out = tiny["apply_eval"](tiny["params"], tiny["x"],
                           tiny["t"].astype(jnp.float32), tiny["y"])
  np.testing.assert_allclose(out, tiny["out"], rtol=1e-5, atol=1e-6)


def test_class_labels_condition_the_output_or_are_refused(tiny):
  params, x, t = tiny["params"], tiny["x"], tiny["t"]
  num_classes = tiny["config"].num_classes
  if num_classes is None:
    with pytest.raises(ValueError, match="num_classes is None"):
      tiny["apply_eval"](params, x, t, jnp.zeros_like(t))
  else:
    other = tiny["apply_eval"](params, x, t, (tiny["y"] + 1) % num_classes)
    assert _max_diff(other, tiny["out"]) > 1e-3


def test_dropout_needs_train_and_follows_the_key(tiny):
  params, x, t, y = tiny["params"], tiny["x"], tiny["t"], tiny["y"]
  a = tiny["apply"](params, x, t, y, jax.random.key(3))
  np.testing.assert_array_equal(
      tiny["apply"](params, x, t, y, jax.random.key(3)), a)
  assert tiny["config"].dropout > 0
  assert _max_diff(a, tiny["apply"](params, x, t, y, jax.random.key(4))) > 1e-4
  assert _max_diff(a, tiny["out"]) > 1e-4


def test_bfloat16_compute_is_close_to_float32(tiny):
  config = dataclasses.replace(tiny["config"], dtype="bfloat16")
  out = jax.jit(lambda p: UNet(config=config).apply({"params": p}, tiny[
      "x"], tiny["t"], y=tiny["y"], train=False))(tiny["params"])
  chex.assert_type(out, jnp.float32)
  assert _max_diff(out,
                   tiny["out"]) < 0.05 * np.abs(np.asarray(tiny["out"])).max()


def test_config_is_a_static_jit_argument(tiny):

  @functools.partial(jax.jit, static_argnames="config")
  def run(params, x, t, y, *, config):
    return UNet(config=config).apply({"params": params}, x, t, y=y, train=False)

  out = jax.eval_shape(functools.partial(run, config=tiny["config"]),
                       tiny["params"], tiny["x"], tiny["t"], tiny["y"])
  chex.assert_shape(out, tiny["x"].shape)


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trips_through_a_plain_dict(preset):
  config = PRESETS[preset]
  fields = config.to_dict()
  assert fields["channel_mults"] == list(config.channel_mults)
  assert UNetConfig.from_dict(fields) == config
  assert UNetConfig(**fields) == config
  assert hash(UNetConfig(**fields)) == hash(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(base_channels=48), "num_groups=32 must divide"),
        (dict(num_groups=5), "num_groups=5 must divide"),
        (dict(block_type="transformer"), "block_type must be one of"),
        (dict(attention=("full",)), "one entry per level"),
        (dict(attention=("none", "full", "none", "sparse")),
         "every attention entry"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(channel_mults=()), "channel_mults must not be empty"),
        (dict(base_channels=0), "base_channels must be a positive int"),
        (dict(widht=3), "unknown fields"),
    ],
)
def test_invalid_config_raises_value_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    unet_config("ddpm_cifar10", **overrides)


def test_unknown_preset_raises_value_error():
  with pytest.raises(ValueError, match="unknown preset"):
    unet_config("ddpm_imagenet")


def test_group_count_is_only_checked_where_group_norm_uses_it():
  assert unet_config(
      "tutorial"
  ).num_groups == 8  # ConvNeXt blocks use GroupNorm(1): 28 % 8 is fine.
  with pytest.raises(ValueError, match="num_groups=8 must divide"):
    unet_config("tutorial", block_type="resnet")


# --- bad inputs: one clear ValueError at trace time ----------------------------------------------


def _bad_call(config, x, t, **kwargs):
  model = UNet(config=config)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, t, train=False, **kwargs))


@pytest.mark.parametrize(
    "preset, shape, message",
    [
        ("ddpm_cifar10",
         (2, 28, 28, 3), "image size 28x28 cannot be halved 3 times"),
        ("tutorial",
         (2, 30, 28, 1), "image size 30x28 cannot be halved 2 times"),
        ("tutorial", (2, 28, 28, 3), r"x must have shape \[B, H, W, 1\]"),
        ("tutorial", (28, 28, 1), r"x must have shape"),
    ],
)
def test_bad_image_raises_value_error(preset, shape, message):
  with pytest.raises(ValueError, match=message):
    _bad_call(unet_config(preset), jnp.zeros(shape),
              jnp.zeros(shape[:1], jnp.int32))


def test_bad_time_steps_and_labels_raise_value_error():
  config = dataclasses.replace(TINY["ddpm_resnet_classes"], num_classes=None)
  x, t, _ = _inputs(config, BATCH, 16)
  with pytest.raises(ValueError, match=r"t must have shape \[B\]=\[2\]"):
    _bad_call(config, x, t[:1])
  with pytest.raises(ValueError, match="num_classes is None"):
    _bad_call(config, x, t, y=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="needs integer labels y"):
    _bad_call(dataclasses.replace(config, num_classes=3), x, t)
  with pytest.raises(ValueError, match="must be floating point"):
    _bad_call(config, x.astype(jnp.int32), t)


# --- depthwise convolution ---------------------------------------------------------------------------


def test_depthwise_conv_module_is_a_grouped_conv():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  grouped = nn.Conv(6, (7, 7), feature_group_count=6)
  params = grouped.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_shapes(
      layers.DepthwiseConv(7).init(jax.random.key(1), x), params)
  params = _perturbed(params, 2)  # a nonzero bias
  np.testing.assert_allclose(
      layers.DepthwiseConv(7).apply(params, x), grouped.apply(params, x),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qkv_projection_is_a_dense_layer_split_in_three(use_bias, dtype):
  h = jax.random.normal(jax.random.key(0), (2, 12, 10))
  dense = nn.Dense(3 * 4 * 8, use_bias=use_bias, kernel_init=layers.KERNEL_INIT,
                   dtype=dtype)
  params = dense.init(jax.random.key(1), h)
  qkv_projection = layers.QKVProjection(4, 8, use_bias, dtype=dtype)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      qkv_projection.init(jax.random.key(1), h), params)
  params = _perturbed(params, 2)  # a nonzero bias
  expected = tuple(
      jnp.split(dense.apply(params, h).reshape(2, 12, 12, 8), 3, axis=2))
  got = qkv_projection.apply(params, h)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g.astype(jnp.float32), e.astype(jnp.float32),
                               rtol=tol, atol=tol)


def test_sinusoidal_embedding():
  emb = layers.sinusoidal_embedding(jnp.array([0, 3]), 8)
  chex.assert_shape(emb, (2, 8))
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  freqs = 10000.0**(-np.arange(4) / 3)
  np.testing.assert_allclose(
      emb[1], np.concatenate([np.sin(3 * freqs),
                              np.cos(3 * freqs)]), rtol=1e-5, atol=1e-6)
