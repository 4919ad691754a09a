"""Saving and loading instruction memories: one folder, one manifest, written with ``durable.commit_folder``.

A saved memory (format version 2) is a folder holding

* ``embeddings.safetensors``: ``embeddings`` ``[n, d]`` in the storage dtype, ``ids`` int64 and
  ``norms`` float32 ``[n]`` (norms of the unnormalised embeddings, for the gate's ``score: dot``;
  absent in folders saved before it was kept);
* ``records.jsonl``: one ``{"id", "text", "metadata"}`` object per line;
* ``index.faiss`` (only for ``index="ivf"``): the trained FAISS index (``faiss.serialize_index``);
* ``manifest.json``: format, format version, plugin version, count, dim, dtype,
  next id, the encoder's identity (name, dim, sha256 of its weights and of its
  config), the caller's ``info`` (e.g. the editing hparams), the index settings,
  ``gate`` (the calibrated retrieval gate written by ``instructedit calibrate-gate``:
  ``threshold``, ``score``, ``std``, ``pad``, ``top_k`` and the calibration's figures;
  null when not calibrated) and the sha256 of every file.

The folder is written by :func:`~...core.durable.commit_folder`: killed at any
moment, it loads as the previous save or as the new one, complete. Loading
checks every sha256 (:func:`~...core.durable.read_verified`) and never unpickles
anything (safetensors, JSON and FAISS's own binary format, read only after its
hash matched). Folders of format version 1 (content-named
``embeddings-<hash>.safetensors`` / ``records-<hash>.jsonl``, a manifest whose
``files`` entries are ``{"sha256", "bytes", "role"}``) still load; saving into
one rewrites it as version 2. Concurrent saves into the same folder are not supported.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...core import durable
from ...core.checkpoint import plugin_version
from ...errors import PluginError

__all__ = [
    "MANIFEST_NAME",
    "MEMORY_FORMAT",
    "MEMORY_FORMAT_VERSION",
    "EncoderMismatchError",
    "MemoryFormatError",
    "SavedMemory",
    "read_folder",
    "read_manifest",
    "resolve_encoder",
    "write_folder",
]

MEMORY_FORMAT = "instructedit-plugin/instruction-memory"
MEMORY_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
RECORDS_FILE = "records.jsonl"
INDEX_FILE = "index.faiss"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
REBUILD = " Fix: restore the folder from a backup or rebuild the memory (add the instructions again and save)"


class MemoryFormatError(PluginError):
    """A saved memory folder is missing, corrupted, tampered with or of an unknown format."""


class EncoderMismatchError(MemoryFormatError):
    """A saved memory was built with a different sentence encoder than the one given."""


@dataclass
class SavedMemory:
    """What a memory folder holds (the memory's contents, as :func:`write_folder` takes and :func:`read_folder` gives)."""

    dtype: str
    dim: int | None
    embeddings: torch.Tensor
    ids: list[int]
    texts: list[str]
    metadata: list[dict[str, Any]]
    next_id: int
    encoder: dict[str, Any] | None
    info: dict[str, Any]
    index: dict[str, Any] | None = None
    index_bytes: bytes | None = None
    norms: torch.Tensor | None = None
    gate: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- writing
def write_folder(folder: str | os.PathLike[str], saved: SavedMemory) -> Path:
    """Save ``saved`` into ``folder`` as one crash-safe commit; returns the manifest path."""
    import safetensors.torch

    folder = Path(folder)
    tensors = {"embeddings": saved.embeddings, "ids": torch.tensor(saved.ids, dtype=torch.long)}
    if saved.norms is not None:
        tensors["norms"] = saved.norms.to(torch.float32).contiguous()
    lines = io.StringIO()
    for item_id, text, meta in zip(saved.ids, saved.texts, saved.metadata):
        lines.write(json.dumps({"id": item_id, "text": text, "metadata": meta}, ensure_ascii=False,
                               allow_nan=False, sort_keys=True))
        lines.write("\n")
    files = {
        EMBEDDINGS_FILE: safetensors.torch.save(tensors, metadata={"format": MEMORY_FORMAT, "dtype": saved.dtype}),
        RECORDS_FILE: lines.getvalue().encode("utf-8"),
    }
    if saved.index_bytes is not None:
        files[INDEX_FILE] = saved.index_bytes
    manifest = {
        "format": MEMORY_FORMAT,
        "format_version": MEMORY_FORMAT_VERSION,
        "plugin_version": plugin_version(),
        "count": len(saved.ids),
        "dim": saved.dim,
        "dtype": saved.dtype,
        "next_id": saved.next_id,
        "encoder": saved.encoder,
        "info": saved.info,
        "index": saved.index,
    }
    if saved.gate is not None:
        manifest["gate"] = saved.gate
    durable.commit_folder(folder, files, MANIFEST_NAME, manifest, known_names=_version1_files(folder))
    return folder / MANIFEST_NAME


def _version1_files(folder: Path) -> list[str]:
    """Data files of a format-1 manifest in ``folder`` (removed once a version-2 save commits)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format_version") == 1 else None
    if not isinstance(files, dict):
        return []
    return [name for name, entry in files.items()
            if isinstance(name, str) and Path(name).name == name and not name.startswith(".") and isinstance(entry, dict)]


# ---------------------------------------------------------------------------- reading
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved memory folder, checked for format and version (files not read)."""
    folder = Path(folder)
    manifest_path = durable.manifest_path(folder, MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MemoryFormatError(f"{folder}: no {MANIFEST_NAME}; not a saved InstructionMemory folder. "
                                "Fix: point at the folder InstructionMemory.save() / save_memory() wrote") from exc
    except (OSError, ValueError) as exc:
        raise MemoryFormatError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})." + REBUILD) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MEMORY_FORMAT:
        raise MemoryFormatError(f"{manifest_path}: not an instruction-memory manifest (format "
                                f"{manifest.get('format') if isinstance(manifest, dict) else None!r}). "
                                "Fix: point at the folder InstructionMemory.save() / save_memory() wrote")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > MEMORY_FORMAT_VERSION:
        raise MemoryFormatError(f"{manifest_path}: format_version {version!r} is not supported (this "
                                f"plugin reads 1 to {MEMORY_FORMAT_VERSION}). Fix: upgrade instructedit-plugin")
    for key, kind in (("files", dict), ("count", int), ("encoder", (dict, type(None))), ("info", (dict, type(None))),
                      ("index", (dict, type(None))), ("gate", (dict, type(None)))):
        if key in manifest and not isinstance(manifest[key], kind):
            raise MemoryFormatError(f"{manifest_path}: field '{key}' has the wrong type "
                                    f"({type(manifest[key]).__name__}); the manifest was modified or corrupted." + REBUILD)
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("count"), int):
        raise MemoryFormatError(f"{manifest_path}: field 'files' or 'count' is missing; "
                                "the manifest was modified or corrupted." + REBUILD)
    return manifest


def _read_files(folder: Path, manifest: dict[str, Any], manifest_path: Path) -> dict[str, bytes]:
    """The verified bytes of every listed file, by role (``embeddings``, ``records``, ``index``)."""
    version1 = manifest["format_version"] == 1
    roles = {EMBEDDINGS_FILE: "embeddings", RECORDS_FILE: "records", INDEX_FILE: "index"}
    blobs: dict[str, bytes] = {}
    for name, entry in manifest["files"].items():
        expected = entry.get("sha256") if version1 and isinstance(entry, dict) else entry
        if not isinstance(name, str) or Path(name).name != name or not isinstance(expected, str):
            raise MemoryFormatError(f"{manifest_path}: file entry {name!r} is not a plain name with its sha256." + REBUILD)
        role = entry.get("role") if version1 else roles.get(name)
        try:
            data = (folder / name).read_bytes() if version1 else durable.read_verified(folder, name, expected)
        except durable.DigestMismatchError:
            data = None
        except OSError as exc:
            raise MemoryFormatError(f"{folder / name}: listed in the manifest but unreadable ({exc}); the folder is "
                                    "incomplete. Fix: restore the folder from a backup or rebuild the memory") from exc
        if data is None or durable.sha256_bytes(data) != expected:
            try:
                found = durable.sha256_bytes((folder / name).read_bytes())[:16]
            except OSError:
                found = "(unreadable)"
            raise MemoryFormatError(
                f"{folder / name}: sha256 {found}... does not match the manifest ({expected[:16]}...); the file was "
                "modified or corrupted. Fix: restore it from a backup or rebuild the memory")
        if role in blobs or role not in ("embeddings", "records", "index"):
            raise MemoryFormatError(f"{manifest_path}: unexpected file {name!r} (role {role!r})." + REBUILD)
        blobs[role] = data
    if not {"embeddings", "records"} <= set(blobs):
        raise MemoryFormatError(f"{manifest_path}: expected an embeddings and a records file, got {sorted(blobs)}." + REBUILD)
    return blobs


def read_folder(folder: str | os.PathLike[str]) -> SavedMemory:
    """Read and verify a memory folder of any supported format version (encoder not checked here)."""
    import safetensors.torch

    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest_path = durable.manifest_path(folder, MANIFEST_NAME)
    dtype_name = manifest.get("dtype")
    if dtype_name not in _DTYPES:
        raise MemoryFormatError(f"{manifest_path}: unknown dtype {dtype_name!r}." + REBUILD)
    blobs = _read_files(folder, manifest, manifest_path)
    try:
        tensors = safetensors.torch.load(blobs["embeddings"])
    except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError)
        raise MemoryFormatError(f"{folder}: the embeddings file is not a safetensors file ({exc}); "
                                "only safetensors is read (never pickle)." + REBUILD) from exc
    try:
        records = [json.loads(line) for line in blobs["records"].decode("utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemoryFormatError(f"{folder}: the records file is not UTF-8 JSON Lines ({exc})." + REBUILD) from exc
    if not all(isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("metadata", {}), (dict, type(None)))
               for r in records):
        raise MemoryFormatError(f"{folder}: a record is not {{'id', 'text', 'metadata'}}." + REBUILD)
    emb, ids = tensors.get("embeddings"), tensors.get("ids")
    count, dim = manifest.get("count"), manifest.get("dim")
    if (emb is None or ids is None or emb.dim() != 2 or emb.shape[0] != count or ids.shape != (count,)
            or (count and emb.shape[1] != dim) or emb.dtype != _DTYPES[dtype_name] or len(records) != count
            or ids.dtype != torch.long):
        raise MemoryFormatError(f"{folder}: data files disagree with the manifest (count/dim/dtype)." + REBUILD)
    if [r.get("id") for r in records] != ids.tolist():
        raise MemoryFormatError(f"{folder}: records and embeddings list different ids." + REBUILD)
    norms = tensors.get("norms")
    if norms is not None and (norms.shape != (count,) or norms.dtype != torch.float32):
        raise MemoryFormatError(f"{folder}: the stored norms disagree with the manifest's count." + REBUILD)
    next_id = manifest.get("next_id", 0)
    return SavedMemory(
        dtype=dtype_name, dim=int(dim) if dim is not None else None, embeddings=emb.contiguous(), ids=ids.tolist(),
        texts=[str(r["text"]) for r in records], metadata=[dict(r.get("metadata") or {}) for r in records],
        next_id=next_id if isinstance(next_id, int) else 0, encoder=manifest.get("encoder"),
        info=dict(manifest.get("info") or {}), index=manifest.get("index"), index_bytes=blobs.get("index"),
        norms=norms, gate=manifest.get("gate"),
    )


def _identity_mismatch(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("dim", "weights_sha256", "config_sha256"):
        if key in saved and saved.get(key) != given.get(key):
            problems.append(f"{key}: saved {saved.get(key)!r}, given {given.get(key)!r}")
    return problems


def resolve_encoder(folder: str | os.PathLike[str], saved_identity: Mapping[str, Any] | None, encoder: Any,
                    check: bool = True) -> Any:
    """The encoder for a loaded memory: ``encoder``, or the one the manifest names; checked against the saved identity."""
    if encoder is None and saved_identity is not None:
        from ..encoder import SentenceEncoder

        try:
            encoder = SentenceEncoder(saved_identity.get("name"))
        except PluginError as exc:
            raise EncoderMismatchError(
                f"{folder}: the memory was built with encoder {saved_identity.get('name')!r}, which cannot be "
                f"loaded here ({exc}). Fix: pass encoder=SentenceEncoder(<local folder of that model>)"
            ) from exc
    if check and saved_identity is not None and encoder is not None:
        problems = _identity_mismatch(saved_identity, encoder.identity)
        if problems:
            raise EncoderMismatchError(
                f"{folder}: built with encoder {saved_identity.get('name')!r}, but the given encoder "
                f"{encoder.identity.get('name')!r} differs ({'; '.join(problems)}). Its embeddings would not be "
                "comparable. Fix: load with the original encoder, or rebuild the memory with this one"
            )
    return encoder
