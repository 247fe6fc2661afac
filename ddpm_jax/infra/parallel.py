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
import logging as std_logging
import os
import socket
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.typing import PyTree

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# JAX's logger of backend start-up; a platform it merely probes for (e.g. a
# TPU where none is installed) is reported there at INFO level.
BACKEND_LOGGER = "jax._src.xla_bridge"
_PROBE_MESSAGE = "Unable to initialize backend"


class _DropBackendProbe(std_logging.Filter):
  """Drops the INFO record of a platform JAX probed for and did not find."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno <= std_logging.INFO and
                str(record.msg).startswith(_PROBE_MESSAGE))


def quiet_backend_probe() -> None:
  """Keeps JAX's "Unable to initialize backend 'tpu' ..." line off the log.

  When JAX picks a platform itself (JAX_PLATFORMS unset) it tries each one it
  knows and logs, at INFO, those that are absent: on a CPU-only machine a
  line about libtpu.so before any output of a command line. This filters
  exactly those records of JAX's backend logger (by its name, so for every
  handler). A platform named in JAX_PLATFORMS that fails still raises, and
  JAX's warnings and errors pass. Idempotent.

  Example:
    >>> quiet_backend_probe()  # first thing in a program's main()
  """
  logger = std_logging.getLogger(BACKEND_LOGGER)
  if not any(isinstance(f, _DropBackendProbe) for f in logger.filters):
    logger.addFilter(_DropBackendProbe())


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
                               process_id=process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
  logging.info("jax.distributed initialized: process %d of %d.",
               jax.process_index(), jax.process_count())
  return True


# How long a connected host may stay silent before it counts as lost (it
# pings every PING_SECONDS); a killed process is noticed at once, as its
# connections close. JAX's own heartbeat timeout (HEARTBEAT_SECONDS), after
# which it aborts the survivors, is longer, so the watch speaks first.
LOST_HOST_SECONDS = 60
PING_SECONDS = 5
HEARTBEAT_SECONDS = 100
# After a host reports that it stops with an error, the others wait this
# long (for their own, usually the same, error) before they stop too.
ERROR_GRACE_SECONDS = 20


def _read_line(conn: socket.socket) -> str:
  """One line from `conn`, read byte by byte (nothing after it consumed)."""
  data = b""
  while not data.endswith(b"\n"):
    byte = conn.recv(1)
    if not byte:
      raise ConnectionError("closed before a whole line")
    data += byte
  return data.decode()


class HostWatch:
  """Notices a host of a multi-process run that is gone and says which.

  Process 0 listens on a port of its own (published to the others with a
  collective); every other process connects to it. Each side pings every
  PING_SECONDS. When a connection closes without a goodbye (the process
  exited or was killed) or stays silent for LOST_HOST_SECONDS (its machine
  is gone), `on_lost(message)` is called on every surviving process (process
  0 relays the loss of a process to the others): a process waiting in a
  collective for a lost host would otherwise wait until JAX's heartbeat
  timeout aborts it. `stop()` says goodbye; `stop(error=True)` says this
  process stops with an error, which the others report after
  ERROR_GRACE_SECONDS unless they stop first.

  Example:
    >>> watch = HostWatch(on_lost=print, coordinator_host="10.0.0.2")
    >>> ...  # train
    >>> watch.stop()
  """

  def __init__(self, *, on_lost: Callable[[str], None],
               coordinator_host: Optional[str] = None,
               lost_after: float = LOST_HOST_SECONDS):
    """Connects the processes (a collective: every process calls it).

    Args:
      on_lost: called once, from a watch thread, with a one-line message
        naming the lost process and its host.
      coordinator_host: the address of process 0's machine; default its
        host name.
      lost_after: seconds of silence after which a host counts as lost.
    """
    self._on_lost, self._lost_after = on_lost, lost_after
    self._index = jax.process_index()
    self._hosts = allgather_json(socket.gethostname())
    self._lock = threading.Lock()
    self._done = threading.Event()
    self._reported = False
    self._loss = threading.Event()
    self._send_lock = threading.Lock()
    self._peers: dict[int, socket.socket] = {}
    listener = None
    port = 0
    if self._index == 0:
      listener = socket.create_server(("", 0))
      port = listener.getsockname()[1]
    port = int(
        np.asarray(
            multihost_utils.broadcast_one_to_all(np.array([port],
                                                          np.int32)))[0])
    if self._index == 0:
      listener.settimeout(HEARTBEAT_SECONDS)
      for _ in range(jax.process_count() - 1):
        conn, _ = listener.accept()
        peer = int(_read_line(conn))
        self._peers[peer] = conn
      listener.close()
    else:
      host = coordinator_host or self._hosts[0]
      conn = socket.create_connection((host, port), timeout=HEARTBEAT_SECONDS)
      conn.sendall(f"{self._index}\n".encode())
      self._peers[0] = conn
    for peer, conn in self._peers.items():
      conn.settimeout(lost_after)
      threading.Thread(target=self._listen, args=(peer, conn), daemon=True,
                       name=f"ddpm_jax_watch_{peer}").start()
    threading.Thread(target=self._ping, daemon=True,
                     name="ddpm_jax_watch_ping").start()

  def _name(self, process: int) -> str:
    return f"process {process} ({self._hosts[process]})"

  def _send(self, message: str, peers=None) -> None:
    with self._send_lock:  # The ping thread and the listeners send.
      for peer in self._peers if peers is None else peers:
        try:
          self._peers[peer].sendall(f"{message}\n".encode())
        except OSError:
          pass  # Its own listener reports it.

  def _message(self, peer: int, why: str) -> str:
    return (f"Lost {self._name(peer)}: {why}; stopping "
            f"{self._name(self._index)}. Restart every host with the same "
            "command to resume from the newest complete checkpoint.")

  def _ping(self) -> None:
    while not self._done.wait(PING_SECONDS):
      self._send("ping")

  def _lost(self, message: str) -> None:
    with self._lock:
      if self._reported or self._done.is_set():
        return
      self._reported = True
    try:
      self._on_lost(message)  # The command line's exits the process.
    finally:
      self._loss.set()

  def wait_for_loss(self, seconds: float) -> bool:
    """Whether a lost host was reported (`on_lost` returned) within
    `seconds`: for a failure of this process that may be the loss seen from
    its side (a collective that failed as its peer vanished)."""
    return self._loss.wait(seconds)

  def _listen(self, peer: int, conn: socket.socket) -> None:
    reader = conn.makefile("r")
    why = None
    try:
      for line in reader:
        word, _, rest = line.strip().partition(" ")
        if word == "bye":
          return
        if word == "error":
          if not self._done.wait(ERROR_GRACE_SECONDS):
            self._lost(f"{self._name(peer)} stopped with an error (see its "
                       f"log); stopping {self._name(self._index)} too.")
          return
        if word == "lost":  # Relayed by process 0: 'lost I WHY'.
          other, _, why = rest.partition(" ")
          self._lost(self._message(int(other), why))
          return
      why = "its connection closed (it exited or was killed)"
    except TimeoutError:
      why = f"it sent nothing for {self._lost_after:.0f} s"
    except OSError as e:
      why = f"its connection failed ({e.strerror or e})"
    if self._done.is_set():
      return
    if self._index == 0:
      self._send(f"lost {peer} {why}", [p for p in self._peers if p != peer])
    self._lost(self._message(peer, why))

  def stop(self, *, error: bool = False) -> None:
    """Says goodbye to the other processes (`error`: this one stops with an
    error) and ends the watch."""
    if self._done.is_set():
      return
    self._done.set()
    self._send("error" if error else "bye")
    for conn in self._peers.values():
      try:
        conn.shutdown(socket.SHUT_WR)
      except OSError:
        pass
