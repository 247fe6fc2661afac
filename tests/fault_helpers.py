"""Real training subprocesses to interrupt, and checkpoints to corrupt.

Shared by tests/test_faults.py and tests/fault_injection.py (the seeded
random campaign, run on its own). The child is

  python tests/fault_helpers.py train WORKDIR NUM_STEPS [HOLD CONTROL_DIR]

`train.train_and_evaluate` with the ~3k-parameter denoiser of
train_helpers.py on 256 of scikit-learn's bundled 8x8 digits, a checkpoint
every 2 steps (2 kept), a log line every step.

Kill moments are announced, never guessed. With HOLD the child stops at one
exact moment: it writes CONTROL_DIR/at.json (which moment, in which thread)
and then waits until CONTROL_DIR/go exists. The parent reads what is on disk
(stable while the child waits), then SIGKILLs it there, or sends SIGTERM,
waits until the library's SIGTERM handler has run (CONTROL_DIR/sigterm is
written by it) and lets the child go on. The library is not instrumented:
the child patches, in its own process only, the dataset it trains on, two
methods of `ddpm_jax.engine.checkpoint.CheckpointManager` (to see its instances and
its restore) and `os.mkdir` / `os.rename` / `os.replace` (the calls through
which Orbax creates and commits a checkpoint's tmp directory). HOLD is one of

  start-up:begin     JAX is up; `train_and_evaluate` not yet called.
  start-up:dataset   it asks for its dataset: the checkpoint manager is open
                     (tmp directories of interrupted writes are removed).
  start-up:restored  the newest valid checkpoint was just restored (broken
                     newer ones moved aside); nothing trained yet.
  mid-step:K         in the train loop, fetching step K's batch: steps
                     before K are done in memory, no checkpoint write is in
                     flight (the hold first waits for pending ones).
  mid-save:K:begin   in checkpoint K's write, right after Orbax created its
                     tmp directory `K.orbax-checkpoint-tmp*` (still empty).
  mid-save:K:items   ... when Orbax moves the first item into place in it.
  mid-save:K:commit  ... all written, just before the rename to `K` that
                     commits it.

  disk-full:K        not a hold: every file written into checkpoint K's
                     unfinished directory fails with ENOSPC (as on a full
                     disk); the child reports the error as the command line
                     does (one `ddpm_jax: error:` line, exit status 1).

A hold that the run never reaches (e.g. mid-step:K when it resumes at or
after K) lets the child train to the end: the parent sees it exit instead.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_helpers as helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = Path(__file__).resolve()
TMP_MARKER = ".orbax-checkpoint-tmp"
TIMEOUT = 300  # seconds for one child; generous, never a timing assertion.
CHECKPOINT_EVERY = 2
KEEP_CHECKPOINTS = 2
HOLDS = ("start-up:begin", "start-up:dataset", "start-up:restored",
         "mid-step:K", "mid-save:K:begin", "mid-save:K:items",
         "mid-save:K:commit")


def child_env(cache_dir: Optional[str] = None) -> dict[str, str]:
  """The environment of a CPU child importing this checkout's ddpm_jax;
  with `cache_dir`, it shares JAX's persistent compilation cache there
  (without, it keeps the one this process's environment names, if any)."""
  env = helpers.subprocess_env(JAX_PLATFORMS="cpu")
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def checkpoint_dir(workdir: Path) -> Path:
  return Path(workdir) / "checkpoints"


def tmp_dirs(workdir: Path) -> list[str]:
  try:
    return sorted(
        n for n in os.listdir(checkpoint_dir(workdir)) if TMP_MARKER in n)
  except FileNotFoundError:
    return []


def complete_steps(workdir: Path) -> list[int]:
  """Finalized step directories (name is the step, commit marker inside)."""
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(
      int(n)
      for n in os.listdir(d)
      if n.isdigit() and (d / n / "commit_success.txt").exists())


def resumed_from(log: str) -> Optional[int]:
  """The step a child's log says it resumed from (None: it did not)."""
  m = re.search(r"Resumed from checkpoint step (\d+)", log)
  return int(m.group(1)) if m else None


class Child:
  """One training subprocess, its log in `<workdir>/../<name>.log` and, with
  `hold`, its control directory `<workdir>/../<name>.control`. A context
  manager: leaving the block kills the child if it still runs."""

  def __init__(self, workdir: Path, num_steps: int, name: str, *,
               hold: Optional[str] = None, cache_dir: Optional[str] = None):
    self.workdir = Path(workdir)
    self.log_path = self.workdir.parent / f"{name}.log"
    self.control = self.workdir.parent / f"{name}.control"
    args = [sys.executable, str(HERE), "train", str(workdir), str(num_steps)]
    if hold is not None:
      self.control.mkdir()
      args += [hold, str(self.control)]
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(args, env=child_env(cache_dir),
                                 stdout=self._log, stderr=subprocess.STDOUT,
                                 cwd=helpers.REPO)

  def __enter__(self) -> Child:
    return self

  def __exit__(self, *exc) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self._log.close()

  def log(self) -> str:
    return self.log_path.read_text(errors="replace")

  def wait(self, timeout: float = TIMEOUT) -> int:
    return self.proc.wait(timeout)

  def _wait_for(self, path: Path, what: str) -> bool:
    """True once `path` exists; False if the child exited first."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
      if self.proc.poll() is not None:
        return path.exists()
      if time.monotonic() > deadline:
        raise TimeoutError(f"{self.log_path}: no {what} after {TIMEOUT} s\n"
                           f"{self.log()[-3000:]}")
      time.sleep(0.01)
    return True

  def wait_for_hold(self) -> Optional[dict[str, Any]]:
    """What the child announced when it stopped at its hold, or None when
    it exited without reaching it."""
    if not self._wait_for(self.control / "at.json", "hold"):
      return None
    return json.loads((self.control / "at.json").read_text())

  def sigterm_and_release(self) -> None:
    """SIGTERM; once the library's handler has run, lets the child go on."""
    os.kill(self.proc.pid, signal.SIGTERM)
    if not self._wait_for(self.control / "sigterm", "SIGTERM handler call"):
      raise AssertionError(f"exited before handling SIGTERM:\n"
                           f"{self.log()[-3000:]}")
    (self.control / "go").touch()


def run_to_end(workdir: Path, num_steps: int, name: str, *,
               cache_dir: Optional[str] = None) -> str:
  """Runs a child without a hold to completion; returns its log."""
  with Child(workdir, num_steps, name, cache_dir=cache_dir) as child:
    rc = child.wait()
    log = child.log()
  assert rc == 0, f"{name}: exit {rc}\n{log[-4000:]}"
  return log


@dataclasses.dataclass
class Interruption:
  """What one interrupted child did."""
  hold: str  # requested, e.g. 'mid-save:6:commit'
  sigterm: bool  # SIGTERM and release at the hold instead of SIGKILL
  at: Optional[dict[str, Any]]  # the child's announcement; None: not reached
  complete_at_hold: list[int]  # finalized steps while it held
  tmp_at_hold: list[str]  # tmp directories while it held
  resumed_from: Optional[int]  # the step its log says it resumed from
  exit_code: int
  log: str


def interrupt(workdir: Path, num_steps: int, name: str, hold: str, *,
              sigterm: bool = False,
              cache_dir: Optional[str] = None) -> Interruption:
  """Starts a child holding at `hold`; SIGKILLs it there (or, with
  `sigterm`, sends SIGTERM and lets it finish by itself)."""
  with Child(workdir, num_steps, name, hold=hold, cache_dir=cache_dir) as child:
    at = child.wait_for_hold()
    complete, tmp = complete_steps(workdir), tmp_dirs(workdir)
    if at is not None:
      if sigterm:
        child.sigterm_and_release()
      else:
        os.kill(child.proc.pid, signal.SIGKILL)
    rc = child.wait()
    log = child.log()
  return Interruption(hold, sigterm, at, complete, tmp, resumed_from(log), rc,
                      log)


# ---------------------------------------------------------------------------
# Checkpoint contents and corruption.


def read_checkpoint(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """{'path': array} of the state item of a checkpoint (no target needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(checkpoint_dir(workdir) / str(step) / "state")
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    bits = [
        np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        for x in (a[key], b[key])
    ]
    assert np.array_equal(*bits), f"{key} differs"


CORRUPTIONS = ("remove-commit-marker", "remove-item", "truncate-array-file",
               "flip-array-byte", "empty-data-json", "leave-tmp-dir",
               "truncate-any-file")


def corrupt(workdir: Path, step: int, kind: str, rng) -> Path:
  """Damages checkpoint `step` in one of CORRUPTIONS; returns what changed.

  `rng` is a `random.Random`.
  """
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


# ---------------------------------------------------------------------------
# The child.


class _Hold:
  """Stops the child at one moment (see the module docstring)."""

  def __init__(self, hold: str, control: Path, checkpoints: Path):
    if re.sub(r":\d+", ":K", hold, count=1) not in HOLDS:
      raise SystemExit(f"unknown hold {hold!r}; one of {', '.join(HOLDS)}")
    self.hold, self.control = hold, control
    self.checkpoints = os.path.realpath(checkpoints)
    self.kind, *rest = hold.split(":")
    self.step = int(rest.pop(0)) if self.kind != "start-up" else None
    self.where = rest[0] if rest else None
    self.managers = []
    self._lock = threading.Lock()
    self._reached = False

  def wait(self, **details) -> None:
    """Announces the moment (once) in control/at.json and waits for
    control/go; exits by itself if the parent never decides."""
    with self._lock:
      if self._reached:
        return
      self._reached = True
    record = dict(hold=self.hold, thread=threading.current_thread().name,
                  **details)
    part = self.control / "at.json.part"
    part.write_text(json.dumps(record))
    _OS["replace"](part, self.control / "at.json")
    deadline = time.monotonic() + TIMEOUT
    while not (self.control / "go").exists():
      if time.monotonic() > deadline:
        os._exit(3)  # pylint: disable=protected-access
      time.sleep(0.01)

  def install(self, checkpoint_lib) -> None:
    """Patches this process's checkpoint manager class, os and signal."""
    manager_cls = checkpoint_lib.CheckpointManager
    init, restore = manager_cls.__init__, manager_cls.restore_newest_valid
    hold = self

    def recording_init(manager, *args, **kwargs):
      init(manager, *args, **kwargs)
      hold.managers.append(manager)

    def holding_restore(manager, *args, **kwargs):
      restored = restore(manager, *args, **kwargs)
      if hold.hold == "start-up:restored":
        hold.wait(restored_step=int(restored[0]))
      return restored

    manager_cls.__init__ = recording_init
    manager_cls.restore_newest_valid = holding_restore
    if self.kind == "mid-save":
      os.mkdir = self._holding_mkdir
      os.rename = self._holding_rename("rename")
      os.replace = self._holding_rename("replace")
    real_signal = signal.signal
    control = self.control

    def recording_signal(signum, handler):
      if signum == signal.SIGTERM and callable(handler):

        def announcing_handler(sig, frame):
          handler(sig, frame)
          (control / "sigterm").touch()

        return real_signal(signum, announcing_handler)
      return real_signal(signum, handler)

    signal.signal = recording_signal

  def _step_tmp(self, path) -> bool:
    """Is `path` checkpoint self.step's tmp directory?"""
    path = os.fspath(path)
    return (os.path.realpath(os.path.dirname(path)) == self.checkpoints and
            os.path.basename(path).startswith(f"{self.step}{TMP_MARKER}"))

  def _holding_mkdir(self, path, *args, **kwargs):
    _OS["mkdir"](path, *args, **kwargs)
    if self.where == "begin" and self._step_tmp(path):
      self.wait(tmp_dir=os.path.basename(os.fspath(path)))

  def _holding_rename(self, name):

    def rename(src, dst, *args, **kwargs):
      src_path = os.fspath(src)
      if self.where == "commit" and self._step_tmp(src_path):
        self.wait(tmp_dir=os.path.basename(src_path))
      elif (self.where == "items" and
            self._step_tmp(os.path.dirname(src_path)) and
            TMP_MARKER in os.path.basename(src_path)):
        self.wait(tmp_dir=os.path.basename(os.path.dirname(src_path)),
                  item=os.path.basename(src_path))
      return _OS[name](src, dst, *args, **kwargs)

    return rename

  def dataset_factory(self, images):
    """train_helpers.dataset_factory, holding at start-up:dataset and at
    mid-step:K (the fetch of step K's batch)."""
    hold = self

    class HoldingDataset(helpers.ArrayDataset):

      def __next__(self):
        if hold.kind == "mid-step" and self.position == hold.step - 1:
          for manager in hold.managers:
            manager.wait_until_finished()
          hold.wait(position=self.position)
        return super().__next__()

    def factory(config, *, batch_size, process_index, process_count):
      del config
      if hold.hold == "start-up:dataset":
        hold.wait()
      return HoldingDataset(images, batch_size, process_index, process_count)

    return factory


_OS = {"mkdir": os.mkdir, "rename": os.rename, "replace": os.replace}


def fail_writes_into(step: int) -> list[str]:
  """Makes every file written into checkpoint `step`'s unfinished directory
  fail as on a full disk (Orbax writes its JSON and metadata files through
  epath); returns the list of paths that failed, growing."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path_type = type(epath.Path("/"))
  write_text = path_type.write_text
  failed = []

  def failing(self, *args, **kwargs):
    if f"/{step}{TMP_MARKER}" in os.fspath(self):
      failed.append(os.fspath(self))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return write_text(self, *args, **kwargs)

  path_type.write_text = failing
  return failed


def _train_main(workdir: str, num_steps: int, hold: Optional[str],
                control: Optional[str]) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.engine import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax.engine import train  # pylint: disable=g-import-not-at-top
  config = helpers.make_config(num_steps=num_steps,
                               checkpoint_every=CHECKPOINT_EVERY,
                               keep_checkpoints=KEEP_CHECKPOINTS, log_every=1)
  images = helpers.load_digits()
  factory = helpers.dataset_factory(images)
  if hold is not None and hold.startswith("disk-full:"):
    import logging as std_logging  # pylint: disable=g-import-not-at-top

    from ddpm_jax import main  # pylint: disable=g-import-not-at-top
    # As the command line: library records without tracebacks (the CLI
    # filters at absl's handler, which sees both loggers' records).
    for name in ("absl", "asyncio"):
      std_logging.getLogger(name).addFilter(main.quiet_libraries)
    fail_writes_into(int(hold.split(":")[1]))
    try:
      train.train_and_evaluate(config, workdir, model=helpers.tiny_model(),
                               dataset_factory=factory)
    except main.USER_ERRORS as e:
      print(f"ddpm_jax: error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    return
  if hold is not None:
    stop = _Hold(hold, Path(control), checkpoint_dir(Path(workdir)))
    stop.install(checkpoint_lib)
    factory = stop.dataset_factory(images)
    if hold == "start-up:begin":
      jax.devices()
      stop.wait()
  train.train_and_evaluate(config, workdir, model=helpers.tiny_model(),
                           dataset_factory=factory)


if __name__ == "__main__":
  if sys.argv[1] != "train" or len(sys.argv) not in (4, 6):
    raise SystemExit(f"usage: {sys.argv[0]} train WORKDIR NUM_STEPS "
                     "[HOLD CONTROL_DIR]")
  _train_main(sys.argv[2], int(sys.argv[3]),
              *(sys.argv[4:6] if len(sys.argv) == 6 else (None, None)))
