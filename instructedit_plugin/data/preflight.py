"""Fail fast on data: check every file a command will read before it loads a model or trains.

A command that reads several dataset files should learn that the third one is missing (or is
truncated JSON) in a second, not after a model load and twenty minutes of training. Call
:func:`check_data_files` first with every file the command will read; it returns what the loader
read, so the command goes on with those records instead of reading the files again::

    from instructedit_plugin.data.preflight import check_data_files

    checked = check_data_files({"--train": "counterfact/counterfact-train.json",
                                "--val": "counterfact/counterfact-val.json"}, data_dir=args.data_dir)
    train = checked["--train"].records          # what load_requests returned
    path = checked["--train"].path              # where the file was found

It raises one :class:`DataFilesError` (a :class:`~instructedit_plugin.errors.PluginError`) whose
message is one line naming the file(s) and ending with ``Fix: ...``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from ..errors import PluginError
from .paths import DATA_DIR_ENV, resolve_data_dir
from .reader import check_limit

__all__ = ["CheckedFile", "DataFilesError", "check_data_files", "find_data_file"]

PathLike = Union[str, "os.PathLike[str]"]


class DataFilesError(PluginError):
    """Data files a command needs are missing (``missing``) or do not parse (``unreadable``).

    ``missing``: label -> the path as given; ``unreadable``: label -> the loader's message.
    """

    def __init__(self, message: str, missing: Mapping[str, str] | None = None,
                 unreadable: Mapping[str, str] | None = None):
        self.missing = dict(missing or {})
        self.unreadable = dict(unreadable or {})
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """A data file that exists and parsed: where it was found and what the loader returned."""

    label: str
    path: Path
    records: Any


def _data_root(data_dir: PathLike | None) -> Path | None:
    try:
        return resolve_data_dir(data_dir)
    except PluginError:  # neither --data_dir nor INSTRUCTEDIT_DATA_DIR: paths are taken as given
        return None


def find_data_file(path: PathLike, data_dir: PathLike | None = None) -> Path | None:
    """``path`` as given when it exists, else under ``data_dir`` / ``$INSTRUCTEDIT_DATA_DIR``; None if neither."""
    given = Path(os.path.expanduser(str(path)))
    if given.exists():
        return given
    root = _data_root(data_dir)
    if root is not None and not given.is_absolute() and (root / given).exists():
        return root / given
    return None


def _problem_and_fix(message: str) -> tuple[str, str]:
    problem, sep, fix = message.partition(" Fix: ")
    return (problem.rstrip(". ") or message, fix) if sep else (message.rstrip(". "), "")


def check_data_files(
    files: Mapping[str, PathLike] | Sequence[PathLike],
    *,
    data_dir: PathLike | None = None,
    limit: int | None | Mapping[str, int | None] = None,
    loader: Callable[..., Any] | None = None,
) -> dict[str, CheckedFile]:
    """Check that every file in ``files`` exists and parses; return ``{label: CheckedFile}``.

    Args:
        files: ``{label: path}`` -- the label is how the user named the file, e.g. ``"--train"`` or
            ``"--task counterfact"``, and appears in the error -- or a list of paths (each labelled
            by itself). A relative path that does not exist as given is looked up under
            ``data_dir`` (else ``$INSTRUCTEDIT_DATA_DIR``, when set).
        data_dir: the dataset folder for relative paths (``--data_dir``); optional.
        limit: read only the first N records of each file, as the command will (``--limit``); a
            ``{label: N or None}`` mapping gives files their own limits (unlisted labels: None).
        loader: ``loader(path, limit=limit)`` parses one file; default
            :func:`instructedit_plugin.data.load_requests` (format guessed from the file name);
            pass :func:`instructedit_plugin.data.load_mquake` for MQuAKE cases.

    First every file's existence is checked (no parsing, so a missing file fails at once, all
    missing files in one message); then each file is parsed with ``loader``.

    Raises:
        DataFilesError: one line naming each missing file, or each file that does not parse with
            the loader's reason (record, key, line/column), ending with ``Fix: ...``.
        PluginError: ``limit`` is not None or an integer >= 0.
    """
    items = list(files.items()) if isinstance(files, Mapping) else [(str(p), p) for p in files]
    limits = {label: (limit.get(label) if isinstance(limit, Mapping) else limit) for label, _ in items}
    for value in limits.values():
        check_limit(value)
    if loader is None:
        from . import load_requests as loader

    found: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for label, path in items:
        where = find_data_file(path, data_dir)
        if where is None:
            missing[label] = str(path)
        else:
            found[label] = where
    if missing:
        raise DataFilesError(_missing_message(missing, data_dir), missing=missing)

    checked: dict[str, CheckedFile] = {}
    unreadable: dict[str, str] = {}
    for label, path in found.items():
        if path.is_dir():
            unreadable[label] = f"{path} is a folder, not a data file. Fix: give the file inside it"
            continue
        try:
            records = loader(path, limit=limits[label])
        except (PluginError, OSError, UnicodeDecodeError) as exc:  # DataSchemaError names file, record, key
            unreadable[label] = str(exc)
            continue
        checked[label] = CheckedFile(label, path, records)
    if unreadable:
        raise DataFilesError(_unreadable_message(unreadable, found), unreadable=unreadable)
    return checked


def _named(label: str, path: str) -> str:
    return path if label == path else f"{label} {path}"


def _missing_message(missing: Mapping[str, str], data_dir: PathLike | None) -> str:
    root = _data_root(data_dir)
    listed = ", ".join(_named(label, path) for label, path in missing.items())
    head = "data file not found" if len(missing) == 1 else f"{len(missing)} data files not found"
    where = (f"under {root} (--data_dir / {DATA_DIR_ENV})" if root is not None
             else f"under --data_dir / {DATA_DIR_ENV} (neither is set)")
    return (f"{head}: {listed}; nothing was loaded or trained. Fix: give existing files; a relative path is looked "
            f"up in the current directory, then {where}")


def _unreadable_message(unreadable: Mapping[str, str], found: Mapping[str, Path]) -> str:
    if len(unreadable) == 1:
        ((label, message),) = unreadable.items()
        problem, fix = _problem_and_fix(message)
        name = label if str(found[label]) in problem else _named(label, str(found[label]))
        return (f"data file {name} does not parse: {problem}; nothing was loaded or trained. "
                f"Fix: {fix or 'repair or replace the file'}")
    parts, fixes = [], []
    for label, message in unreadable.items():
        problem, fix = _problem_and_fix(message)
        parts.append(problem if problem.startswith(label) else f"{label}: {problem}")
        if fix and fix not in fixes:
            fixes.append(fix)
    return (f"{len(unreadable)} data files do not parse ({'; '.join(parts)}); nothing was loaded or trained. "
            f"Fix: {' / '.join(fixes) or 'repair or replace the files'}")
