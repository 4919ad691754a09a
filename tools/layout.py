"""Print the README's module map: every module of the runtime package, its one job, its size.

    python tools/layout.py            # markdown table for README.md's "Layout" section
    python tools/layout.py --totals   # only the line totals

The one-line job of a module is the first line of its docstring, so the map stays what the code
says about itself. ``tests/test_layout.py`` checks that README.md's map names every module.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "instructedit_plugin"


def modules() -> list[tuple[str, str, int]]:
    """``(path relative to the package, first docstring line, lines)`` for every ``.py`` file."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        out.append((path.relative_to(PACKAGE).as_posix(), doc.strip().split("\n")[0], len(text.splitlines())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--totals", action="store_true")
    args = parser.parse_args(argv)
    rows = modules()
    total = sum(n for _, _, n in rows)
    print(f"{len(rows)} modules, {total} lines of Python in instructedit_plugin/")
    if args.totals:
        return 0
    print("\n| module | its one job | lines |\n|---|---|---|")
    for rel, job, n in rows:
        print(f"| `{rel}` | {job.replace('|', '/')} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
