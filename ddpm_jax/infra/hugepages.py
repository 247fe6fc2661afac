"""Huge pages for malloc on CPU training runs (a one-time re-exec).

XLA:CPU allocates each train step's temporaries afresh (gigabytes for a
U-Net at batch 128) and frees them after the step; glibc serves such blocks
with mmap, so every step faults its whole working set in again, 4 KiB at a
time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) those
blocks get 2 MiB pages: on a 2-core machine the tutorial net's step at
batch 128 went from about 1.1 million page faults and 3-4 s of system time
to about 4,000 faults and 1.5 s, 1.2x faster (BENCHMARKS.md). Tunables are
read only at start-up, hence a re-exec of the program. It was measured to
help CPU training only, so the command line does it only there.

Example (a program's entry point, before anything else runs):
  >>> if not accelerator_installed():
  ...   reexec_with_huge_page_malloc()
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

# glibc tunable: back malloc's mmap'd blocks with transparent huge pages.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
_ACCELERATOR_MODULES = ("libtpu", "jax_plugins")


def huge_page_malloc_supported() -> bool:
  """Whether glibc >= 2.35 runs this process and the kernel's transparent
  huge pages are on."""
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def huge_page_malloc_active() -> bool:
  """Whether this process runs with `MALLOC_TUNABLE`."""
  return MALLOC_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def accelerator_installed() -> bool:
  """Whether JAX may run on a GPU or TPU here, decided without starting a
  backend: from JAX_PLATFORMS when set, else from the installed GPU/TPU
  plugins (`jax_plugins`, libtpu)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(
      importlib.util.find_spec(name) is not None
      for name in _ACCELERATOR_MODULES)


def reexec_with_huge_page_malloc() -> None:
  """Restarts this program once with glibc's malloc using huge pages.

  Same pid, same arguments, stdio flushed. Does nothing when GLIBC_TUNABLES
  already sets `glibc.malloc.hugetlb` (set it to 0 to opt out), off glibc,
  on older glibc, or when the kernel's transparent huge pages are disabled.
  Call it only from a program's entry point: it replaces the running
  process.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or not huge_page_malloc_supported():
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(
      filter(None, [tunables, MALLOC_TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
