"""The module paths of ddpm_jax 0.1, kept for one release.

Each old module (`ddpm_jax.sampling`, `ddpm_jax.train`, ...) is a two-line
file that calls `alias`: importing it warns once (DeprecationWarning) and
binds the old name to the new module itself, so attributes, private names and
monkeypatches are shared. `python -m` on an old command path runs the new one.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import types
import warnings


def _warn(old: str, new: str) -> None:
  warnings.warn(
      f"{old} moved to {new}; the old path is removed in the next release.",
      DeprecationWarning, stacklevel=4)


def alias(old: str, new: str) -> types.ModuleType:
  """Makes module `old` the module `new` (imported here), with a warning."""
  _warn(old, new)
  module = importlib.import_module(new)
  sys.modules[old] = module
  return module


def run_main(old: str, new: str) -> None:
  """`python -m old`: warns and runs `python -m new`."""
  _warn(old, new)
  runpy.run_module(new, run_name="__main__", alter_sys=True)
