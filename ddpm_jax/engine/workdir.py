"""Checks of a run's workdir, local or gs://, before anything is built, and
the config a run started with (`<workdir>/config.json`).

Example:
  >>> check_workdir("/tmp/ddpm_digits", mode="train")
  >>> check_workdir("gs://my-bucket/runs/digits", mode="train")
  >>> record_config("/tmp/ddpm_digits", config)
  >>> config_differences("/tmp/ddpm_digits", other_config)
  ['model.base_channels: 16 in the run, 32 now']
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

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


RUN_CONFIG = "config.json"
# The groups whose fields decide what a checkpoint holds (the network, its
# input, the optimizer state).
CHECKPOINT_GROUPS = ("model", "data", "optimizer")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'group.field': JSON value} of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def _as_json(config) -> dict[str, Any]:
  return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=repr))


def record_config(workdir: str, config) -> bool:
  """Writes `config` to `<workdir>/config.json` unless the workdir has one:
  the config of the run's first training (atomically; local or gs://).

  Returns:
    True when it was written.

  Example:
    >>> record_config("/tmp/ddpm_digits", config)  # before the first step
    True
  """
  path = storage.as_path(workdir) / RUN_CONFIG
  if path.exists():
    return False
  tmp = path.with_name(f"{RUN_CONFIG}.{uuid.uuid4().hex}.tmp")
  tmp.write_text(json.dumps(_as_json(config), sort_keys=True, indent=1))
  tmp.rename(path)
  return True


def config_differences(
    workdir: str, config, *,
    groups: tuple[str, ...] = CHECKPOINT_GROUPS) -> list[str]:
  """The fields of `groups` in which `config` differs from the one recorded
  in the workdir, as 'group.field: A in the run, B now' ([] when the
  workdir has no config.json, or none differ).

  Example:
    >>> config_differences("/tmp/ddpm_digits", conditional_config)
    ['data.num_classes: 0 in the run, 10 now']
  """
  path = storage.as_path(workdir) / RUN_CONFIG
  try:
    recorded = _flat(json.loads(path.read_text()))
  except (OSError, ValueError):
    return []
  now = _flat(_as_json(config))
  fields = sorted(
      k for k in set(recorded) | set(now)
      if k.split(".")[0] in groups and recorded.get(k) != now.get(k))
  return [
      f"{k}: {json.dumps(recorded.get(k))} in the run, "
      f"{json.dumps(now.get(k))} now" for k in fields
  ]
