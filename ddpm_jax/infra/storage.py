"""Where a run's files live: local paths and gs:// URLs through one layer.

Every path ddpm_jax reads or writes is an `etils.epath.Path`: the workdir,
checkpoints (Orbax: metadata through epath, arrays through TensorStore),
TensorBoard events, samples, eval JSON, the FID statistics cache, `npz:` and
`folder:` sources, the Inception weights and the tfds `data_dir`. So
`gs://bucket/dir` works wherever a local path does, and only process 0 of a
multi-host run writes what is not a checkpoint.

Importing this module (every module of ddpm_jax that opens files does) sets
`EPATH_USE_TF=false` (unless it is set) and turns off fsspec's cache of
gs:// listings, and `as_path`, which makes every path, makes sure of both
again; `import ddpm_jax` alone changes nothing. etils decides once per
process, at the first operation on any epath path (local ones too), whether
gs:// goes through TensorFlow: with these settings made first it never does,
and epath uses gcsfs whether or not TensorFlow is installed,
one client for every gs:// path of the program, Orbax's included, and one
that honours the standard emulator setting (TF's GCS client has a fixed
endpoint; tfds still reads its record files through it). Other processes (the
other hosts, a trainer beside a sampler) write to the same bucket, so no
listing is cached.

Storage emulators (the tests use one): `STORAGE_EMULATOR_HOST=http://HOST:PORT`
for gcsfs and `TENSORSTORE_GCS_HTTP_URL=http://HOST:PORT` for TensorStore.

Example:
  >>> check_writable("gs://my-bucket/runs/cifar10")  # StorageError if not
  >>> exists("gs://my-bucket/data/mnist.npz")
  True
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import uuid
from typing import Iterator

import fsspec
from etils import epath

REMOTE_PREFIXES = ("gs://",)
PROBE_NAME = ".ddpm_jax_write_test"
_CLIENT_LOGGERS = ("gcsfs", "fsspec", "google.auth", "aiohttp")


def _use_gcsfs() -> None:
  # Before etils picks a gs:// backend, which it does once per process.
  os.environ.setdefault("EPATH_USE_TF", "false")
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache",
                                                      False)


_use_gcsfs()


def as_path(location: epath.PathLike) -> epath.Path:
  """`epath.Path(location)`, with gs:// through gcsfs (see the module doc).

  Example:
    >>> as_path("gs://my-bucket/runs") / "checkpoints"
    PosixGPath('gs://my-bucket/runs/checkpoints')
  """
  _use_gcsfs()
  return epath.Path(location)


class StorageError(OSError):
  """A remote path that cannot be used: no bucket, no credentials, no
  connection, no such object (the message names the path and the cause)."""


def is_remote(path: epath.PathLike) -> bool:
  """True for gs:// paths."""
  return os.fspath(path).startswith(REMOTE_PREFIXES)


@contextlib.contextmanager
def _quiet_clients() -> Iterator[None]:
  """Keeps gcsfs's retry tracebacks out of the log while a probe runs; the
  caller reports the final error in one line."""
  loggers = [std_logging.getLogger(name) for name in _CLIENT_LOGGERS]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(std_logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _cause(error: BaseException) -> str:
  text = " ".join(str(error).split())
  if len(text) > 300:
    text = text[:300] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _remote_error(path: epath.PathLike, action: str,
                  error: BaseException) -> StorageError:
  bucket = os.fspath(path)[len("gs://"):].split("/")[0]
  return StorageError(
      f"cannot {action} {os.fspath(path)} ({_cause(error)}); check that "
      f"bucket gs://{bucket} exists, that this machine has credentials for it "
      "(gcloud auth application-default login, or the VM's service account) "
      "and that Cloud Storage is reachable (STORAGE_EMULATOR_HOST for an "
      "emulator).")


def check_writable(directory: epath.PathLike) -> None:
  """Writes and deletes a small object in a gs:// `directory`.

  Raises:
    StorageError: one line naming the directory and the cause.
  """
  probe = as_path(directory) / f"{PROBE_NAME}-{uuid.uuid4().hex}"
  with _quiet_clients():
    try:
      probe.write_bytes(b"0" * 4096)
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      # gcsfs raises OSError subclasses, aiohttp client errors, HttpError and
      # google.auth errors for the same few causes.
      raise _remote_error(directory, "write to", e) from None


def exists(path: epath.PathLike, *, directory: bool = False) -> bool:
  """Whether `path` (a file, or with `directory` a folder) exists.

  Local paths are checked as usual; for gs:// paths a missing bucket or no
  connection is a `StorageError` rather than False.
  """
  path = as_path(path)
  if not is_remote(path):
    return path.is_dir() if directory else path.exists()
  with _quiet_clients():
    try:
      bucket = as_path("gs://" + os.fspath(path)[len("gs://"):].split("/")[0])
      if not bucket.exists():
        raise FileNotFoundError(f"bucket {bucket} does not exist")
      return path.is_dir() if directory else path.exists()
    except Exception as e:  # pylint: disable=broad-except
      raise _remote_error(path, "read", e) from None


def walk(
    top: epath.PathLike) -> Iterator[tuple[epath.Path, list[str], list[str]]]:
  """`os.walk` for local and gs:// trees: (directory, dirnames, filenames).

  Directories are full paths (epath's gs:// walk drops the scheme from
  them); prune `dirnames` in place to skip folders.
  """
  top = as_path(top)
  for root, dirnames, filenames in top.walk():
    if is_remote(top) and not is_remote(root):
      root = as_path("gs://" + os.fspath(root).lstrip("/"))
    yield root, dirnames, filenames


def move_tree(source: epath.PathLike, target: epath.PathLike) -> None:
  """Moves a directory: a rename on local disks; on gs://, which has no
  directories to rename, a copy of every object, then the source deleted."""
  source, target = as_path(source), as_path(target)
  if not is_remote(source):
    source.rename(target)
    return
  for root, _, filenames in walk(source):
    for name in filenames:
      (root / name).copy(target / (root / name).relative_to(source))
  source.rmtree()
