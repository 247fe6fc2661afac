"""The config schema: one place for every field, one check of a config."""

import ml_collections
import pytest

from ddpm_jax.engine import config as config_lib


def _fields(schema, prefix=""):
  for name, spec in schema.items():
    if isinstance(spec, dict):
      yield from _fields(spec, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}", spec


def test_every_field_is_documented_and_its_default_fits():
  fields = dict(_fields(config_lib.SCHEMA))
  assert len(fields) >= 40
  for path, field in fields.items():
    assert field.doc.strip(), path
    field.check(path, field.default)  # Raises if the default does not fit.
    if field.choices is not None:
      assert field.default in field.choices, path


def test_base_config_is_the_schema_defaults_and_valid():
  config = config_lib.base_config()
  for path, field in _fields(config_lib.SCHEMA):
    node = config
    for part in path.split("."):
      node = node[part]
    assert node == field.default and type(node) is type(field.default), path
  config_lib.validate_config(config, mode="train", num_devices=1,
                             process_count=1)


@pytest.mark.parametrize("override, message", [
    (("train", "max_time", -1.0), r"config.train.max_time must be a number "
     r"in \[0.0, inf\)"),
    (("train", "log_every", 0), "config.train.log_every must be an integer "
     ">= 1, got 0"),
    (("train", "log_every", 2.0), "config.train.log_every must be an integer"),
    (("data", "resize", "yes"), "config.data.resize must be True or False"),
    (("diffusion", "loss_weighting", "snr"), "config.diffusion.loss_weighting"
     " must be one of uniform, min_snr; got 'snr'"),
    (("diffusion", "min_snr_gamma", 0.0), "config.diffusion.min_snr_gamma "
     r"must be a number in \(0.0, inf\)"),
    (("seed", None, 2**32), r"config.seed must be an integer in \[0, "),
    (("sample", "eta", 1.5), r"config.sample.eta must be a number in "
     r"\[0.0, 1.0\], got 1.5"),
    (("diffusion", "clip_x0", "yes"), "config.diffusion.clip_x0 must be True "
     "or False or None, got 'yes'"),
    (("eval", "ode_tolerance", 0.0), "config.eval.ode_tolerance must be a "
     r"number in \(0.0, 1.0\], got 0.0"),
])
def test_bad_values_name_the_field(override, message):
  config = config_lib.base_config().to_dict()  # Plain dicts: no type checks.
  group, name, value = override
  if name is None:
    config[group] = value
  else:
    config[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(config)


def test_an_optional_field_is_typed_until_set():
  config = config_lib.base_config()
  assert config.diffusion.clip_x0 is None  # each sampler's reference
  config.diffusion.clip_x0 = True
  assert config.diffusion.clip_x0 is True
  with pytest.raises(TypeError):
    config.diffusion.clip_x0 = "yes"


def test_unknown_fields_are_listed_together():
  config = config_lib.base_config()
  config.train.lr = 1e-3
  config.nosuch = ml_collections.ConfigDict({"x": 1})
  with pytest.raises(config_lib.ConfigError,
                     match=r"Unknown config field\(s\): nosuch, train.lr\."):
    config_lib.validate_config(config)


def test_learned_variances_train():
  config = config_lib.base_config()
  config.diffusion.var_type = "learned_range"
  with pytest.raises(config_lib.ConfigError,
                     match="needs config.model.learned_variance = True"):
    config_lib.validate_config(config, mode="train")
  config.model.learned_variance = True
  for mode in config_lib.MODES:
    config_lib.validate_config(config, mode=mode)


def _sampling_config(**fields):
  """base_config() (T = 1000) with `group__name=value` overrides."""
  config = config_lib.base_config()
  for key, value in fields.items():
    group, name = key.split("__")
    config[group][name] = value
  return config


@pytest.mark.parametrize("fields, message", [
    (dict(sample__sampler="dpm_solver"), "config.sample.sampler must be one "
     "of ddpm, ddim, euler, heun, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, edm; got "
     "'dpm_solver'."),
    (dict(sample__sampler="heun", sample__num_steps=1001),
     r"config.sample.num_steps \(1001\) must be in \[1, 1000\] "
     r"\(config.diffusion.num_timesteps\) for sampler 'heun'."),
    (dict(sample__sampler="ddim", sample__num_steps=1001),
     r"config.sample.num_steps \(1001\) must be in \[1, 1000\]"),
    (dict(sample__ddpm_steps=1001),
     r"config.sample.ddpm_steps \(1001\) must be in \[0, 1000\]"),
    (dict(sample__num_steps=0), "config.sample.num_steps must be an integer "
     ">= 1, got 0."),
    (dict(sample__solver_spacing="quadratic"), "config.sample.solver_spacing "
     "must be one of uniform, logsnr, karras"),
    (dict(sample__guidance_scale=-1.5), r"config.sample.guidance_scale must "
     r"be a number in \[-1.0, inf\)"),
    (dict(sample__guidance_scale=2.0), r"config.sample.guidance_scale "
     r"\(2.0\) needs a class-conditional model"),
    (dict(sample__class_id=3), r"config.sample.class_id \(3\) needs a "
     "class-conditional model"),
    (dict(data__num_classes=10, sample__class_id=10), r"config.sample."
     r"class_id \(10\) must be -1 or a class in \[0, 10\)"),
    (dict(data__num_classes=10, sample__class_id=-2), "config.sample."
     "class_id must be an integer >= -1, got -2."),
    (dict(data__num_classes=10, train__p_uncond=0.0,
          sample__guidance_scale=1.0), r"config.sample.guidance_scale "
     r"\(1.0\) needs the null class, which config.train.p_uncond = 0"),
    (dict(train__p_uncond=1.5), r"config.train.p_uncond must be a number in "
     r"\[0.0, 1.0\]"),
    (dict(data__num_classes=-1), "config.data.num_classes must be an integer "
     ">= 0"),
    (dict(data__num_classes=10, model__num_classes=11), "config.model."
     "num_classes is derived from config.data.num_classes"),
])
def test_bad_sampling_and_class_settings(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(_sampling_config(**fields), mode="sample")


@pytest.mark.parametrize(
    "fields",
    [
        # Steps of the sampler not in use are not checked against T.
        dict(sample__sampler="ddpm", sample__num_steps=5000),
        dict(sample__sampler="dpmpp_2m", sample__ddpm_steps=5000),
        dict(sample__sampler="ddpm", sample__ddpm_steps=1000),
        dict(data__num_classes=10, sample__class_id=9,
             sample__guidance_scale=-1.0),
        dict(data__num_classes=1, train__p_uncond=0.0),
    ])
def test_good_sampling_and_class_settings(fields):
  config_lib.validate_config(_sampling_config(**fields), mode="sample")


def test_conditional_network_embeds_the_null_class():
  config = config_lib.base_config()
  assert config_lib.model_config(config).num_classes is None
  config.data.num_classes = 10
  assert config_lib.model_config(config).num_classes == 11


def test_variants_combine_in_any_order():

  def get(variant):
    config = config_lib.base_config()
    return config_lib.apply_variant(config, variant, num_classes=10,
                                    tiny_model=dict(base_channels=8))

  plain, tiny, cond = get(""), get("tiny"), get("cond")
  assert (plain.data.num_classes, tiny.data.num_classes) == (0, 0)
  assert (cond.data.num_classes, cond.sample.guidance_scale) == (10, 1.0)
  assert cond.diffusion.num_timesteps == plain.diffusion.num_timesteps
  both = get("cond,tiny")
  assert both.to_dict() == get("tiny,cond").to_dict()
  assert both.data.num_classes == 10
  assert both.diffusion.num_timesteps == 20 and both.model.base_channels == 8
  with pytest.raises(ValueError, match="Unknown config variant 'small'"):
    get("small")
  with pytest.raises(ValueError, match="no class-conditional variant"):
    config_lib.apply_variant(config_lib.base_config(), "cond", tiny_model={})


@pytest.mark.parametrize("spec", [
    "configs/digits.py", "configs/digits.py:tiny", "configs/mnist.py",
    "configs/cifar10.py:tiny", "configs/fashion_mnist.py",
    "configs/digits.py:cond,tiny", "configs/mnist.py:cond",
    "configs/fashion_mnist.py:cond", "configs/cifar10.py:cond",
    "configs/improved_cifar10.py", "configs/improved_cifar10.py:tiny",
    "configs/mnist_cpu.py", "configs/mnist_cpu.py:tiny"
])
def test_load_config_reads_the_repository_configs(spec):
  config = config_lib.load_config(spec)
  assert set(config.keys()) == set(config_lib.SCHEMA)
  if spec.endswith("tiny"):
    assert config.train.num_steps == 4
  assert config.data.num_classes == (10 if ":cond" in spec else 0)
  config.data.source = "digits"  # The recipe's own data may be absent.
  config_lib.validate_config(config, mode="train", num_devices=1)


def test_improved_ddpm_config_learns_variances_and_respaces():
  config = config_lib.load_config("configs/improved_cifar10.py")
  assert config.diffusion.var_type == "learned_range"
  assert config_lib.model_config(config).learned_variance
  assert config.diffusion.schedule == "cosine"
  assert (config.sample.sampler, config.sample.ddpm_steps) == ("ddpm", 100)
  tiny = config_lib.load_config("configs/improved_cifar10.py:tiny")
  assert (tiny.diffusion.num_timesteps, tiny.sample.ddpm_steps) == (20, 5)


def test_load_config_finds_the_repository_configs_from_elsewhere(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # No configs/ here: the clone's are found.
  assert config_lib.load_config("configs/digits.py:tiny").train.num_steps == 4


def test_load_config_names_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="configs/none.py not found"):
    config_lib.load_config("configs/none.py")
