"""Devices and hosts: the 'data' mesh, jax.distributed, host <-> global arrays.

Every parallel piece of the library uses one mesh over every device of every
host. By default it is 1-D, its axis named `DATA_AXIS`: batches are sharded
along it, parameters and train state replicated. With `create_mesh(fsdp=n)`
it is 2-D, ('data', 'fsdp') = (devices / n, n), for models that outgrow one
device (FSDP, as ZeRO-3): batches are sharded over both axes (every device
still sees its own examples) and the train state's arrays along 'fsdp', each
along its largest dimension that n divides (`fsdp_spec`), so each device
holds 1/n of the parameters, EMA and optimizer state; XLA gathers the
parameters where the step needs them. With several hosts each one reads
its own slice of a global batch, `global_batch` assembles the global array,
and `host_value` reads a replicated result back on any host.

Example:
  >>> initialize_distributed()  # first thing; a no-op on one host
  >>> mesh = create_mesh()  # or create_mesh(fsdp=8)
  >>> abstract = fsdp_abstract(init_fn, rng, mesh=mesh)
  >>> state = jax.jit(init_fn, out_shardings=shardings(abstract))(rng)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def create_mesh(devices=None, *, fsdp: int = 1) -> Mesh:
  """The mesh over `devices` (default: all, all hosts).

  Args:
    devices: the devices; default `jax.devices()`.
    fsdp: devices each train-state array is sharded over. 1: a 1-D mesh
      with axis 'data' (data parallel, state replicated); n > 1: a 2-D mesh
      ('data', 'fsdp') of shape (len(devices) / n, n).

  Raises:
    ValueError: if `fsdp` is not a positive divisor of the device count.

  Example:
    >>> create_mesh(fsdp=4).shape  # on 8 devices
    {'data': 2, 'fsdp': 4}
  """
  devices = jax.devices() if devices is None else list(devices)
  if isinstance(
      fsdp,
      bool) or not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp must be a positive divisor of the device count "
                     f"({len(devices)}), got {fsdp!r}.")
  if fsdp == 1:
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)
  return jax.make_mesh((len(devices) // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays copied to every device of `mesh`."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of batches: leading dimension split over 'data' (and
  'fsdp', if the mesh has it: over every device)."""
  if FSDP_AXIS in mesh.axis_names:
    return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], size: int) -> P:
  """The FSDP partition of an array of `shape` over `size` devices: its
  largest dimension that `size` divides (the first of equals) is split over
  'fsdp'; replicated (`P()`) if none is.

  Example:
    >>> fsdp_spec((384, 1152), 8), fsdp_spec((6,), 8)
    (PartitionSpec(None, 'fsdp'), PartitionSpec())
  """
  fits = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
  if not fits:
    return P()
  axis = max(fits, key=lambda i: (shape[i], -i))
  return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def fsdp_abstract(fn: Callable[..., PyTree], *args, mesh: Mesh) -> PyTree:
  """`jax.eval_shape(fn, *args)` with every leaf sharded along 'fsdp' by
  `fsdp_spec` on a mesh with that axis, replicated on one without (then the
  same as `replicated_abstract`).

  Like `replicated_abstract`'s, the result is a restore target for
  checkpoints and, via `shardings`, the `out_shardings` of a jit.
  """
  if FSDP_AXIS not in mesh.axis_names:
    return replicated_abstract(fn, *args, mesh=mesh)
  size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, fsdp_spec(
              x.shape, size))), jax.eval_shape(fn, *args))


def replicated_abstract(fn: Callable[..., PyTree], *args, mesh: Mesh) -> PyTree:
  """`jax.eval_shape(fn, *args)` with every leaf replicated on `mesh`.

  The result is a tree of `jax.ShapeDtypeStruct`s with shardings: a restore
  target for checkpoints, and via `shardings` the `out_shardings` of a jit
  that materializes `fn(*args)` directly on the mesh.
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(fn, *args))


def shardings(abstract: PyTree) -> PyTree:
  """The tree of shardings of a tree of sharded `ShapeDtypeStruct`s."""
  return jax.tree.map(lambda x: x.sharding, abstract)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This host's slice of a batch -> the global batch sharded over 'data'.

  Every host passes an array of the same shape; the global batch stacks them
  in process order.
  """
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(data_sharded(mesh), local,
                                                global_shape)


def host_value(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy, from a local copy."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (collective)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.array([flag], np.int32))
  return bool(np.asarray(flags).any())


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (collective; lengths may
  differ between processes)."""
  if jax.process_count() == 1:
    return [bytes(data)]
  lengths = np.asarray(
      multihost_utils.process_allgather(np.array([len(data)],
                                                 np.int32))).reshape(-1)
  padded = np.zeros((max(int(lengths.max()), 1),), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:n]) for row, n in zip(gathered, lengths)]


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (collective)."""
  return [
      json.loads(b.decode("utf-8"))
      for b in allgather_bytes(json.dumps(value).encode("utf-8"))
  ]


def differing_processes(text: str) -> list[str]:
  """Processes whose `text` differs from process 0's, as 'process I (HOST)';
  [] when all agree (collective; e.g. the run's config and flags, hashed)."""
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
  entries = allgather_json([digest, socket.gethostname()])
  return [
      f"process {i} ({host})" for i, (other, host) in enumerate(entries)
      if other != entries[0][0]
  ]


def failed_processes(error: Optional[str]) -> list[str]:
  """Every process's error (None: its check passed) as 'process I (HOST):
  ERROR' for each process that failed; [] when none did (collective).

  A check that fails on some hosts only must stop all of them: a host that
  exits alone leaves the others waiting for it at their next collective
  until a timeout.
  """
  entries = allgather_json([error, socket.gethostname()])
  return [
      f"process {i} ({host}): {message}" for i, (message,
                                                 host) in enumerate(entries)
      if message is not None
  ]


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process launch.

  Must run before any other JAX call. Multi-process is recognised from the
  arguments, or the environment: JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (explicit launch), a multi-host Cloud
  TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), SLURM_NTASKS > 1 or
  OMPI_COMM_WORLD_SIZE > 1 (JAX detects the rest). CPU collectives use gloo,
  so CPU-only hosts can train together too. Single-process launches do
  nothing.

  Returns:
    True when `jax.distributed.initialize` was called.
  """
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  explicit = coordinator_address is not None and num_processes is not None
  hosts = [
      h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h
  ]
  detected = (len(hosts) > 1 or (_env_int("SLURM_NTASKS") or 1) > 1 or
              (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)
  if not explicit and not detected:
    return False
  if explicit and num_processes <= 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed initialized: process %d of %d.",
               jax.process_index(), jax.process_count())
  return True
