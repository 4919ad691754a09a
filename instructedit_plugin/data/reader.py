"""Read raw records from ``.json`` (one array) and ``.jsonl`` (one object per line) files.

Every loader goes through :func:`read_records` so that all of them share the
same behaviour: ``limit`` decodes only the first N records (a JSON array is
decoded element by element, a JSON Lines file is read line by line), and a
broken file raises :class:`~instructedit_plugin.errors.DataSchemaError` naming
the file, the record index and the line/column instead of a bare
``JSONDecodeError`` that does not say which of many files was at fault.

A ``.json`` file whose first non-blank character is ``{`` is read as JSON
Lines: several upstream releases store JSON Lines under a ``.json`` name.
A UTF-8 byte-order mark, if any, is skipped.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataSchemaError, PluginError, fix_for

__all__ = ["JSON_KEY", "DataFileNotFoundError", "check_limit", "read_records"]

#: Pseudo key used in DataSchemaError when the file itself is not valid JSON.
JSON_KEY = "<json>"
#: Pseudo key used when the top level of a file has the wrong shape.
ROOT_KEY = "<root>"

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_FIX_JSON = "Fix: repair the file (or re-download it); with limit=N only the first N records are read"
_FIX_JSON_CLI = "Fix: repair the file (or re-download it); with --limit N only the first N records are read"


def _fix_json() -> str:
    return fix_for(_FIX_JSON, _FIX_JSON_CLI)


class DataFileNotFoundError(PluginError, FileNotFoundError):
    """A dataset file does not exist (also a ``FileNotFoundError``, as before)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        super().__init__(f"dataset file {self.path} does not exist. Fix: check the path; relative paths are resolved "
                         "from the current directory (the CLI also looks under --data_dir / INSTRUCTEDIT_DATA_DIR)")
_DECODER = json.JSONDecoder()


def check_limit(limit: int | None) -> int | None:
    """Return ``limit`` unchanged if it is ``None`` or a non-negative int, else raise."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise PluginError(f"limit must be None or an integer >= 0, got {limit!r}. Fix: " + fix_for(
            "pass a record count such as 100, or None for every record",
            "pass --limit with a record count such as 100, or leave --limit out for every record"))
    return limit


def _skip_ws(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _json_error(path: Path, index: int | None, err: json.JSONDecodeError) -> DataSchemaError:
    return DataSchemaError(
        str(path), index, JSON_KEY,
        f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}. {_fix_json()}",
    )


def _iter_json_array(text: str, path: Path) -> Iterator[Any]:
    """Yield the elements of the JSON array in ``text`` one at a time."""
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        found = "an empty file" if pos >= len(text) else f"{text[pos]!r}"
        raise DataSchemaError(str(path), None, ROOT_KEY, f"expected a JSON array of records, found {found}. "
                              "Fix: a .json file holds one array [{...}, ...]; use .jsonl for one record per line")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        _check_trailing(text, pos + 1, path)
        return
    index = 0
    while True:
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(path, index, err) from None
        yield obj
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            _check_trailing(text, pos + 1, path)
            return
        if pos >= len(text) or text[pos] != ",":
            err = json.JSONDecodeError("expected ',' or ']' after a record", text, min(pos, len(text)))
            raise _json_error(path, index, err)
        pos = _skip_ws(text, pos + 1)


def _check_trailing(text: str, pos: int, path: Path) -> None:
    pos = _skip_ws(text, pos)
    if pos < len(text):
        err = json.JSONDecodeError("extra data after the JSON array", text, pos)
        raise _json_error(path, None, err)


def _iter_json_lines(lines: Iterator[str], path: Path) -> Iterator[Any]:
    """Yield one decoded object per non-blank line."""
    index = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSchemaError(
                str(path), index, JSON_KEY,
                f"invalid JSON on line {lineno} (column {err.colno}): {err.msg}. {_fix_json()}",
            ) from None
        yield obj
        index += 1


def _take(items: Iterator[Any], limit: int | None) -> list[Any]:
    out: list[Any] = []
    if limit == 0:
        return out
    for item in items:
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def _is_json_lines(path: Path, text_start: str) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    stripped = text_start.lstrip()
    return stripped.startswith("{")


def read_records(path: str | os.PathLike[str], limit: int | None = None) -> list[Any]:
    """Decode the records of a ``.json`` array or ``.jsonl`` file (first ``limit`` only).

    The records are returned as decoded; checking their schema is the loaders' job.

    Raises:
        DataFileNotFoundError: ``path`` does not exist (a ``PluginError`` and a ``FileNotFoundError``).
        DataSchemaError: the file is not valid JSON / JSON Lines, is not UTF-8,
            or its top level is not an array.
    """
    limit = check_limit(limit)
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            head = handle.read(64)
            handle.seek(0)
            if _is_json_lines(path, head):
                return _take(_iter_json_lines(iter(handle), path), limit)
            text = handle.read()
    except UnicodeDecodeError as err:
        raise DataSchemaError(str(path), None, ROOT_KEY, f"file is not UTF-8 text ({err.reason}). "
                              "Fix: convert it to UTF-8 JSON / JSON Lines") from None
    except FileNotFoundError:
        raise DataFileNotFoundError(path) from None
    return _take(_iter_json_array(text, path), limit)
