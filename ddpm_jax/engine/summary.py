"""What a training run writes besides checkpoints: the log line, TensorBoard
scalars (local or gs:// workdirs) and `jax.profiler` traces.

* `MetricLog`: every `log_every` steps a log line with images/s and ETA,
  TensorBoard scalars (process 0) and a progress bar on a terminal;
* `Profile`: a trace of chosen train steps in `<workdir>/profile`;
* `summary_writer`: a tensorboardX writer for any `storage` path.

Example:
  >>> log = MetricLog(workdir=workdir, num_steps=100, start_step=0,
  ...                 global_batch=64, log_every=10, is_chief=True)
  >>> log.step_done(1, math.inf)
  >>> if log.due(step):
  ...   log.write(step, metrics, math.inf)
  >>> log.close()
"""

from __future__ import annotations

import io
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import jax
import tqdm
from absl import logging
from etils import epath

from ddpm_jax.infra import parallel, storage


def format_seconds(seconds: float) -> str:
  """`seconds` as H:MM:SS; '?' when not finite."""
  if not math.isfinite(seconds):
    return "?"
  hours, rest = divmod(int(seconds), 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class _EventFile:
  """A tensorboardX event file at an epath path (gs://). Cloud Storage
  objects cannot be appended to, so every flush rewrites the whole file;
  the file holds a few scalars per log step."""

  def __init__(self, path: str):
    self._path = storage.as_path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """tensorboardX's writer factory for gs:// logdirs, through epath (in
  place of its own google-cloud-storage writer)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    storage.as_path(path).mkdir(parents=True, exist_ok=True)


def summary_writer(workdir: epath.Path):
  """A tensorboardX SummaryWriter for `workdir`, or None without
  tensorboardX."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("tensorboardX is not installed: no TensorBoard scalars.")
    return None
  for prefix in storage.REMOTE_PREFIXES:
    record_writer.register_writer_factory(prefix.split(":")[0], _EventFiles())
  return tensorboardX.SummaryWriter(os.fspath(workdir))


class Profile:
  """A `jax.profiler` trace of train steps `first`, ..., `first + count - 1`
  (numbered from 1, as in the log) on process 0.

  The trace is written to a local temporary directory and copied to
  `<workdir>/profile` (so a gs:// workdir works too): TensorBoard's profile
  tab reads `plugins/profile/<run>/*.xplane.pb`, ui.perfetto.dev opens
  `perfetto_trace.json.gz`. A run resumed after `first` traces nothing.
  """

  def __init__(self, *, first: int, count: int, workdir: epath.Path,
               enabled: bool):
    self._first, self._last = first, first + count - 1
    self._target = workdir / "profile"
    self._enabled = enabled and first > 0
    self._local: Optional[str] = None

  def before(self, step: int) -> None:
    """Called before step `step` runs."""
    if self._enabled and step == self._first:
      self._local = tempfile.mkdtemp(prefix="ddpm_jax_profile_")
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)

  def after(self, step: int, state) -> None:
    """Called after step `step` was dispatched, with its output state."""
    if self._local is not None and step >= self._last:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Ends a running trace and copies it to the workdir."""
    if self._local is None:
      return
    local, self._local = self._local, None
    jax.profiler.stop_trace()
    for root, _, files in os.walk(local):
      for name in files:
        source = os.path.join(root, name)
        target = self._target / os.path.relpath(source, local)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as f:
          target.write_bytes(f.read())
    shutil.rmtree(local)
    logging.info(
        "Wrote a profiler trace of steps %d-%d to %s (TensorBoard: "
        "--logdir %s, profile tab; Perfetto: "
        "perfetto_trace.json.gz).", self._first, self._last, self._target,
        self._target)


class MetricLog:
  """Every `log_every` steps: a log line with images/s and ETA, TensorBoard
  scalars (process 0), and a progress bar on a terminal."""

  def __init__(self, *, workdir: epath.Path, num_steps: int, start_step: int,
               global_batch: int, log_every: int, is_chief: bool):
    self._num_steps, self._global_batch = num_steps, global_batch
    self._log_every, self._is_chief = log_every, is_chief
    self._timer_step, self._timer_start = start_step, None
    self._writer = summary_writer(workdir) if is_chief else None
    # A progress bar only for a person watching a terminal.
    self._progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step",
                               dynamic_ncols=True,
                               disable=not (is_chief and sys.stderr.isatty()))

  def due(self, step: int) -> bool:
    return step % self._log_every == 0 or step == self._num_steps

  def step_done(self, step: int, seconds_left: float) -> None:
    self._progress.update(1)
    if math.isfinite(seconds_left):
      self._progress.set_postfix_str(
          f"time budget left {format_seconds(max(seconds_left, 0))}",
          refresh=False)
    if self._timer_start is None:  # Excludes the first step's compilation.
      self._timer_step, self._timer_start = step, time.time()

  def write(self, step: int, metrics: dict[str, jax.Array],
            seconds_left: float) -> None:
    host = {k: float(parallel.host_value(v)) for k, v in metrics.items()}
    elapsed = time.time() - self._timer_start
    steps_per_sec = (step - self._timer_step) / elapsed if elapsed > 0 else 0.
    host["images_per_sec"] = steps_per_sec * self._global_batch
    if not self._is_chief:
      return
    eta = ((self._num_steps - step) /
           steps_per_sec if steps_per_sec > 0 else math.inf)
    budget = ""
    if seconds_left < eta:
      eta, budget = max(seconds_left, 0.0), " (time budget)"
    logging.info(
        "step %d/%d: loss %.5f, grad_norm %.4f, lr %.3g, %.1f images/s, "
        "ETA %s%s%s", step, self._num_steps, host["loss"], host["grad_norm"],
        host["lr"], host["images_per_sec"], format_seconds(eta), budget,
        f", {int(host['nonfinite_count'])} non-finite steps in a row"
        if host["nonfinite_count"] else "")
    if self._writer is not None:
      for name, value in host.items():
        self._writer.add_scalar(f"train/{name}", value, step)
      self._writer.flush()

  def close(self) -> None:
    self._progress.close()
    if self._writer is not None:
      self._writer.close()
