"""The command line end to end: train, resume, sample, eval and bad input."""

import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.infra import cpu_flags, hugepages
from ddpm_jax.metrics import inception
from tests import inception_helpers, train_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/digits.py:tiny"
pytestmark = pytest.mark.slow  # every test starts the command line


def _run(args, *, devices=None, **env_extra):
  # With the session's JAX compilation cache (conftest.py): later runs reuse
  # the first run's compilations.
  env = train_helpers.subprocess_env(devices=devices, **env_extra)
  return subprocess.run([sys.executable, "-m", "ddpm_jax.main", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir after `--mode=train` of 4 steps, then a resumed run to 6."""
  workdir = tmp_path_factory.mktemp("cli")
  # As a user starts it: the run restarts itself with huge-page malloc.
  first = _run([f"--config={TINY}", f"--workdir={workdir}"], GLIBC_TUNABLES="")
  assert first.returncode == 0, first.stderr[-3000:]
  after_first = sorted(os.listdir(workdir / "checkpoints"))
  second = _run([
      f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=6"
  ])
  assert second.returncode == 0, second.stderr[-3000:]
  return dict(workdir=workdir, first=first, second=second,
              after_first=after_first)


def test_train_writes_checkpoints_samples_and_logs(trained):
  workdir = trained["workdir"]
  assert trained["after_first"] == ["2", "4"]
  assert "step 4/4: loss" in trained["first"].stderr
  # CPU training restarts itself with huge-page malloc, and says so.
  assert ("malloc uses huge pages" in trained["first"].stderr) == (
      hugepages.huge_page_malloc_supported())
  # On the CPU it turns YNNPACK's convolutions off (ddpm_jax.infra.cpu_flags), and says so.
  assert ("XLA's own convolutions instead of YNNPACK's"
          in trained["first"].stderr) == (cpu_flags.applies())
  grid = Image.open(workdir / "samples" / "step_00000004.png")
  # 8 images in a 3x3 grid of 16x16 images scaled 4x, 2 px of padding.
  assert grid.size == (3 * (4 * 16 + 2) + 2,) * 2
  gif = Image.open(workdir / "samples" / "step_00000004.gif")
  assert gif.n_frames > 1
  assert any(
      name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_second_train_call_resumes(trained):
  log = trained["second"].stderr
  assert "Resumed from checkpoint step 4" in log
  assert "Training 6 steps from step 4" in log
  assert "step 6/6: loss" in log and "step 2/" not in log
  # keep_checkpoints = 3
  assert sorted(os.listdir(trained["workdir"] /
                           "checkpoints")) == ["2", "4", "6"]


def test_sample_mode(trained):
  out = _run([
      f"--config={TINY}", f"--workdir={trained['workdir']}", "--mode=sample",
      "--config.sample.num_images=12"
  ], GLIBC_TUNABLES="")  # As a user starts it.
  assert out.returncode == 0, out.stderr[-3000:]
  assert "images/s" in out.stderr
  assert "malloc uses huge pages" not in out.stderr  # Only CPU training.
  assert ("XLA's own convolutions instead of YNNPACK's"
          in out.stderr) == cpu_flags.applies()
  samples = trained["workdir"] / "samples"
  with np.load(samples / "sample_step_00000006.npz") as f:
    images = f["images"]
  assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
  # 12 images in rows of ceil(sqrt(12)) = 4, scaled 4x, 2 px of padding.
  assert Image.open(samples / "sample_step_00000006.png").size == (4 * 66 + 2,
                                                                   3 * 66 + 2)
  assert Image.open(samples / "sample_step_00000006.gif").n_frames > 1


def test_eval_mode(trained):
  out = _run(
      [f"--config={TINY}", f"--workdir={trained['workdir']}", "--mode=eval"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "bits/dim" in out.stderr and "FID, Inception Score and KID skipped" \
      in out.stderr
  result = json.loads(
      (trained["workdir"] / "eval" / "step_00000006.json").read_text())
  assert result["num_images"] == 8 and result["step"] == 6
  parts = result["prior_bpd"] + result["decoder_bpd"] + result["kl_bpd"]
  assert np.isfinite(result["total_bpd"]) and result["total_bpd"] > 0
  np.testing.assert_allclose(result["total_bpd"], parts, rtol=1e-5)


def test_eval_mode_with_inception_weights(trained, tmp_path):
  """FID, IS and KID through the CLI, with synthetic Inception weights of the
  right names and shapes (the real ones cannot be downloaded here)."""
  weights = tmp_path / "fid_inception.npz"
  np.savez(
      weights,
      **inception_helpers.random_state_dict(
          inception_helpers.torch_layout(inception_helpers.flax_shapes())))
  out = _run([
      f"--config={TINY}", f"--workdir={trained['workdir']}", "--mode=eval",
      f"--config.eval.inception_weights={weights}",
      "--config.eval.num_samples=8", "--config.eval.num_reference=16"
  ])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(
      (trained["workdir"] / "eval" / "step_00000006.json").read_text())
  assert result["num_samples"] == 8
  assert np.isfinite(result["fid"]) and result["fid"] >= 0
  assert result["inception_score"] >= 1.0 - 1e-6
  assert np.isfinite(result["kid"])
  assert os.listdir(trained["workdir"] / "fid_stats") == [
      "fid_inception_tensorflow_digits_train_16.npz"
  ]


@pytest.mark.slow
def test_guided_sampling_of_a_class_conditional_run(tmp_path_factory):
  """digits:cond,tiny trains with labels (label dropout), samples guided with
  DPM-Solver++, one grid row per class, and writes the labels."""
  workdir = tmp_path_factory.mktemp("cond")
  config = "--config=configs/digits.py:cond,tiny"
  out = _run([config, f"--workdir={workdir}"])
  assert out.returncode == 0, out.stderr[-3000:]
  # 10 classes, 8 grid images: one image per class, one class per row
  # (16x16 images scaled 4x, 2 px of padding).
  assert Image.open(workdir / "samples" /
                    "step_00000004.png").size == (66 + 2, 10 * 66 + 2)
  out = _run([
      config, f"--workdir={workdir}", "--mode=sample",
      "--config.sample.num_images=25", "--config.sample.sampler=dpmpp_2m",
      "--config.sample.guidance_scale=2"
  ])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "with dpmpp_2m (5 network calls each, guidance scale 2)" in (
      out.stderr)
  samples = workdir / "samples"
  with np.load(samples / "sample_step_00000004.npz") as f:
    assert f["images"].shape == (25, 16, 16, 1)
    np.testing.assert_array_equal(f["labels"], np.arange(25) % 10)
  # Two images of each class per row, one row per class.
  assert Image.open(samples / "sample_step_00000004.png").size == (2 * 66 + 2,
                                                                   10 * 66 + 2)
  out = _run([
      config, f"--workdir={workdir}", "--mode=sample",
      "--config.sample.num_images=4", "--config.sample.class_id=7",
      "--config.sample.gif=False"
  ])
  assert out.returncode == 0, out.stderr[-3000:]
  with np.load(samples / "sample_step_00000004.npz") as f:
    np.testing.assert_array_equal(f["labels"], [7, 7, 7, 7])


@pytest.mark.parametrize("args, message", [
    (["--config.train.lr=1"], r"Unknown config field\(s\): train.lr"),
    (["--config.nosuchgroup.x=1"], "bad command line"),
    (["--config.train.num_steps=abc"], "bad command line"),
    (["--config.optimizer.lr=-0.1"], r"config.optimizer.lr must be a number"),
    (["--config.data.image_size=17"], r"image_size \(17\) must be divisible"),
    (["--config.data.source=npz:/no/such/file.npz"], "does not exist"),
    (["--config.model.base_channels=0"], "config.model: UNetConfig"),
    (["--config.sample.sampler=ddim", "--config.sample.num_steps=50"
     ], r"num_steps \(50\) must be in \[1, 20\]"),
    (["--config.sample.sampler=dpm_solver"
     ], "config.sample.sampler must be one of ddpm, ddim, euler, heun, "
     "dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, edm; got 'dpm_solver'"),
    (["--config.sample.sampler=ddpm", "--config.sample.ddpm_steps=21"
     ], r"ddpm_steps \(21\) must be in \[0, 20\]"),
    (["--config.sample.guidance_scale=2"
     ], r"guidance_scale \(2.0\) needs a class-conditional model"),
    (["--config.data.num_classes=10", "--config.sample.class_id=10"
     ], r"class_id \(10\) must be -1 or a class in \[0, 10\)"),
    (["--config.train.ema_decay=1.0"], r"ema_decay must be a number in"),
    (["--mode=sample"], "train first"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
  out = _run([f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *args])
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  error_lines = [
      line for line in out.stderr.splitlines() if line.startswith("ddpm_jax:")
  ]
  assert len(error_lines) == 1, out.stderr[-3000:]
  assert re.search(message, error_lines[0]), error_lines[0]


def test_batch_not_divisible_by_devices(tmp_path):
  out = _run([
      f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.batch_size=9"
  ], devices=2)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert ("config.train.batch_size (9) must be divisible by the number of "
          "devices (2)") in out.stderr


_REEXEC_PROBE = ("import os; from ddpm_jax import hugepages; "
                 "print('before', os.environ.get('GLIBC_TUNABLES')); "
                 "hugepages.reexec_with_huge_page_malloc(); "
                 "print('after', os.environ.get('GLIBC_TUNABLES'))")


@pytest.mark.parametrize(
    "tunables, expected",
    [
        (None, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=4",
         "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", None),  # the user's opt-out is kept
    ])
def test_reexec_with_huge_page_malloc(tunables, expected):
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  proc = subprocess.run([sys.executable, "-c", _REEXEC_PROBE], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120,
                        check=True)
  if expected is None or not hugepages.huge_page_malloc_supported():
    # No restart: the program ran once, its environment untouched.
    assert proc.stdout.splitlines() == [
        f"before {tunables}", f"after {tunables}"
    ]
  else:
    # The first run restarted itself (same arguments) once, with the tunable added.
    assert proc.stdout.splitlines() == [
        f"before {tunables}", f"before {expected}", f"after {expected}"
    ]


@pytest.mark.parametrize("platforms, expected", [("cpu", False), ("cuda", True),
                                                 ("cpu,tpu", True)])
def test_accelerator_installed_reads_jax_platforms(monkeypatch, platforms,
                                                   expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert hugepages.accelerator_installed() == expected


# ---------------------------------------------------------------------------
# Issue 30: each of these used to end in a traceback; now one line.


def _one_error_line(out) -> str:
  assert out.returncode == 1, out.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "Unable to initialize "
                "backend"):
    assert noise not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def test_training_records_its_config(trained):
  recorded = json.loads((trained["workdir"] / "config.json").read_text())
  # The first run's: the second (num_steps=6) resumed and kept it.
  assert recorded["train"]["num_steps"] == 4
  assert recorded["model"]["base_channels"] == 8


@pytest.mark.parametrize("config, overrides, network, fields", [
    (TINY, ["--config.model.base_channels=16"
           ], r"\d+ differ in shape, e\.g\. \['Conv_0'\]\['bias'\] \[\d+\] "
     r"in the checkpoint, \[\d+\] here",
     "model.base_channels: 8 in the run, 16 now"),
    ("configs/digits.py:cond,tiny", [],
     r"1 parameter array\(s\) of this config's network are not in it, e\.g\. "
     r"\['Embed_0'\]\['embedding'\] \[11, \d+\]",
     "data.num_classes: 0 in the run, 10 now"),
])
def test_sample_from_a_checkpoint_of_another_network(trained, config, overrides,
                                                     network, fields):
  out = _run([
      f"--config={config}", f"--workdir={trained['workdir']}", "--mode=sample",
      *overrides
  ])
  line = _one_error_line(out)
  assert re.search(
      r"^ddpm_jax: error: The checkpoints in .*/checkpoints \(step\(s\) 6, 4, "
      r"2\)"
      rf" hold another network than this config builds: another network: "
      rf"{network} \(step 6\)\.", line), line
  assert line.endswith("The workdir's run was trained with another config: "
                       f"{fields}."), line


def test_train_on_only_truncated_checkpoints(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained["workdir"], workdir)
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 3
  for step in steps:
    data = max((p for p in (step / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
  out = _run([f"--config={TINY}", f"--workdir={workdir}"])
  line = _one_error_line(out)
  assert line.startswith("ddpm_jax: error: No usable checkpoint in"), line


@pytest.mark.parametrize("contents", ["garbage", "wrong-keys"])
def test_eval_with_unusable_inception_weights(trained, tmp_path, contents):
  weights = tmp_path / "fid_inception.npz"
  if contents == "garbage":
    weights.write_bytes(b"not an npz file")
  else:
    np.savez(weights, x_train=np.zeros((2, 4)))
  out = _run([
      f"--config={TINY}", f"--workdir={trained['workdir']}", "--mode=eval",
      f"--config.eval.inception_weights={weights}",
      "--config.eval.num_samples=8", "--config.eval.num_reference=16"
  ])
  line = _one_error_line(out)
  # The line of the fid tool (one code path: load_fid_inception_params).
  with pytest.raises(inception.WeightsError) as err:
    inception.load_fid_inception_params(weights)
  assert line == f"ddpm_jax: error: {err.value}"


def test_quiet_libraries_keeps_one_line_of_a_library_error():
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top
  record = std_logging.LogRecord(
      "absl", std_logging.WARNING, "/site-packages/orbax/checkpoint/x.py", 1,
      "read failed: %s",
      ("boom\nTraceback (most recent call last):\n  File 'x.py'\nError",), None)
  assert main.quiet_libraries(record)
  assert record.getMessage() == "read failed: boom"
  chatter = std_logging.LogRecord("absl", std_logging.INFO,
                                  "/site-packages/jax/_src/x.py", 1, "hi", (),
                                  None)
  assert not main.quiet_libraries(chatter)


def _raised_from(filename: str):
  try:
    exec(
        compile("raise ValueError('NOT_FOUND: rename failed')", filename,
                "exec"))
  except ValueError:
    return sys.exc_info()


@pytest.mark.parametrize("filename,kept", [
    ("/site-packages/orbax/checkpoint/serialization.py", False),
    ("/home/me/my_code.py", True),
])
def test_quiet_libraries_drops_asyncio_echoes_of_library_failures(
    filename, kept):
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top
  record = std_logging.LogRecord("asyncio", std_logging.ERROR,
                                 "/lib/python3/asyncio/base_events.py", 1,
                                 "Task exception was never retrieved", (),
                                 _raised_from(filename))
  assert main.quiet_libraries(record) is kept
