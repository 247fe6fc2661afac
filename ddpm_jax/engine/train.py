"""The training loop: `train_and_evaluate(config, workdir)`.

The loop feeds batches to the jitted `train_step` (`ddpm_jax.engine.train_step`)
and runs its periodic actions, each a small piece of its own:

* `_MetricLog`: log line, TensorBoard scalars and progress bar;
* `_NonFiniteGuard`: stops after too many skipped (non-finite) steps;
* `_StopRequest`: SIGTERM (preemption) or the wall-clock budget;
* `_Profile`: a `jax.profiler` trace of chosen steps;
* checkpoints (`ddpm_jax.engine.checkpoint`) and sample grids
  (`ddpm_jax.engine.generation`), with one grid of real data at the start of a
  fresh run (`samples/data.png`).

The workdir may be local or gs:// (`ddpm_jax.infra.storage`).

Multi-host: call `parallel.initialize_distributed()` first (the command line
does). Each host reads batch_size / process_count examples of its own shard,
assembled into the global batch over the 'data' mesh; only process 0 logs
and writes TensorBoard scalars and images; checkpoints are written by all
processes together.

Example:
  >>> parallel.initialize_distributed()
  >>> state = train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath

from ddpm_jax.engine import builders, checkpoint, generation, train_step
from ddpm_jax.engine.inference import Trained
from ddpm_jax.infra import parallel, storage

PyTree = Any


class NonFiniteError(RuntimeError):
  """Training stopped after too many consecutive non-finite steps."""


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  hours, rest = divmod(int(seconds), 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class _StopRequest:
  """SIGTERM (a preemption) or the end of the wall-clock budget.

  The SIGTERM handler is installed on the main thread only and restored on
  exit. `check` agrees over all processes (a collective on several hosts, so
  every process calls it at the same steps).
  """

  def __init__(self, *, max_time: float, start: float):
    self.sigterm = False
    self.out_of_time = False
    self._deadline = start + max_time if max_time > 0 else math.inf
    self._previous = None

  def __enter__(self) -> _StopRequest:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.sigterm = True

  def seconds_left(self) -> float:
    return self._deadline - time.time()

  def check(self) -> bool:
    """Whether to stop now (both reasons are kept for the log)."""
    self.sigterm = parallel.any_process(self.sigterm)
    self.out_of_time = parallel.any_process(self.seconds_left() <= 0)
    return self.sigterm or self.out_of_time


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


def _summary_writer(workdir: epath.Path):
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


class _Profile:
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


class _MetricLog:
  """Every `log_every` steps: a log line with images/s and ETA, TensorBoard
  scalars (process 0), and a progress bar on a terminal."""

  def __init__(self, *, workdir: epath.Path, num_steps: int, start_step: int,
               global_batch: int, log_every: int, is_chief: bool):
    self._num_steps, self._global_batch = num_steps, global_batch
    self._log_every, self._is_chief = log_every, is_chief
    self._timer_step, self._timer_start = start_step, None
    self._writer = _summary_writer(workdir) if is_chief else None
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
          f"time budget left {_format_seconds(max(seconds_left, 0))}",
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
        host["lr"], host["images_per_sec"], _format_seconds(eta), budget,
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


class _NonFiniteGuard:
  """Raises `NonFiniteError` after `max_steps` skipped steps in a row,
  naming the last checkpoint written before them."""

  def __init__(self, max_steps: int, directory: epath.Path,
               last_saved: Optional[int]):
    self._max_steps, self._directory = max_steps, directory
    self.last_saved = last_saved

  def saved(self, step: int, metrics: Optional[dict[str, jax.Array]]) -> None:
    if metrics is None or self._count(metrics) == 0:
      self.last_saved = step

  @staticmethod
  def _count(metrics) -> int:
    return int(parallel.host_value(metrics["nonfinite_count"]))

  def check(self, step: int, metrics: Optional[dict[str, jax.Array]]) -> None:
    if self._max_steps <= 0 or metrics is None:
      return
    count = self._count(metrics)
    if count >= self._max_steps:
      raise NonFiniteError(
          f"Stopping at step {step}: the loss or gradient norm was "
          f"non-finite for {count} steps in a row (train.max_nonfinite_steps"
          f" = {self._max_steps}); those updates were skipped. Last good "
          "checkpoint: " +
          (f"step {self.last_saved} in {self._directory}." if self.last_saved
           is not None else "none (no checkpoint was written before)."))


def _check_batch(images: np.ndarray, expected: tuple[int, ...]) -> None:
  if images.shape != expected:
    raise ValueError(f"The input pipeline gave images of shape "
                     f"{images.shape}; expected {expected}.")


def train_and_evaluate(
    config, workdir: str | epath.PathLike, *, model: Optional[nn.Module] = None,
    dataset_factory: Optional[Callable[...,
                                       Any]] = None) -> train_step.TrainState:
  """Trains (resuming from `workdir` when it holds a checkpoint).

  Checkpoints go to `<workdir>/checkpoints` every `train.checkpoint_every`
  steps, at the end, on SIGTERM and when `train.max_time` runs out (then
  the function returns early; on SIGTERM without sample grids, the grace
  period being for the checkpoint); TensorBoard scalars to `workdir`
  (process 0). The config is used as given: check it first with
  `config.validate_config` (the command line does).

  Args:
    config: the run config (seed, data, model, diffusion, optimizer, train,
      sample).
    workdir: directory for checkpoints, TensorBoard events and samples.
    model: the network; default `builders.build_model(config)`.
    dataset_factory: `f(config, *, batch_size, process_index, process_count)`
      returning this host's iterator of {'image': [b, H, W, C]} batches
      (and 'label' [b] in [0, data.num_classes) for a class-conditional run)
      with `get_state()` / `set_state()`; default `builders.build_dataset`.

  Returns:
    The final `TrainState` (replicated over the mesh, or sharded along
    'fsdp' with `train.fsdp` > 1).

  Raises:
    NonFiniteError: `train.max_nonfinite_steps` non-finite steps in a row.
    checkpoint.CheckpointError: the workdir holds checkpoints but none is
      usable (broken newer ones are skipped in favour of older ones).
  """
  start_time = time.time()
  tcfg = config.train
  num_steps, global_batch = int(tcfg.num_steps), int(tcfg.batch_size)
  process_count, process_index = jax.process_count(), jax.process_index()
  is_chief = process_index == 0
  image_shape = builders.image_shape(config)
  host_shape = (global_batch // process_count,) + image_shape
  workdir = storage.as_path(workdir)

  # The data first: a bad source fails before anything starts threads.
  ds = (dataset_factory or
        builders.build_dataset)(config, batch_size=host_shape[0],
                                process_index=process_index,
                                process_count=process_count)
  mesh = builders.build_mesh(config)
  replicated = parallel.replicated(mesh)
  model = builders.build_model(config) if model is None else model
  tx = builders.build_optimizer(config)
  schedule = builders.build_schedule(config)
  # Made on the mesh by jit: identical and replicated on every process.
  # Three independent streams: parameters, train steps, sample grids.
  init_rng, train_rng, sample_rng = jax.jit(
      lambda: tuple(jax.random.split(jax.random.PRNGKey(config.seed), 3)),
      out_shardings=(replicated,) * 3)()
  num_classes = int(config.data.num_classes)
  abstract_state = train_step.abstract_train_state(model, tx,
                                                   image_shape=image_shape,
                                                   mesh=mesh,
                                                   num_classes=num_classes)

  with contextlib.ExitStack() as stack:
    ckpt = stack.enter_context(
        checkpoint.CheckpointManager(workdir / "checkpoints",
                                     max_to_keep=int(tcfg.keep_checkpoints)))
    if ckpt.latest_step() is None:
      state = train_step.create_train_state(model, tx, init_rng,
                                            image_shape=image_shape, mesh=mesh,
                                            num_classes=num_classes)
      rng, last_saved = train_rng, None
    else:
      # The newest complete, verified checkpoint; broken newer ones are
      # skipped with a warning (CheckpointError when none is usable).
      last_saved, state, rng, data_state = ckpt.restore_newest_valid(
          abstract_state,
          jax.ShapeDtypeStruct(train_rng.shape, train_rng.dtype,
                               sharding=replicated))
      if data_state is not None and hasattr(ds, "set_state"):
        ds.set_state(data_state)
      else:
        logging.warning(
            "Checkpoint %d has no input-pipeline position for "
            "this process; the data restarts from the "
            "beginning.", last_saved)
      if is_chief:
        logging.info("Resumed from checkpoint step %d in %s.", last_saved,
                     ckpt.directory)
    step = int(parallel.host_value(state.step))
    if is_chief:
      logging.info(
          "Training %d steps from step %d: global batch %d over %d "
          "devices (%d processes), %d parameters.", num_steps, step,
          global_batch, jax.device_count(), process_count,
          sum(x.size for x in jax.tree.leaves(abstract_state.params)))

    step_fn = train_step.jit_train_step(
        builders.build_train_step(config, model, tx, schedule=schedule), mesh,
        abstract_state)
    log = _MetricLog(workdir=workdir, num_steps=num_steps, start_step=step,
                     global_batch=global_batch, log_every=int(tcfg.log_every),
                     is_chief=is_chief)
    stack.callback(log.close)
    guard = _NonFiniteGuard(int(tcfg.max_nonfinite_steps), ckpt.directory,
                            last_saved)
    stop = stack.enter_context(
        _StopRequest(max_time=float(tcfg.max_time), start=start_time))
    profile = _Profile(first=int(tcfg.profile_start),
                       count=int(tcfg.profile_steps), workdir=workdir,
                       enabled=is_chief)
    stack.callback(profile.close)
    sample_every, ckpt_every = int(tcfg.sample_every), int(
        tcfg.checkpoint_every)

    def save(at_step, metrics):
      ckpt.save(at_step, state, rng,
                data_state=ds.get_state() if hasattr(ds, "get_state") else None)
      guard.saved(at_step, metrics)

    def sample_grid(at_step, *, gif):
      generation.save_training_samples(
          Trained(model=model, params=state.ema_params, schedule=schedule,
                  step=at_step, mesh=mesh, num_classes=num_classes), config,
          key=sample_rng, workdir=workdir, gif=gif)

    metrics = prev_metrics = None
    # A fresh run shows its real data once, drawn as the sample grids are.
    show_data = is_chief and last_saved is None and bool(sample_every)
    while step < num_steps:
      batch = next(ds)
      images = np.asarray(batch["image"], np.float32)
      _check_batch(images, host_shape)
      if show_data:
        show_data = False
        generation.save_data_grid(images, workdir)
      arrays = {"image": parallel.global_batch(images, mesh)}
      if num_classes:
        arrays["label"] = parallel.global_batch(
            np.asarray(batch["label"], np.int32), mesh)
      profile.before(step + 1)
      state, metrics = step_fn(state, arrays, rng)
      step += 1
      profile.after(step, state)
      log.step_done(step, stop.seconds_left())
      guard.check(step - 1, prev_metrics)  # One step stays in flight.
      prev_metrics = metrics
      if log.due(step):
        log.write(step, metrics, stop.seconds_left())
      # Several hosts agree at log steps only (a collective); one checks
      # every step.
      stopping = (stop.check()
                  if process_count == 1 or log.due(step) else False)
      final = step == num_steps or stopping
      if step % ckpt_every == 0 or final:
        save(step, metrics)
      if sample_every and not stop.sigterm and (final or
                                                step % sample_every == 0):
        sample_grid(step, gif=final and bool(config.sample.gif))
      if stopping:
        if is_chief:
          why = ("SIGTERM" if stop.sigterm else
                 f"time budget of {_format_seconds(float(tcfg.max_time))} "
                 "used up")
          logging.warning("%s: saved checkpoint at step %d in %s; stopping.",
                          why, step, ckpt.directory)
        break
    guard.check(step, metrics)
  return state
