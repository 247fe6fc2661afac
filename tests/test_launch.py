"""launch/: the documented TPU-pod and SLURM commands are valid bash and
start the command line on every worker / task."""

import pathlib
import re
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("name, starter", [
    ("tpu_pod.sh", r"gcloud compute tpus tpu-vm ssh .*--worker=all"),
    ("slurm_gpu.sbatch", r"^srun python -m ddpm_jax\.main"),
])
def test_launch_script_parses_and_starts_every_worker(name, starter):
  script = LAUNCH / name
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
  text = script.read_text()
  assert re.search(starter, text, re.MULTILINE), starter
  assert "python -m ddpm_jax.main --config=" in text
  assert "--workdir=" in text and "SIGTERM" in text
