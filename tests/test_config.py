"""The config schema: one place for every field, one check of a config."""

import ml_collections
import pytest

from ddpm_jax import config as config_lib


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


def test_unknown_fields_are_listed_together():
  config = config_lib.base_config()
  config.train.lr = 1e-3
  config.nosuch = ml_collections.ConfigDict({"x": 1})
  with pytest.raises(config_lib.ConfigError,
                     match=r"Unknown config field\(s\): nosuch, train.lr\."):
    config_lib.validate_config(config)


def test_learned_variances_are_rejected_for_training_only():
  config = config_lib.base_config()
  config.diffusion.var_type = "learned_range"
  config.model.learned_variance = True
  with pytest.raises(config_lib.ConfigError, match="cannot be trained yet"):
    config_lib.validate_config(config, mode="train")
  config_lib.validate_config(config, mode="sample")


@pytest.mark.parametrize("spec", ["configs/digits.py", "configs/digits.py:tiny",
                                  "configs/mnist.py", "configs/cifar10.py:tiny",
                                  "configs/fashion_mnist.py"])
def test_load_config_reads_the_repository_configs(spec):
  config = config_lib.load_config(spec)
  assert set(config.keys()) == set(config_lib.SCHEMA)
  if spec.endswith(":tiny"):
    assert config.train.num_steps == 4


def test_load_config_names_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="configs/none.py not found"):
    config_lib.load_config("configs/none.py")
