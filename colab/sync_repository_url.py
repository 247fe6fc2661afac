"""Writes setup.py's `url` into the notebooks and the README's Colab badges.

The repository URL is one setting, `url=` in setup.py. The notebooks' install
cell (`REPO = ...`), their Open-in-Colab badges and the README's badges are
copies that Colab needs before anything is installed; this script rewrites
them from the setting:

  python colab/sync_repository_url.py          # rewrite
  python colab/sync_repository_url.py --check  # exit 1 if any copy differs
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# github.com/OWNER/NAME, as a plain link or inside a Colab badge link.
_GITHUB = re.compile(r"(colab\.research\.google\.com/github/|https://github\.com/)"
                     r"([\w.-]+/[\w.-]+?)(?=[/\"\)\s\\]|$)")


def repository() -> str:
  """OWNER/NAME of setup.py's `url="https://github.com/OWNER/NAME"`."""
  setup = (ROOT / "setup.py").read_text(encoding="utf-8")
  match = re.search(r'url="https://github\.com/([\w.-]+/[\w.-]+)"', setup)
  if match is None:
    raise SystemExit("setup.py has no url=\"https://github.com/OWNER/NAME\".")
  return match.group(1)


def files() -> list[pathlib.Path]:
  return [ROOT / "README.md"] + sorted((ROOT / "colab").glob("*.ipynb"))


def stale(path: pathlib.Path, repo: str) -> list[str]:
  """The repository names in `path` that are not `repo`."""
  return [m.group(2) for m in _GITHUB.finditer(path.read_text(encoding="utf-8"))
          if m.group(2) != repo]


def main(argv: list[str]) -> int:
  repo = repository()
  if argv[1:] == ["--check"]:
    bad = {str(p.relative_to(ROOT)): stale(p, repo) for p in files()}
    bad = {k: v for k, v in bad.items() if v}
    for name, names in bad.items():
      print(f"{name}: {', '.join(sorted(set(names)))} instead of {repo}")
    return 1 if bad else 0
  for path in files():
    text = path.read_text(encoding="utf-8")
    new = _GITHUB.sub(lambda m: m.group(1) + repo, text)
    if new != text:
      path.write_text(new, encoding="utf-8")
      print(f"updated {path.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
