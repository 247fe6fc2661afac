"""Smoke test of benchmarks/process_solvers.py at a tiny size (its figures
mean nothing here)."""

import json

from benchmarks import process_solvers as bench


def test_tiny_run_reports_every_row(tmp_path):
  out = tmp_path / "rows.json"
  result = bench.main([
      "--points", "64", "--calls", "3", "--spacings", "karras",
      "--reference-steps", "10", "--json",
      str(out), "--md",
      str(tmp_path / "table.md")
  ])
  rows = result["rows"]
  assert [(r["process"], r["sampler"], r["calls"]) for r in rows
         ] == [("edm", "euler", 3), ("edm", "heun", 3), ("edm", "dpmpp_2m", 3),
               ("edm", "dpmpp_2m_sde", 3), ("edm", "dpmpp_3m", 3),
               ("edm", "edm", 3), ("flow", "euler", 3), ("flow", "heun", 3),
               ("flow", "dpmpp_2m", 3), ("flow", "dpmpp_2m_sde", 3),
               ("flow", "dpmpp_3m", 3)]
  assert ("rms_to_ode" in rows[0]) and ("rms_to_ode" not in rows[5])
  assert json.loads(out.read_text())["points"] == 64
  assert "| edm (karras) | " in (tmp_path / "table.md").read_text()
