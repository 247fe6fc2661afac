"""Parameter sharding (FSDP) over the mesh ('data', 'fsdp'): the partition
rule, the config, and on 8 fake CPU devices (a subprocess running
tests/fsdp_helpers.py) the same training as data parallel, 1/n of the state
per device, and checkpoints restored bit-equal on other meshes."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddpm_jax.engine import config as config_lib
from ddpm_jax.engine import train
from ddpm_jax.infra import parallel
from tests import fsdp_helpers, host_helpers, train_helpers

HELPER = str(train_helpers.REPO / "tests" / "fsdp_helpers.py")


@pytest.mark.parametrize(
    "shape,size,spec",
    [
        ((384, 1152), 8, P(None, "fsdp")),
        ((1152, 384), 8, P("fsdp", None)),
        ((64, 64), 8, P("fsdp", None)),  # the first of equals
        ((4, 12), 8, P()),  # nothing 8 divides
        ((12, 6), 4, P("fsdp", None)),
        ((6,), 8, P()),
        ((), 8, P()),
    ])
def test_fsdp_spec_splits_the_largest_dimension_that_divides(shape, size, spec):
  assert parallel.fsdp_spec(shape, size) == spec


def test_mesh_without_fsdp_is_the_data_mesh():
  mesh = parallel.create_mesh(fsdp=1)
  assert mesh.axis_names == ("data",)
  assert parallel.data_sharded(mesh).spec == P("data")
  abstract = parallel.fsdp_abstract(lambda: {"w": np.zeros((8, 8))}, mesh=mesh)
  assert abstract["w"].sharding.spec == P()
  with pytest.raises(ValueError, match="fsdp must be a positive divisor"):
    parallel.create_mesh(fsdp=len(jax.devices()) + 1)


def test_config_checks_fsdp_against_the_devices():
  config = config_lib.load_config("configs/digits.py:tiny")
  assert config.train.fsdp == 1  # off by default
  config.train.fsdp = 3
  with pytest.raises(
      config_lib.ConfigError,
      match=r"train.fsdp \(3\) must divide the number of "
      r"devices \(8\)"):
    config_lib.validate_config(config, mode="train", num_devices=8)
  config.train.fsdp = 4
  config_lib.validate_config(config, mode="train", num_devices=8)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("fsdp")
  out = workdir / "out.npz"
  proc = subprocess.run(
      [sys.executable, HELPER, "devices8",
       str(workdir), str(out)],
      env=train_helpers.subprocess_env(devices=8, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as f:
    return dict(f)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp8", "fsdp4"])
def test_sharded_training_equals_data_parallel(eight_devices, mesh):
  """5 steps of a tiny DiT: the same losses (rtol 1e-6) and parameters, EMA
  and Adam moments (atol 1e-6) as data parallel; only the reduction order
  of the gradients differs."""
  r = eight_devices
  assert r[f"{mesh}/losses"].shape == (fsdp_helpers.NUM_STEPS,)
  np.testing.assert_allclose(r[f"{mesh}/losses"], r["dp/losses"], rtol=1e-6)
  names = [k[len("dp/state"):] for k in r if k.startswith("dp/state")]
  assert any("mu" in k for k in names) and any("ema" in k for k in names)
  for k in names:
    np.testing.assert_allclose(r[f"{mesh}/state{k}"], r[f"dp/state{k}"], rtol=0,
                               atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_each_device_holds_an_eighth_of_the_state(eight_devices):
  r = eight_devices
  names = [k[len("shape"):] for k in r if k.startswith("shape")]
  total = local = 0
  for k in names:
    shape, shard = tuple(r["shape" + k]), tuple(r["shard" + k])
    spec = parallel.fsdp_spec(shape, 8)
    expected = tuple(d // 8 if s == "fsdp" else d
                     for d, s in zip(shape,
                                     tuple(spec) + (None,) * len(shape)))
    assert shard == expected, (k, shape, shard)
    total += int(np.prod(shape))
    local += int(np.prod(shard))
  # Replicated: the step counters and the final layer's 4-vector bias (and
  # its EMA and moments), 20 numbers of 170,772.
  assert total == 170_772 and local == (total - 20) // 8 + 20


@pytest.mark.slow
@pytest.mark.parametrize("restored,source", [("one", "fsdp8"),
                                             ("four_by_two", "fsdp8"),
                                             ("dp_to_fsdp8", "dp")])
def test_checkpoints_restore_bit_equal_on_other_meshes(eight_devices, restored,
                                                       source):
  """Saved sharded on (1, 8), restored on 1 device and on (4, 2); saved
  data parallel, restored sharded on (1, 8)."""
  r = eight_devices
  names = [
      k[len(f"restored_{restored}"):]
      for k in r
      if k.startswith(f"restored_{restored}")
  ]
  assert names
  for k in names:
    np.testing.assert_array_equal(r[f"restored_{restored}{k}"],
                                  r[f"{source}/state['params']{k}"], err_msg=k)


@pytest.mark.slow
def test_command_line_trains_resumes_and_samples_sharded(tmp_path):
  """`--config.train.fsdp=4` on 8 devices: the CLI logs the losses of a
  1-device run, resumes from its sharded checkpoint and samples from it."""

  def run(workdir, *extra, devices):
    out = subprocess.run([
        sys.executable, "-m", "ddpm_jax.main",
        "--config=configs/mnist_cpu_dit.py:cond,tiny",
        "--config.data.source=digits", "--config.data.image_size=8",
        f"--workdir={workdir}", *extra
    ], cwd=train_helpers.REPO, env=train_helpers.subprocess_env(
        devices=devices, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr

  def losses(log):
    return re.findall(r"step (\d+/\d+): loss ([0-9.]+)", log)

  sharded = run(tmp_path / "fsdp", "--config.train.fsdp=4", devices=8)
  assert "over 8 devices" in sharded
  single = run(tmp_path / "one", devices=None)
  assert len(losses(sharded)) == 2
  assert losses(sharded) == losses(single)
  resumed = run(tmp_path / "fsdp", "--config.train.fsdp=4",
                "--config.train.num_steps=6", devices=8)
  assert "Resumed from checkpoint step 4" in resumed
  assert [s for s, _ in losses(resumed)] == ["6/6"]
  run(tmp_path / "fsdp", "--mode=sample", "--config.sample.num_images=8",
      devices=8)
  with np.load(tmp_path / "fsdp" / "samples" / "sample_step_00000006.npz") as f:
    assert f["images"].shape == (8, 8, 8, 1)


@pytest.mark.slow
def test_two_processes_sharded_agree_with_one(tmp_path):
  """2 processes (gloo), the state sharded over both: the parameters of a
  1-device data-parallel run after 6 steps (atol 1e-6), each process
  holding its half of each sharded array."""
  images = train_helpers.load_digits()
  reference = train.train_and_evaluate(
      fsdp_helpers.distributed_config(1), str(tmp_path / "one"),
      dataset_factory=train_helpers.dataset_factory(images))
  port = host_helpers.free_port()
  results = host_helpers.run_processes([[
      sys.executable, HELPER, "distributed",
      str(i),
      str(port),
      str(tmp_path / "two"),
      str(tmp_path / f"out{i}.npz")
  ] for i in range(2)], [train_helpers.subprocess_env(JAX_PLATFORMS="cpu")] * 2)
  for result in results:
    assert result.returncode == 0, result.stderr[-4000:]
  expected = train_helpers.flat(reference.params)
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz") as f:
      assert int(f["step"]) == 6
      for k, v in expected.items():
        np.testing.assert_allclose(f["params" + k], v, rtol=0, atol=1e-6,
                                   err_msg=k)
        spec = parallel.fsdp_spec(v.shape, 2)
        assert tuple(f["shard" + k]) == tuple(
            d // 2 if s == "fsdp" else d
            for d, s in zip(v.shape,
                            tuple(spec) + (None,) * v.ndim)), k
  assert sorted(p.name
                for p in (tmp_path / "two" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["4", "6"]
