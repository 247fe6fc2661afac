"""Session set-up shared by every test.

* One JAX persistent compilation cache for the session. Before anything
  compiles, `pytest_configure` points JAX in this process
  (`jax.config.update`, public options) and every subprocess the tests
  start (the environment they inherit) at one temporary directory, so a
  program compiled once, e.g. the tiny train step of the engine, fault and
  command-line tests, is loaded from disk by later runs and children instead
  of compiled again. A cache directory the caller set
  (JAX_COMPILATION_CACHE_DIR) is used as is and kept; the temporary one is
  removed at the end.
* `@pytest.mark.real_data("mnist.npz")`: an extra that reads
  ../shared/data/mnist.npz, skipped when that file is absent (a fresh clone
  has no such folder; no other test needs it).
"""

import os
import pathlib
import shutil
import tempfile

import pytest

REAL_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
# In this process only compilations that took this long are written to the
# cache: the many small ones are compiled once and then kept in memory.
# Subprocesses write every one: each start compiles them all again.
MIN_COMPILE_SECONDS = 0.2
# The tests' programs are tiny: XLA's lowest backend optimization level cuts
# their compile time 2-4x (e.g. a tiny U-Net's init 16 s -> 3.5 s of CPU).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_OWN_CACHE = []


def pytest_configure(config):
  del config
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not cache:
    cache = tempfile.mkdtemp(prefix="ddpm_jax_tests_jax_cache_")
    _OWN_CACHE.append(cache)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_SECONDS)


def pytest_unconfigure(config):
  del config
  for cache in _OWN_CACHE:
    shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    for mark in item.iter_markers("real_data"):
      path = REAL_DATA / mark.args[0]
      if not path.exists():
        item.add_marker(pytest.mark.skip(reason=f"extra: {path} not found"))
