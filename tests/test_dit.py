"""Tests of the DiT: exact parameter counts, adaLN-Zero, shapes, determinism,
one trace per train step, diffusers' DiTTransformer2DModel as the peer, and
the NNX bridge."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ddpm_jax import samplers
from ddpm_jax.data import pipeline
from ddpm_jax.diffusion import guidance, losses, schedules
from ddpm_jax.engine import builders, train_step
from ddpm_jax.engine import config as config_lib
from ddpm_jax.infra import parallel
from ddpm_jax.models import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    count_params,
    dit,
    dit_config,
    pretrained,
)
from ddpm_jax.models.pretrained import dit as pretrained_dit
from tests import train_helpers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# Two blocks of width 32: every code path, a few tens of thousands of
# parameters.
TINY = dict(hidden_size=32, depth=2, num_heads=4, time_embed_dim=32)


def _abstract_params(config: DiTConfig, size: int):
  x = jnp.zeros((1, size, size, config.in_channels))
  t = jnp.zeros((1,), jnp.int32)
  y = None if config.num_classes is None else t
  return jax.eval_shape(lambda: DiT(config=config).init(jax.random.key(
      0), x, t, y=y, train=False))["params"]


def _expected_count(config: DiTConfig) -> int:
  """The closed form of the paper's network (biases everywhere)."""
  d, p = config.hidden_size, config.patch_size
  block = (6 * d * d + 6 * d) + (3 * d * d + 3 * d) + (
      d * d + d) + (config.mlp_ratio * d * d +
                    config.mlp_ratio * d) + (config.mlp_ratio * d * d + d)
  return ((p * p * config.in_channels * d + d) +
          (config.time_embed_dim * d + d + d * d + d) +
          (config.num_classes or 0) * d + config.depth * block +
          (2 * d * d + 2 * d) +
          (d * p * p * config.out_channels + p * p * config.out_channels))


# Peebles & Xie (2023): the /2 models' parameters in millions, on 256x256
# ImageNet (32x32x4 latents, learned Sigma, 1000 classes and the null class).
PAPER_MILLIONS = {"s": 33, "b": 130, "l": 458, "xl": 675}


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_preset_parameter_counts(preset):
  config = dit_config(preset, in_channels=4, learned_variance=True,
                      num_classes=1001)
  params = _abstract_params(config, 32)
  tokens = (32 // config.patch_size)**2
  count = count_params(params)
  assert count == _expected_count(config)
  # The authors count their frozen position embedding as a parameter.
  with_positions = count + tokens * config.hidden_size
  if config.patch_size == 2:  # B/2's 130.51M is the paper's 130M.
    assert abs(with_positions / 1e6 -
               PAPER_MILLIONS[preset.split("_")[1]]) < 0.6
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_dit_xl_2_has_the_papers_675m_parameters():
  """DiT-XL/2 on 32x32x4 latents, learned Sigma, 1000 classes + null:
  674,834,720 trainable parameters; the authors' printed count 675,129,632
  adds their frozen 256 x 1152 position embedding."""
  config = dit_config("dit_xl_2", in_channels=4, learned_variance=True,
                      num_classes=1001)
  count = count_params(_abstract_params(config, 32))
  assert count == 674_834_720
  assert count + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("preset,width,depth,heads,patch", [
    ("dit_s_2", 384, 12, 6, 2),
    ("dit_b_4", 768, 12, 12, 4),
    ("dit_l_8", 1024, 24, 16, 8),
    ("dit_xl_2", 1152, 28, 16, 2),
])
def test_presets_are_the_papers_models(preset, width, depth, heads, patch):
  config = DIT_PRESETS[preset]
  assert (config.hidden_size, config.depth, config.num_heads,
          config.patch_size) == (width, depth, heads, patch)
  assert config.mlp_ratio == 4 and config.time_embed_dim == 256


def _inputs(config: DiTConfig, batch: int = 3, size: int = 16):
  x = jax.random.normal(jax.random.key(1),
                        (batch, size, size, config.in_channels))
  t = jnp.array([0, 417, 999, 5][:batch], jnp.int32)
  y = None if config.num_classes is None else jnp.arange(
      batch, dtype=jnp.int32) % config.num_classes
  return x, t, y


def _perturbed(params, seed: int = 0):
  """The parameters plus noise, so that every zero-initialised layer acts."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)
  ])


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("learned_variance,num_classes", [(False, None),
                                                          (True, 11)])
def test_untrained_output_is_exactly_zero_and_shaped(patch, learned_variance,
                                                     num_classes):
  """adaLN-Zero: zero modulation and final layer give exactly 0 at init."""
  config = dit_config("dit_s_2", **TINY, patch_size=patch, in_channels=3,
                      learned_variance=learned_variance,
                      num_classes=num_classes)
  x, t, y = _inputs(config)
  net = DiT(config=config)
  params = net.init(jax.random.key(0), x, t, y=y, train=False)["params"]
  out = net.apply({"params": params}, x, t, y=y, train=False)
  chex.assert_shape(out, (3, 16, 16, config.out_channels))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(out, np.zeros_like(out))
  assert not np.any(params["block_0"]["adaLN_modulation"]["kernel"])
  assert not np.any(params["final_linear"]["kernel"])


def test_output_is_deterministic_and_depends_on_every_input():
  config = dit_config("dit_s_2", **TINY, in_channels=3, num_classes=11)
  x, t, y = _inputs(config)
  net = DiT(config=config)
  params = _perturbed(
      net.init(jax.random.key(0), x, t, y=y, train=False)["params"])
  apply = jax.jit(
      lambda p, x, t, y: net.apply({"params": p}, x, t, y=y, train=False))
  out = apply(params, x, t, y)
  np.testing.assert_array_equal(out, apply(params, x, t, y))
  np.testing.assert_array_equal(
      params["block_0"]["qkv"]["kernel"],
      _perturbed(net.init(jax.random.key(0), x, t, y=y,
                          train=False)["params"])["block_0"]["qkv"]["kernel"])
  for changed in (apply(params, x, t + 1, y), apply(params, x, t, y + 1),
                  apply(params, x.at[:, 0, 0].add(1.0), t, y)):
    assert np.all(np.any(np.asarray(changed != out), axis=(1, 2, 3)))


def test_bfloat16_compute_keeps_float32_parameters():
  config = dit_config("dit_s_2", **TINY, in_channels=3, dtype="bfloat16")
  x, t, _ = _inputs(config)
  net = DiT(config=config)
  params = net.init(jax.random.key(0), x, t, train=False)["params"]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  params = _perturbed(params)
  out = net.apply({"params": params}, x, t, train=False)
  chex.assert_type(out, jnp.float32)
  reference = DiT(config=dit_config("dit_s_2", **TINY, in_channels=3)).apply(
      {"params": params}, x, t, train=False)
  # bfloat16 keeps 8 bits of mantissa.
  np.testing.assert_allclose(out, reference,
                             atol=0.05 * np.abs(reference).max())


def test_dropout_acts_only_when_training():
  config = dit_config("dit_s_2", **TINY, in_channels=3, dropout=0.5)
  x, t, _ = _inputs(config)
  net = DiT(config=config)
  params = _perturbed(net.init(jax.random.key(0), x, t, train=False)["params"])
  run = lambda train, key: net.apply({"params": params}, x, t, train=train, rngs
                                     ={"dropout": jax.random.key(key)})
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert np.any(np.asarray(run(True, 0) != run(True, 1)))


@pytest.mark.parametrize("fields,message", [
    (dict(patch_size=3), "patch_size must be one of"),
    (dict(num_heads=5), "must divide hidden_size"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(time_freq_shift=2), "time_freq_shift"),
    (dict(mlp_norm_epsilon=0.0), "mlp_norm_epsilon must be a positive"),
    (dict(channels=3), "unknown fields"),
])
def test_config_rejects_bad_fields(fields, message):
  with pytest.raises(ValueError, match=message):
    dit_config("dit_s_2", **fields)
  with pytest.raises(ValueError, match="unknown preset"):
    dit_config("dit_m_2")


@pytest.mark.parametrize("x_shape,t_shape,y,message", [
    ((2, 16, 16, 4), (2,), None, "x must have shape"),
    ((2, 14, 14, 3), (2,), None, "divisible by patch_size=4"),
    ((2, 16, 16, 3), (3,), None, "t must have shape"),
    ((2, 16, 16, 3), (2,), jnp.zeros((2,), jnp.int32), "y was given"),
])
def test_bad_inputs_raise(x_shape, t_shape, y, message):
  net = DiT(config=dit_config("dit_s_4", **TINY, in_channels=3))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x_shape),
                                    jnp.zeros(t_shape), y=y, train=False))


def test_sincos_position_embedding_closed_form():
  emb = dit.sincos_position_embedding(8, 3, 5)
  chex.assert_shape(emb, (15, 8))
  row, col = 2, 3  # token 2 * 5 + 3
  w = 1.0 / 10000**(np.arange(2) / 2)
  expected = np.concatenate(
      [np.sin(col * w),
       np.cos(col * w),
       np.sin(row * w),
       np.cos(row * w)])
  np.testing.assert_allclose(emb[13], expected, rtol=1e-6)


def test_timestep_embedding_closed_form():
  emb = dit.timestep_embedding(jnp.array([0.0, 3.0]), 8, freq_shift=0)
  f = 10000.0**(-np.arange(4) / 4)
  np.testing.assert_allclose(emb[1],
                             np.concatenate([np.cos(3 * f),
                                             np.sin(3 * f)]), rtol=1e-6)
  np.testing.assert_array_equal(emb[0], np.repeat([1.0, 0.0], 4))


# ---------------------------------------------------------------------------
# diffusers' DiTTransformer2DModel (tests/fixtures/make_dit_fixture.py).


@pytest.mark.parametrize(
    "fixture",
    ["diffusers_dit_tiny", "diffusers_dit_tiny_p4", "diffusers_dit_tiny_eps"])
def test_matches_diffusers_dit(fixture):
  net = pretrained_dit.load_diffusers_dit(os.path.join(FIXTURES, fixture))
  golden = np.load(os.path.join(FIXTURES, fixture, "golden.npz"))
  assert net.image_size == golden["x"].shape[1]
  assert net.config.num_classes == int(golden["y"][-1]) + 1  # the null class
  out = DiT(config=net.config).apply({"params": net.params}, golden["x"],
                                     golden["t"], y=golden["y"], train=False)
  chex.assert_shape(out, golden["out"].shape)
  # float32 on both sides; the residue is the t = 999 phase of the timestep
  # sinusoid, which an ulp of its frequency moves by ~6e-5.
  np.testing.assert_allclose(out, golden["out"], atol=1e-5, rtol=0)


def test_diffusers_dit_import_names_bad_tensors(tmp_path):
  folder = os.path.join(FIXTURES, "diffusers_dit_tiny")
  config, _ = pretrained_dit.dit_config_from_diffusers(
      json.loads(open(os.path.join(folder, "config.json")).read()))
  tensors = pretrained.read_tensors(
      os.path.join(folder, pretrained.SAFETENSORS_FILE))
  name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  untied = {**tensors, name: tensors[name] + 1}
  with pytest.raises(pretrained.PretrainedError, match="differs from"):
    pretrained_dit.dit_params_from_diffusers(untied, config)
  with pytest.raises(pretrained.PretrainedError, match="missing tensor"):
    pretrained_dit.dit_params_from_diffusers(
        {
            k: v for k, v in tensors.items() if k != "proj_out_2.bias"
        }, config)
  with pytest.raises(pretrained.PretrainedError, match="unexpected tensor"):
    pretrained_dit.dit_params_from_diffusers({
        **tensors, "extra": tensors[name]
    }, config)
  with pytest.raises(pretrained.PretrainedError, match="norm_type"):
    pretrained_dit.dit_config_from_diffusers({"norm_type": "ada_norm"})
  assert pretrained_dit.dit_config_from_diffusers(
      {})[0].mlp_norm_epsilon == 1e-5  # diffusers' default norm_eps


# ---------------------------------------------------------------------------
# Drop-in: the library's train step and guidance take the DiT unchanged.


def test_train_step_traces_once_and_guidance_runs():
  config = dit_config("dit_s_4", **TINY, in_channels=1, num_classes=11)
  model = DiT(config=config)
  tx = optax.adam(1e-3)
  mesh = parallel.create_mesh()
  state = train_step.create_train_state(model, tx, jax.random.key(0),
                                        image_shape=(8, 8, 1), mesh=mesh,
                                        num_classes=10)
  sched = schedules.make_schedule("cosine", 50)
  step_fn = train_step.make_train_step(model, tx, sched,
                                       learning_rate_fn=lambda _: 1e-3,
                                       num_classes=10, p_uncond=0.1)

  @chex.assert_max_traces(n=1)
  def counted(state, batch, rng):
    return step_fn(state, batch, rng)

  step = train_step.jit_train_step(counted, mesh, state)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1)
  batch = {"image": images, "label": jnp.arange(4, dtype=jnp.int32)}
  losses_seen = []
  for i in range(3):
    state, metrics = step(state, batch, jax.random.key(i))
    losses_seen.append(float(metrics["loss"]))
  assert int(state.step) == 3 and np.all(np.isfinite(losses_seen))
  # After a step the zero-initialised layers have moved.
  assert np.any(np.asarray(state.params["final_linear"]["kernel"]))

  cond_fn = lambda x_t, t, y: model.apply({"params": state.params}, x_t, t, y=y,
                                          train=False)
  model_fn = guidance.classifier_free_guidance(
      cond_fn, labels=jnp.arange(4, dtype=jnp.int32), num_classes=10, scale=2.0)
  out = samplers.ddim_sample(model_fn, sched, num_steps=5, shape=(4, 8, 8, 1),
                             key=jax.random.key(0)).images
  chex.assert_shape(out, (4, 8, 8, 1))
  assert np.all(np.isfinite(out))


@pytest.mark.slow
def test_dit_in_nnx_trains_and_samples():
  config = dit_config("dit_s_2", hidden_size=32, depth=2, num_heads=4,
                      in_channels=1)
  linen = DiT(config=config)
  model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
  x0 = jnp.asarray(
      next(
          pipeline.create_dataset("digits", batch_size=16, image_size=8,
                                  channels=1, random_flip=False,
                                  seed=0))["image"])
  nnx.bridge.lazy_init(model, x0, jnp.zeros((16,), jnp.int32), train=False)

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  t = jnp.arange(16, dtype=jnp.int32) * 3
  chex.assert_trees_all_close(
      model(x0, t, train=False),
      linen.apply({"params": params}, x0, t, train=False), atol=1e-6)

  sched = schedules.make_schedule("cosine", 50)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def loss_of(model, key):
    model_fn = lambda x_t, s: model(x_t, s, train=True)
    return losses.training_losses(model_fn, sched, x0, key).mean()

  @nnx.jit
  def step(model, optimizer, key):
    loss, grads = nnx.value_and_grad(loss_of)(model, key)
    optimizer.update(model, grads)
    return loss

  fixed = jax.random.key(123)
  before = float(nnx.jit(loss_of)(model, fixed))
  for i in range(60):
    step(model, optimizer, jax.random.key(i))
  after = float(nnx.jit(loss_of)(model, fixed))
  assert after < 0.6 * before, (before, after)

  trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  @jax.jit
  def sample(params, key):
    model_fn = lambda x_t, s: linen.apply({"params": params}, x_t, s, train=
                                          False)
    return samplers.ddim_sample(model_fn, sched, num_steps=10,
                                shape=(4, 8, 8, 1), key=key).images

  images = sample(trained, jax.random.key(0))
  chex.assert_shape(images, (4, 8, 8, 1))
  assert np.all(np.isfinite(images))
  np.testing.assert_array_equal(images, sample(trained, jax.random.key(0)))


# ---------------------------------------------------------------------------
# The run config: `model.preset` selects the DiT; the recipes.


@pytest.mark.parametrize("spec,num_classes,width", [
    ("configs/cifar10_dit.py", 10, 384),
    ("configs/cifar10_dit.py:tiny", 10, 32),
    ("configs/mnist_cpu_dit.py", 0, 128),
    ("configs/mnist_cpu_dit.py:cond,tiny", 10, 32),
])
def test_dit_recipes_build_the_dit(spec, num_classes, width):
  config = config_lib.load_config(spec)
  config.data.source = "digits"  # The recipe's own data may be absent.
  config_lib.validate_config(config, mode="train", num_devices=1)
  model = builders.build_model(config)
  assert isinstance(model, DiT)
  assert model.config.hidden_size == width
  assert model.config.in_channels == config.data.channels
  # The classes and the null class of guidance.
  assert model.config.num_classes == (num_classes + 1 if num_classes else None)
  assert model.config.learned_variance == (
      config.diffusion.var_type == "learned_range")


@pytest.mark.parametrize("overrides,message", [
    (dict(image_size=30), r"image_size \(30\) must be divisible by "
     r"config.model.patch_size \(4\)"),
    (dict(channels=3), r"channels \(3\) must equal the network's in_channels"),
])
def test_dit_run_config_checks(overrides, message):
  config = config_lib.load_config("configs/mnist_cpu_dit.py")
  config.data.update(dict(source="digits", **overrides))
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(config, mode="train")
  config = config_lib.load_config("configs/mnist_cpu_dit.py")
  config.model.base_channels = 32
  with pytest.raises(config_lib.ConfigError, match="DiTConfig: unknown"):
    config_lib.model_config(config)
  config.model = dict(preset="dit_m_2")
  with pytest.raises(config_lib.ConfigError,
                     match="'dit_m_2' is neither a U-Net preset"):
    config_lib.model_config(config)


@pytest.mark.slow
def test_command_line_trains_and_samples_a_guided_dit(tmp_path):
  """The CLI, unchanged, trains the class-conditional DiT recipe (tiny, on
  the bundled digits) and samples it with guidance."""
  args = [
      "--config=configs/mnist_cpu_dit.py:cond,tiny",
      "--config.data.source=digits", "--config.data.image_size=8",
      f"--workdir={tmp_path}"
  ]

  def run(*extra):
    out = subprocess.run([sys.executable, "-m", "ddpm_jax.main", *args, *extra],
                         cwd=train_helpers.REPO,
                         env=train_helpers.subprocess_env(),
                         capture_output=True, text=True, timeout=900,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr

  assert "step 4/4: loss" in run()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  log = run("--mode=sample", "--config.sample.num_images=20",
            "--config.sample.guidance_scale=2")
  assert "guidance scale 2" in log
  with np.load(tmp_path / "samples" / "sample_step_00000004.npz") as f:
    chex.assert_shape(f["images"], (20, 8, 8, 1))
    assert np.all(np.isfinite(f["images"]))
    np.testing.assert_array_equal(f["labels"], np.arange(20) % 10)
