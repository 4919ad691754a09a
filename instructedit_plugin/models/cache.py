"""Where built model folders are cached, and how they are keyed, locked and cleaned up.

Every folder the plugin builds (tiny test models, the BPE tokenizer, the converted
embedded LM) is written through :mod:`instructedit_plugin.core.durable` (its
:func:`atomic_dir` and :func:`atomic_write_file` are re-exported here; :func:`write_json` uses it): built
under a temporary sibling name, fsynced, then swapped in atomically. A process killed half-way
through a build therefore leaves at most a stray ``.<name>.tmp-*`` folder behind, never a
half-written model folder under the final name; the next build ignores such leftovers (and
:func:`remove_stale_temp_dirs` can clean them up).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import durable
from ..core.durable import atomic_dir, atomic_write_file  # noqa: F401 - re-exported: the cache's writers

CACHE_ENV_VAR = "INSTRUCTEDIT_CACHE"
_TMP_MARKER = durable.TEMP_MARKER


def cache_dir() -> Path:
    """Return the plugin's cache root, creating it if needed.

    ``$INSTRUCTEDIT_CACHE`` when set (and non-empty), else
    ``~/.cache/instructedit_plugin``.
    """
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "instructedit_plugin"
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(payload: Any, length: int = 12) -> str:
    """A short, stable hex digest of a JSON-serialisable ``payload`` (keys sorted)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | os.PathLike[str], block_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (with a trailing newline), crash-safely."""
    durable.atomic_write_json(path, data)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """Read a JSON file; ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_stale_temp_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete leftover temporary build folders/files directly under ``root``
    (default: :func:`cache_dir`). Only call this when no build is running."""
    root = Path(root) if root is not None else cache_dir()
    removed = []
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.name.startswith(".") and (_TMP_MARKER in entry.name or durable.OLD_MARKER in entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block.

    Used around expensive builds so that concurrent processes sharing one cache
    (pytest-xdist workers, parallel jobs) build once and reuse the result. On
    platforms without :mod:`fcntl` it degrades to a no-op; atomic publishing
    still keeps the cache consistent there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
