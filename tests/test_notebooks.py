"""The Colab notebooks in colab/ run top to bottom and are committed clean.

Each notebook runs in a fresh Jupyter kernel (nbclient, the `python3` kernel
that ipykernel provides for the running interpreter) with DDPM_JAX_TINY=1, the
notebooks' switch to toy sizes, and the repository root first on PYTHONPATH so
the kernel imports this checkout's ddpm_jax. Any cell that raises fails the
test with the cell's traceback. The notebooks run in a temporary directory.
"""

import os
import pathlib

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
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  return env


def test_there_are_notebooks():
  names = [path.name for path in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_library_in_your_code.ipynb",
                   "03_ddpm_vs_ddim.ipynb"]


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
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=_kernel_env(), cwd=str(tmp_path))
