"""Issue 17: every mode of the command line on two hosts (two processes on
localhost, jax.distributed over gloo) against one process with the same two
devices: the same sample grids, samples and evaluation numbers; only
process 0 writes and logs; all processes restore the same checkpoint; hosts
started with different configs are named and stopped; a killed host stops
the other with one line (issue 30).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_helpers as hh  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests import inception_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow


def _two(args, workdir, extra_args=((), ())):
  port = hh.free_port()
  return hh.run_processes(
      [hh.cli([f"--workdir={workdir}", *args, *extra]) for extra in extra_args],
      [hh.env(process=i, port=port) for i in range(2)])


def _ok(result):
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr


def _both(args, two, one):
  """The same command on two hosts (workdir `two`) and, at the same time, on
  one process with two devices (workdir `one`): (the two stderrs, the one)."""
  port = hh.free_port()
  *pair, single = hh.run_processes(
      [hh.cli([f"--workdir={two}", *args])] * 2 +
      [hh.cli([f"--workdir={one}", *args])],
      [hh.env(process=i, port=port) for i in range(2)] + [hh.env(devices=2)])
  return [_ok(r) for r in pair], _ok(single)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tiny digits recipe trained (4 steps, grids at the end) on two hosts
  and on one, then sampled and evaluated the same ways; the two-host and the
  one-process run of each mode run together (they share nothing but the
  compilation cache)."""
  base = tmp_path_factory.mktemp("hosts")
  two, one = base / "two", base / "one"
  logs = {}
  logs["train2"], logs["train1"] = _both([], two, one)
  sample = ["--mode=sample", "--config.sample.num_images=12"]
  logs["sample2"], logs["sample1"] = _both(sample, two, one)
  weights = base / "fid_inception.npz"
  np.savez(
      weights,
      **inception_helpers.random_state_dict(
          inception_helpers.torch_layout(inception_helpers.flax_shapes())))
  evaluate = [
      "--mode=eval", f"--config.eval.inception_weights={weights}",
      "--config.eval.num_samples=8", "--config.eval.num_reference=16"
  ]
  logs["eval2"], logs["eval1"] = _both(evaluate, two, one)
  return dict(base=base, two=two, one=one, logs=logs)


def test_training_grids_match_one_process(runs):
  for name in ("step_00000004.png", "step_00000004.gif"):
    assert (runs["two"] / "samples" /
            name).read_bytes() == (runs["one"] / "samples" /
                                   name).read_bytes(), name
  first, second = runs["logs"]["train2"]
  assert "step 4/4: loss" in first and "wrote" in first
  assert "step 4/4" not in second and "wrote" not in second
  assert "Training 4 steps from step 0" not in second


def test_sample_mode_matches_one_process(runs):
  name = "samples/sample_step_00000004"
  with np.load(runs["two"] / f"{name}.npz") as f:
    two = f["images"]
  with np.load(runs["one"] / f"{name}.npz") as f:
    one = f["images"]
  assert two.shape == (12, 16, 16, 1)
  np.testing.assert_array_equal(two, one)
  for suffix in (".png", ".gif"):
    assert (runs["two"] /
            f"{name}{suffix}").read_bytes() == (runs["one"] /
                                                f"{name}{suffix}").read_bytes()
  first, second = runs["logs"]["sample2"]
  assert "Sampled 12 images" in first and "Sampled" not in second


def test_eval_mode_matches_one_process(runs):
  results = [
      json.loads((workdir / "eval" / "step_00000004.json").read_text())
      for workdir in (runs["two"], runs["one"])
  ]
  assert results[0] == results[1]  # The same programs over the same mesh.
  assert np.isfinite(results[0]["fid"]) and results[0]["num_images"] == 8
  first, second = runs["logs"]["eval2"]
  for line in ("bits/dim", "FID", "Wrote"):
    assert line in first and line not in second, line


def test_hosts_agree_on_a_checkpoint_one_of_them_cannot_read(runs, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(runs["two"], workdir)
  port = hh.free_port()
  results = hh.run_processes([[
      sys.executable,
      str(Path(hh.__file__)), "agree",
      str(i),
      str(port),
      str(workdir), "4",
      str(tmp_path / f"out{i}.json")
  ] for i in range(2)], [hh.env(process=i, port=port) for i in range(2)])
  logs = [_ok(r) for r in results]
  chosen = [
      json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)
  ]
  # Step 4 is fine for process 0, unreadable for process 1: both use 2.
  assert chosen == [{"loaded": 2, "final": 4}] * 2
  for log in logs:
    assert (f"Checkpoint {workdir / 'checkpoints' / '4'} is unusable and is "
            "skipped: process 1: unreadable from this host") in log
  assert (f"Moved broken checkpoint {workdir / 'checkpoints' / '4'} to "
          in logs[0])  # By process 0, after both agreed.
  assert [
      p.name.split("-")[0]
      for p in (workdir / "checkpoints" / "corrupt").iterdir()
  ] == ["4"]


def _error_line(result):
  """The one `ddpm_jax:` line of a run that stopped with exit status 1."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("ddpm_jax:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def test_hosts_with_different_configs_are_named(runs, tmp_path):
  results = _two([], tmp_path / "w",
                 extra_args=((), ("--config.train.num_steps=5",)))
  for result in results:
    line = _error_line(result)
    assert ("ddpm_jax: error: Hosts started with different configs: process "
            "1 (") in line and "differ from process 0" in line
  assert not (tmp_path / "w").exists()  # Stopped before the workdir.


def test_a_check_failing_on_one_host_stops_every_host(tmp_path):
  """A relative npz: path that process 0 finds in its working directory and
  process 1 does not (hosts with different local files): every host stops
  at start-up, naming process 1 and why, instead of waiting for it."""
  cwds = [tmp_path / "host0", tmp_path / "host1"]
  for cwd in cwds:
    cwd.mkdir()
  digits = np.zeros((4, 16, 16), np.uint8)
  np.savez(cwds[0] / "digits.npz", x_train=digits, y_train=np.zeros(4),
           x_test=digits, y_test=np.zeros(4))
  port = hh.free_port()
  results = hh.run_processes([
      hh.cli([
          f"--workdir={tmp_path / 'w'}", "--config.data.source=npz:digits.npz"
      ])
  ] * 2, [hh.env(process=i, port=port) for i in range(2)], cwds)
  for result in results:
    line = _error_line(result)
    assert line.startswith(
        "ddpm_jax: error: Start-up checks failed on process 1 ("), line
    assert "digits.npz does not exist" in line, line
    assert "process 0" not in line, line
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_killed_host_stops_the_other_and_both_resume(tmp_path):
  """Process 1 is killed (SIGKILL) once checkpoint 2 is complete, in a run
  far too long to end first: process 0, waiting for it in a collective,
  stops with one line naming process 1 (parallel.HostWatch; within
  hh.TIMEOUT here, measured in docs/robustness.md) instead of hanging; both
  restarted resume from the newest complete checkpoint."""
  code, log, seconds, newest = hh.kill_one_host(tmp_path, victim=1)
  line = _error_line(subprocess.CompletedProcess([], code, "", log))
  assert line.startswith("ddpm_jax: error: Lost process 1 ("), line
  assert "its connection closed" in line and "stopping process 0 (" in line
  print(f"process 0 stopped {seconds:.1f} s after process 1 was killed")
  # Restarted, both resume from the newest complete checkpoint; a time
  # budget of 1 s ends the run at its first agreed stop.
  args = hh.lost_host_args(tmp_path / "w")[1:] + ["--config.train.max_time=1"]
  results = _two(args, tmp_path / "w")
  first = _ok(results[0])
  _ok(results[1])
  assert f"Resumed from checkpoint step {newest} in" in first, first
