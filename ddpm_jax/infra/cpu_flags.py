"""XLA:CPU flags under which the U-Net runs faster, set before JAX starts its backend.

In jaxlib 0.10, XLA:CPU hands every convolution to YNNPACK, which runs one
with at most 64 output channels on a single thread; XLA's own convolution
runs it on every core. On a 2-core machine, the tutorial net's 3x3
convolutions at 28x28 took 50 ms with YNNPACK and 26 ms with XLA's
convolution. The tutorial net's train step took 0.77-0.92x the time (4
rounds, separate processes) and a sampling call 0.73-0.78x; the CIFAR-10
net, whose convolutions have 128 or more channels, 0.91-0.99x per train
step (BENCHMARKS.md). `FLAGS` turns the YNNPACK convolutions off. Dots and
everything else are unchanged.

The flag is experimental in XLA, and XLA aborts the process on a flag it
does not know. It is therefore added only for the jaxlib versions it was
measured with (`MEASURED_JAXLIB`), and only when XLA_FLAGS does not already
name it. To keep YNNPACK's convolutions, start with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`
(XLA's default list; an empty value would turn YNNPACK's dots off too).

Example (a program's entry point, before its first JAX computation):
  >>> if not hugepages.accelerator_installed():
  ...   cpu_flags.add_to_environment()
"""

from __future__ import annotations

import os

import jaxlib

#: XLA:CPU flags this module adds to XLA_FLAGS.
FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
#: jaxlib (major, minor) versions FLAGS were measured with.
MEASURED_JAXLIB = ((0, 10),)


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def applies(jaxlib_version: str = jaxlib.__version__) -> bool:
  """Whether FLAGS were measured with this jaxlib version ('0.10.2', ...)."""
  major, minor = (int(v) for v in jaxlib_version.split(".")[:2])
  return (major, minor) in MEASURED_JAXLIB


def add_to_environment() -> bool:
  """Appends FLAGS to the XLA_FLAGS environment variable.

  Only flags XLA_FLAGS does not already name are added, and none for a jaxlib
  version outside `MEASURED_JAXLIB`. XLA reads XLA_FLAGS when JAX starts its
  backend, so this has an effect only before the process's first JAX
  computation.

  Returns:
    Whether XLA_FLAGS was changed.
  """
  if not applies():
    return False
  current = os.environ.get("XLA_FLAGS", "")
  named = {_name(flag) for flag in current.split()}
  new = [flag for flag in FLAGS if _name(flag) not in named]
  if new:
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [current, *new]))
  return bool(new)
