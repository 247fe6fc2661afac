"""The README and the pages of docs/ run, link and name modules as printed.

Every fenced block whose info string is exactly `python` in README.md and
docs/*.md is executed as printed, the blocks of one file in order in one
namespace (so a block may use the names of the blocks above it), with the
repository root as the working directory and a moved-module warning raised
as an error: a broken or outdated example fails here. A block that is shown
but not meant to run (it needs a trained workdir or a download) is fenced
```` ```python no-run ````; any other `python...` info string is an error,
so a misspelt marker cannot hide an example. Blocks of other languages
(`bash`, plain) are not run; the README's first block, the two commands of
a fresh machine, is checked against what CI runs (`.ci/run`).

The README's blocks run in the fast tier, the docs pages' in the slow one.
Also checked: every relative link and image of these pages, BENCHMARKS.md
and benchmarks/HISTORY.md points at a file of the repository, and every
`ddpm_jax.X.Y` name and `ddpm_jax/X.py` path the pages and BENCHMARKS.md
mention exists in the current layout (not an old module path kept for one
release).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import pathlib
import re
import warnings
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Pages whose links and module names are checked too; their history keeps
# the names of its dates, so only its links are.
BENCHMARKS = ROOT / "BENCHMARKS.md"
HISTORY = ROOT / "benchmarks" / "HISTORY.md"
RUN, NO_RUN = "python", "python no-run"
# What importing an old module path warns (ddpm_jax/_moved.py).
MOVED_WARNING = r".* moved to ddpm_jax\."


class Block(NamedTuple):
  info: str  # the fence's info string, e.g. 'python' or 'bash'.
  line: int  # 1-based line of the opening fence.
  code: str


def blocks(text: str) -> list[Block]:
  """The fenced blocks of a markdown text (fences at the start of a line)."""
  found, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    if lines[i].startswith("```"):
      start, info = i, lines[i][3:].strip()
      i += 1
      while i < len(lines) and lines[i].rstrip() != "```":
        i += 1
      if i == len(lines):
        raise ValueError(f"line {start + 1}: unclosed ``` fence")
      found.append(Block(info, start + 1, "\n".join(lines[start + 1:i]) + "\n"))
    i += 1
  return found


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def _runnable_pages() -> list[pathlib.Path]:
  return [
      p for p in PAGES
      if any(b.info == RUN for b in blocks(p.read_text(encoding="utf-8")))
  ]


def test_blocks_parse_fences_and_info_strings():
  text = ("# t\n```python\nx = 1\n```\ntext\n```python no-run\ny\n```\n"
          "```\nplain\n```\n")
  assert blocks(text) == [
      Block("python", 2, "x = 1\n"),
      Block("python no-run", 6, "y\n"),
      Block("", 9, "plain\n")
  ]
  with pytest.raises(ValueError, match="line 1: unclosed"):
    blocks("```python\nx = 1\n")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_blocks_are_marked_run_or_no_run(page):
  infos = [b.info for b in blocks(page.read_text(encoding="utf-8"))]
  bad = [i for i in infos if i.startswith("py") and i not in (RUN, NO_RUN)]
  assert not bad, (f"{_rel(page)}: fence info strings {bad}; use {RUN!r} or "
                   f"{NO_RUN!r}")


def test_readme_has_runnable_examples():
  assert ROOT / "README.md" in _runnable_pages()


@pytest.mark.parametrize("page", [
    pytest.param(p, marks=() if p.name == "README.md" else pytest.mark.slow)
    for p in _runnable_pages()
], ids=_rel)
def test_python_blocks_run_as_printed(page, monkeypatch):
  monkeypatch.chdir(ROOT)
  namespace = {"__name__": f"__{page.stem}__"}
  for block in blocks(page.read_text(encoding="utf-8")):
    if block.info != RUN:
      continue
    code = compile(block.code, f"{_rel(page)}:{block.line}", "exec")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
      warnings.filterwarnings("error", MOVED_WARNING, DeprecationWarning)
      exec(code, namespace)  # pylint: disable=exec-used


def test_readme_opens_with_the_commands_ci_runs():
  """The first block is the main job and the tests; CI installs the same
  extra and runs the same test command."""
  first = blocks((ROOT / "README.md").read_text(encoding="utf-8"))[0]
  assert first.info == "bash"
  main, tests = first.code.splitlines()
  assert main == ("pip install -e . && python -m ddpm_jax.main "
                  "--config=configs/digits.py --workdir=/tmp/ddpm_digits")
  install, run = tests.split(" && ")
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
  assert f"python3 -m {install}".replace("install ", "install -q ") in ci
  assert run in ci


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES + [BENCHMARKS, HISTORY], ids=_rel)
def test_relative_links_point_at_files(page):
  missing = []
  for target in _LINK.findall(page.read_text(encoding="utf-8")):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    path = (page.parent / target.split("#")[0]).resolve()
    if not path.exists():
      missing.append(target)
  assert not missing, f"{_rel(page)} links to missing files: {missing}"


def _is_old_path(path: str) -> bool:
  """Whether the module file at `path` is an old path kept for one release."""
  return "_moved.alias" in pathlib.Path(path).read_text(encoding="utf-8")


def _resolves(dotted: str) -> bool:
  """Whether `ddpm_jax.a.b...` is a module of the current layout, or an
  attribute of one (modules are imported only to read an attribute)."""
  parts = dotted.split(".")
  for n in range(len(parts), 0, -1):
    try:
      spec = importlib.util.find_spec(".".join(parts[:n]))
    except ImportError:  # A parent is a module, not a package.
      spec = None
    if spec is None:
      continue
    if _is_old_path(spec.origin):
      return False
    value = importlib.import_module(".".join(parts[:n]))
    for attr in parts[n:]:
      if not hasattr(value, attr):
        return False
      value = getattr(value, attr)
    return True
  return False


@pytest.mark.parametrize("page", PAGES + [BENCHMARKS], ids=_rel)
def test_module_names_are_of_the_current_layout(page):
  text = page.read_text(encoding="utf-8")
  names = set(re.findall(r"\bddpm_jax(?:\.\w+)+", text))
  files = set(re.findall(r"\bddpm_jax/[\w/]+\.py", text))
  bad = sorted(n for n in names if not _resolves(n))
  bad += sorted(
      f for f in files if not (ROOT / f).is_file() or _is_old_path(ROOT / f))
  assert not bad, f"{_rel(page)} names what does not exist (or moved): {bad}"
