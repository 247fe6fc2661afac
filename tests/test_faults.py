"""Issue 9: training that survives kills, broken checkpoints and bad input.

* Real training subprocesses (tests/fault_helpers.py) are killed with SIGKILL
  during start-up, mid-step and at three points inside an asynchronous
  checkpoint write, and sent SIGTERM, each at a moment the child announces
  and waits at (no timing); each restart resumes from the newest complete
  checkpoint the previous run left and the final parameters equal an
  uninterrupted run's bit for bit.
* Checkpoints damaged on disk (no commit marker, a missing item, a truncated
  or altered array file, an empty JSON item, a tmp directory) are skipped
  with a warning naming the path, in training and in `inference.load_trained`;
  with none usable the error names each one.
* A read-only or full workdir, and config values out of range through the
  command line, give one line before anything compiles.

The larger seeded campaign is `python tests/fault_injection.py`.
"""

import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_helpers as fh  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from ddpm_jax import main  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.data import pipeline
from ddpm_jax.engine import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.engine import inference, train
from ddpm_jax.engine import workdir as workdir_lib
from ddpm_jax.infra import parallel

NUM_STEPS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted child run of NUM_STEPS (it fills the session's
  compilation cache, conftest.py, for the other children)."""
  base = tmp_path_factory.mktemp("faults")
  fh.run_to_end(base / "reference", NUM_STEPS, "reference")
  return dict(base=base, arrays=fh.read_checkpoint(base / "reference",
                                                   NUM_STEPS))


# ---------------------------------------------------------------------------
# Kills and SIGTERM on real subprocesses, each at a moment the child
# announces and waits at (tests/fault_helpers.py).

# (hold, SIGTERM instead of SIGKILL, newest complete step after the run,
# tmp directory left); checkpoints every 2 steps, the 2 newest kept.
RUNS = [
    ("start-up:begin", False, None, None),
    ("mid-save:4:commit", False, 2, "4"),  # 4 written, never renamed
    ("mid-step:5", True, 5, None),  # SIGTERM: step 5 runs and is saved
    ("mid-save:6:items", False, 5, "6"),
    ("mid-step:8", False, 6, None),  # steps 6-7 ran; step 6 saved
    ("mid-save:8:begin", False, 6, "8"),
    ("start-up:restored", False, 6, None),
]


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_bit_for_bit(reference):
  workdir = reference["base"] / "interrupted"
  newest, left = None, []  # on disk before each run
  for i, (hold, sigterm, newest_after, tmp_step) in enumerate(RUNS):
    r = fh.interrupt(workdir, NUM_STEPS, f"run{i}", hold, sigterm=sigterm)
    where = f"run{i} ({hold}):\n{r.log[-3000:]}"
    assert r.at is not None and r.at["hold"] == hold, where
    assert "Traceback" not in r.log, where
    # Every interrupted write a previous run left is reported and removed
    # once a run opens the checkpoints; the resume is from the newest
    # complete checkpoint there was, so nothing is lost beyond it.
    if hold != "start-up:begin":
      for name in left:
        assert f"Removing {fh.checkpoint_dir(workdir) / name}" in r.log, where
      left = []
    if hold.startswith(("mid-", "start-up:restored")):
      assert r.resumed_from == newest or hold == "start-up:restored", where
    if hold == "start-up:restored":
      assert r.at["restored_step"] == newest, where
    if hold.startswith("mid-save"):
      # Killed inside checkpoint K's write: its tmp directory is there and
      # step K is not complete.
      step = int(hold.split(":")[1])
      assert r.at["tmp_dir"].startswith(f"{step}{fh.TMP_MARKER}"), where
      assert step not in r.complete_at_hold, where
    if sigterm:
      assert r.exit_code == 0, where
      saved = re.search(r"SIGTERM: saved checkpoint at step (\d+)", r.log)
      assert saved and int(saved.group(1)) == newest_after, where
    else:
      assert r.exit_code == -signal.SIGKILL, where
    complete, tmp = fh.complete_steps(workdir), fh.tmp_dirs(workdir)
    if not sigterm:  # nothing changed on disk between the hold and the kill
      assert complete == r.complete_at_hold and tmp == r.tmp_at_hold, where
    assert (complete[-1] if complete else None) == newest_after, where
    assert [t.split(".")[0] for t in tmp
           ] == ([tmp_step] if tmp_step else []), (tmp, where)
    newest, left = newest_after, left + tmp

  log = fh.run_to_end(workdir, NUM_STEPS, "final")
  assert fh.resumed_from(log) == newest
  assert not fh.tmp_dirs(workdir)
  fh.assert_same_arrays(fh.read_checkpoint(workdir, NUM_STEPS),
                        reference["arrays"])


# ---------------------------------------------------------------------------
# Broken checkpoints, in process.


def _state(scale):
  return {
      "w": jnp.arange(4096, dtype=jnp.float32) * scale,
      "b": {
          "c": jnp.full((8, 8), scale, jnp.bfloat16),
          "n": jnp.asarray(scale, jnp.int32)
      }
  }


def _write(directory, steps=(2, 4, 6)):
  with checkpoint_lib.CheckpointManager(directory, max_to_keep=5) as ckpt:
    for s in steps:
      ckpt.save(s, _state(s), jax.random.PRNGKey(s), data_state={"pos": s})


def _targets():
  return (checkpoint_lib.abstract_like(_state(1)),
          checkpoint_lib.abstract_like(jax.random.PRNGKey(0)))


@pytest.mark.parametrize("kind, reason", [
    ("remove-commit-marker", r"incomplete: no commit_success.txt"),
    ("remove-item", r"missing item\(s\): (state|data)"),
    ("truncate-array-file", r"cannot be read|\d+ array\(s\) differ from "
     r"their checksums"),
    ("flip-array-byte", r"cannot be read|\d+ array\(s\) differ from their "
     r"checksums"),
    ("empty-data-json", r"cannot be read \(JSONDecodeError"),
    ("leave-tmp-dir", None),
])
def test_broken_newest_checkpoint_is_skipped_and_moved_aside(
    tmp_path, caplog, kind, reason):
  workdir = tmp_path / "w"
  _write(workdir / "checkpoints")
  changed = fh.corrupt(workdir, 6, kind, random.Random(0))
  directory = workdir / "checkpoints"
  with caplog.at_level(logging.WARNING):
    with checkpoint_lib.CheckpointManager(directory, max_to_keep=5) as ckpt:
      step, state, rng, data = ckpt.restore_newest_valid(*_targets())
      assert step == 4 and data == {"pos": 4}
      np.testing.assert_array_equal(state["w"], _state(4)["w"])
      np.testing.assert_array_equal(rng, jax.random.PRNGKey(4))
      # Step 6 can be written again after the resume.
      ckpt.save(6, _state(7), rng, data_state={"pos": 7})
    with checkpoint_lib.CheckpointManager(directory) as ckpt:
      assert ckpt.all_steps() == [2, 4, 6]
      step, state, _, _ = ckpt.restore_newest_valid(*_targets())
      assert step == 6 and int(state["b"]["n"]) == 7
  if reason is None:  # an interrupted write: reported, then removed
    assert f"Removing {changed}" in caplog.text
    assert not fh.tmp_dirs(workdir)
  else:
    assert re.search(
        rf"Checkpoint {directory / '6'} is unusable and is "
        rf"skipped: ({reason})", caplog.text), caplog.text
    moved = os.listdir(directory / "corrupt")
    assert len(moved) == 1 and moved[0].startswith("6-")


def test_no_usable_checkpoint_names_each_and_changes_nothing(tmp_path):
  workdir = tmp_path / "w"
  _write(workdir / "checkpoints", steps=(2, 4))
  fh.corrupt(workdir, 4, "flip-array-byte", random.Random(1))
  fh.corrupt(workdir, 2, "remove-commit-marker", random.Random(1))
  before = sorted(os.listdir(workdir / "checkpoints"))
  with checkpoint_lib.CheckpointManager(workdir / "checkpoints") as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointError) as err:
      ckpt.restore_newest_valid(*_targets())
  message = str(err.value)
  assert f"No usable checkpoint in {workdir / 'checkpoints'}" in message
  assert f"{workdir / 'checkpoints' / '4'}: " in message
  assert f"{workdir / 'checkpoints' / '2'}: incomplete" in message
  assert sorted(os.listdir(workdir / "checkpoints")) == before
  assert checkpoint_lib.CheckpointError in main.USER_ERRORS


def test_checksum_catches_any_single_change():
  x = jnp.arange(1000, dtype=jnp.float32)
  base = checkpoint_lib.checksums({"x": x})
  for i in (0, 1, 500, 999):
    y = x.at[i].set(jnp.nextafter(x[i], jnp.inf))
    assert checkpoint_lib.checksums({"x": y}) != base
  swapped = x.at[3].set(x[4]).at[4].set(x[3])
  assert checkpoint_lib.checksums({"x": swapped}) != base


def test_training_and_sampling_skip_a_corrupt_checkpoint(tmp_path, caplog):
  images = helpers.load_digits()
  config = helpers.make_config(num_steps=4, keep_checkpoints=3)
  kwargs = dict(model=helpers.tiny_model(),
                dataset_factory=helpers.dataset_factory(images))
  reference = train.train_and_evaluate(config, str(tmp_path / "ref"), **kwargs)
  workdir = tmp_path / "w"
  train.train_and_evaluate(config, str(workdir), **kwargs)
  fh.corrupt(workdir, 4, "truncate-array-file", random.Random(3))
  with caplog.at_level(logging.WARNING):
    # Sampling (read only) moves nothing. It reads and verifies only the EMA
    # parameters, so step 4 serves if its damage lies elsewhere (e.g. in the
    # optimizer state); either way what it returns is intact.
    trained = inference.load_trained(config, workdir,
                                     model=helpers.tiny_model())
    assert not (workdir / "checkpoints" / "corrupt").exists()
    if trained.step == 4:
      for a, b in zip(jax.tree.leaves(trained.params),
                      jax.tree.leaves(reference.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      assert trained.step == 2
    # Training falls back to step 2, redoes steps 3-4 and ends identical.
    again = train.train_and_evaluate(config, str(workdir), **kwargs)
  assert f"Checkpoint {workdir / 'checkpoints' / '4'} is unusable" \
      in caplog.text
  assert (workdir / "checkpoints" / "corrupt").is_dir()
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Workdir and config checks before anything compiles.


def test_full_disk_is_reported_before_training(tmp_path):
  with pytest.raises(
      workdir_lib.ConfigError,
      match=rf"--workdir {tmp_path} has only \d+ MiB free; at "
      r"least \d+ MiB are needed"):
    workdir_lib.check_workdir(str(tmp_path), mode="train", min_free_bytes=2**62)


def test_unwritable_workdir_is_reported_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(workdir_lib.ConfigError,
                     match=rf"--workdir {blocker}/w is not writable"):
    workdir_lib.check_workdir(str(blocker / "w"), mode="train")
  if os.geteuid() != 0:  # root writes through permission bits
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
      with pytest.raises(workdir_lib.ConfigError,
                         match="is not writable: Permission denied"):
        workdir_lib.check_workdir(str(ro), mode="train")
    finally:
      ro.chmod(0o755)


def _cli(args, workdir):
  env = fh.child_env()
  return subprocess.run([
      sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py:tiny",
      f"--workdir={workdir}", *args
  ], cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=fh.TIMEOUT, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config.sample.eta=1.5"
     ], r"config.sample.eta must be a number in \[0.0, 1.0\], got 1.5"),
    (["--config.sample.eta=-0.1"], r"config.sample.eta must be a number in"),
    (["--config.diffusion.num_timesteps=0"
     ], r"config.diffusion.num_timesteps must be an integer >= 1, got 0"),
    (["--config.train.ema_decay=-0.5"
     ], r"config.train.ema_decay must be a number in \[0.0, 1.0\)"),
    (["--config.train.max_nonfinite_steps=-1"
     ], r"config.train.max_nonfinite_steps must be an integer >= 0"),
])
def test_cli_rejects_out_of_range_config(tmp_path, args, message):
  out = _cli(args, tmp_path / "w")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1 and re.search(message, lines[0]), out.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # rejected before the workdir


@pytest.mark.slow
def test_cli_unwritable_workdir_and_broken_checkpoints(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  out = _cli([], blocker / "w")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert f"ddpm_jax: error: --workdir {blocker}/w is not writable" \
      in out.stderr
  # Sampling from a workdir whose only checkpoint is broken: one line.
  workdir = tmp_path / "w"
  _write(workdir / "checkpoints", steps=(2,))
  fh.corrupt(workdir, 2, "remove-commit-marker", random.Random(0))
  out = _cli(["--mode=sample"], workdir)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert "ddpm_jax: error: No usable checkpoint in" in out.stderr
  assert f"{workdir / 'checkpoints' / '2'}: incomplete" in out.stderr


# ---------------------------------------------------------------------------
# Issue 30: each failure one line; a failed checkpoint write loses nothing.


@pytest.mark.parametrize("level, message, kept", [
    (logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to "
     "open libtpu.so: libtpu.so: cannot open shared object file", False),
    (logging.INFO, "Unable to initialize backend 'cuda': no GPU", False),
    (logging.INFO, "Connecting to JAX distributed service", True),
    (logging.WARNING, "Unable to initialize backend 'rocm': broken", True),
    (logging.ERROR, "Unable to initialize backend 'tpu': broken", True),
])
def test_backend_probe_line_is_dropped_and_nothing_else(caplog, level, message,
                                                        kept):
  parallel.quiet_backend_probe()
  parallel.quiet_backend_probe()  # idempotent: one filter
  logger = logging.getLogger(parallel.BACKEND_LOGGER)
  assert sum(
      type(f).__name__ == "_DropBackendProbe" for f in logger.filters) == 1
  with caplog.at_level(logging.INFO, logger=parallel.BACKEND_LOGGER):
    logger.log(level, message)
  assert (message in caplog.text) == kept, caplog.text


def test_tfds_without_tensorflow_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
  with pytest.raises(
      pipeline.DataError,
      match=r'^tfds:mnist needs TensorFlow .*: pip install -e '
      r'"\.\[tf\]"$'):
    pipeline.create_dataset("tfds:mnist", batch_size=2, image_size=None,
                            channels=None, random_flip=False, seed=0)
  assert pipeline.DataError in main.USER_ERRORS


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
  images = helpers.load_digits()
  config = helpers.make_config(num_steps=6, keep_checkpoints=0)
  kwargs = dict(model=helpers.tiny_model(),
                dataset_factory=helpers.dataset_factory(images))
  reference = train.train_and_evaluate(config, str(tmp_path / "ref"), **kwargs)
  workdir = tmp_path / "w"
  path_type = type(epath.Path("/"))
  monkeypatch.setattr(path_type, "write_text", path_type.write_text)
  calls = fh.fail_writes_into(4)  # undone by monkeypatch
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as err:
    train.train_and_evaluate(config, str(workdir), **kwargs)
  monkeypatch.undo()
  assert calls
  directory = workdir / "checkpoints"
  assert str(err.value) == (
      f"Could not write checkpoint step 4 to {directory}: No space left on "
      f"device. Last good checkpoint: step 2 in {directory / '2'}; the "
      "unfinished step 4 is never used (removed now, or by the next run). Free"
      " space (or fix the disk) and run the same command again to resume from"
      " it.")
  assert isinstance(err.value, main.USER_ERRORS)
  # Nothing half-written is left for a restart to trip on: at most a tmp
  # directory of step 4 (a write still in flight may recreate it), which
  # the restart removes.
  assert fh.complete_steps(workdir) == [2]
  assert all(n == "2" or n.startswith(f"4{fh.TMP_MARKER}")
             for n in os.listdir(directory)), os.listdir(directory)
  # The restart resumes from step 2 and ends as the uninterrupted run.
  again = train.train_and_evaluate(config, str(workdir), **kwargs)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fh.assert_same_arrays(fh.read_checkpoint(workdir, 6),
                        fh.read_checkpoint(tmp_path / "ref", 6))


class _Params(NamedTuple):
  ema_params: dict


def _params(channels, *, embed=False):
  params = {
      "Conv_0": {
          "kernel": jnp.ones((3, 3, 1, channels)),
          "bias": jnp.zeros((channels,))
      }
  }
  if embed:
    params["Embed_0"] = {"embedding": jnp.ones((11, 4))}
  return _Params(ema_params=params)


@pytest.mark.parametrize("written, wanted, reason", [
    (dict(channels=4), dict(channels=8),
     r"another network: 2 differ in shape, e.g. \['Conv_0'\]\['bias'\] \[4\] "
     r"in the checkpoint, \[8\] here"),
    (dict(channels=4), dict(channels=4, embed=True),
     r"another network: 1 parameter array\(s\) of this config's network are "
     r"not in it, e.g. \['Embed_0'\]\['embedding'\] \[11, 4\]"),
    (dict(channels=4, embed=True), dict(channels=4),
     r"another network: it has 1 the network lacks, e.g. "
     r"\['Embed_0'\]\['embedding'\] \[11, 4\]"),
])
def test_checkpoint_of_another_network_is_named_before_any_read(
    tmp_path, written, wanted, reason):
  directory = tmp_path / "checkpoints"
  with checkpoint_lib.CheckpointManager(directory) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _params(**written), jax.random.PRNGKey(0))
  target = checkpoint_lib.abstract_like(_params(**wanted))
  rng = checkpoint_lib.abstract_like(jax.random.PRNGKey(0))
  with checkpoint_lib.CheckpointManager(directory, writable=False) as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointMismatch) as err:
      ckpt.restore_newest_valid(target, rng)
    assert re.search(
        rf"^The checkpoints in {directory} \(step\(s\) 2, 1\) hold another "
        rf"network than this config builds: {reason} \(step 2\)\.",
        str(err.value)), str(err.value)
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match=reason):
      ckpt.restore_params(target.ema_params)
    with pytest.raises(checkpoint_lib.CheckpointMismatch, match=reason):
      ckpt.restore(target, rng, step=1)
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved


def test_config_differences_name_the_fields(tmp_path):
  from ddpm_jax.engine import config as config_lib  # pylint: disable=g-import-not-at-top
  run = config_lib.load_config("configs/digits.py:tiny")
  assert workdir_lib.record_config(str(tmp_path), run)
  other = config_lib.load_config("configs/digits.py:cond,tiny")
  other.model.base_channels = 16
  other.train.num_steps = 7  # not a field that decides the checkpoint
  assert not workdir_lib.record_config(str(tmp_path), other)  # kept
  assert workdir_lib.config_differences(str(tmp_path), other) == [
      "data.num_classes: 0 in the run, 10 now",
      "model.base_channels: 8 in the run, 16 now"
  ]
  assert workdir_lib.config_differences(str(tmp_path), run) == []
  assert workdir_lib.config_differences(str(tmp_path / "none"), run) == []


@pytest.mark.slow
def test_full_disk_mid_run_gives_one_line_and_resumes_bit_for_bit(reference):
  workdir = reference["base"] / "disk-full"
  with fh.Child(workdir, NUM_STEPS, "disk-full", hold="disk-full:4") as child:
    rc = child.wait()
    log = child.log()
  assert rc == 1 and "Traceback" not in log, log[-3000:]
  lines = [l for l in log.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1, log[-3000:]
  assert lines[0].startswith(
      "ddpm_jax: error: Could not write checkpoint step 4 to "
      f"{fh.checkpoint_dir(workdir)}: No space left on device. Last good "
      f"checkpoint: step 2 in {fh.checkpoint_dir(workdir) / '2'};"), lines[0]
  assert fh.complete_steps(workdir) == [2]
  left = fh.tmp_dirs(workdir)  # at most step 4's, removed by the restart
  assert all(t.startswith(f"4{fh.TMP_MARKER}") for t in left), left
  log = fh.run_to_end(workdir, NUM_STEPS, "after-disk-full")
  assert fh.resumed_from(log) == 2 and not fh.tmp_dirs(workdir)
  for name in left:
    assert f"Removing {fh.checkpoint_dir(workdir) / name}" in log
  fh.assert_same_arrays(fh.read_checkpoint(workdir, NUM_STEPS),
                        reference["arrays"])
