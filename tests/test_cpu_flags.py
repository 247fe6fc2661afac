"""ddpm_jax.infra.cpu_flags: which XLA_FLAGS it adds, when, and that XLA then skips YNNPACK's convolutions."""

import os
import pathlib
import subprocess
import sys

import pytest

from ddpm_jax.infra import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.mark.parametrize("version, expected", [("0.10.2", True),
                                               ("0.10.0", True),
                                               ("0.11.0", False),
                                               ("0.9.2", False),
                                               ("0.4.30", False)])
def test_applies_only_to_measured_jaxlib(version, expected):
  assert cpu_flags.applies(version) == expected


@pytest.mark.parametrize(
    "before, after, changed",
    [
        (None, FLAG, True),
        ("--xla_cpu_prefer_vector_width=512",
         f"--xla_cpu_prefer_vector_width=512 {FLAG}", True),
        # The user's own setting of the flag is kept, whatever its value.
        ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
         "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", False
        ),
        (FLAG, FLAG, False),
    ])
def test_add_to_environment(monkeypatch, before, after, changed):
  if not cpu_flags.applies():
    pytest.skip("the flags are measured for another jaxlib version")
  if before is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", before)
  assert cpu_flags.add_to_environment() == changed
  assert os.environ["XLA_FLAGS"] == after


def test_add_to_environment_leaves_other_jaxlib_alone(monkeypatch):
  monkeypatch.setattr(cpu_flags, "applies", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=512")
  assert not cpu_flags.add_to_environment()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=512"


# A fresh process (XLA reads XLA_FLAGS once): the compiled 3x3 convolution of
# the CIFAR net's first level, YNNPACK's or XLA's own, and a dot for contrast.
_PROBE = """
import sys
import jax, jax.numpy as jnp
from ddpm_jax.infra import cpu_flags
if sys.argv[1] == "add":
  cpu_flags.add_to_environment()
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
dot = jax.jit(lambda a, b: a @ b)
conv_hlo = conv.lower(jnp.ones((16, 32, 32, 128)), jnp.ones((3, 3, 128, 128))).compile().as_text()
dot_hlo = dot.lower(jnp.ones((512, 512)), jnp.ones((512, 512))).compile().as_text()
print("conv", "ynn" if "ynn_fusion" in conv_hlo else "xla")
print("dot", "ynn" if "ynn_fusion" in dot_hlo else "xla")
"""


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("none", ["conv ynn", "dot ynn"]),  # jaxlib's default
        ("add", ["conv xla", "dot ynn"]),
    ])
def test_flag_moves_convolutions_to_xla(mode, expected):
  if not cpu_flags.applies():
    pytest.skip("the flags are measured for another jaxlib version")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  assert proc.stdout.split("\n")[:2] == expected
