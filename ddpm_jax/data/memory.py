"""Batch iterator over a split held in memory (npz, folder and digits)."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Any

import numpy as np

from ddpm_jax.data import common

_PREFETCH = 4  # batches computed ahead in background threads
_FLIP_STREAM = 1  # separates the flip random stream from the shuffle stream


def read_state(state: dict[str, Any], steps_per_epoch: int) -> tuple[int, int]:
  """Validates a `get_state()` dict and returns (epoch, step).

  Raises:
    DataError: naming the missing or out-of-range field.
  """
  try:
    epoch, step = int(state["epoch"]), int(state["step"])
  except KeyError as e:
    raise common.DataError(f"iterator state lacks field {e}; expected "
                           f"{{'epoch', 'step'}}, got {sorted(state)}") from e
  if epoch < 0 or not 0 <= step < steps_per_epoch:
    raise common.DataError(f"iterator state {state} out of range: need epoch "
                           f">= 0 and 0 <= step < {steps_per_epoch}")
  return epoch, step


class MemoryIterator:
  """Shuffled, sharded, optionally flipped batches of in-memory images.

  Epoch e visits the examples in the order `default_rng([seed, e])
  .permutation(N)` (identity without shuffling). Global batch k of an epoch is
  order[k * B * P:(k + 1) * B * P] for B = batch_size and P = process_count;
  host i takes its i-th slice of B examples, so hosts are disjoint and the
  global batch does not depend on P. Flips are drawn per global batch from
  `default_rng([seed, e, k, 1])`. A batch therefore depends only on
  (seed, epoch, step), which makes `set_state` exact and free.

  With `repeat=True` an epoch has floor(N / (B * P)) steps (the remainder is
  dropped, and differs between epochs). With `repeat=False` there is one pass
  of ceil(N / (B * P)) steps, every example is yielded exactly once over all
  hosts, the last global batch is padded with zeros, and batches carry
  'mask' (False on padding).

  Attributes:
    spec: The DatasetSpec of the yielded batches.
  """

  def __init__(self, data: common.ImageArrays, *, batch_size: int,
               random_flip: bool, seed: int, shuffle: bool, repeat: bool,
               process_index: int, process_count: int, where: str):
    """Builds the iterator; see `pipeline.create_dataset` for options.

    Raises:
      DataError: if the split has no examples, or (with `repeat`) fewer than
        one global batch.
    """
    num_examples = len(data.images)
    global_batch = batch_size * process_count
    if num_examples == 0:
      raise common.DataError(f"{where}: the split has no examples")
    if repeat:
      steps = num_examples // global_batch
      if steps == 0:
        raise common.DataError(
            f"{where}: {num_examples} examples give host {process_index} of "
            f"{process_count} fewer than one batch of {batch_size}; lower "
            f"batch_size or use more data")
    else:
      steps = common.ceil_div(num_examples, global_batch)
    self.spec = common.DatasetSpec(num_examples=num_examples,
                                   image_shape=data.images.shape[1:],
                                   num_classes=data.num_classes,
                                   steps_per_epoch=steps)
    self._data = data
    self._batch_size = batch_size
    self._random_flip = random_flip
    self._seed = seed
    self._shuffle = shuffle
    self._repeat = repeat
    self._host_offset = process_index * batch_size
    self._global_batch = global_batch
    self._position = (0, 0)  # (epoch, step) of the next batch to return
    self._pending = collections.deque()  # futures of the following batches
    self._scheduled = (0, 0)  # (epoch, step) of the next batch to submit
    self._order = functools.lru_cache(maxsize=2)(self._epoch_order)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

  def __iter__(self) -> MemoryIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._position[0] > 0 and not self._repeat:
      raise StopIteration
    while len(self._pending) < _PREFETCH and (self._repeat or
                                              self._scheduled[0] == 0):
      self._pending.append(self._pool.submit(self._batch, *self._scheduled))
      self._scheduled = self._advance(self._scheduled)
    batch = self._pending.popleft().result()
    self._position = self._advance(self._position)
    return batch

  def get_state(self) -> dict[str, int]:
    """Returns {'epoch', 'step'} of the next batch; JSON-serializable."""
    epoch, step = self._position
    return {"epoch": epoch, "step": step}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` result, exactly as the run that saved it.

    Raises:
      DataError: if `state` lacks a field or is out of range.
    """
    position = read_state(state, self.spec.steps_per_epoch)
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._position = self._scheduled = position

  def _advance(self, position: tuple[int, int]) -> tuple[int, int]:
    epoch, step = position
    if step + 1 < self.spec.steps_per_epoch:
      return epoch, step + 1
    return epoch + 1, 0

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """Example indices of `epoch` in visiting order, int [N]."""
    if not self._shuffle:
      return np.arange(self.spec.num_examples)
    return np.random.default_rng([self._seed,
                                  epoch]).permutation(self.spec.num_examples)

  def _batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Computes this host's batch `step` of `epoch`."""
    start = step * self._global_batch + self._host_offset
    indices = self._order(epoch)[start:start + self._batch_size]
    images = self._data.images[indices]
    if self._random_flip:
      rng = np.random.default_rng([self._seed, epoch, step, _FLIP_STREAM])
      flips = rng.random(self._global_batch) < 0.5
      flips = flips[self._host_offset:self._host_offset + len(indices)]
      images[flips] = images[flips, :, ::-1]
    batch = {
        "image": common.to_unit_range(images),
        "label": self._data.labels[indices]
    }
    if not self._repeat:
      pad = self._batch_size - len(indices)
      batch = {
          key:
              np.concatenate(
                  [value,
                   np.zeros((pad,) + value.shape[1:], value.dtype)])
          for key, value in batch.items()
      }
      batch["mask"] = np.arange(self._batch_size) < len(indices)
    return batch
