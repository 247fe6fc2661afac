"""The package's shape: old module paths, the top-level API, imports.

These pin what the layout promises research code: `import ddpm_jax as dj`
reaches the public API without side effects, every 0.1 module path still
imports (with a DeprecationWarning) as the very module it moved to, and no
module reaches into another module's private names.
"""

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import ddpm_jax as dj

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddpm_jax"

# ddpm_jax 0.1's module paths -> where they live now.
MOVED = {
    "ddpm_jax.builders": "ddpm_jax.engine.builders",
    "ddpm_jax.checkpoint": "ddpm_jax.engine.checkpoint",
    "ddpm_jax.config": "ddpm_jax.engine.config",
    "ddpm_jax.convert_inception": "ddpm_jax.tools.convert_inception",
    "ddpm_jax.cpu_flags": "ddpm_jax.infra.cpu_flags",
    "ddpm_jax.evaluation": "ddpm_jax.engine.evaluation",
    "ddpm_jax.fid": "ddpm_jax.tools.fid",
    "ddpm_jax.generation": "ddpm_jax.engine.generation",
    "ddpm_jax.guidance": "ddpm_jax.diffusion.guidance",
    "ddpm_jax.hugepages": "ddpm_jax.infra.hugepages",
    "ddpm_jax.images": "ddpm_jax.infra.images",
    "ddpm_jax.inference": "ddpm_jax.engine.inference",
    "ddpm_jax.input_pipeline": "ddpm_jax.data.pipeline",
    "ddpm_jax.likelihood": "ddpm_jax.diffusion.likelihood",
    "ddpm_jax.losses": "ddpm_jax.diffusion.losses",
    "ddpm_jax.models.inception": "ddpm_jax.metrics.inception",
    "ddpm_jax.optim": "ddpm_jax.engine.optim",
    "ddpm_jax.parallel": "ddpm_jax.infra.parallel",
    "ddpm_jax.pretrained": "ddpm_jax.models.pretrained",
    "ddpm_jax.pretrained_workdir": "ddpm_jax.tools.pretrained_workdir",
    "ddpm_jax.respace": "ddpm_jax.diffusion.respace",
    "ddpm_jax.sampling": "ddpm_jax.samplers",
    "ddpm_jax.schedules": "ddpm_jax.diffusion.schedules",
    "ddpm_jax.solvers": "ddpm_jax.samplers",
    "ddpm_jax.storage": "ddpm_jax.infra.storage",
    "ddpm_jax.testing": "ddpm_jax.diffusion.testing",
    "ddpm_jax.train": "ddpm_jax.engine.train",
    "ddpm_jax.train_step": "ddpm_jax.engine.train_step",
    "ddpm_jax.workdir": "ddpm_jax.engine.workdir",
}
SUBPACKAGES = ("data", "diffusion", "engine", "infra", "metrics", "models",
               "samplers", "tools")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_is_the_new_module(old):
  new = importlib.import_module(MOVED[old])
  sys.modules.pop(old, None)
  with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
    module = importlib.import_module(old)
  assert module is new
  assert sys.modules[old] is new


def test_every_old_module_file_is_covered():
  shims = {
      "ddpm_jax." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
      for p in PACKAGE.rglob("*.py")
      if "_moved.alias(" in p.read_text()
  }
  assert shims == set(MOVED)


@pytest.mark.parametrize("name", sorted(dj.__all__))
def test_top_level_names_resolve(name):
  value = getattr(dj, name)
  assert value is not None
  assert name in dir(dj)
  if name in SUBPACKAGES:
    assert value is importlib.import_module(f"ddpm_jax.{name}")
  else:  # The very object its defining module holds.
    assert getattr(importlib.import_module(dj._API[name]), name) is value


def test_unknown_top_level_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'sample_ddpm'"):
    dj.sample_ddpm  # noqa: B018


def test_every_public_function_has_a_static_docstring():
  missing = []
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text())
    for node in tree.body:
      if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and
          not node.name.startswith("_") and ast.get_docstring(node) is None):
        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
  assert not missing, "\n".join(missing)


def _ddpm_jax_modules(tree: ast.Module, path: pathlib.Path) -> dict[str, str]:
  """Local name -> ddpm_jax module, for the modules `tree` imports."""
  names = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or
                                             "").startswith("ddpm_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / full.replace(".", "/")).is_dir():
          names[alias.asname or alias.name] = full
  return names


def test_no_module_uses_a_private_name_of_another():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text())
    modules = _ddpm_jax_modules(tree, path)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or
                                               "").startswith("ddpm_jax"):
        for alias in node.names:
          private = alias.name.startswith("_")
          if private and f"{node.module}.{alias.name}" not in modules.values():
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports "
                         f"{node.module}.{alias.name}")
      if (isinstance(node, ast.Attribute) and
          isinstance(node.value, ast.Name) and node.value.id in modules and
          node.attr.startswith("_") and not node.attr.startswith("__")):
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses "
                     f"{modules[node.value.id]}.{node.attr}")
  assert not found, "\n".join(found)


@pytest.mark.slow
def test_importing_the_package_changes_no_global_state():
  probe = """
import copy, os, sys
import fsspec
env, conf = dict(os.environ), copy.deepcopy(fsspec.config.conf)
modules = set(sys.modules)
import ddpm_jax as dj
assert dict(os.environ) == env, set(os.environ) ^ set(env)
assert fsspec.config.conf == conf, fsspec.config.conf
new = sorted(m for m in set(sys.modules) - modules
             if not m.startswith("ddpm_jax"))
assert not [m for m in new if m.split(".")[0] in ("jax", "flax", "etils")], new
dj.ddim_sample
assert os.environ.get("EPATH_USE_TF") == env.get("EPATH_USE_TF")
import ddpm_jax.infra.storage  # Where files are opened: gs:// via gcsfs.
assert os.environ["EPATH_USE_TF"] == "false"
assert fsspec.config.conf["gcs"]["use_listings_cache"] is False
print("ok")
"""
  env = {
      k: v for k, v in __import__("os").environ.items() if k != "EPATH_USE_TF"
  }
  out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"


def test_as_path_sets_gcsfs_again(monkeypatch):
  from ddpm_jax.infra import storage  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("EPATH_USE_TF", raising=False)
  path = storage.as_path("gs://bucket/dir")
  assert __import__("os").environ["EPATH_USE_TF"] == "false"
  assert str(path) == "gs://bucket/dir"


def _body_lines(node: ast.FunctionDef) -> int:
  """Lines of a function's body, its docstring aside."""
  first = node.body[0]
  docstring = (isinstance(first, ast.Expr) and
               isinstance(first.value, ast.Constant) and
               isinstance(first.value.value, str))
  start = first.end_lineno + 1 if docstring else first.lineno
  return node.end_lineno - start + 1


def test_no_function_is_longer_than_80_lines():
  long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and
          _body_lines(node) > 80):
        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                    f"{_body_lines(node)} lines")
  assert not long, "\n".join(long)


def test_one_pytree_type():
  defined = [
      str(path.relative_to(ROOT))
      for path in sorted(PACKAGE.rglob("*.py"))
      if re.search(r"^PyTree = ", path.read_text(), re.M)
  ]
  assert defined == ["ddpm_jax/typing.py"], defined
