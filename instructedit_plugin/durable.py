"""Crash-safe writes shared by every artefact the plugin saves.

Editors, prefixes and instruction memories are trained for hours and shared;
a half-written file must never replace a good one. Every writer here puts the
bytes in a temporary file in the *same* folder, flushes and fsyncs it, renames
it over the target with :func:`os.replace` (atomic on POSIX) and fsyncs the
folder so the rename itself survives a power cut.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort on filesystems without dir fsync)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a same-folder temp file, flush, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | os.PathLike, name: str) -> int:
    """Delete temp files that :func:`atomic_write_bytes` left for ``name`` in ``folder`` when a
    writer was killed mid-write (``.<name>.<random>.tmp``); returns how many were removed.

    Only for folders with a single writer: a concurrent writer's temp file would be removed too.
    """
    removed = 0
    head = f".{name}."
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        middle = entry.name[len(head):-len(".tmp")] if entry.name.startswith(head) and entry.name.endswith(".tmp") else ""
        if middle and "." not in middle and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def dumps_json(data: Any) -> str:
    """Deterministic JSON text (sorted keys) for files whose hash matters."""
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_bytes(path, dumps_json(data).encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
