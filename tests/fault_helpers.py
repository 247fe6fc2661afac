"""Real training subprocesses to kill, and checkpoints to corrupt.

Shared by tests/test_faults.py (a few faults, in the default run) and
tests/fault_injection.py (the seeded random campaign, run on its own).

The child is `python tests/fault_helpers.py train WORKDIR NUM_STEPS`:
`train.train_and_evaluate` with the ~3k-parameter denoiser of
train_helpers.py on 256 MNIST images, a checkpoint every 2 steps (2 kept),
a log line every step. Nothing in the library is instrumented: the moment of
a kill is chosen by watching the child's log and its checkpoint directory,
then frozen with SIGSTOP, classified from what is on disk and in the log
(start-up, mid-step or mid-save, i.e. an Orbax tmp directory exists), and
only then killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = Path(__file__).resolve()
TMP_MARKER = ".orbax-checkpoint-tmp"
START_LINE = "Training "  # "Training N steps from step K: ..."
TIMEOUT = 300  # seconds for one child; generous, never a timing assertion.


def child_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(helpers.REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  # Every child reuses the first one's compilations.
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class Child:
  """One training subprocess with its log in `<workdir>/../<name>.log`."""

  def __init__(self, workdir: Path, num_steps: int, cache_dir: str,
               name: str):
    self.workdir = Path(workdir)
    self.log_path = self.workdir.parent / f"{name}.log"
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(
        [sys.executable, str(HERE), "train", str(workdir), str(num_steps)],
        env=child_env(cache_dir), stdout=self._log, stderr=subprocess.STDOUT,
        cwd=helpers.REPO)

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def wait(self, timeout: float = TIMEOUT) -> int:
    try:
      return self.proc.wait(timeout)
    finally:
      self._log.close()

  def running(self) -> bool:
    return self.proc.poll() is None


def checkpoint_dir(workdir: Path) -> Path:
  return Path(workdir) / "checkpoints"


def tmp_dirs(workdir: Path) -> list[str]:
  try:
    return [n for n in os.listdir(checkpoint_dir(workdir)) if TMP_MARKER in n]
  except FileNotFoundError:
    return []


def complete_steps(workdir: Path) -> list[int]:
  """Finalized step directories (name is the step, commit marker inside)."""
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and (d / n / "commit_success.txt").exists())


def run_to_end(workdir: Path, num_steps: int, cache_dir: str,
               name: str) -> tuple[str, float]:
  """Runs a child to completion; returns its log and how many seconds it
  took to reach the train loop (the start-up window for later kills)."""
  start = time.time()
  child = Child(workdir, num_steps, cache_dir, name)
  startup = None
  while child.running():
    if startup is None and START_LINE in child.log():
      startup = time.time() - start
    time.sleep(0.01)
  rc = child.wait()
  log = child.log()
  assert rc == 0, f"{name}: exit {rc}\n{log[-4000:]}"
  return log, startup if startup is not None else time.time() - start


@dataclasses.dataclass
class Interruption:
  """What one interrupted child did."""
  requested: str  # start-up, mid-step, mid-save or sigterm
  moment: str  # observed: start-up, mid-step, mid-save, or sigterm
  complete_before: list[int]  # finalized steps when it was frozen
  resumed_from: Optional[int]  # the step its log says it resumed from
  exit_code: int
  log: str


def _resumed_from(log: str) -> Optional[int]:
  m = re.search(r"Resumed from checkpoint step (\d+)", log)
  return int(m.group(1)) if m else None


def _stop_and_classify(child: Child) -> tuple[str, list[int]]:
  os.kill(child.proc.pid, signal.SIGSTOP)
  time.sleep(0.05)  # let the log file catch up (the child is frozen)
  log = child.log()
  if tmp_dirs(child.workdir):
    moment = "mid-save"
  elif START_LINE not in log:
    moment = "start-up"
  else:
    moment = "mid-step"
  return moment, complete_steps(child.workdir)


def interrupt(workdir: Path, num_steps: int, cache_dir: str, name: str,
              requested: str, rng: random.Random, *,
              startup_seconds: float = 5.0) -> Interruption:
  """Starts a child and SIGKILLs it at a `requested` moment (or SIGTERMs it).

  start-up: a random delay in [0, startup_seconds / 2) after the spawn
    (startup_seconds: how long a previous child took to reach the loop).
  mid-step: a random delay in [0, 1.5) s after the child's log shows the
    train loop started (it may turn out mid-save: the moment is observed).
  mid-save: polls the checkpoint directory and freezes the child while an
    Orbax tmp directory exists (retrying at later saves when the poll missed
    one); if the run ends before, it is reported as the moment it was.
  sigterm: SIGTERM once the loop has logged a step; the child must save and
    exit 0 by itself.
  """
  child = Child(workdir, num_steps, cache_dir, name)
  moment, complete = None, None
  deadline = time.time() + TIMEOUT
  if requested == "start-up":
    time.sleep(rng.uniform(0, startup_seconds / 2))
    if child.running():
      moment, complete = _stop_and_classify(child)
  else:
    while child.running() and time.time() < deadline:
      if START_LINE in child.log():
        break
      time.sleep(0.01)
    if requested == "mid-step":
      time.sleep(rng.uniform(0, 1.5))
      if child.running():
        moment, complete = _stop_and_classify(child)
    elif requested == "mid-save":
      while child.running() and time.time() < deadline:
        if tmp_dirs(workdir):
          moment, complete = _stop_and_classify(child)
          if moment == "mid-save":
            break
          os.kill(child.proc.pid, signal.SIGCONT)  # missed: the next save
          moment = None
        time.sleep(0.0005)
    elif requested == "sigterm":
      while child.running() and time.time() < deadline:
        if re.search(r"step \d+/\d+: loss", child.log()):
          break
        time.sleep(0.01)
      complete = complete_steps(workdir)
      os.kill(child.proc.pid, signal.SIGTERM)
      moment = "sigterm"
    else:
      raise ValueError(requested)
  if moment is not None and moment != "sigterm":
    os.kill(child.proc.pid, signal.SIGKILL)
    os.kill(child.proc.pid, signal.SIGCONT)
  rc = child.wait()
  log = child.log()
  if moment is None:  # it finished before the chosen moment
    moment, complete = "finished", complete_steps(workdir)
  return Interruption(requested, moment, complete or [], _resumed_from(log),
                      rc, log)


# ---------------------------------------------------------------------------
# Checkpoint contents and corruption.


def read_checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """{'path': array} of the state item of a checkpoint (no target needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(checkpoint_dir(workdir) / str(step) / "state")
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    bits = [np.ascontiguousarray(x).reshape(-1).view(np.uint8)
            for x in (a[key], b[key])]
    assert np.array_equal(*bits), f"{key} differs"


CORRUPTIONS = ("remove-commit-marker", "remove-item", "truncate-array-file",
               "flip-array-byte", "empty-data-json", "leave-tmp-dir",
               "truncate-any-file")


def corrupt(workdir: Path, step: int, kind: str, rng: random.Random) -> Path:
  """Damages checkpoint `step` in one of CORRUPTIONS; returns what changed."""
  path = checkpoint_dir(workdir) / str(step)
  array_files = sorted(p for p in (path / "state").rglob("*")
                       if p.is_file() and p.parent.name == "d")
  if kind == "remove-commit-marker":
    target = path / "commit_success.txt"
    target.unlink()
  elif kind == "remove-item":
    target = path / rng.choice(["state", "data"])
    shutil.rmtree(target)
  elif kind in ("truncate-array-file", "truncate-any-file"):
    # The largest data file holds the parameters; any other file may be one
    # the restore never reads (e.g. a superseded per-process B-tree node),
    # and then the restored arrays are still verified against checksums.
    if kind == "truncate-array-file":
      target = max(array_files, key=lambda p: p.stat().st_size)
    else:
      target = rng.choice(sorted(p for p in path.rglob("*") if p.is_file()))
    size = target.stat().st_size
    with open(target, "r+b") as f:
      f.truncate(rng.randrange(0, size))
  elif kind == "flip-array-byte":
    # The largest data file holds the parameters (zstd-compressed chunks).
    target = max(array_files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[rng.randrange(len(data) // 4, len(data))] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
  elif kind == "empty-data-json":
    target = path / "data" / "metadata"
    target.write_text("")
  elif kind == "leave-tmp-dir":
    # As a kill mid-save leaves it: renamed back to a tmp name.
    target = path.with_name(f"{step}{TMP_MARKER}-{rng.randrange(10**9)}")
    path.rename(target)
  else:
    raise ValueError(kind)
  return target


def _train_main(workdir: str, num_steps: int) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top
  config = helpers.make_config(num_steps=num_steps, checkpoint_every=2,
                               keep_checkpoints=2, log_every=1)
  train.train_and_evaluate(
      config, workdir, model=helpers.tiny_model(),
      dataset_factory=helpers.dataset_factory(helpers.load_mnist()))


if __name__ == "__main__":
  if sys.argv[1] != "train":
    raise SystemExit(f"usage: {sys.argv[0]} train WORKDIR NUM_STEPS")
  _train_main(sys.argv[2], int(sys.argv[3]))
