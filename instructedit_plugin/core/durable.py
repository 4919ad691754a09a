"""Crash-safe writes shared by every artefact the plugin saves.

Editors, prefixes and instruction memories are trained for hours and shared;
a half-written file must never replace a good one. Every writer here puts the
bytes in a temporary file in the *same* folder, flushes and fsyncs it, renames
it over the target with :func:`os.replace` (atomic on POSIX) and fsyncs the
folder so the rename itself survives a power cut.

A checkpoint is usually *several* files that must change together (tensors, their config, the
trainer state), which no single rename can do; :func:`commit_folder` saves such a folder as a
small journal whose single commit point is one atomic rename (see "Folders of several files"
below), and :func:`manifest_path` / :func:`read_verified` are what its loaders use.

A folder that is built by other code (``save_pretrained``, a tokenizer, shipped package data) is
written with :func:`atomic_dir`: built under a temporary sibling name, fsynced, then swapped in
with one atomic exchange of the two names (Linux ``renameat2``; elsewhere the old folder is moved
aside first). :func:`atomic_write_file` does the same for one file that a callback writes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger(__name__)


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` like :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Files and folders that a callback builds
# ----------------------------------------------------------------------------------------------
#: Marks the temporary sibling a file or folder is built under (``.<name>.tmp-<random>``).
TEMP_MARKER = ".tmp-"
#: Marks where a replaced folder waits for deletion (``.<name>.old-<random>``).
OLD_MARKER = ".old-"


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, then every folder bottom-up (so their entries are durable)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync_file(path)
        fsync_dir(root)


def atomic_write_file(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create file ``final`` crash-safely from ``write(tmp_path)``, which fills a temporary sibling
    (for writers that want a path, not bytes); then fsync, :func:`os.replace` and fsync the folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{TEMP_MARKER}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)
    return final


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, changing nothing, where the platform or file system cannot do it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(second))


def publish_folder(built: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete folder ``built`` (a sibling of ``final``) appear as ``final`` in one step.

    Its files are made readable (0644) and fsynced first. A missing ``final`` is created by one
    rename; an existing one is exchanged with ``built`` atomically and then deleted, so a crash
    leaves the old or the new folder under ``final``, never a mix. Without an atomic exchange the
    old folder is moved aside first (a crash there leaves it under ``.<name>.old-*``). When another
    process published ``final`` concurrently, its folder is kept and ``built`` is discarded.
    """
    built, final = Path(built), Path(final)
    for path in built.rglob("*"):  # some writers (safetensors) create 0600 files
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o644)
    fsync_tree(built)
    try:
        os.replace(built, final)  # fails unless final is missing or an empty folder
        fsync_dir(final.parent)
        return
    except OSError:
        if not final.exists():
            shutil.rmtree(built, ignore_errors=True)
            raise
    if exchange_paths(built, final):  # ``built`` now holds the old folder
        fsync_dir(final.parent)
        shutil.rmtree(built, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}{OLD_MARKER}", dir=final.parent))
    old = aside / "dir"
    try:
        os.replace(final, old)
    except OSError:  # vanished meanwhile: fine
        pass
    try:
        os.replace(built, final)
    except OSError:
        shutil.rmtree(built, ignore_errors=True)
        if not final.exists():  # our rename failed: put the old folder back and report it
            if old.exists():
                os.replace(old, final)
            fsync_dir(final.parent)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        LOG.info("%s was published concurrently; discarding this build", final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary sibling name, then :func:`publish_folder` it as ``final``.

    Usage::

        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
        # here ``target`` exists and is complete

    If the body (or the publishing) raises, the temporary folder is deleted and ``final`` is left
    as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARKER}", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a published folder should be readable
    try:
        yield tmp
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Folders of several files, committed together
# ----------------------------------------------------------------------------------------------
# A folder saved by :func:`commit_folder` holds data files and one JSON *manifest* whose
# ``"files"`` entry maps every data file's name to its sha256. A save is a small journal:
#
# 1. every new data file is written (temp file, fsync, rename) under a *staged* name,
#    ``<name>.staged``; the current files are untouched;
# 2. the new manifest is written the same way under its *pending* name (``manifest.json`` ->
#    ``manifest.next.json``): **the commit point**;
# 3. each staged file is renamed over its final name, then the pending manifest over the manifest;
#    data files the new manifest no longer lists, staged copies and temp files are removed.
#
# Killed before step 2, the folder is the previous version (staged files are never read in its
# place: their hashes are not the manifest's). Killed after it, the folder is the new version,
# each of whose files is either still staged or already renamed: a loader reads the manifest
# :func:`manifest_path` names and each file with :func:`read_verified`, which takes whichever copy
# has the hash the manifest lists, without writing anything; the next save (or
# :func:`finish_pending`) completes the renames first. Either way a load sees the previous or the
# new version complete and bit-identical, never a mix.

#: Suffix of a data file written by a save that has not (yet) finished.
STAGED_SUFFIX = ".staged"


class DigestMismatchError(ValueError):
    """No copy of a file (final or staged) has the sha256 its manifest lists."""


def staged_name(name: str) -> str:
    """The name ``name`` is written under before its save commits."""
    return name + STAGED_SUFFIX


def pending_manifest_name(manifest_name: str) -> str:
    """The commit-point name of ``manifest_name``: ``manifest.json`` -> ``manifest.next.json``."""
    stem, dot, ext = manifest_name.rpartition(".")
    return f"{stem}.next.{ext}" if dot and stem else f"{manifest_name}.next"


def manifest_path(folder: str | os.PathLike, manifest_name: str) -> Path:
    """The manifest a load of ``folder`` must use: the pending one when a save committed but did not
    finish its renames, else ``manifest_name`` (which may not exist)."""
    folder = Path(folder)
    pending = folder / pending_manifest_name(manifest_name)
    return pending if pending.is_file() else folder / manifest_name


def has_manifest(folder: str | os.PathLike, manifest_name: str) -> bool:
    """Whether ``folder`` holds a committed save (its manifest, or a pending one)."""
    return manifest_path(folder, manifest_name).is_file()


def _check_file_names(names: Iterable[Any], manifest_name: str) -> None:
    reserved = {manifest_name, pending_manifest_name(manifest_name)}
    for name in names:
        if (not isinstance(name, str) or not name or Path(name).name != name or "\\" in name
                or name.startswith(".") or name.endswith(STAGED_SUFFIX) or name in reserved):
            raise ValueError(f"{name!r} cannot be a file of a folder committed with {manifest_name!r} (a plain "
                             f"file name, not hidden, not *{STAGED_SUFFIX} and not the manifest itself)")


def manifest_files(manifest: Any, manifest_name: str) -> dict[str, str]:
    """The ``{name: sha256}`` map of ``manifest``; :class:`ValueError` unless it is well formed."""
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError(f"{manifest_name}: 'files' must map file names to sha256 digests")
    _check_file_names(files, manifest_name)
    return dict(files)


def read_verified(folder: str | os.PathLike, name: str, expected: str) -> bytes:
    """The bytes of ``name`` in ``folder`` whose sha256 is ``expected``: its staged copy (a committed
    save whose renames were interrupted) or the file itself. Never writes.

    Raises:
        FileNotFoundError: neither copy exists.
        DigestMismatchError: no copy has that hash (a modified, corrupted or replaced file).
        OSError: a copy exists but cannot be read (``filename`` names it).
    """
    folder = Path(folder)
    found = False
    for candidate in (folder / staged_name(name), folder / name):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        found = True
        if sha256_bytes(data) == expected:
            return data
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(folder / name))
    raise DigestMismatchError(f"{folder / name} does not match the sha256 its manifest lists")


def finish_pending(folder: str | os.PathLike, manifest_name: str,
                   check: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """Complete a committed save of ``folder`` whose renames were interrupted (idempotent); returns
    whether there was one. A pending manifest that is not JSON, whose ``files`` are malformed or that
    ``check`` rejects (by raising :class:`ValueError`) was not written by :func:`commit_folder`: it is
    moved aside to ``<pending>.invalid`` and the committed manifest stays in force."""
    folder = Path(folder)
    pending = folder / pending_manifest_name(manifest_name)
    if not pending.is_file():
        return False
    try:
        manifest = json.loads(pending.read_bytes().decode("utf-8"))
        files = manifest_files(manifest, manifest_name)
        if check is not None:
            check(manifest)
    except ValueError:  # also JSON and Unicode errors
        os.replace(pending, folder / (pending.name + ".invalid"))
        fsync_dir(folder)
        return False
    for name, expected in files.items():
        staged = folder / staged_name(name)
        if staged.is_file() and sha256_bytes(staged.read_bytes()) == expected:
            os.replace(staged, folder / name)
    fsync_dir(folder)
    os.replace(pending, folder / manifest_name)
    fsync_dir(folder)
    return True


def _listed_files(folder: Path, manifest_name: str) -> set[str]:
    """Names the committed manifest lists (none when it is missing or unreadable)."""
    try:
        return set(manifest_files(json.loads((folder / manifest_name).read_bytes().decode("utf-8")), manifest_name))
    except (OSError, ValueError):
        return set()


def _remove_leftovers(folder: Path, manifest_name: str, names: Iterable[str], keep: Iterable[str] | None) -> None:
    """Remove staged copies and temp files of ``names`` and of the manifests; with ``keep``, also
    the data files among ``names`` that are not in it."""
    keep = None if keep is None else set(keep)
    pending = pending_manifest_name(manifest_name)
    for name in sorted(set(names)):
        remove_stale_temp_files(folder, name)
        remove_stale_temp_files(folder, staged_name(name))
        try:
            (folder / staged_name(name)).unlink()
        except FileNotFoundError:
            pass
        if keep is not None and name not in keep:
            try:
                (folder / name).unlink()
            except FileNotFoundError:
                pass
    for name in (manifest_name, pending):
        remove_stale_temp_files(folder, name)


def _encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return dumps_json(manifest).encode("utf-8")


def commit_folder(folder: str | os.PathLike, files: Mapping[str, bytes], manifest_name: str,
                  manifest: Mapping[str, Any], *, encode: Callable[[dict[str, Any]], bytes] = _encode_manifest,
                  check: Callable[[dict[str, Any]], None] | None = None,
                  known_names: Iterable[str] = ()) -> dict[str, str]:
    """Replace the contents of ``folder`` with ``files`` and ``manifest`` as one crash-safe step.

    ``files`` maps plain file names to their bytes; ``manifest`` is written to ``manifest_name``
    with its ``"files"`` entry set to ``{name: sha256}`` of ``files`` (``encode`` turns it into
    bytes; the default is :func:`dumps_json`). Killed at any moment, the folder loads (through
    :func:`manifest_path` and :func:`read_verified`) as the previous version or as this one, complete;
    see the notes above. A pending save left by an earlier writer is finished first (``check`` as in
    :func:`finish_pending`). Afterwards data files of the previous manifest, or among
    ``known_names``, that ``files`` does not include are removed, with every staged copy and temp
    file of an interrupted save. The folder must have a single writer. Returns the hashes.
    """
    folder = Path(folder)
    _check_file_names(files, manifest_name)
    folder.mkdir(parents=True, exist_ok=True)
    finish_pending(folder, manifest_name, check)
    names = set(files) | _listed_files(folder, manifest_name) | set(known_names)
    _remove_leftovers(folder, manifest_name, names, keep=None)  # the current version stays untouched
    hashes = {}
    for name, data in files.items():
        atomic_write_bytes(folder / staged_name(name), data)
        hashes[name] = sha256_bytes(data)
    atomic_write_bytes(folder / pending_manifest_name(manifest_name), encode({**manifest, "files": hashes}))  # commit
    finish_pending(folder, manifest_name)  # our own manifest: no need to check it
    _remove_leftovers(folder, manifest_name, names, keep=hashes)
    return hashes
