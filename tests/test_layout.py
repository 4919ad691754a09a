"""README.md's module map names every module of the runtime package, and only those.

The map is printed by ``python tools/layout.py`` (first docstring line of each module); a module added,
renamed or deleted without updating the README turns this test red.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_module_map_names_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M))
    package = REPO / "instructedit_plugin"
    actual = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert listed == actual, {"missing from README": sorted(actual - listed), "gone from the package": sorted(listed - actual)}


def test_every_module_says_its_job_in_its_docstring():
    import ast

    package = REPO / "instructedit_plugin"
    silent = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
              if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not silent, silent


def test_test_support_is_not_installed_with_the_package():
    """Tiny models and their tokenizer corpus are test fixtures: they live under tests/, not in the package."""
    package = REPO / "instructedit_plugin"
    assert not (package / "models" / "tiny.py").exists() and not (package / "models" / "tokenizer.py").exists()
    assert (REPO / "tests" / "support" / "tiny_models.py").is_file()
