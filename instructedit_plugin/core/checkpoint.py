"""The one checkpoint format both methods save in: data files plus one verified JSON manifest.

A checkpoint folder (InstructEd prefixes, an InstructEdit editor) holds its method's data files
(tensors in safetensors, everything else JSON; nothing is ever unpickled) and ``manifest.json``::

    {"format": "instructedit_plugin/<method format>", "format_version": N,
     "plugin_version": "0.1.0",                        # the plugin that wrote it
     "base_model": {"fingerprint": sha256, "model_type": ..., "name": ...},
     "hparams": {...},                                 # what the checkpoint was trained with
     "files": {"<name>": sha256, ...},                 # every data file
     ...}                                              # the method's own fields

A ``last/`` folder also holds the trainer state in one layout for both methods:
``trainer_state.safetensors`` (optimiser tensors named ``state.<param index>.<key>``) and
``trainer_state.json`` (``{"optimizer": {"state": {idx: {key: {"tensor": name} | {"value": v}}},
"param_groups": [...]}, ...}`` plus the trainer's own fields: step, best value...).
:func:`read_trainer_state` also reads InstructEd's earlier layout (``optimizer.<idx>.<key>``
tensors, ``optimizer_scalars`` and ``param_groups`` at the top level).

Saving goes through :func:`instructedit_plugin.core.durable.commit_folder` (a crash at any moment
leaves the previous version or the new one, complete); loading reads the manifest
:func:`~instructedit_plugin.core.durable.manifest_path` names and each file through
:func:`read_file`, which checks its sha256. Every problem is a :class:`CheckpointError`, a
:class:`~instructedit_plugin.errors.HyperParamsError` naming the field that pointed at the folder
(``archive``, ``resume``) and ending in "Fix: ...".

The model fingerprint (:func:`model_fingerprint`) identifies a base model by its architecture
config (paths, dtype, attention backend and transformers version left out); :func:`verify_base_model`
refuses a checkpoint trained for another one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import HyperParamsError
from . import durable

LOG = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FILE",
    "PENDING_MANIFEST_FILE",
    "TRAINER_JSON",
    "TRAINER_TENSORS",
    "BaseModelMismatchError",
    "CheckpointError",
    "base_model_identity",
    "flatten_optimizer_state",
    "model_fingerprint",
    "plugin_version",
    "read_file",
    "read_json",
    "read_manifest",
    "read_tensors",
    "read_trainer_state",
    "resolve_archive",
    "trainer_state_files",
    "unflatten_optimizer_state",
    "verify_base_model",
    "write_checkpoint",
]

MANIFEST_FILE = "manifest.json"
#: The commit point of a save (renamed over :data:`MANIFEST_FILE` once the save's files are in place).
PENDING_MANIFEST_FILE = durable.pending_manifest_name(MANIFEST_FILE)
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
#: What to do about a damaged checkpoint (the default fix of :class:`CheckpointError`).
REBUILD_FIX = "use another checkpoint (e.g. best/ or last/), re-save it or retrain"

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation", "attn_implementation",
                         "_attn_implementation_internal", "torch_dtype", "dtype", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


class CheckpointError(HyperParamsError):
    """A checkpoint is missing, incomplete, corrupted, tampered with, of an unknown format or for another
    model. A :class:`HyperParamsError` (``field`` names the setting that pointed at it, ``archive``
    unless told) so that code catching either keeps working."""

    def __init__(self, field: str, problem: str, fix: str = REBUILD_FIX, source: str | None = None):
        super().__init__(field, problem, fix, source)


class BaseModelMismatchError(CheckpointError):
    """The checkpoint was trained for a different base model than the one it is applied to."""


def plugin_version() -> str:
    """The installed plugin's version (written into every manifest)."""
    from .. import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# Base-model identity
# ----------------------------------------------------------------------------------------------
def model_fingerprint(config: Any) -> str:
    """sha256 of a base model's architecture config (a transformers config or its dict), without paths,
    dtype, attention backend, transformers version or private keys."""
    config = getattr(config, "config", config) if not isinstance(config, Mapping) else config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)

    return hashlib.sha256(json.dumps(clean(data), sort_keys=True).encode()).hexdigest()


def base_model_identity(model_or_config: Any) -> dict[str, Any]:
    """``{"fingerprint", "model_type", "name"}`` of a model (or its config): the fingerprint decides,
    the model type and folder name are for messages."""
    config = getattr(model_or_config, "config", model_or_config)
    data = config if isinstance(config, Mapping) else None
    name = (data.get("_name_or_path") if data is not None else getattr(config, "_name_or_path", None)) or ""
    model_type = data.get("model_type") if data is not None else getattr(config, "model_type", None)
    return {"fingerprint": model_fingerprint(config), "model_type": model_type if isinstance(model_type, str) else None,
            "name": str(name).rstrip("/").split("/")[-1] or None}


def _describe(ident: Mapping[str, Any]) -> str:
    name = f"'{ident.get('name')}', " if ident.get("name") else ""
    return f"{name}model_type {ident.get('model_type')!r}, config fingerprint {str(ident.get('fingerprint'))[:12]}"


def verify_base_model(saved: Mapping[str, Any] | None, model_or_config: Any, subject: str, *, fix: str,
                      field: str = "archive", source: str | None = None) -> None:
    """Raise :class:`BaseModelMismatchError` unless ``saved`` (a manifest's ``base_model``) has the
    fingerprint of ``model_or_config``; ``subject`` starts the message ("the editor <folder> was").
    ``saved=None`` (a format without identity) passes."""
    if saved is None:
        return
    given = base_model_identity(model_or_config)
    if saved.get("fingerprint") == given["fingerprint"]:
        return
    raise BaseModelMismatchError(field, f"{subject} trained for another base model ({_describe(saved)}), not for this "
                                        f"one ({_describe(given)})", fix, source)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys) of plain values; tensors become lists, paths strings."""
    return durable.dumps_json(obj).encode("utf-8")


def write_checkpoint(folder: str | os.PathLike, files: Mapping[str, bytes], manifest: Mapping[str, Any], *,
                     known_names: Iterable[str] = (), manifest_name: str = MANIFEST_FILE) -> dict[str, str]:
    """Replace ``folder``'s checkpoint by ``files`` and ``manifest`` in one crash-safe step.

    ``manifest`` must name its ``format`` and ``format_version``; ``plugin_version`` is filled in and
    ``files`` (each file's sha256) is added. Data files of the previous save (or among ``known_names``)
    that ``files`` lacks are removed. Returns the hashes."""
    if not isinstance(manifest.get("format"), str) or not isinstance(manifest.get("format_version"), int):
        raise TypeError("a checkpoint manifest needs a string 'format' and an integer 'format_version'")
    meta = {k: v for k, v in manifest.items() if k != "files"}
    meta.setdefault("plugin_version", plugin_version())
    fmt = meta["format"]

    def check(pending: dict[str, Any]) -> None:  # a pending manifest is completed only if it is ours
        if pending.get("format") != fmt:
            raise ValueError(f"{durable.pending_manifest_name(manifest_name)} is not a {fmt} manifest")

    return durable.commit_folder(folder, dict(files), manifest_name, meta, encode=json_bytes, check=check,
                                 known_names=known_names)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike, formats: Mapping[str, Iterable[int]], *, field: str = "archive",
                  source: str | None = None, manifest_name: str = MANIFEST_FILE, fix: str = REBUILD_FIX,
                  what: str | None = None) -> dict[str, Any]:
    """The manifest a load of ``folder`` uses (the pending one of a committed save whose renames were
    interrupted, else ``manifest_name``), checked: JSON object, ``format`` one of ``formats`` (else
    "not ``what``"), a
    ``format_version`` among that format's readable versions (a newer one asks to upgrade), a
    well-formed ``files`` map."""
    folder = Path(folder)
    path = durable.manifest_path(folder, manifest_name)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(field, f"{folder} holds no checkpoint ({manifest_name} is missing)", fix, source) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(field, f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]}); only JSON "
                                     "and safetensors are read (never pickle)", fix, source) from None
    if not isinstance(meta, dict):
        raise CheckpointError(field, f"{path} is a {type(meta).__name__}, not a JSON object (the manifest was modified)",
                              fix, source)
    fmt = meta.get("format")
    if fmt not in formats:
        what = what or f"a {' or '.join(sorted(formats))} checkpoint"
        raise CheckpointError(field, f"{folder} is not {what} (format {fmt!r})", fix, source)
    readable = tuple(formats[fmt])
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(field, f"{path}: format_version {version!r} is not an integer (the manifest was modified)",
                              fix, source)
    if version > max(readable):
        raise CheckpointError(field, f"{folder} was written by a newer plugin (format {version}, plugin "
                                     f"{meta.get('plugin_version')!r}; this plugin {plugin_version()} reads up to "
                                     f"{max(readable)})", "upgrade instructedit-plugin", source)
    if version not in readable:
        raise CheckpointError(field, f"{folder}: checkpoint format {version} is not one of {readable}", fix, source)
    try:
        durable.manifest_files(meta, manifest_name)
    except ValueError as exc:
        raise CheckpointError(field, f"{path}: {exc} (the manifest was modified)", fix, source) from None
    return meta


def read_file(folder: str | os.PathLike, manifest: Mapping[str, Any], name: str, *, field: str = "archive",
              source: str | None = None, fix: str = REBUILD_FIX, manifest_name: str = MANIFEST_FILE) -> bytes:
    """The bytes of ``name`` whose sha256 the manifest lists (its staged copy while a committed save's
    renames are unfinished, else the file itself)."""
    folder = Path(folder)
    files = manifest.get("files")
    expected = files.get(name) if isinstance(files, Mapping) else None
    if not isinstance(expected, str):
        raise CheckpointError(field, f"{folder}: {manifest_name} lists no sha256 for {name} (an incomplete checkpoint "
                                     "or a modified manifest)", fix, source)
    try:
        return durable.read_verified(folder, name, expected)
    except FileNotFoundError:
        raise CheckpointError(field, f"{folder}: {name} is missing; the checkpoint is incomplete", fix, source) from None
    except durable.DigestMismatchError:
        raise CheckpointError(field, f"{folder / name} does not match the sha256 in {manifest_name} (modified, corrupted "
                                     "or replaced file); it is not loaded", fix, source) from None
    except OSError as exc:
        raise CheckpointError(field, f"{exc.filename or folder / name} is not readable ({type(exc).__name__})",
                              fix, source) from None


def read_json(data: bytes, where: Any, *, field: str = "archive", source: str | None = None,
              fix: str = REBUILD_FIX) -> dict[str, Any]:
    """``data`` as a JSON object."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(field, f"{where} is not readable JSON ({type(exc).__name__})", fix, source) from None
    if not isinstance(value, dict):
        raise CheckpointError(field, f"{where} is not a JSON object", fix, source)
    return value


def read_tensors(data: bytes, where: Any, *, field: str = "archive", source: str | None = None,
                 fix: str = REBUILD_FIX) -> dict[str, torch.Tensor]:
    """``data`` as safetensors (the only tensor format read: never pickle)."""
    try:
        return st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(field, f"{where} is not a safetensors file ({str(exc)[:120]}); only safetensors is read "
                                     "(never pickle)", fix, source) from None


def resolve_archive(path: str | os.PathLike | None, is_checkpoint: Callable[[Path], bool], *, what: str, fix: str,
                    field: str = "archive", source: str | None = None, file_names: Iterable[str] = (),
                    subfolders: Iterable[str] = ("best", "last"),
                    accept_file: Callable[[Path], bool] | None = None) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, the folder of one of its ``file_names``,
    or its first ``subfolders`` entry holding one (a results folder). ``accept_file`` may accept a
    file as the checkpoint itself (e.g. an EasyEdit archive). Else a :class:`CheckpointError`
    saying there is no ``what`` there."""
    if path is None or not str(path).strip():
        raise CheckpointError(field, f"no {what} is given", fix, source)
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        if p.name in set(file_names):
            p = p.parent
        elif accept_file is not None and accept_file(p):
            return p
    if p.is_dir():
        if is_checkpoint(p):
            return p
        for sub in subfolders:
            if is_checkpoint(p / sub):
                return p / sub
    where = "is a file, not a checkpoint folder" if p.is_file() else (
        "does not exist" if not p.exists() else f"holds no {what}")
    raise CheckpointError(field, f"{str(path)!r} {where}", fix, source)


# ----------------------------------------------------------------------------------------------
# Trainer state: one optimiser layout, without pickle
# ----------------------------------------------------------------------------------------------
def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<idx>.<key>``) and JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{idx}.{key}"
                tensors[name] = value.detach().to("cpu").contiguous()
                entry[key] = {"tensor": name}
            else:
                entry[key] = {"value": value}
        per_param[str(idx)] = entry
    groups = json.loads(durable.dumps_json(state["param_groups"]))
    return tensors, {"state": per_param, "param_groups": groups}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], structure: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer_state`."""
    state = {}
    for idx, entry in structure["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def _from_old_instructed_layout(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    """InstructEd's layout before the shared core: ``optimizer.<idx>.<key>`` tensors, ``optimizer_scalars``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        head, idx, key = name.split(".", 2)
        if head != "optimizer":
            raise KeyError(name)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in (info.get("optimizer_scalars") or {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


def trainer_state_files(optimizer_state: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, bytes]:
    """``{trainer_state.safetensors, trainer_state.json}`` of an optimiser state dict and the trainer's
    JSON-able ``info`` (step, best value, scheduler...), to save with the checkpoint's files."""
    tensors, structure = flatten_optimizer_state(optimizer_state)
    blob = st_save(tensors) if tensors else st_save({"_empty": torch.zeros(1)})
    return {TRAINER_TENSORS: blob, TRAINER_JSON: json_bytes({**dict(info), "optimizer": structure})}


def read_trainer_state(folder: str | os.PathLike, manifest: Mapping[str, Any], *, field: str = "resume",
                       source: str | None = None, fix: str = REBUILD_FIX,
                       manifest_name: str = MANIFEST_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(optimizer_state_dict, info)`` of a ``last/`` folder, both files verified against ``manifest``
    (either optimiser layout, see the module docs)."""
    folder = Path(folder)
    files = manifest.get("files") if isinstance(manifest.get("files"), Mapping) else {}
    unlisted = [name for name in (TRAINER_TENSORS, TRAINER_JSON) if name not in files]
    if unlisted:
        raise CheckpointError(field, f"{folder} holds no trainer state to resume from ({manifest_name} lists no "
                                     f"{' or '.join(unlisted)}: a best/ or exported checkpoint, or a modified manifest)",
                              fix, source)
    info = read_json(read_file(folder, manifest, TRAINER_JSON, field=field, source=source, fix=fix,
                               manifest_name=manifest_name), folder / TRAINER_JSON, field=field, source=source, fix=fix)
    blob = read_file(folder, manifest, TRAINER_TENSORS, field=field, source=source, fix=fix, manifest_name=manifest_name)
    return parse_trainer_state(blob, info, folder, field=field, source=source, fix=fix), info


def parse_trainer_state(blob: bytes, info: Mapping[str, Any], folder: Any, *, field: str = "resume",
                        source: str | None = None, fix: str = REBUILD_FIX) -> dict[str, Any]:
    """The optimiser state dict in ``blob`` (safetensors) + ``info`` (``trainer_state.json``)."""
    tensors = read_tensors(blob, Path(folder) / TRAINER_TENSORS, field=field, source=source, fix=fix)
    try:
        if isinstance(info.get("optimizer"), Mapping):
            state = unflatten_optimizer_state(tensors, info["optimizer"])
        else:
            state = _from_old_instructed_layout(tensors, info)
        if not isinstance(state["param_groups"], list):
            raise TypeError("param_groups")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(field, f"{TRAINER_TENSORS} / {TRAINER_JSON} in {folder} do not describe an optimiser "
                                     f"state ({type(exc).__name__}: {str(exc)[:120]})", fix, source) from None
    return state
