"""Load a repository script (``examples/*.py``, ``benchmarks/*.py``) as a module, once per session."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, module_name: str | None = None) -> ModuleType:
    """The module of the script at ``path`` (relative to the repository root or absolute), cached in
    ``sys.modules`` under ``module_name`` (default: ``script_<folder>_<stem>``)."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO / path
    name = module_name or f"script_{path.parent.name}_{path.stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
