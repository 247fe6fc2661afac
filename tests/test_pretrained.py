"""Tests of ddpm_jax.models.pretrained: diffusers folders (golden outputs from
diffusers itself, committed by tests/fixtures/make_diffusers_fixtures.py), the
real google/ddpm-* configs, and bad input."""

import dataclasses
import json
import os
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import flax as safetensors_flax
from safetensors import numpy as safetensors_numpy

from ddpm_jax.diffusion import schedules
from ddpm_jax.models import PRESETS, UNet, UNetConfig, count_params, pretrained
from ddpm_jax.models.pretrained import DiffusionSettings, PretrainedError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "diffusers_tiny")
TINY_CLASSES = os.path.join(FIXTURES, "diffusers_tiny_classes")
CIFAR = os.path.join(FIXTURES, "google_ddpm_cifar10_32")
CAT = os.path.join(FIXTURES, "google_ddpm_cat_256")
SEEDED = os.path.join(FIXTURES, "diffusers_32groups")
WEIGHTS = pretrained.SAFETENSORS_FILE
LEGACY = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn"
}


def _json(folder, name="config.json"):
  with open(os.path.join(folder, name), encoding="utf-8") as f:
    return json.load(f)


def _copy(folder, tmp_path, name="model"):
  return shutil.copytree(folder, tmp_path / name)


def _tensors(folder):
  return safetensors_numpy.load_file(os.path.join(folder, WEIGHTS))


def _legacy_names(tensors):
  """The attention tensors under diffusers' old names (query, ..., proj_attn)."""
  renamed = {}
  for key, value in tensors.items():
    for new, old in LEGACY.items():
      key = key.replace(f".{new}.", f".{old}.")
    renamed[key] = value
  return renamed


# --- golden outputs of diffusers' UNet2DModel ------------------------------


@pytest.mark.parametrize("folder", [TINY, TINY_CLASSES],
                         ids=["ddpm_blocks", "classes_learned_range"])
def test_outputs_match_diffusers(folder):
  net = pretrained.load_diffusers(folder)
  golden = np.load(os.path.join(folder, "golden.npz"))
  y = jnp.asarray(golden["y"]) if golden["y"].size else None
  out = UNet(config=net.config).apply({"params": net.params},
                                      jnp.asarray(golden["x"]),
                                      jnp.asarray(golden["t"]), y=y,
                                      train=False)
  chex.assert_shape(out, golden["out"].shape)
  np.testing.assert_allclose(out, golden["out"], rtol=0, atol=1e-5)


def test_tiny_fixture_maps_to_the_expected_config_and_settings():
  net = pretrained.load_diffusers(TINY)
  assert net.config == UNetConfig(layout="ddpm", in_channels=3, base_channels=8,
                                  channel_mults=(1, 2), num_res_blocks=1,
                                  attention=("none", "full"),
                                  mid_attention="full", num_groups=4,
                                  dropout=0.0)
  assert net.diffusion == DiffusionSettings(
      schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
      var_type="fixed_large", clip_x0=True, target="eps", mean_form="x0")
  assert net.image_size == 8
  classes = pretrained.load_diffusers(TINY_CLASSES)
  assert (classes.config.num_classes, classes.config.learned_variance,
          classes.config.attention,
          classes.config.mid_attention) == (4, True, ("full", "none"), "none")
  assert classes.diffusion.var_type == "learned_range"
  tensors = _tensors(TINY)
  assert count_params(net.params) == sum(v.size for v in tensors.values())
  chex.assert_trees_all_equal_dtypes(
      net.params, jax.tree.map(lambda p: p.astype(jnp.float32), net.params))


def test_legacy_attention_names_give_the_same_params(tmp_path):
  folder = _copy(TINY, tmp_path)
  legacy = _legacy_names(_tensors(TINY))
  assert any(".proj_attn." in k for k in legacy)
  safetensors_numpy.save_file(legacy, os.path.join(folder, WEIGHTS))
  chex.assert_trees_all_equal(
      pretrained.load_diffusers(folder).params,
      pretrained.load_diffusers(TINY).params)


def test_bfloat16_weights_are_read(tmp_path):
  folder = _copy(TINY, tmp_path)
  tensors = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _tensors(TINY).items()}
  safetensors_flax.save_file(tensors, os.path.join(folder, WEIGHTS))
  params = pretrained.load_diffusers(folder).params
  chex.assert_trees_all_close(params,
                              pretrained.load_diffusers(TINY).params, rtol=1e-2,
                              atol=1e-2)
  assert params["Conv_0"]["kernel"].dtype == jnp.float32


def test_pipeline_folder_with_unet_and_scheduler_subfolders(tmp_path):
  unet = _copy(TINY, tmp_path, "pipeline/unet")
  os.makedirs(tmp_path / "pipeline" / "scheduler")
  shutil.move(os.path.join(unet, "scheduler_config.json"),
              tmp_path / "pipeline" / "scheduler" / "scheduler_config.json")
  net = pretrained.load_diffusers(tmp_path / "pipeline")
  chex.assert_trees_all_equal(net.params,
                              pretrained.load_diffusers(TINY).params)


def test_pytorch_bin_file_is_read_with_torch(tmp_path):
  torch = pytest.importorskip("torch")
  folder = _copy(TINY, tmp_path)
  os.remove(os.path.join(folder, WEIGHTS))
  torch.save({
      k: torch.from_numpy(v) for k, v in _tensors(TINY).items()
  }, os.path.join(folder, pretrained.BIN_FILE))
  chex.assert_trees_all_equal(
      pretrained.load_diffusers(folder).params,
      pretrained.load_diffusers(TINY).params)


def test_pytorch_bin_file_without_torch_is_refused(tmp_path, monkeypatch):
  folder = _copy(TINY, tmp_path)
  os.remove(os.path.join(folder, WEIGHTS))
  with open(os.path.join(folder, pretrained.BIN_FILE), "wb") as f:
    f.write(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  with pytest.raises(PretrainedError, match=r"\.bin file needs torch"):
    pretrained.load_diffusers(folder)


# --- the real google/ddpm-* configs ----------------------------------------


def test_ddpm_cifar10_32_config_is_the_ddpm_cifar10_preset():
  config, image_size = pretrained.unet_config_from_diffusers(_json(CIFAR))
  # DDPM trained with dropout 0.1; the diffusers config records none.
  assert config == dataclasses.replace(PRESETS["ddpm_cifar10"], dropout=0.0)
  assert image_size == 32
  settings = pretrained.diffusion_settings_from_diffusers(
      _json(CIFAR, "scheduler_config.json"))
  assert settings == DiffusionSettings(schedule="linear", num_timesteps=1000,
                                       beta_start=1e-4, beta_end=0.02,
                                       var_type="fixed_large", clip_x0=True,
                                       target="eps", mean_form="x0")
  ours = schedules.make_schedule(settings.schedule, settings.num_timesteps,
                                 beta_start=settings.beta_start,
                                 beta_end=settings.beta_end)
  np.testing.assert_allclose(ours.betas, np.linspace(1e-4, 0.02, 1000),
                             rtol=1e-6)


def test_ddpm_256_configs_are_the_ddpm_256_preset():
  config, image_size = pretrained.unet_config_from_diffusers(_json(CAT))
  assert config == PRESETS["ddpm_256"]
  assert image_size == 256
  assert pretrained.diffusion_settings_from_diffusers(
      _json(CAT, "scheduler_config.json")).var_type == "fixed_small"


@pytest.mark.parametrize("naming", ["current", "legacy"])
def test_random_weights_in_the_cifar10_layout_load_with_every_tensor_used(
    tmp_path, naming):
  """The 328 tensors (35,746,307 numbers) diffusers builds from the real
  config.json, filled with random numbers."""
  folder = tmp_path / "ddpm-cifar10-32"
  os.makedirs(folder)
  for name in ("config.json", "scheduler_config.json"):
    shutil.copy(os.path.join(CIFAR, name), folder)
  rng = np.random.default_rng(0)
  tensors = {
      k: rng.standard_normal(shape, np.float32)
      for k, shape in _json(CIFAR, "tensor_shapes.json").items()
  }
  if naming == "legacy":
    tensors = _legacy_names(tensors)
  safetensors_numpy.save_file(tensors, os.path.join(folder, WEIGHTS))
  net = pretrained.load_diffusers(folder)
  assert count_params(net.params) == 35_746_307
  p = net.params
  np.testing.assert_array_equal(p["Conv_0"]["kernel"],
                                tensors["conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["TimeEmbedding_0"]["Dense_1"]["kernel"],
                                tensors["time_embedding.linear_2.weight"].T)
  # Down level 1 (16x16) holds the first attention: q, k, v fused in order.
  q, k, v = (("query", "key", "value") if naming == "legacy" else
             ("to_q", "to_k", "to_v"))
  prefix = "down_blocks.1.attentions.1."
  np.testing.assert_array_equal(
      p["Attention_1"]["Dense_0"]["kernel"],
      np.concatenate([tensors[prefix + n + ".weight"].T for n in (q, k, v)],
                     axis=1))
  # Resnet blocks: 4 levels x 2 down, 2 in the middle, 4 x 3 up. The first
  # up block's first one (ResnetBlock_10) maps 512 -> 256 channels through a
  # 1x1 shortcut.
  assert sum(name.startswith("ResnetBlock_") for name in p) == 8 + 2 + 12
  np.testing.assert_array_equal(
      p["ResnetBlock_10"]["Dense_1"]["kernel"],
      tensors["up_blocks.0.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)


# --- bad input --------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(norm_eps=1e-5), r"norm_eps=1e-05 is not supported"),
    (dict(downsample_padding=1), r"downsample_padding=1 is not supported"),
    (dict(flip_sin_to_cos=True), r"flip_sin_to_cos=True is not supported"),
    (dict(freq_shift=0), r"freq_shift=0 is not supported"),
    (dict(center_input_sample=True), r"center_input_sample=True"),
    (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier'"),
    (dict(resnet_time_scale_shift="scale_shift"),
     r"resnet_time_scale_shift='scale_shift'"),
    (dict(class_embed_type="timestep"), r"class_embed_type='timestep'"),
    (dict(act_fn="gelu"), r"act_fn='gelu' is not supported"),
    (dict(mid_block_scale_factor=2), r"mid_block_scale_factor=2"),
    (dict(attention_head_dim=64), r"attention_head_dim=64 is not supported"),
    (dict(attn_norm_num_groups=8), r"attn_norm_num_groups=8"),
    (dict(block_out_channels=[128, 192, 256, 256]),
     r"block_out_channels=\[128, 192, 256, 256\].*multiple of the first"),
    (dict(
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"
                       ]), r"up_block_types=.*same levels"),
    (dict(down_block_types=[
        "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"
    ]), r"down_block_types=.* block type 'CrossAttnDownBlock2D'"),
    (dict(down_block_types=["DownBlock2D"]),
     r"down_block_types=\['DownBlock2D'\] .* one block type per"),
    (dict(out_channels=4), r"out_channels=4 is not supported"),
    (dict(norm_num_groups=48), r"not a valid ddpm_jax network.*num_groups=48"),
    (dict(sample_size=[32, 64]), r"sample_size=\[32, 64\]"),
    (dict(cross_attention_dim=768), r"unknown field\(s\) cross_attention_dim"),
    (dict(_class_name="UNet2DConditionModel"),
     r"_class_name='UNet2DConditionModel': only UNet2DModel"),
])
def test_unsupported_unet_config_is_refused_naming_the_field(change, message):
  fields = {**_json(CIFAR), **change}
  with pytest.raises(PretrainedError, match="^my/config.json: " + message):
    pretrained.unet_config_from_diffusers(fields, source="my/config.json")


def test_missing_attention_head_dim_is_diffusers_default_8_and_refused():
  fields = _json(CIFAR)
  del fields["attention_head_dim"]
  with pytest.raises(PretrainedError, match=r"attention_head_dim=8 is not"):
    pretrained.unet_config_from_diffusers(fields)


@pytest.mark.parametrize("change, message", [
    (dict(beta_schedule="squaredcos_cap_v2"), r"beta_schedule="),
    (dict(variance_type="learned"), r"variance_type='learned' is not"),
    (dict(variance_type="fixed_large_log"), r"variance_type='fixed_large_log'"),
    (dict(trained_betas=[0.1, 0.2]), r"trained_betas="),
    (dict(thresholding=True), r"thresholding=True"),
    (dict(clip_sample_range=2.0), r"clip_sample_range=2.0"),
    (dict(prediction_type="score"), r"prediction_type='score'"),
    (dict(rescale_betas_zero_snr=True), r"rescale_betas_zero_snr=True"),
    (dict(num_train_timesteps=0), r"num_train_timesteps=0"),
    (dict(beta_end=2.0), r"beta_end=2.0"),
    (dict(_class_name="PNDMScheduler"),
     r"_class_name='PNDMScheduler': only DDPMScheduler and"),
    (dict(solver_order=2), r"unknown field\(s\) solver_order"),
])
def test_unsupported_scheduler_config_is_refused_naming_the_field(
    change, message):
  fields = {**_json(CIFAR, "scheduler_config.json"), **change}
  with pytest.raises(PretrainedError, match="^s.json: " + message):
    pretrained.diffusion_settings_from_diffusers(fields, source="s.json")


def test_scheduler_mappings():
  base = _json(CIFAR, "scheduler_config.json")
  convert = pretrained.diffusion_settings_from_diffusers
  assert convert({
      **base, "beta_schedule": "scaled_linear"
  }).schedule == ("quadratic")
  assert convert({
      **base, "variance_type": "fixed_small_log"
  }).var_type == ("fixed_small")
  assert convert({
      **base, "prediction_type": "v_prediction",
      "clip_sample": False
  })[-3:] == (False, "v", "x0")
  assert convert({
      "_class_name": "DDIMScheduler",
      "set_alpha_to_one": False,
      "steps_offset": 1
  }).var_type == "fixed_small"


def test_folder_without_config_json(tmp_path):
  with pytest.raises(PretrainedError, match=r"no config\.json"):
    pretrained.load_diffusers(tmp_path)
  with pytest.raises(PretrainedError, match=r"not a directory"):
    pretrained.load_diffusers(tmp_path / "absent")


def test_missing_or_unreadable_files(tmp_path):
  folder = _copy(TINY, tmp_path)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write('{"in_channels": 3,')
  with pytest.raises(PretrainedError,
                     match=r"config\.json: not a readable JSON"):
    pretrained.load_diffusers(folder)
  shutil.copy(os.path.join(TINY, "config.json"), folder)
  os.remove(os.path.join(folder, "scheduler_config.json"))
  with pytest.raises(PretrainedError, match=r"scheduler_config\.json: no such"):
    pretrained.load_diffusers(folder)
  shutil.copy(os.path.join(TINY, "scheduler_config.json"), folder)
  os.remove(os.path.join(folder, WEIGHTS))
  with pytest.raises(PretrainedError, match=r"no diffusion_pytorch_model"):
    pretrained.load_diffusers(folder)


def test_truncated_weights_file(tmp_path):
  folder = _copy(TINY, tmp_path)
  path = os.path.join(folder, WEIGHTS)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(PretrainedError,
                     match=r"safetensors: not a readable safetensors file"):
    pretrained.load_diffusers(folder)


def test_weights_of_another_network(tmp_path):
  folder = _copy(TINY, tmp_path)
  shutil.copy(os.path.join(TINY_CLASSES, WEIGHTS), folder)
  with pytest.raises(
      PretrainedError, match=r"2 tensor\(s\) do not fit the network of "
      r".*config\.json: conv_out\.bias has shape \(6,\), the "
      r"network needs \(3,\); conv_out\.weight"):
    pretrained.load_diffusers(folder)


@pytest.mark.parametrize("edit, message", [
    ("drop", r"1 tensor\(s\) of the network .* are missing: "
     r"mid_block\.resnets\.1\.conv2\.bias"),
    ("add", r"1 tensor\(s\) are not part of the network .*: extra\.weight"),
    ("reshape", r"mid_block\.resnets\.1\.conv2\.bias has shape \(8,\), the "
     r"network needs \(16,\)"),
])
def test_missing_extra_or_misshaped_tensor_is_named(tmp_path, edit, message):
  folder = _copy(TINY, tmp_path)
  tensors = _tensors(TINY)
  key = "mid_block.resnets.1.conv2.bias"
  if edit == "drop":
    del tensors[key]
  elif edit == "add":
    tensors["extra.weight"] = np.zeros((2,), np.float32)
  else:
    tensors[key] = tensors[key][:8]
  safetensors_numpy.save_file(tensors, os.path.join(folder, WEIGHTS))
  with pytest.raises(PretrainedError, match=message):
    pretrained.load_diffusers(folder)


def test_variance_type_must_fit_the_output_channels(tmp_path):
  folder = _copy(TINY, tmp_path)
  scheduler = {
      **_json(TINY, "scheduler_config.json"), "variance_type": "learned_range"
  }
  with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
    json.dump(scheduler, f)
  with pytest.raises(
      PretrainedError, match=r"variance_type gives "
      r"'learned_range' but .*out_channels=3"):
    pretrained.load_diffusers(folder)


def test_errors_are_one_line_value_errors(tmp_path):
  assert issubclass(PretrainedError, ValueError)
  folder = _copy(TINY, tmp_path)
  shutil.copy(os.path.join(TINY_CLASSES, WEIGHTS), folder)
  with pytest.raises(PretrainedError) as info:
    pretrained.load_diffusers(folder)
  assert "\n" not in str(info.value)


# --- the DDPM authors' TensorFlow checkpoints --------------------------------


def _tf_scope(key: str, levels: int) -> str:
  """The authors' TF variable scope (diffusion_tf.models.unet) of a diffusers
  tensor, by the scopes of their code."""
  layer = key.split(".")[:-1]
  top = {
      "conv_in": "conv_in",
      "conv_out": "conv_out",
      "conv_norm_out": "norm_out",
      "time_embedding.linear_1": "temb/dense0",
      "time_embedding.linear_2": "temb/dense1"
  }
  if ".".join(layer) in top:
    return "model/" + top[".".join(layer)]
  if layer[0] == "mid_block":
    block = {
        "resnets.0": "mid/block_1",
        "resnets.1": "mid/block_2",
        "attentions.0": "mid/attn_1"
    }[".".join(layer[1:3])]
    layer = layer[3:]
  else:
    index = int(layer[1])
    level = (f"down_{index}"
             if layer[0] == "down_blocks" else f"up_{levels - 1 - index}")
    block = level + "/" + {
        "resnets": f"block_{layer[3]}",
        "attentions": f"attn_{layer[3]}",
        "downsamplers": "downsample",
        "upsamplers": "upsample"
    }[layer[2]]
    layer = layer[4:]
  renames = {
      "group_norm": "norm",
      "time_emb_proj": "temb_proj",
      "conv_shortcut": "nin_shortcut",
      "to_q": "q",
      "to_k": "k",
      "to_v": "v",
      "to_out": "proj_out"
  }
  inner = [renames.get(p, p) for p in layer if p != "0"]
  return "/".join(["model", block] + inner)


def _tf_value(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """TF leaf name and layout: HWIO convolutions, [in, out] dense kernels."""
  norm = any(
      n in key for n in ("norm1.", "norm2.", "group_norm.", "conv_norm_out."))
  if key.endswith(".bias"):
    return ("beta" if norm else "b"), value
  if norm:
    return "gamma", value
  if value.ndim == 4 and value.shape[2:] == (1, 1):
    return "W", value[:, :, 0, 0].T
  return "W", value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _write_tf_checkpoint(prefix, variables):
  tf = pytest.importorskip("tensorflow")
  with tf.Graph().as_default():
    tf_vars = {
        name: tf.compat.v1.Variable(value, name=f"v{i}")
        for i, (name, value) in enumerate(sorted(variables.items()))
    }
    saver = tf.compat.v1.train.Saver(var_list=tf_vars)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      return saver.save(sess, os.fspath(prefix), global_step=790000)


def _seeded_weights(shapes):
  """tests/fixtures/make_diffusers_fixtures.py's `seeded_weights` (the golden
  outputs of diffusers_32groups come from these)."""
  rng = np.random.default_rng(0)
  return {
      k:
          rng.standard_normal(shape, np.float32) *
          np.float32(1 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.1)
      for k, shape in sorted(shapes.items())
  }


@pytest.fixture(scope="module", name="seeded")
def fixture_seeded():
  """The 32-group network of diffusers_32groups: config, weights, golden."""
  config, _ = pretrained.unet_config_from_diffusers(_json(SEEDED))
  tensors = _seeded_weights(_json(SEEDED, "tensor_shapes.json"))
  golden = np.load(os.path.join(SEEDED, "golden.npz"))
  apply = jax.jit(lambda params, x, t: UNet(config=config).apply(
      {"params": params}, x, t, train=False))
  return config, tensors, dict(golden), apply


def test_seeded_weights_match_diffusers(seeded):
  config, tensors, golden, apply = seeded
  params = pretrained.params_from_diffusers(tensors, config)
  np.testing.assert_allclose(apply(params, golden["x"], golden["t"]),
                             golden["out"], rtol=0, atol=1e-5)


def _authors_variables(config, tensors):
  """Weights as the authors' checkpoint holds them: raw weights (here the EMA
  values minus 1), their moving averages, Adam slots and counters."""
  variables = {"global_step": np.int64(790000), "beta1_power": np.float32(0.9)}
  for key, value in tensors.items():
    leaf, tf_value = _tf_value(key, value)
    name = _tf_scope(key, len(config.channel_mults)) + "/" + leaf
    variables[name] = tf_value - 1
    variables[name + pretrained.TF_EMA_SUFFIX] = tf_value
    variables[name + "/Adam"] = np.zeros_like(tf_value)
  return variables


def test_tf_checkpoint_in_the_authors_naming_matches_diffusers(
    tmp_path, seeded):
  config, tensors, golden, apply = seeded
  variables = _authors_variables(config, tensors)
  assert "model/down_1/attn_0/proj_out/W" in variables
  assert "model/up_0/block_1/nin_shortcut/W" in variables
  path = _write_tf_checkpoint(tmp_path / "model.ckpt", variables)
  tf_config, params = pretrained.load_tf_checkpoint(path)
  assert tf_config == config
  np.testing.assert_allclose(apply(params, golden["x"], golden["t"]),
                             golden["out"], rtol=0, atol=1e-5)
  _, raw = pretrained.load_tf_checkpoint(tmp_path, ema=False)
  chex.assert_trees_all_close(raw, jax.tree.map(lambda p: p - 1, params),
                              atol=1e-6)


def test_tf_checkpoint_errors(tmp_path, seeded):
  config, tensors, _, _ = seeded
  variables = _authors_variables(config, tensors)
  no_ema = {
      k: v
      for k, v in variables.items()
      if k != "model/conv_out/b" + pretrained.TF_EMA_SUFFIX
  }
  path = _write_tf_checkpoint(tmp_path / "a" / "model.ckpt", no_ema)
  with pytest.raises(
      PretrainedError, match=r"no moving average of "
      r"model/conv_out/b \(1 variables without one\)"):
    pretrained.load_tf_checkpoint(path)
  stray = {**variables, "model/extra/kernel": np.zeros(2, np.float32)}
  path = _write_tf_checkpoint(tmp_path / "b" / "model.ckpt", stray)
  with pytest.raises(
      PretrainedError, match=r"variable model/extra/kernel is "
      "not part of the DDPM authors' U-Net"):
    pretrained.load_tf_checkpoint(path)
  half = {
      k: v
      for k, v in variables.items()
      if not k.startswith("model/mid/attn_1/k/")
  }
  path = _write_tf_checkpoint(tmp_path / "c" / "model.ckpt", half)
  with pytest.raises(
      PretrainedError, match=r"2 tensor\(s\) of the network of "
      r"this checkpoint are missing: model/mid/attn_1/k/b; "
      r"model/mid/attn_1/k/W"):
    pretrained.load_tf_checkpoint(path)
  with pytest.raises(PretrainedError, match=r"not a readable TensorFlow "
                     "checkpoint"):
    pretrained.load_tf_checkpoint(tmp_path / "absent" / "model.ckpt")
