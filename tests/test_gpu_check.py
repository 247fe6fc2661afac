"""The GPU check's CPU dry run (`benchmarks/gpu_check.sh --dry-run`) writes its report."""

import json
import pathlib
import subprocess

import numpy as np
import pytest

from tests import train_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
  # The session's fast-compile level and compilation cache (conftest.py).
  env = train_helpers.subprocess_env()
  proc = subprocess.run(
      ["bash", "benchmarks/gpu_check.sh", "--dry-run",
       str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "gpu_check.json").read_text())
  assert result["dry_run"] and not result["skipped"]
  assert "tests collected" in result["pytest"]
  rows = [(r["preset"], r["process"], r["dtype"], r["kernels"], r["batch"])
          for r in result["train"]]
  assert rows == [("ddpm_cifar10", "ddpm", "bfloat16", "auto", 2),
                  ("dit_b_2", "ddpm", "bfloat16", "auto", 2),
                  ("ddpm_cifar10", "ddpm", "float32", "auto", 2),
                  ("ddpm_cifar10", "edm", "bfloat16", "auto", 2),
                  ("ddpm_cifar10", "flow", "bfloat16", "auto", 2),
                  ("ddpm_cifar10", "ddpm", "bfloat16", "xla", 2)]
  for r in result["train"]:
    assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r[
        "flops_per_image"] > 0
    # bf16 compute keeps the loss, parameters, optimizer state and EMA in float32.
    assert r["loss_dtype"] == "float32"
    assert r["state_float_dtypes"] == {
        "params": ["float32"],
        "opt_state": ["float32"],
        "ema_params": ["float32"]
    }
  samples = [(s["sampler"], s["steps"], s["network_calls"], s["batch"])
             for s in result["samples"]]
  assert samples == [("ddim", 5, 5, 2), ("dpmpp_2m", 3, 3, 2)]
  for sample in result["samples"]:
    assert sample["seconds_for_50k"] == pytest.approx(50_000 /
                                                      sample["images_per_s"])
  # The quality run: configs/cifar10_flow.py:tiny's 4 steps of batch 8, then its
  # samples as --mode=sample writes them.
  quality = result["quality"]
  assert (quality["steps"], quality["images_seen"]) == (4, 32)
  with np.load(tmp_path / quality["samples"]) as f:
    assert f["images"].shape == (8, 32, 32, 3) and f["images"].dtype == np.uint8
  assert (tmp_path / "quality_grid.png").stat().st_size > 0
  profile = result["profile"]
  assert profile["ops"] and profile["total_ms"] > 0
  assert sum(o["fraction"] for o in profile["ops"]) <= 1.0 + 1e-9
  table = (tmp_path / "gpu_check.md").read_text()
  for part in ("DRY RUN", "| train |", "| sample |", "Quality run:", "| op |",
               "ddpm_cifar10 (edm)"):
    assert part in table, part
