"""The training loop: `train_and_evaluate(config, workdir)`.

`train_and_evaluate` builds the run once (`builders.build_run`) and hands it
to `train`, which restores or initialises the train state, then feeds
batches to the jitted train step (`ddpm_jax.engine.train_step`) and runs its
periodic actions, each a small piece of its own:

* `summary.MetricLog`: log line, TensorBoard scalars and progress bar;
* `_NonFiniteGuard`: stops after too many skipped (non-finite) steps;
* `_StopRequest`: SIGTERM (preemption) or the wall-clock budget;
* `summary.Profile`: a `jax.profiler` trace of chosen steps;
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
  >>> state = train(builders.build_run(config), workdir)  # the same
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax.engine import (
    builders,
    checkpoint,
    generation,
    inference,
    summary,
    train_step,
)
from ddpm_jax.infra import parallel, storage
from ddpm_jax.typing import PyTree


class NonFiniteError(RuntimeError):
  """Training stopped after too many consecutive non-finite steps."""


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


class _Feed:
  """This host's batches of the input pipeline, checked and assembled into
  global arrays over the mesh. With `data_grid_in`, the first batch is also
  drawn once as `<workdir>/samples/data.png` (a fresh run shows its data)."""

  def __init__(self, ds, *, host_shape: tuple[int, ...], mesh: Mesh,
               num_classes: int, data_grid_in: Optional[epath.Path]):
    self._ds, self._host_shape, self._mesh = ds, host_shape, mesh
    self._num_classes, self._data_grid_in = num_classes, data_grid_in

  def next(self) -> dict[str, jax.Array]:
    batch = next(self._ds)
    images = np.asarray(batch["image"], np.float32)
    _check_batch(images, self._host_shape)
    if self._data_grid_in is not None:
      generation.save_data_grid(images, self._data_grid_in)
      self._data_grid_in = None
    arrays = {"image": parallel.global_batch(images, self._mesh)}
    if self._num_classes:
      arrays["label"] = parallel.global_batch(
          np.asarray(batch["label"], np.int32), self._mesh)
    return arrays


class _Keys(NamedTuple):
  """Three independent streams of PRNGKey(seed), replicated on the mesh."""
  init: jax.Array  # the parameters.
  train: jax.Array  # the train steps (`fold_in` of the step inside).
  sample: jax.Array  # the sample grids (`fold_in` of the step).


def _split_seed(seed: int, mesh: Mesh) -> _Keys:
  """Made on the mesh by jit: identical and replicated on every process."""
  replicated = parallel.replicated(mesh)
  return _Keys(
      *jax.jit(lambda: tuple(jax.random.split(jax.random.PRNGKey(seed), 3)),
               out_shardings=(replicated,) * 3)())


class _Start(NamedTuple):
  """Where the loop starts."""
  state: train_step.TrainState  # replicated over the mesh.
  rng: jax.Array  # the train stream.
  last_saved: Optional[int]  # the restored checkpoint's step; None: fresh.


def _restore_or_initialise(run: builders.Run,
                           ckpt: checkpoint.CheckpointManager, ds, *,
                           keys: _Keys, mesh: Mesh,
                           abstract_state: PyTree) -> _Start:
  """The newest complete, verified checkpoint (broken newer ones are
  skipped with a warning; CheckpointError when none is usable), with the
  input pipeline's position; or a fresh state from `keys.init`."""
  if ckpt.latest_step() is None:
    return _Start(
        train_step.create_train_state(run.model, run.optimizer, keys.init,
                                      image_shape=run.image_shape, mesh=mesh,
                                      num_classes=run.num_classes), keys.train,
        None)
  last_saved, state, rng, data_state = ckpt.restore_newest_valid(
      abstract_state,
      jax.ShapeDtypeStruct(keys.train.shape, keys.train.dtype,
                           sharding=parallel.replicated(mesh)))
  if data_state is not None and hasattr(ds, "set_state"):
    ds.set_state(data_state)
  else:
    logging.warning(
        "Checkpoint %d has no input-pipeline position for "
        "this process; the data restarts from the "
        "beginning.", last_saved)
  if jax.process_index() == 0:
    logging.info("Resumed from checkpoint step %d in %s.", last_saved,
                 ckpt.directory)
  return _Start(state, rng, last_saved)


class _PeriodicActions:
  """What the loop does around each step: the profiler trace, the log line
  and progress bar, the non-finite guard, the stop checks, checkpoints and
  sample grids. A context manager: it installs the SIGTERM handler and
  closes the log and a running trace on exit."""

  def __init__(self, run: builders.Run, *, workdir: epath.Path,
               ckpt: checkpoint.CheckpointManager, ds, mesh: Mesh,
               sample_key: jax.Array, start: _Start, start_time: float):
    loop, is_chief = run.loop, jax.process_index() == 0
    self._run, self._loop, self._workdir = run, loop, workdir
    self._ckpt, self._ds, self._mesh = ckpt, ds, mesh
    self._sample_key = sample_key
    self._stack = contextlib.ExitStack()
    self._log = summary.MetricLog(
        workdir=workdir, num_steps=loop.num_steps,
        start_step=int(parallel.host_value(start.state.step)),
        global_batch=loop.batch_size, log_every=loop.log_every,
        is_chief=is_chief)
    self._guard = _NonFiniteGuard(loop.max_nonfinite_steps, ckpt.directory,
                                  start.last_saved)
    self._stop = _StopRequest(max_time=loop.max_time, start=start_time)
    self._profile = summary.Profile(first=loop.profile_start,
                                    count=loop.profile_steps, workdir=workdir,
                                    enabled=is_chief)
    self._metrics = None  # Of the step in flight.

  def __enter__(self) -> _PeriodicActions:
    self._stack.callback(self._log.close)
    self._stack.enter_context(self._stop)
    self._stack.callback(self._profile.close)
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def before(self, step: int) -> None:
    """Called before step `step` runs."""
    self._profile.before(step)

  def after(self, step: int, state: train_step.TrainState, rng: jax.Array,
            metrics: dict[str, jax.Array]) -> bool:
    """Runs the actions due after step `step`; returns whether to stop."""
    loop, log, stop = self._loop, self._log, self._stop
    self._profile.after(step, state)
    log.step_done(step, stop.seconds_left())
    self._guard.check(step - 1, self._metrics)  # One step stays in flight.
    self._metrics = metrics
    if log.due(step):
      log.write(step, metrics, stop.seconds_left())
    # Several hosts agree at log steps only (a collective); one checks
    # every step.
    stopping = (stop.check()
                if jax.process_count() == 1 or log.due(step) else False)
    final = step == loop.num_steps or stopping
    if step % loop.checkpoint_every == 0 or final:
      self._save(step, state, rng, metrics)
    if loop.sample_every and not stop.sigterm and (final or step %
                                                   loop.sample_every == 0):
      self._sample_grid(step, state, gif=final and self._run.sampling.gif)
    if stopping and jax.process_index() == 0:
      why = ("SIGTERM" if stop.sigterm else
             f"time budget of {summary.format_seconds(loop.max_time)} "
             "used up")
      logging.warning("%s: saved checkpoint at step %d in %s; stopping.", why,
                      step, self._ckpt.directory)
    return stopping

  def finish(self, step: int) -> None:
    """Called once the loop ends, at step `step`."""
    self._guard.check(step, self._metrics)

  def _save(self, step, state, rng, metrics) -> None:
    ds = self._ds
    self._ckpt.save(
        step, state, rng,
        data_state=ds.get_state() if hasattr(ds, "get_state") else None)
    self._guard.saved(step, metrics)

  def _sample_grid(self, step, state, *, gif: bool) -> None:
    generation.save_training_samples(
        inference.trained_from_run(self._run, state.ema_params, step=step,
                                   mesh=self._mesh), self._run.sampling,
        key=self._sample_key, workdir=self._workdir, gif=gif)


def _log_start(run: builders.Run, step: int, abstract_state: PyTree) -> None:
  if jax.process_index() == 0:
    logging.info(
        "Training %d steps from step %d: global batch %d over %d "
        "devices (%d processes), %d parameters.", run.loop.num_steps, step,
        run.loop.batch_size, jax.device_count(), jax.process_count(),
        sum(x.size for x in jax.tree.leaves(abstract_state.params)))


def _run_steps(start: _Start, *, step_fn: Callable, feed: _Feed, num_steps: int,
               actions: _PeriodicActions) -> train_step.TrainState:
  """Train steps from `start` until `num_steps` or a stop request; returns
  the state."""
  state, rng = start.state, start.rng
  step = int(parallel.host_value(state.step))
  while step < num_steps:
    arrays = feed.next()
    actions.before(step + 1)
    state, metrics = step_fn(state, arrays, rng)
    step += 1
    if actions.after(step, state, rng, metrics):
      break
  actions.finish(step)
  return state


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
  `config.validate_config` (the command line does). It is read once, by
  `builders.build_run`; `train` runs the built run.

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
  return train(
      builders.build_run(config, model=model, dataset_factory=dataset_factory),
      workdir)


def train(run: builders.Run,
          workdir: str | epath.PathLike) -> train_step.TrainState:
  """Trains a built run (see `train_and_evaluate`): restore or initialise,
  then the loop with its periodic actions.

  Args:
    run: the run (`builders.build_run`).
    workdir: directory for checkpoints, TensorBoard events and samples.

  Returns:
    The final `TrainState` (replicated over the mesh).

  Example:
    >>> state = train(builders.build_run(config), "/tmp/run")
  """
  start_time, loop = time.time(), run.loop
  process_count = jax.process_count()
  host_shape = (loop.batch_size // process_count,) + run.image_shape
  workdir = storage.as_path(workdir)
  # The data first: a bad source fails before anything starts threads.
  ds = run.dataset(batch_size=host_shape[0], process_index=jax.process_index(),
                   process_count=process_count)
  mesh = parallel.create_mesh(fsdp=run.fsdp)
  keys = _split_seed(run.seed, mesh)
  abstract_state = train_step.abstract_train_state(run.model, run.optimizer,
                                                   image_shape=run.image_shape,
                                                   mesh=mesh,
                                                   num_classes=run.num_classes)
  with checkpoint.CheckpointManager(workdir / "checkpoints",
                                    max_to_keep=loop.keep_checkpoints) as ckpt:
    start = _restore_or_initialise(run, ckpt, ds, keys=keys, mesh=mesh,
                                   abstract_state=abstract_state)
    _log_start(run, int(parallel.host_value(start.state.step)), abstract_state)
    step_fn = train_step.jit_train_step(run.train_step, mesh, abstract_state)
    # A fresh run shows its real data once, drawn as the sample grids are.
    show_data = (jax.process_index() == 0 and start.last_saved is None and
                 bool(loop.sample_every))
    feed = _Feed(ds, host_shape=host_shape, mesh=mesh,
                 num_classes=run.num_classes,
                 data_grid_in=workdir if show_data else None)
    with _PeriodicActions(run, workdir=workdir, ckpt=ckpt, ds=ds, mesh=mesh,
                          sample_key=keys.sample, start=start,
                          start_time=start_time) as actions:
      return _run_steps(start, step_fn=step_fn, feed=feed,
                        num_steps=loop.num_steps, actions=actions)
