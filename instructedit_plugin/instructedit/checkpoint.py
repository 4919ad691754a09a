"""Editor checkpoints: safetensors tensors + a JSON manifest, written atomically, loaded without pickle.

A checkpoint folder holds

* ``editor.safetensors``: hypernetwork parameters and running statistics, ``edit_lrs``;
* for resuming (``last/`` only): ``trainer_state.safetensors`` (optimiser
  tensors) and ``trainer_state.json`` (optimiser structure, step, best value);
* ``editor_config.json``, the manifest: format and format
  version, the plugin version, the base model's identity (``base_model``: the
  sha256 fingerprint of its architecture config, its ``model_type`` and folder
  name), layer specs, hypernetwork settings, the training hparams
  (``training_config``), step/validation stats and ``files``: the sha256 of
  every other file in the folder (the trainer state's too).

Crash safety: a save replaces several files as one step with
:func:`instructedit_plugin.core.durable.commit_folder` (shared with InstructEd's
prefix checkpoints): the new files are written as ``<name>.staged``, then the
new manifest as ``editor_config.next.json`` -- the single commit point --, then
everything is renamed into place. A save killed at any moment leaves the
previous version or the new one, complete: :func:`load_editor` and
:func:`load_trainer_state` read the pending manifest when there is one and
take each file's copy (staged or final) whose sha256 it lists, never a mix; the
next save finishes the renames first. Each file is written to a temporary file
in the same folder, flushed, fsynced and moved with :func:`os.replace`.

Loading (:func:`load_editor`) checks the format, the hash of every file it
reads and that the manifest names a base model; :func:`verify_base_model`
refuses to apply an editor to a model whose architecture config differs from
the one it was trained for (a :class:`~instructedit_plugin.errors.HyperParamsError`
naming ``archive``, before any tensor shape is compared).

EasyEdit's trainer (``EditTrainer`` with ``ALG_TRAIN_DICT['INSTRUCTEDIT']``)
saves a ``torch.save`` archive ``{"model": state_dict, "opt": ..., ...}``.
:class:`~instructedit_plugin.instructedit.editable.InstructEditModel` puts its
manifest into that state dict (``instructedit_meta``, a uint8 tensor of JSON),
the plugin writes a checkpoint folder next to every such save
(``<save_path>.instructedit``, see :func:`easyedit_export_dir`), and
:func:`load_editor` also accepts the archive itself: it is read **only** with
``torch.load(..., weights_only=True)`` (tensors and plain containers; never
arbitrary objects) and converted. Anything else is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core import durable
from ..core.durable import dumps_json
from ..errors import HyperParamsError, fix_for
from ..core.config import training_yaml_hint

LOG = logging.getLogger(__name__)

FORMAT_NAME = "instructedit_plugin/InstructEdit-editor"
FORMAT_VERSION = 2
#: Versions :func:`load_editor` reads (1: no manifest fields beyond the tensor file's sha256).
READABLE_VERSIONS = (1, 2)
EDITOR_FILE = "editor.safetensors"
CONFIG_FILE = "editor_config.json"
#: The commit point of a save (renamed over :data:`CONFIG_FILE` once the save's files are in place).
PENDING_CONFIG_FILE = durable.pending_manifest_name(CONFIG_FILE)
TRAINER_FILE = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
#: Data files a folder may hold; a save removes those it does not write.
_DATA_FILES = (EDITOR_FILE, TRAINER_FILE, TRAINER_JSON)
#: State-dict key under which :class:`InstructEditModel` stores its manifest (uint8 tensor of UTF-8 JSON).
META_KEY = "instructedit_meta"
#: Suffix of the checkpoint folder written next to an EasyEdit trainer archive.
EASYEDIT_EXPORT_SUFFIX = ".instructedit"
#: Manifest keys :func:`save_editor` always writes itself.
_WRITER_KEYS = ("format", "format_version", "files", "sha256")
_REQUIRED_KEYS = ("layers", "hypernet", "base_model", "plugin_version", "training_config")

#: Default fix for a missing/unusable archive.
_TRAIN_FIX = ("train an editor first (InstructEditTrainer(...).run(), or EasyEdit's EditTrainer) and point archive "
              "at its best/ folder, or at the EasyEdit archive / its .instructedit folder")


def _train_fix(source: str | None = None, python: str = _TRAIN_FIX) -> str:
    """The fix for a missing/unusable archive: ``python`` in Python, ``instructedit train`` on the command line."""
    return fix_for(python, f"train an editor with `instructedit train --hparams {training_yaml_hint(source, 'InstructEdit')}` "
                           "(tasks: --task NAME=FILE, default counterfact, recent and convsent under --data_dir) and pass "
                           "--archive <folder> (the best_checkpoint it prints)")


def plugin_version() -> str:
    from .. import __version__

    return __version__


def base_model_identity(model_or_config: Any) -> dict[str, Any]:
    """What identifies the base model an editor belongs to.

    ``fingerprint`` is the sha256 of the architecture config without volatile
    keys (path, dtype, attention backend, transformers version; the helper
    InstructEd checkpoints use too); ``model_type`` and ``name`` (the folder
    name) are for messages only.
    """
    from ..instructed.checkpoint import model_fingerprint

    config = getattr(model_or_config, "config", model_or_config)
    data = config if isinstance(config, Mapping) else None
    name = (data.get("_name_or_path") if data is not None else getattr(config, "_name_or_path", None)) or ""
    model_type = data.get("model_type") if data is not None else getattr(config, "model_type", None)
    return {"fingerprint": model_fingerprint(config), "model_type": model_type,
            "name": str(name).rstrip("/").split("/")[-1] or None}


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()
            if isinstance(v, torch.Tensor) and k != META_KEY}


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def _jsonable(value: Any) -> Any:
    """Plain JSON values (numbers from numpy/torch scalars become floats/ints, other objects strings)."""
    return json.loads(json.dumps(value, default=_plain))


def save_editor(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``editor.safetensors``, ``extra_files`` and the manifest ``editor_config.json`` as one
    crash-safe step (see the module docs); returns ``folder``.

    ``config`` is the editor's metadata (``InstructEditModel.editor_config()`` plus
    step and validation stats); the format fields and the files' hashes are added here.
    ``extra_files`` (e.g. :func:`trainer_state_files`) are hashed in the manifest like the
    editor; trainer-state files of an earlier save that this one does not write are removed.
    """
    folder = Path(folder)
    missing = [k for k in ("layers", "hypernet", "base_model") if k not in config]
    if missing:
        raise ValueError(f"editor metadata lacks {missing}; build it with InstructEditModel.editor_config()")
    blobs = {EDITOR_FILE: st_save(_tensors(state))}
    for name, data in (extra_files or {}).items():
        if (Path(name).name != name or name in (EDITOR_FILE, CONFIG_FILE, PENDING_CONFIG_FILE)
                or name.startswith(".") or name.endswith(durable.STAGED_SUFFIX)):
            raise ValueError(f"extra checkpoint file name {name!r} is not allowed")
        blobs[name] = bytes(data)
    meta = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    meta.setdefault("plugin_version", plugin_version())
    meta.setdefault("training_config", {})
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
    # "files" (the sha256 of every blob) is added by commit_folder
    durable.commit_folder(folder, blobs, CONFIG_FILE, meta, check=_pending_check, known_names=_DATA_FILES)
    return folder


def _pending_check(meta: dict[str, Any]) -> None:
    """A pending manifest is completed only if it is one of ours (else it is moved aside)."""
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{PENDING_CONFIG_FILE} is not an InstructEdit editor manifest")


def easyedit_export_dir(save_path: str | os.PathLike) -> Path:
    """The checkpoint folder written next to EasyEdit's trainer archive ``save_path``."""
    return Path(f"{os.fspath(save_path)}{EASYEDIT_EXPORT_SUFFIX}")


def resolve_archive(archive: str | os.PathLike | None, field: str = "archive", source: str | None = None) -> Path:
    """The checkpoint named by ``archive``: a checkpoint folder (also given as its
    ``editor.safetensors``), or an EasyEdit trainer archive file."""
    if archive is None or not str(archive).strip():
        raise HyperParamsError(field, "no trained editor checkpoint is given",
                               _train_fix(source, "set it to the folder written by InstructEditTrainer "
                                                  "(e.g. results/models/InstructEdit/<model>/best)"), source)
    path = Path(archive).expanduser()
    if path.is_file():
        return path.parent if path.name == EDITOR_FILE or path.suffix == ".safetensors" else path
    has_editor = (path / EDITOR_FILE).is_file() or (path / durable.staged_name(EDITOR_FILE)).is_file()
    if not has_editor or not durable.has_manifest(path, CONFIG_FILE):
        raise HyperParamsError(field, f"no InstructEdit checkpoint at {path} (needs {EDITOR_FILE} and {CONFIG_FILE}, "
                               "or an EasyEdit trainer archive file)", _train_fix(source), source)
    return path


def _read_manifest(folder: Path, field: str, source: str | None) -> dict[str, Any]:
    """The manifest a load uses: ``editor_config.next.json`` when a save committed but did not finish
    its renames, else ``editor_config.json``."""
    path = durable.manifest_path(folder, CONFIG_FILE)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise HyperParamsError(field, f"{path} is not readable JSON ({type(exc).__name__})",
                               "use another checkpoint (e.g. best/ or last/) or retrain", source) from None
    if not isinstance(meta, dict):
        raise HyperParamsError(field, f"{path} is not a JSON object", "use another checkpoint or retrain", source)
    return meta


def _check_manifest(meta: Mapping[str, Any], where: Any, field: str, source: str | None) -> None:
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise HyperParamsError(field, f"{where} was written by a newer plugin (format {version}, plugin "
                               f"{meta.get('plugin_version')!r}; this plugin {plugin_version()} reads up to {FORMAT_VERSION})",
                               "upgrade instructedit-plugin", source)
    if version not in READABLE_VERSIONS:
        raise HyperParamsError(field, f"{where}: checkpoint format {version!r} is not one of {READABLE_VERSIONS}",
                               "retrain the editor with this plugin version", source)
    if version >= 2:
        if meta.get("format") != FORMAT_NAME:
            raise HyperParamsError(field, f"{where} is not an InstructEdit editor (format {meta.get('format')!r})",
                                   _train_fix(source), source)
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        base = meta.get("base_model")
        if not isinstance(base, Mapping) or not isinstance(base.get("fingerprint"), str):
            missing.append("base_model.fingerprint")
        if missing:
            raise HyperParamsError(field, f"{where}: the manifest lacks {sorted(set(missing))} (modified or incomplete)",
                                   "use another checkpoint or retrain", source)
        newer = _version_tuple(meta.get("plugin_version")) > _version_tuple(plugin_version())
        if newer:
            LOG.warning("%s was written by instructedit-plugin %s, newer than this %s", where, meta.get("plugin_version"),
                        plugin_version())


def _version_tuple(text: Any) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "0").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _verified(folder: Path, name: str, expected: Any, field: str, source: str | None) -> bytes:
    """The bytes of ``name`` with the sha256 the manifest lists (its staged copy while a committed
    save's renames are unfinished, else the file itself)."""
    if not isinstance(expected, str):
        raise HyperParamsError(field, f"{CONFIG_FILE} in {folder} lists no sha256 for {name}",
                               "use another checkpoint or retrain", source)
    try:
        return durable.read_verified(folder, name, expected)
    except durable.DigestMismatchError:
        raise HyperParamsError(field, f"{folder / name} does not match the sha256 in {CONFIG_FILE} "
                               "(modified, corrupted or interrupted write); it is not loaded",
                               "use another checkpoint (e.g. best/ or last/) or retrain", source) from None
    except OSError as exc:
        raise HyperParamsError(field, f"{exc.filename or folder / name} is not readable ({type(exc).__name__})",
                               "use another checkpoint or retrain", source) from None


def load_editor(archive: str | os.PathLike, field: str = "archive", source: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint without unpickling: ``(tensors, manifest)``.

    ``archive`` is a checkpoint folder (or its ``editor.safetensors``), whose
    tensor file must match the manifest's sha256, or an EasyEdit trainer
    archive (see :func:`load_easyedit_archive`).
    """
    path = resolve_archive(archive, field, source)
    if path.is_file():
        return load_easyedit_archive(path, field, source)
    meta = _read_manifest(path, field, source)
    _check_manifest(meta, path, field, source)
    if meta["format_version"] == 1:
        expected = meta.get("sha256")
        LOG.warning("%s is a format-1 InstructEdit checkpoint: its base model cannot be verified; "
                    "re-save it with this plugin (load_editor + save_editor) to add the manifest", path)
    else:
        files = meta.get("files")
        expected = files.get(EDITOR_FILE) if isinstance(files, Mapping) else None
    blob = _verified(path, EDITOR_FILE, expected, field, source)
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise HyperParamsError(field, f"{path / EDITOR_FILE} is not a safetensors file ({exc})",
                               "use another checkpoint or retrain", source) from None
    return tensors, meta


# ------------------------------------------------------------------ EasyEdit archives
def encode_meta(meta: Mapping[str, Any]) -> torch.Tensor:
    """The manifest as a uint8 tensor (a state-dict entry that safe loaders accept)."""
    return torch.frombuffer(bytearray(dumps_json(meta).encode("utf-8")), dtype=torch.uint8)


def decode_meta(tensor: Any) -> dict[str, Any] | None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        return None
    try:
        meta = json.loads(tensor.cpu().numpy().tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refusal_reason(exc: BaseException, limit: int = 200) -> str:
    """The specific reason in torch's weights-only error (e.g. the refused global), else its first line."""
    text = _ANSI.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
        for stop in ("Please use", "Check the documentation"):
            text = text.split(stop, 1)[0]
        text = " ".join(text.split()).rstrip(". ")
    else:
        text = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_easyedit_archive(path: str | os.PathLike, field: str = "archive",
                          source: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, manifest)`` of an archive saved by EasyEdit's trainer for ``InstructEditModel``.

    The file is read only with ``torch.load(weights_only=True)``, which rebuilds
    tensors and plain containers and refuses every other object *before*
    creating it (so a crafted pickle's code never runs); anything it refuses,
    and any archive that is not InstructEdit's, is a ``HyperParamsError``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HyperParamsError(field, f"{path} is not readable ({type(exc).__name__})", _train_fix(source), source) from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every refusal becomes the same clear error
        raise HyperParamsError(
            field, f"{path} cannot be read safely: torch.load(weights_only=True) refused it: {_refusal_reason(exc)}; "
            "the plugin never unpickles arbitrary objects",
            f"use an archive saved by EasyEdit's trainer for InstructEdit, the {EASYEDIT_EXPORT_SUFFIX} folder written "
            "next to it, or a folder written by InstructEditTrainer", source) from None
    state = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise HyperParamsError(field, f"{path} is not an EasyEdit trainer archive (no 'model' state dict)", _train_fix(source), source)
    meta = decode_meta(state.get(META_KEY))
    if meta is None or meta.get("alg") != "InstructEdit":
        raise HyperParamsError(field, f"{path} is not an InstructEdit archive (its state dict has no '{META_KEY}' "
                               "entry; another algorithm's, or saved without the plugin)", _train_fix(source), source)
    meta = {k: v for k, v in meta.items() if k not in _WRITER_KEYS}
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION,
                files={path.name: hashlib.sha256(data).hexdigest()}, easyedit_archive=str(path))
    for key in ("step", "val_stats", "elapsed_time"):
        if key in obj:
            meta[key] = _jsonable(obj[key])
    _check_manifest(meta, path, field, source)
    tensors = {k: v for k, v in state.items()
               if isinstance(v, torch.Tensor) and (k.startswith("hypernet.") or k == "edit_lrs")}
    if "edit_lrs" not in tensors:
        raise HyperParamsError(field, f"{path}: the InstructEdit state dict has no edit_lrs", _train_fix(source), source)
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def verify_base_model(meta: Mapping[str, Any], model: Any, where: Any, field: str = "archive",
                      source: str | None = None) -> None:
    """Refuse an editor trained for another base model (architecture config fingerprint differs)."""
    saved = meta.get("base_model")
    if not isinstance(saved, Mapping):  # format 1: nothing to compare (load_editor warned)
        return
    given = base_model_identity(model)
    if saved.get("fingerprint") == given["fingerprint"]:
        return

    def describe(ident: Mapping[str, Any]) -> str:
        name = f"'{ident.get('name')}', " if ident.get("name") else ""
        return f"{name}model_type {ident.get('model_type')!r}, config fingerprint {str(ident.get('fingerprint'))[:12]}"

    raise HyperParamsError(
        field, f"the editor {where} was trained for another base model ({describe(saved)}), "
        f"not for the model being edited ({describe(given)})",
        "point archive at an editor trained for this model (or set model_name to the model the editor was "
        "trained for), or train one for it", source)


# ------------------------------------------------------------------ optimiser state
def flatten_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{idx}.{key}"
                tensors[name] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = {"value": value}
        per_param[str(idx)] = entry
    return _tensors(tensors), {"state": per_param, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def trainer_state_files(optimizer_state: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, bytes]:
    """``{trainer_state.safetensors: ..., trainer_state.json: ...}`` for :func:`save_editor`'s ``extra_files``."""
    tensors, structure = flatten_optimizer_state(optimizer_state)
    blob = st_save(tensors) if tensors else st_save({"_empty": torch.zeros(1)})
    info = {"optimizer": structure, "sha256": hashlib.sha256(blob).hexdigest(), **extra}
    return {TRAINER_FILE: blob, TRAINER_JSON: dumps_json(info).encode("utf-8")}


def load_trainer_state(folder: str | os.PathLike, field: str = "resume",
                       source: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(optimizer_state, info)`` saved in a ``last/`` folder by :func:`save_editor` with
    :func:`trainer_state_files`; ``info`` holds ``step``, ``best_value``, ``history``...

    The trainer-state files are verified like the editor: against the sha256 the manifest lists
    (a committed save whose renames were interrupted reads its staged copies), and against the
    tensor file's sha256 kept in ``trainer_state.json`` (all format-1 folders have to go on).

    Returns ``None`` when ``folder`` holds no committed checkpoint (no manifest): nothing to resume.

    Raises:
        HyperParamsError: (``field``) the folder holds a checkpoint whose trainer state is absent,
            not listed in the manifest, modified, corrupted or unreadable.
    """
    folder = Path(folder)
    if not durable.has_manifest(folder, CONFIG_FILE):
        return None
    meta = _read_manifest(folder, field, source)
    _check_manifest(meta, folder, field, source)
    fix = "use another checkpoint or retrain"
    if meta["format_version"] == 1:  # the manifest hashes the editor only; the state carries its own sha256
        try:
            info_bytes, blob = (folder / TRAINER_JSON).read_bytes(), (folder / TRAINER_FILE).read_bytes()
        except FileNotFoundError:
            raise HyperParamsError(field, f"{folder} holds no trainer state to resume from ({TRAINER_FILE} and "
                                   f"{TRAINER_JSON} are needed)", fix, source) from None
        except OSError as exc:
            raise HyperParamsError(field, f"{exc.filename} is not readable ({type(exc).__name__})", fix, source) from None
    else:
        files = meta.get("files") if isinstance(meta.get("files"), Mapping) else {}
        unlisted = [name for name in (TRAINER_FILE, TRAINER_JSON) if name not in files]
        if unlisted:
            raise HyperParamsError(field, f"{folder} holds no trainer state to resume from ({CONFIG_FILE} lists no "
                                   f"{' or '.join(unlisted)}: a best/ or exported checkpoint, or a modified manifest)",
                                   fix, source)
        info_bytes = _verified(folder, TRAINER_JSON, files[TRAINER_JSON], field, source)
        blob = _verified(folder, TRAINER_FILE, files[TRAINER_FILE], field, source)
    try:
        info = json.loads(info_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HyperParamsError(field, f"{folder / TRAINER_JSON} is not readable JSON ({type(exc).__name__})",
                               fix, source) from None
    if not isinstance(info, dict) or info.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise HyperParamsError(field, f"{folder / TRAINER_FILE} does not match the sha256 in {TRAINER_JSON} "
                               "(modified, corrupted or from another save)", fix, source)
    try:
        optimizer_state = unflatten_optimizer_state(st_load(blob), info["optimizer"])
    except (SafetensorError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise HyperParamsError(field, f"{TRAINER_FILE} / {TRAINER_JSON} in {folder} do not describe an optimiser "
                               f"state ({type(exc).__name__}: {str(exc)[:120]})", fix, source) from None
    return optimizer_state, info
