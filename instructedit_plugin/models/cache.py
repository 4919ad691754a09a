"""On-disk cache for built model folders, with crash-safe (atomic) publishing.

Every folder the plugin builds (tiny test models, the BPE tokenizer, the converted
embedded LM) is first written into a temporary *sibling* folder and then moved
into place with :func:`os.replace`, which is atomic on POSIX when source and
target are on the same file system. A process killed half-way through a build
therefore leaves at most a stray ``.<name>.tmp-*`` folder behind, never a
half-written model folder under the final name; the next build ignores such
leftovers (and :func:`remove_stale_temp_dirs` can clean them up).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "INSTRUCTEDIT_CACHE"
_TMP_MARKER = ".tmp-"


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
    """Write ``data`` as indented, key-sorted JSON (with a trailing newline)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """Read a JSON file; ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary sibling name, then publish it as ``final``.

    Usage::

        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
        # here ``target`` exists and is complete

    If the body raises, the temporary folder is deleted and ``final`` is left
    untouched. If ``final`` already exists when the body finishes (a concurrent
    build won the race, or the caller is replacing a stale folder), the old folder
    is moved aside first and deleted after the new one is in place; when the move
    fails because another process just published the same folder, the freshly
    built copy is discarded and the published one is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARKER}", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a published cache folder should be readable
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)


def _publish(tmp: Path, final: Path) -> None:
    for path in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
        if path.is_file():
            os.chmod(path, 0o644)
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if not final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # ``final`` exists (os.replace cannot overwrite a non-empty folder): move it
    # aside, publish ours, then delete the old one.
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    try:
        os.replace(final, old / "dir")
    except OSError:  # vanished meanwhile: fine
        pass
    try:
        os.replace(tmp, final)
    except OSError:
        # Someone else published in the gap; keep theirs.
        logger.info("%s was published concurrently; discarding this build", final)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_file(final: str | os.PathLike[str], write: Any) -> Path:
    """Create file ``final`` atomically: ``write(tmp_path)`` fills a temp sibling file,
    which is then moved into place with :func:`os.replace`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{_TMP_MARKER}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return final


def remove_stale_temp_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete leftover temporary build folders/files directly under ``root``
    (default: :func:`cache_dir`). Only call this when no build is running."""
    root = Path(root) if root is not None else cache_dir()
    removed = []
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.name.startswith(".") and (_TMP_MARKER in entry.name or ".old-" in entry.name):
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
