"""tfds: sources prepared for real: tfds' download manager fetches a file
from a local HTTP server (no network) into the configured data.tfds_data_dir,
so a dependency tfds needs but does not declare fails here."""

import numpy as np
import pytest

from ddpm_jax.engine import builders
from ddpm_jax.engine import config as config_lib
from tests import tfds_builder


def _config(data_dir):
  config = config_lib.base_config()
  config.data.update(
      dict(source="tfds:ddpm_jax_test_digits", image_size=tfds_builder.SIZE,
           channels=1, resize=False, tfds_data_dir=str(data_dir)))
  return config


def test_download_and_prepare_offline_into_data_dir(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  contents = tfds_builder.arrays()
  np.savez(served / "digits.npz", **contents)
  data_dir = tmp_path / "tfds"
  config = _config(data_dir)
  config_lib.validate_config(config, mode="eval")
  with tfds_builder.serving(served) as (url, requests):
    tfds_builder.DdpmJaxTestDigits.url = f"{url}/digits.npz"
    batches = builders.build_dataset(config, batch_size=tfds_builder.NUM_TEST,
                                     training=False)
    assert requests == ["/digits.npz"]  # Downloaded once, over HTTP.
  assert (data_dir / "ddpm_jax_test_digits" / "1.0.0").is_dir()
  assert batches.spec.num_examples == tfds_builder.NUM_TEST
  batch = next(batches)
  assert batch["mask"].all()
  # The same examples (tfds stores them in its own order).
  expected = (contents["x_test"].astype(np.float32) - 127.5) / 127.5

  def examples(images, labels):
    return sorted(
        (image.tobytes(), int(label)) for image, label in zip(images, labels))

  assert examples(batch["image"],
                  batch["label"]) == examples(expected, contents["y_test"])

  # Prepared: the next run reads data_dir and downloads nothing.
  with tfds_builder.serving(served) as (url, requests):
    tfds_builder.DdpmJaxTestDigits.url = f"{url}/digits.npz"
    train = builders.build_dataset(config, batch_size=4)
    assert requests == []
  assert train.spec.num_examples == tfds_builder.NUM_TRAIN


def test_tfds_data_dir_needs_a_tfds_source(tmp_path):
  config = _config(tmp_path)
  config.data.source = "digits"
  with pytest.raises(config_lib.ConfigError,
                     match="tfds_data_dir applies to tfds: sources only"):
    config_lib.validate_config(config, mode="train")
