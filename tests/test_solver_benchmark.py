"""Smoke test of benchmarks/solvers.py at a tiny size (its figures mean
nothing here)."""

import json

from benchmarks import solvers as bench


def test_tiny_run_reports_every_row(tmp_path):
  out = tmp_path / "rows.json"
  result = bench.main([
      "--points", "64", "--calls", "3", "--samplers",
      "ddpm,ddim,heun,dpmpp_2m_sde", "--spacings", "logsnr,karras",
      "--schedule", "cosine", "--num-timesteps", "100", "--reference-steps",
      "20", "--runs", "1", "--json",
      str(out), "--md",
      str(tmp_path / "table.md")
  ])
  rows = result["rows"]
  assert [(r["sampler"], r["spacing"], r["calls"]) for r in rows
         ] == [("ddpm", None, 3), ("ddim", None, 3), ("ddim", None, 100),
               ("heun", "logsnr", 3), ("heun", "karras", 3),
               ("dpmpp_2m_sde", "logsnr", 3), ("dpmpp_2m_sde", "karras", 3)]
  assert all(r["median_s"] > 0 and r["fit_error"] >= 0 for r in rows)
  assert ("rms_to_ode" in rows[1]) and ("rms_to_ode" not in rows[-1])
  assert json.loads(out.read_text())["points"] == 64
  assert "| heun | karras | 2 | 3 |" in (tmp_path / "table.md").read_text()
