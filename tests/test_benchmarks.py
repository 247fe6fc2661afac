"""Smoke test of the benchmark suite: `benchmarks/run.py --tiny` writes its JSON."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests import train_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_writes_json_with_every_section(tmp_path):
  out = tmp_path / "bench.json"
  md = tmp_path / "bench.md"
  # The session's fast-compile level and compilation cache (conftest.py).
  env = train_helpers.subprocess_env()
  proc = subprocess.run([
      sys.executable, "benchmarks/run.py", "--tiny", "--out",
      str(out), "--md",
      str(md)
  ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())

  env_info = result["environment"]
  for field in ("backend", "device_kind", "device_count", "jax", "flax"):
    assert env_info[field], field

  (row,) = result["train"]
  assert row["params"] > 0
  for field in ("median_s", "min_s", "max_s", "images_per_s", "compile_s",
                "flops_per_image"):
    assert row[field] > 0, field
  assert row["n"] == 2
  assert row["memory"]["peak_bytes"] > 0 and row["memory"][
      "process_peak_rss_bytes"] > 0

  (sample,) = result["sample"]
  for name, steps in (("ddpm", 10), ("ddim", 5)):
    assert sample[name]["steps"] == steps
    for field in ("median_s", "images_per_s", "bare_median_s", "overhead_ratio",
                  "compile_s"):
      assert sample[name][field] > 0, (name, field)

  assert result["input"] and all(r["images_per_s"] > 0 for r in result["input"])
  table = md.read_text()
  assert "| train |" in table and "| sample |" in table and "| input source |" in table
