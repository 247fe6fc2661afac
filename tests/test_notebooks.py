"""The Colab notebooks in colab/ run top to bottom and are committed clean.

Each notebook runs in a fresh Jupyter kernel (nbclient, the `python3` kernel
that ipykernel provides for the running interpreter) with DDPM_JAX_TINY=1, the
notebooks' switch to toy sizes, and DDPM_JAX_SOURCE naming this checkout, which
the notebooks' install cell installs (as Colab installs the repository). Any cell that raises fails the
test with the cell's traceback. The notebooks run in a temporary directory.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _kernel_env() -> dict:
  # The kernels inherit the session's JAX compilation cache (conftest.py):
  # 01 and 03 train the same tiny config, so 03 reuses 01's train step.
  env = dict(os.environ)
  env["DDPM_JAX_TINY"] = "1"
  env.pop("DDPM_JAX_DATA", None)  # the offline default, whatever the caller has
  env["DDPM_JAX_SOURCE"] = str(REPO_ROOT)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  return env


def test_there_are_notebooks():
  names = [path.name for path in NOTEBOOKS]
  assert names == [
      "01_quickstart.ipynb", "02_library_in_your_code.ipynb",
      "03_ddpm_vs_ddim.ipynb"
  ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{path.name} cell {index} has outputs"
      assert cell.execution_count is None, (
          f"{path.name} cell {index} has an execution count")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_at_tiny_settings(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  # `python3` is ipykernel's kernel; jupyter_client starts its "python" as
  # this interpreter (sys.executable), the one with ddpm_jax's dependencies.
  client = nbclient.NotebookClient(
      notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      resources={"metadata": {
          "path": str(tmp_path)
      }})
  client.execute(env=_kernel_env(), cwd=str(tmp_path))


def test_repository_url_is_one_setting(tmp_path):
  """setup.py's url is what the notebooks and badges use, and the sync script
  carries a change of it everywhere."""
  sync = [sys.executable, "colab/sync_repository_url.py"]
  check = subprocess.run(sync + ["--check"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=False)
  assert check.returncode == 0, check.stdout
  copy = tmp_path / "repo"
  (copy / "colab").mkdir(parents=True)
  for name in [
      "setup.py", "README.md", "colab/sync_repository_url.py",
      *(f"colab/{p.name}" for p in NOTEBOOKS)
  ]:
    shutil.copy(REPO_ROOT / name, copy / name)
  setup = copy / "setup.py"
  setup.write_text(setup.read_text().replace(
      'url="https://github.com/ddpm-jax/ddpm_jax"',
      'url="https://github.com/someone/fork"'))
  stale = subprocess.run(sync + ["--check"], cwd=copy, capture_output=True,
                         text=True, check=False)
  assert stale.returncode == 1 and "instead of someone/fork" in stale.stdout
  subprocess.run(sync, cwd=copy, check=True, capture_output=True)
  assert subprocess.run(sync + ["--check"], cwd=copy,
                        check=False).returncode == 0
  notebook = (copy / "colab" / "01_quickstart.ipynb").read_text()
  assert 'REPO = \\"https://github.com/someone/fork\\"' in notebook
  assert ("colab.research.google.com/github/someone/fork/blob/main/colab/"
          "01_quickstart.ipynb") in (copy / "README.md").read_text()
