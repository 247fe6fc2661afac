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

Integrity. Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>`,
writes `commit_success.txt` into it and renames it to `<step>` last, so a
write that was killed leaves only a tmp directory. On top of that the `data`
item stores a checksum of every array (a position-weighted sum of its bits,
computed on the devices), so a truncated, missing or altered file that Orbax
itself would read without complaint is caught. `restore` walks the steps
newest first and skips (with a warning naming the path) any step directory
that lacks its commit marker or an item, fails to restore, or does not match
its checksums; once an older step restores, the broken newer ones are moved
to `<directory>/corrupt/<step>-<unix time>` (kept for inspection, never
deleted), so training can write those step numbers again. Interrupted tmp
directories are reported and removed when a manager opens for writing. When
no step is usable, `CheckpointError` lists each one and why; nothing is
moved and nothing starts from scratch. Before any array is read, the stored
shapes of the EMA parameters are compared with the target's: checkpoints of
another network raise `CheckpointMismatch`, naming the arrays that differ.

A write that fails (a full disk, an I/O error; with asynchronous saves it
surfaces at the next `save`, `wait_until_finished` or `close`) raises
`CheckpointWriteError` naming the step and the last complete checkpoint; the
unfinished step directory is removed (should a write still in flight leave
a tmp directory, the next writable manager removes it), so a restart
resumes from that one.

Example:
  >>> ckpt = CheckpointManager(workdir + "/checkpoints", max_to_keep=3)
  >>> ckpt.save(step, state, rng, data_state=ds.get_state())
  >>> step, state, rng, data_state = ckpt.restore_newest_valid(
  ...     abstract_state, abstract_rng)
  >>> ckpt.close()
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax import lax
from jax.experimental import multihost_utils

from ddpm_jax.infra import parallel, storage
from ddpm_jax.typing import PyTree

ITEMS = ("state", "data")
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it before the rename.
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_DIR = "corrupt"


class CheckpointError(RuntimeError):
  """No usable checkpoint (each broken one is named with its path and why),
  or a checkpoint that could not be written."""


class CheckpointMismatch(CheckpointError):
  """Every checkpoint holds another network than the restore target (e.g.
  another model size, or a class embedding the target lacks or needs)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint write failed (full disk, I/O error); the message names the
  last complete checkpoint, from which a restart resumes."""


class _Unusable(Exception):
  """One step directory is incomplete or corrupt (the message says why)."""


class _Mismatch(_Unusable):
  """One step directory holds arrays of other names or shapes."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 sum over the array's bits weighted by (2 * index + 1), mod 2**32.

  Any single changed element changes it (the weights are odd, so invertible
  mod 2**32), and so does a swap of two elements; integer addition makes it
  exact whatever the sharding or reduction order.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {
        1: jnp.uint8,
        2: jnp.uint16,
        4: jnp.uint32,
        8: jnp.uint32
    }[x.dtype.itemsize]  # 8 bytes: two words each.
    bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _local(x):
  """A replicated array's copy on one local device (so a checksum is a
  computation of this process alone); other leaves as they are."""
  if isinstance(x, jax.Array) and x.is_fully_replicated:
    return x.addressable_data(0)
  return x


def checksums(tree: PyTree) -> dict[str, int]:
  """{'path': uint32 checksum} of every array of `tree` (computed on the
  devices; only the scalars come to the host). Replicated arrays are summed
  from this process's copy, so no other process takes part; arrays sharded
  over the mesh (FSDP) in one more jit over the mesh."""
  leaves, treedef = jax.tree_util.tree_flatten(jax.tree.map(_local, tree))
  sharded = {
      i for i, x in enumerate(leaves)
      if isinstance(x, jax.Array) and not x.is_fully_replicated
  }
  out = [None] * len(leaves)
  for group in (sorted(sharded),
                [i for i in range(len(leaves)) if i not in sharded]):
    if group:
      for i, v in zip(group, _checksums_jit([leaves[i] for i in group])):
        out[i] = v
  sums = jax.tree_util.tree_unflatten(treedef, out)
  return {
      jax.tree_util.keystr(path):
          int(
              np.asarray(
                  v.addressable_data(0) if isinstance(v, jax.Array) else v))
      for path, v in jax.tree_util.tree_leaves_with_path(sums)
  }


def _quiet_abandoned_io() -> None:
  """After one array fails to read or write, Orbax abandons the others:
  their coroutines, garbage-collected later, would print the same
  TensorStore error as an 'Exception ignored' traceback, and TensorStore's
  callbacks into Orbax's closed event loop one 'Event loop is closed'
  traceback each. This logs those at debug level instead (other unraisable
  exceptions go to the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, "_ddpm_jax", False):
    return

  def hook(unraisable):
    message = str(unraisable.exc_value)
    if ("Encountered error while reading array" in message or
        (isinstance(unraisable.exc_value, RuntimeError) and
         message == "Event loop is closed")):
      logging.debug("Abandoned checkpoint read or write: %s",
                    _one_line(unraisable.exc_value))
    else:
      previous(unraisable)

  hook._ddpm_jax = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  text = text.split(" See full TensorStore details")[0]
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


_EMA_PREFIX = "['train_state']['ema_params']"


def _shape(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _stored_ema_shapes(state_dir: epath.Path) -> dict[str, tuple[int, ...]]:
  """{'path': shape} of the EMA parameters in a state item, from its
  metadata alone (no array is read)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(state_dir)
  finally:
    handler.close()
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(metadata):
    key = jax.tree_util.keystr(path)
    if key.startswith(_EMA_PREFIX) and getattr(leaf, "shape", None) is not None:
      shapes[key[len(_EMA_PREFIX):]] = tuple(leaf.shape)
  return shapes


def _network_mismatch(state_dir: epath.Path,
                      abstract_params: PyTree) -> Optional[str]:
  """Why the EMA parameters stored in `state_dir` are not those of
  `abstract_params` (names and shapes), or None when they agree."""
  try:
    stored = _stored_ema_shapes(state_dir)
  except Exception as e:  # pylint: disable=broad-except
    # As in `_read`: Orbax raises many types for unreadable files.
    raise _Unusable(f"cannot be read ({_one_line(e)})") from None
  if not stored:  # Nothing to compare with; the read decides.
    return None
  needed = {
      jax.tree_util.keystr(path): tuple(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(abstract_params)
  }
  missing = sorted(set(needed) - set(stored))
  extra = sorted(set(stored) - set(needed))
  differ = sorted(
      k for k in set(needed) & set(stored) if needed[k] != stored[k])
  parts = []
  if missing:
    parts.append(f"{len(missing)} parameter array(s) of this config's "
                 f"network are not in it, e.g. {missing[0]} "
                 f"{_shape(needed[missing[0]])}")
  if extra:
    parts.append(f"it has {len(extra)} the network lacks, e.g. {extra[0]} "
                 f"{_shape(stored[extra[0]])}")
  if differ:
    parts.append(f"{len(differ)} differ in shape, e.g. {differ[0]} "
                 f"{_shape(stored[differ[0]])} in the checkpoint, "
                 f"{_shape(needed[differ[0]])} here")
  return "; ".join(parts) or None


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
  return [
      json.loads(b.decode("utf-8")) for b in parallel.allgather_bytes(encoded)
  ]


class CheckpointManager:
  """Saves and restores (train state, rng, data position) every few steps.

  Attributes:
    directory: where the step directories live.
  """

  def __init__(self, directory: str | epath.PathLike, *,
               max_to_keep: Optional[int] = None, async_save: bool = True,
               writable: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: checkpoint directory, e.g. `<workdir>/checkpoints`.
      max_to_keep: keep the latest K checkpoints (None or 0: keep all).
      async_save: write in a background thread.
      writable: False to only read (sampling, evaluation, possibly while a
        trainer writes to the same directory): nothing is created, removed or
        moved aside.
    """
    self.directory = storage.as_path(directory)
    self._writable = writable
    self._writing: Optional[int] = None  # The step of the latest save.
    self._failed = False  # A write failed and was reported.
    _quiet_abandoned_io()
    if writable:
      for tmp in sorted(self.directory.glob(f"*{TMP_MARKER}*")):
        logging.warning(
            "Removing %s: an interrupted checkpoint write (never "
            "finalized, never used).", tmp)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, create=writable,
        read_only=not writable, cleanup_tmp_directories=writable,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=ITEMS)

  def step_path(self, step: int) -> epath.Path:
    """The directory of checkpoint `step`."""
    return self.directory / str(int(step))

  def latest_step(self) -> Optional[int]:
    """The newest finished checkpoint's step, or None when there is none
    (as `all_steps`, agreed by every process)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Steps of every kept checkpoint, ascending.

    With several processes (every one must call it) the steps any process
    sees, so that all of them consider the same steps.
    """
    steps = [int(s) for s in self._manager.all_steps()]
    return sorted({s for seen in parallel.allgather_json(steps) for s in seen})

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

    Raises:
      CheckpointWriteError: this write, or the previous asynchronous one,
        failed.
    """
    states = _gather_data_states(data_state)
    data = {
        "process_count": jax.process_count(),
        "states": states,
        "checksums": checksums({
            "train_state": state,
            "rng": rng
        })
    }
    self.wait_until_finished()  # The previous write's error surfaces here.
    self._writing = int(step)
    try:
      return self._manager.save(
          int(step), args=ocp.args.Composite(
              state=ocp.args.StandardSave({
                  "train_state": state,
                  "rng": rng
              }), data=ocp.args.JsonSave(data)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise OSError, ValueError (RESOURCE_EXHAUSTED,
      # ...) and others for a failed write.
      raise self._write_failed(e) from None

  def restore(self, abstract_state: PyTree, abstract_rng: jax.ShapeDtypeStruct,
              *, step: Optional[int] = None) -> tuple[PyTree, jax.Array, Any]:
    """Restores a verified checkpoint onto the shardings of the targets.

    Args:
      abstract_state: the train state's structure as `jax.ShapeDtypeStruct`s
        with `sharding` set (see `abstract_like`).
      abstract_rng: the rng's `jax.ShapeDtypeStruct` with sharding.
      step: which checkpoint; None for the newest usable one (see
        `restore_newest_valid`, which also returns the step).

    Returns:
      (state, rng, data_state): the data state of this process, or None when
      the checkpoint has none or was written by a different number of
      processes.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointError: `step` (or, for None, every step) is incomplete or
        corrupt.
    """
    if step is None:
      return self.restore_newest_valid(abstract_state, abstract_rng)[1:]
    try:
      return self._restore_verified(int(step), abstract_state, abstract_rng)
    except _Unusable as e:
      error = CheckpointMismatch if isinstance(e,
                                               _Mismatch) else CheckpointError
      raise error(f"Checkpoint {self.step_path(step)} is unusable: "
                  f"{e}") from None

  def restore_newest_valid(
      self, abstract_state: PyTree,
      abstract_rng: jax.ShapeDtypeStruct) -> tuple[int, PyTree, jax.Array, Any]:
    """Restores the newest complete, uncorrupted checkpoint.

    Steps are tried newest first; an incomplete or corrupt one is logged as a
    warning naming its path and skipped. When an older one restores, the
    skipped ones are moved to `<directory>/corrupt/` (writable managers).

    Returns:
      (step, state, rng, data_state), as `restore`.

    Raises:
      FileNotFoundError: no checkpoint in the directory.
      CheckpointError: checkpoints exist but none is usable; names each one,
        its path and the problem. Nothing is moved.
    """
    step, restored = self._newest_valid(
        lambda s: self._restore_verified(s, abstract_state, abstract_rng))
    return (step,) + restored

  def restore_params(self, abstract_params: PyTree, *,
                     step: Optional[int] = None,
                     ema: bool = True) -> tuple[int, PyTree]:
    """The EMA parameters of the newest usable checkpoint (or of `step`),
    nothing else; with `ema=False` the trained parameters instead.

    Only `train_state.ema_params` (or `train_state.params`) is read (and
    checked against its checksums), so no optimizer is needed to describe
    the target and the optimizer state never occupies memory. Without
    `step`, broken steps are skipped as in `restore_newest_valid`.

    Args:
      abstract_params: the parameters' `jax.ShapeDtypeStruct`s with
        shardings.
      step: a kept checkpoint's step; default the newest usable one.
      ema: read the EMA parameters (True) or the trained ones.

    Returns:
      (step, parameters).

    Raises:
      FileNotFoundError, CheckpointError: as `restore_newest_valid`;
        CheckpointError also when `step` is missing or broken.
    """
    if step is not None:
      try:
        return step, self._restore_params_verified(step, abstract_params,
                                                   ema=ema)
      except _Unusable as e:
        error = (CheckpointMismatch
                 if isinstance(e, _Mismatch) else CheckpointError)
        raise error(f"Checkpoint {self.step_path(step)} is unusable: "
                    f"{e}.") from None
    return self._newest_valid(
        lambda s: self._restore_params_verified(s, abstract_params, ema=ema))

  def _newest_valid(self, restore_step: Callable[[int],
                                                 Any]) -> tuple[int, Any]:
    """(step, restore_step(step)) for the newest step that restores."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    skipped, mismatched = [], []
    for step in steps:
      try:
        restored, why, other = restore_step(step), None, False
      except _Unusable as e:
        restored, why, other = None, str(e), isinstance(e, _Mismatch)
      # Every process must restore the same step: a step that any process
      # cannot use is skipped by all.
      verdicts = parallel.allgather_json([why, other])
      broken = [(i, v) for i, (v, _) in enumerate(verdicts) if v is not None]
      if broken:
        why = (broken[0][1] if len(verdicts) == 1 else "; ".join(
            f"process {i}: {v}" for i, v in broken))
        logging.warning("Checkpoint %s is unusable and is skipped: %s",
                        self.step_path(step), why)
        skipped.append((step, why))
        mismatched.append(any(o for _, o in verdicts))
        continue
      if skipped:
        logging.warning(
            "Restored checkpoint step %d from %s instead of the "
            "newer broken one(s).", step, self.step_path(step))
        self._move_aside([s for s, _ in skipped])
      return step, restored
    listing = "; ".join(f"{self.step_path(s)}: {why}" for s, why in skipped)
    if all(mismatched):
      names = ", ".join(str(s) for s, _ in skipped)
      raise CheckpointMismatch(
          f"The checkpoints in {self.directory} (step(s) {names}) hold "
          f"another network than this config builds: {skipped[0][1]} (step "
          f"{skipped[0][0]}). Nothing was loaded or changed; use the config "
          "they were trained with, or another workdir.")
    raise CheckpointError(
        f"No usable checkpoint in {self.directory} ({listing}). Nothing was "
        "loaded or changed; move these away (or use another workdir) to "
        "start from scratch.")

  def _check_complete(self, step: int) -> epath.Path:
    """The step's directory, or `_Unusable` if it is not a finished write."""
    path = self.step_path(step)
    if not path.is_dir():
      raise _Unusable("no such step directory")
    if not (path / COMMIT_MARKER).exists():
      raise _Unusable(f"incomplete: no {COMMIT_MARKER} (the write never "
                      "finished)")
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing:
      raise _Unusable(f"missing item(s): {', '.join(missing)}")
    return path

  @staticmethod
  def _check_network(path: epath.Path, abstract_params: PyTree) -> None:
    """`_Mismatch` when the step's EMA parameters are of another network."""
    why = _network_mismatch(path / "state", abstract_params)
    if why is not None:
      raise _Mismatch(f"another network: {why}")

  def _read(self, step: int, state_args: ocp.args.CheckpointArgs) -> dict:
    """Both items of `step`, or `_Unusable` when they cannot be read.

    Read with the items' handlers, not the manager: a manager's restore ends
    in a barrier of all processes, which a process that failed to read would
    never reach; here every process returns, and `_newest_valid` agrees.
    """
    path = self.step_path(step)
    handlers = {
        "state": (ocp.PyTreeCheckpointHandler() if isinstance(
            state_args, ocp.args.PyTreeRestore) else
                  ocp.StandardCheckpointHandler()),
        "data": ocp.JsonCheckpointHandler()
    }
    args = {"state": state_args, "data": ocp.args.JsonRestore()}
    _quiet_abandoned_io()
    try:
      restored = {
          item: handler.restore(path / item, args=args[item])
          for item, handler in handlers.items()
      }
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types (ValueError, KeyError,
      # JSONDecodeError, plain Exception) for unreadable files.
      raise _Unusable(f"cannot be read ({_one_line(e)})") from None
    finally:
      for handler in handlers.values():
        handler.close()
    if not isinstance(restored["data"], dict):
      raise _Unusable(f"item 'data' holds {type(restored['data']).__name__}, "
                      "not a dict")
    return restored

  @staticmethod
  def _verify(path: epath.Path, data: dict, actual: dict[str, int], *,
              whole: bool) -> None:
    """`_Unusable` unless every array in `actual` matches its stored sum
    (and, when `whole`, every stored sum has its array)."""
    expected = data.get("checksums")
    if expected is None:
      logging.warning(
          "Checkpoint %s has no checksums (written by an older "
          "version): its contents are not verified.", path)
      return
    keys = set(actual) | set(expected) if whole else set(actual)
    bad = sorted(k for k in keys if actual.get(k) != expected.get(k))
    if bad:
      raise _Unusable(f"{len(bad)} array(s) differ from their checksums, "
                      f"e.g. {bad[0]} (a truncated or altered file)")

  def _restore_verified(self, step: int, abstract_state: PyTree,
                        abstract_rng: jax.ShapeDtypeStruct):
    """(state, rng, data_state) of `step`, or `_Unusable` saying why."""
    path = self._check_complete(step)
    ema_params = getattr(abstract_state, "ema_params", None)
    if ema_params is not None:
      self._check_network(path, ema_params)
    restored = self._read(
        step,
        ocp.args.StandardRestore({
            "train_state": abstract_state,
            "rng": abstract_rng
        }))
    data = restored["data"]
    tree = {
        "train_state": restored["state"]["train_state"],
        "rng": restored["state"]["rng"]
    }
    self._verify(path, data, checksums(tree), whole=True)
    data_state = None
    states = data.get("states") or []
    if data.get("process_count") == jax.process_count() and states:
      data_state = states[jax.process_index()]
    return tree["train_state"], tree["rng"], data_state

  def _restore_params_verified(self, step: int, abstract_params: PyTree, *,
                               ema: bool):
    """The EMA (or trained) parameters of `step`, or `_Unusable` saying
    why."""
    path = self._check_complete(step)
    self._check_network(path, abstract_params)
    name = "ema_params" if ema else "params"
    target = {"train_state": {name: abstract_params}}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.
                                       shape, dtype=x.dtype), target)
    restored = self._read(
        step,
        ocp.args.PyTreeRestore(target, restore_args=restore_args,
                               partial_restore=True))
    params = restored["state"]["train_state"][name]
    # The sums were stored under the TrainState's attribute path.
    prefix = f"['train_state'].{name}"
    actual = {
        prefix + path_str: value
        for path_str, value in checksums(params).items()
    }
    self._verify(path, restored["data"], actual, whole=False)
    return params

  def _move_aside(self, steps: list[int]) -> None:
    """Moves broken step directories to `<directory>/corrupt/` (process 0),
    so their step numbers can be written again."""
    if not self._writable:
      return
    if jax.process_index() == 0:
      aside = self.directory / CORRUPT_DIR
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / f"{step}-{int(time.time())}"
        storage.move_tree(self.step_path(step), target)
        logging.warning("Moved broken checkpoint %s to %s.",
                        self.step_path(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ddpm_jax_checkpoint_move_aside")
    self._manager.reload()

  def _complete_steps_on_disk(self) -> list[int]:
    """Finished step directories (with the commit marker), ascending."""
    return sorted(
        int(p.name)
        for p in self.directory.iterdir()
        if p.name.isdigit() and (p / COMMIT_MARKER).exists())

  def _remove_unfinished(self, step: int) -> None:
    """Removes step `step`'s tmp directories, and its step directory if it
    lacks the commit marker (process 0; a failure is logged)."""
    if jax.process_index() != 0:
      return
    paths = sorted(self.directory.glob(f"{step}{TMP_MARKER}*"))
    if (self.step_path(step).exists() and
        not (self.step_path(step) / COMMIT_MARKER).exists()):
      paths.append(self.step_path(step))
    for path in paths:
      try:
        path.rmtree()
      except OSError as e:
        logging.warning("Could not remove %s (an unfinished write): %s", path,
                        e)

  def _write_failed(self, error: BaseException) -> CheckpointWriteError:
    """Removes the unfinished write of `self._writing` (again in `close`,
    once every background write has ended) and returns the error naming it
    and the last complete checkpoint."""
    self._failed = True
    step = self._writing
    try:  # Background writes of the step may still run; let them end.
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logging.debug("Also failed: %s", _one_line(e))
    self._remove_unfinished(step)
    good = [s for s in self._complete_steps_on_disk() if s != step]
    last = (f"step {good[-1]} in {self.step_path(good[-1])}"
            if good else "none (no checkpoint was written before)")
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code:  # TensorStore's error of a failed system call.
      cause = os.strerror(int(code.group(1)))
    elif isinstance(error, OSError) and error.strerror:
      cause = error.strerror
    else:
      cause = _one_line(error)
    return CheckpointWriteError(
        f"Could not write checkpoint step {step} to {self.directory}: "
        f"{cause}. Last good checkpoint: {last}; the unfinished step {step} "
        "is never used (removed now, or by the next run). Free space (or fix "
        "the disk) and run the same command again to resume from it.")

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous writes are done.

    Raises:
      CheckpointWriteError: the pending write failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(e) from None

  def close(self) -> None:
    """Waits for pending writes and releases the manager.

    Raises:
      CheckpointWriteError: the pending write failed (not again once a
        failure was raised).
    """
    try:
      if not self._failed:
        self.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self._failed:
          raise
        logging.debug("Closing after a failed write: %s", _one_line(e))
      if self._failed:
        self._remove_unfinished(self._writing)

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
