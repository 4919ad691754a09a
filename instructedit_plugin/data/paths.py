"""Find the directory that holds the knowledge-editing datasets.

The datasets are large, read-only and live outside the package, so their
location must come from the caller: an explicit ``data_dir`` argument, or the
``INSTRUCTEDIT_DATA_DIR`` environment variable. Nothing here guesses a path on
the current machine, so library code behaves the same on every host and a
missing setting fails with an error that says how to fix it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PluginError

DATA_DIR_ENV = "INSTRUCTEDIT_DATA_DIR"

__all__ = ["DATA_DIR_ENV", "resolve_data_dir"]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the dataset directory: ``data_dir`` if given, else ``$INSTRUCTEDIT_DATA_DIR``.

    The path is expanded (``~``) but not required to exist: a loader that opens a
    file under it reports a missing file with the full path.

    Raises:
        PluginError: neither ``data_dir`` nor the environment variable is set.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    from ..errors import fix_for

    raise PluginError(
        "no dataset directory given. Fix: "
        + fix_for("pass data_dir=...", "pass --data_dir FOLDER")
        + f" (the folder holding e.g. zsre/, counterfact/, mquake/) or set the {DATA_DIR_ENV} environment variable"
    )
