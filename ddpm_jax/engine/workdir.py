"""Checks of a run's workdir, local or gs://, before anything is built.

Example:
  >>> check_workdir("/tmp/ddpm_digits", mode="train")
  >>> check_workdir("gs://my-bucket/runs/digits", mode="train")
"""

from __future__ import annotations

import os
import shutil
import uuid

from ddpm_jax.engine.config import ConfigError
from ddpm_jax.infra import storage


def check_workdir(workdir: str, *, mode: str,
                  min_free_bytes: int = 100 * 2**20) -> None:
  """Fails early on a workdir that cannot hold a run.

  For training a local directory is created if needed and must be writable
  with at least `min_free_bytes` free; in a gs:// workdir a small object is
  written and deleted (nothing is created locally). For sampling and
  evaluation the workdir must exist.

  Raises:
    ConfigError: naming the directory and the problem (a missing bucket, no
      credentials or no connection for gs://).
  """
  if storage.is_remote(workdir):
    try:
      if mode == "train":
        storage.check_writable(workdir)
      elif not storage.exists(workdir, directory=True):
        raise ConfigError(f"--workdir {workdir} does not exist: train first "
                          "with --mode=train.")
    except storage.StorageError as e:
      raise ConfigError(f"--workdir {workdir}: {e}") from None
    return
  if mode != "train":
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir {workdir} does not exist: train first "
                        "with --mode=train.")
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    # A name of its own: the hosts of a multi-host run may probe one
    # shared directory at the same time.
    probe = os.path.join(workdir, f"{storage.PROBE_NAME}-{uuid.uuid4().hex}")
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror} "
                      f"({e.filename}).") from None
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise ConfigError(f"--workdir {workdir} has only {free / 2**20:.0f} MiB "
                      f"free; at least {min_free_bytes / 2**20:.0f} MiB are "
                      "needed for checkpoints.")
