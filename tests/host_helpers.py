"""Runs of several processes on localhost (jax.distributed over gloo), for
tests/test_hosts.py; also the worker of its checkpoint-agreement test:

  python tests/host_helpers.py agree PROCESS_ID PORT WORKDIR BROKEN_STEP OUT
      one of two processes: process 1 alone sees checkpoint BROKEN_STEP as
      broken (as if its view of the storage differed); both load the
      trained model, then resume training; OUT gets the steps they chose.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import train_helpers  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
TINY = f"{REPO / 'configs' / 'digits.py'}:tiny"
TIMEOUT = 900  # seconds for one run; generous, never a timing check.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(*, process: Optional[int] = None, num_processes: int = 2,
        port: Optional[int] = None, devices: int = 1) -> dict[str, str]:
  """The environment of one process: of `num_processes` on localhost when
  `process` is given, else a single process with `devices` CPU devices."""
  # This process's XLA flags (the tests' fast-compile level) and the
  # session's compilation cache (conftest.py) travel along: the runs of
  # every test share their compiled programs.
  out = train_helpers.subprocess_env(
      devices=devices if process is None and devices > 1 else None,
      JAX_PLATFORMS="cpu")
  if process is not None:
    out.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process))
  return out


def run_processes(
    commands: list[list[str]], envs: list[dict[str, str]],
    cwds: Optional[list[Path]] = None) -> list[subprocess.CompletedProcess]:
  """Runs the commands together (in `cwds`, default all in the repository);
  returns each one's exit code and stderr.

  Each stderr goes to a file, not a pipe: a process whose pipe nobody reads
  yet would block on a full pipe while the others wait for it at a barrier.
  """
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [
        subprocess.Popen(c, env=e, cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=log, text=True)
        for c, e, cwd, log in zip(commands, envs, cwds or [REPO] *
                                  len(commands), logs)
    ]
    try:
      for proc in procs:
        proc.wait(timeout=TIMEOUT)
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    results = []
    for command, proc, log in zip(commands, procs, logs):
      log.seek(0)
      results.append(
          subprocess.CompletedProcess(command, proc.returncode, "", log.read()))
  return results


def start_processes(commands: list[list[str]], envs: list[dict[str, str]],
                    log_dir: Path) -> tuple[list[subprocess.Popen], list[Path]]:
  """Starts the commands together, each one's stderr to log_dir/host{i}.log
  (a file, as in `run_processes`); returns the processes and logs."""
  procs, logs = [], []
  for i, (command, environment) in enumerate(zip(commands, envs)):
    logs.append(Path(log_dir) / f"host{i}.log")
    with open(logs[-1], "w") as log:
      procs.append(
          subprocess.Popen(command, env=environment, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=log, text=True))
  return procs, logs


def wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
  """Returns once `path` exists; fails if a process exits first or after
  TIMEOUT seconds (generous; never a timing check)."""
  deadline = time.monotonic() + TIMEOUT
  while not path.exists():
    exited = [p.returncode for p in procs if p.poll() is not None]
    assert not exited, f"exited ({exited}) before {path} existed"
    assert time.monotonic() < deadline, f"no {path} after {TIMEOUT} s"
    time.sleep(0.1)


def lost_host_args(workdir: Path) -> list[str]:
  """A run far too long to end by itself, a checkpoint every 2 steps."""
  return [
      f"--workdir={workdir}", "--config.train.num_steps=100000",
      "--config.train.checkpoint_every=2", "--config.train.sample_every=0"
  ]


def kill_one_host(base: Path, victim: int) -> tuple[int, str, float, int]:
  """Trains on two hosts, SIGKILLs process `victim` once checkpoint 2 is
  complete and waits (up to TIMEOUT) for the other to stop.

  Returns:
    (the survivor's exit code, its stderr, seconds from the kill to its
    exit, the newest complete checkpoint step).
  """
  workdir = Path(base) / "w"
  port = free_port()
  procs, logs = start_processes([cli(lost_host_args(workdir))] * 2,
                                [env(process=i, port=port) for i in range(2)],
                                base)
  survivor = procs[1 - victim]
  try:
    wait_for(workdir / "checkpoints" / "2" / "commit_success.txt", procs)
    killed_at = time.monotonic()
    procs[victim].kill()
    code = survivor.wait(timeout=TIMEOUT)
    seconds = time.monotonic() - killed_at
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  complete = sorted(
      int(p.name)
      for p in (workdir / "checkpoints").iterdir()
      if p.name.isdigit() and (p / "commit_success.txt").exists())
  return code, logs[1 - victim].read_text(), seconds, complete[-1]


def cli(args: list[str]) -> list[str]:
  return [sys.executable, "-m", "ddpm_jax.main", f"--config={TINY}", *args]


def _agree(process_id: int, port: int, workdir: str, broken: int,
           out: str) -> None:
  from ddpm_jax.engine import checkpoint, inference, train  # pylint: disable=g-import-not-at-top
  from ddpm_jax.engine import config as config_lib
  from ddpm_jax.infra import parallel
  assert parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
  if process_id == 1:
    check = checkpoint.CheckpointManager._check_complete  # pylint: disable=protected-access

    def broken_here(self, step):
      if step == broken:
        raise checkpoint._Unusable("unreadable from this host")  # pylint: disable=protected-access
      return check(self, step)

    checkpoint.CheckpointManager._check_complete = broken_here  # pylint: disable=protected-access
  config = config_lib.load_config(TINY)
  loaded = inference.load_trained(config, workdir).step
  state = train.train_and_evaluate(config, workdir)
  with open(out, "w") as f:
    json.dump({
        "loaded": loaded,
        "final": int(parallel.host_value(state.step))
    }, f)


if __name__ == "__main__":
  if sys.argv[1] != "agree":
    raise SystemExit(f"unknown mode {sys.argv[1]}")
  _agree(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
         sys.argv[6])
