"""Orbax checkpoints of a training run: train state, rng and data position.

A thin wrapper over `orbax.checkpoint.CheckpointManager`. One checkpoint is a
step directory holding two items:

* `state`: `{'train_state': TrainState, 'rng': uint32 [2]}` as an Orbax
  standard pytree (written collectively by all processes; each array is
  restored with the sharding of the abstract target, i.e. onto the current
  mesh, whatever mesh wrote it);
* `data`: JSON `{'process_count': P, 'states': [state of process 0, ...]}`,
  the input pipeline position of every host (gathered to process 0, which
  writes the file), so each host resumes its own shard exactly.

Saves are asynchronous: `save` returns once the arrays are copied off the
devices and the files are written in the background; call
`wait_until_finished` (or `close`) before reading them.

Example:
  >>> ckpt = CheckpointManager(workdir + "/checkpoints", max_to_keep=3)
  >>> ckpt.save(step, state, rng, data_state=ds.get_state())
  >>> state, rng, data_state = ckpt.restore(abstract_state, abstract_rng)
  >>> ckpt.close()
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any


def abstract_like(tree: PyTree, shardings: Optional[PyTree] = None) -> PyTree:
  """`jax.ShapeDtypeStruct`s of `tree` with `shardings` (default: its own).

  Args:
    tree: arrays or `ShapeDtypeStruct`s.
    shardings: a matching tree of `jax.sharding.Sharding`s (or a single one
      for every leaf); None keeps each leaf's `.sharding`.

  Returns:
    The restore target for `CheckpointManager.restore`.
  """
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        tree)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)


def _json_default(obj):
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  raise TypeError(f"Cannot store {type(obj).__name__} in the data-pipeline "
                  "state of a checkpoint; use JSON types.")


def _gather_data_states(data_state: Any) -> list[Any]:
  """Every process's JSON-able `data_state`, in process order."""
  encoded = json.dumps(data_state, default=_json_default).encode("utf-8")
  if jax.process_count() == 1:
    return [json.loads(encoded)]
  lengths = multihost_utils.process_allgather(np.array([len(encoded)],
                                                       np.int32))
  lengths = np.asarray(lengths).reshape(-1)
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode("utf-8"))
          for row, n in zip(gathered, lengths)]


class CheckpointManager:
  """Saves and restores (train state, rng, data position) every few steps.

  Attributes:
    directory: where the step directories live.
  """

  def __init__(self, directory: str | epath.PathLike, *,
               max_to_keep: Optional[int] = None, async_save: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: checkpoint directory, e.g. `<workdir>/checkpoints`.
      max_to_keep: keep the latest K checkpoints (None or 0: keep all).
      async_save: write in a background thread.
    """
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    """The newest finished checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, rng: jax.Array, *,
           data_state: Any = None) -> bool:
    """Starts writing a checkpoint for `step`; called by every process.

    Args:
      step: the training step (the directory name).
      state: the train state (any pytree of jax Arrays).
      rng: the run's base PRNG key (raw uint32 key data), replicated.
      data_state: this process's input-pipeline state (JSON types), or None.

    Returns:
      True if a save was started.
    """
    states = _gather_data_states(data_state)
    data = {"process_count": jax.process_count(), "states": states}
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"train_state": state, "rng": rng}),
            data=ocp.args.JsonSave(data)),
        force=True)

  def restore(self, abstract_state: PyTree, abstract_rng: jax.ShapeDtypeStruct,
              *, step: Optional[int] = None) -> tuple[PyTree, jax.Array, Any]:
    """Restores a checkpoint onto the shardings of the abstract targets.

    Args:
      abstract_state: the train state's structure as `jax.ShapeDtypeStruct`s
        with `sharding` set (see `abstract_like`).
      abstract_rng: the rng's `jax.ShapeDtypeStruct` with sharding.
      step: which checkpoint; None for the latest.

    Returns:
      (state, rng, data_state): the data state of this process, or None when
      the checkpoint has none or was written by a different number of
      processes.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"train_state": abstract_state,
                                            "rng": abstract_rng}),
            data=ocp.args.JsonRestore()))
    data = restored["data"] or {}
    data_state = None
    states = data.get("states") or []
    if data.get("process_count") == jax.process_count() and states:
      data_state = states[jax.process_index()]
    return (restored["state"]["train_state"], restored["state"]["rng"],
            data_state)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous writes are done."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
