"""InstructEdit editor checkpoints on top of :mod:`instructedit_plugin.core.checkpoint`.

What is InstructEdit's own here: which tensors (``editor.safetensors``: hypernetwork parameters and
running statistics, ``edit_lrs``), which manifest fields (``alg``, ``layers``, ``hypernet``, ``step``,
``val_stats``; the training hparams are the core's ``hparams``), and reading the formats older
plugins wrote:

* format 3 (written now): the core format, manifest ``manifest.json``; ``last/`` adds the core's
  trainer state;
* format 2: the same files, but the manifest was ``editor_config.json`` and the hparams were
  ``training_config``; converted on load;
* format 1: ``editor_config.json`` holding only the tensor file's sha256 (the base model cannot be
  verified; a warning says so), the trainer state's sha256 in ``trainer_state.json``.

:func:`load_editor` returns the manifest with both ``hparams`` and ``training_config`` whatever
the format. Saving is crash-safe through the core (:func:`~instructedit_plugin.core.durable.commit_folder`).

EasyEdit's trainer (``EditTrainer`` with ``ALG_TRAIN_DICT['INSTRUCTEDIT']``) saves a ``torch.save``
archive ``{"model": state_dict, "opt": ..., ...}``.
:class:`~instructedit_plugin.instructedit.editable.InstructEditModel` puts its manifest into that state
dict (``instructedit_meta``, a uint8 tensor of JSON), the plugin writes a checkpoint folder next to
every such save (``<save_path>.instructedit``, see :func:`easyedit_export_dir`), and
:func:`load_editor` also accepts the archive itself: it is read **only** with
``torch.load(..., weights_only=True)`` (tensors and plain containers; never arbitrary objects) and
converted. Anything else is refused.
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
from safetensors.torch import save as st_save

from ..core import checkpoint as core
from ..core import durable
from ..core.checkpoint import CheckpointError, base_model_identity, plugin_version
from ..core.config import training_yaml_hint
from ..core.durable import dumps_json
from ..errors import fix_for

LOG = logging.getLogger(__name__)

FORMAT_NAME = "instructedit_plugin/InstructEdit-editor"
FORMAT_VERSION = 3
#: Versions :func:`load_editor` reads (see the module docs).
READABLE_VERSIONS = (1, 2, 3)
EDITOR_FILE = "editor.safetensors"
#: The manifest (the core's); format 1 and 2 folders have :data:`LEGACY_CONFIG_FILE` instead.
CONFIG_FILE = core.MANIFEST_FILE
#: The commit point of a save (renamed over :data:`CONFIG_FILE` once the save's files are in place).
PENDING_CONFIG_FILE = core.PENDING_MANIFEST_FILE
LEGACY_CONFIG_FILE = "editor_config.json"
TRAINER_FILE = core.TRAINER_TENSORS
TRAINER_JSON = core.TRAINER_JSON
#: Data files a folder may hold; a save removes those it does not write.
_DATA_FILES = (EDITOR_FILE, TRAINER_FILE, TRAINER_JSON)
#: State-dict key under which :class:`InstructEditModel` stores its manifest (uint8 tensor of UTF-8 JSON).
META_KEY = "instructedit_meta"
#: Suffix of the checkpoint folder written next to an EasyEdit trainer archive.
EASYEDIT_EXPORT_SUFFIX = ".instructedit"
#: Manifest keys :func:`save_editor` always writes itself.
_WRITER_KEYS = ("format", "format_version", "files", "sha256", "training_config", "hparams")
_REQUIRED_KEYS = ("layers", "hypernet", "base_model", "plugin_version", "hparams")
_RETRY = "use another checkpoint (e.g. best/ or last/) or retrain"

#: Default fix for a missing/unusable archive.
_TRAIN_FIX = ("train an editor first (InstructEditTrainer(...).run(), or EasyEdit's EditTrainer) and point archive "
              "at its best/ folder, or at the EasyEdit archive / its .instructedit folder")

__all__ = [
    "CheckpointError",
    "base_model_identity",
    "decode_meta",
    "easyedit_export_dir",
    "encode_meta",
    "load_easyedit_archive",
    "load_editor",
    "load_trainer_state",
    "manifest_file",
    "plugin_version",
    "resolve_archive",
    "save_editor",
    "trainer_state_files",
    "verify_base_model",
]


def _train_fix(source: str | None = None, python: str = _TRAIN_FIX) -> str:
    """The fix for a missing/unusable archive: ``python`` in Python, ``instructedit train`` on the command line."""
    return fix_for(python, f"train an editor with `instructedit train --hparams {training_yaml_hint(source, 'InstructEdit')}` "
                           "(tasks: --task NAME=FILE, default counterfact, recent and convsent under --data_dir) and pass "
                           "--archive <folder> (the best_checkpoint it prints)")


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


def _manifest_name(folder: Path) -> str | None:
    """The manifest file a folder's committed save uses (today's, else the format-1/2 one)."""
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        if durable.has_manifest(folder, name):
            return name
    return None


def manifest_file(folder: str | os.PathLike) -> Path:
    """The manifest in force in ``folder`` (whichever name its format uses; pending while a committed
    save's renames are unfinished). Changes whenever a save commits."""
    folder = Path(folder)
    return durable.manifest_path(folder, _manifest_name(folder) or CONFIG_FILE)


def save_editor(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``editor.safetensors``, ``extra_files`` and the manifest as one crash-safe step; returns ``folder``.

    ``config`` is the editor's metadata (``InstructEditModel.editor_config()`` plus step and
    validation stats; its ``training_config`` becomes the manifest's ``hparams``); the format fields
    and the files' hashes are added here. ``extra_files`` (e.g. :func:`trainer_state_files`) are
    hashed in the manifest like the editor; trainer-state files of an earlier save that this one does
    not write are removed, and so is a format-1/2 ``editor_config.json``.
    """
    folder = Path(folder)
    missing = [k for k in ("layers", "hypernet", "base_model") if k not in config]
    if missing:
        raise ValueError(f"editor metadata lacks {missing}; build it with InstructEditModel.editor_config()")
    blobs = {EDITOR_FILE: st_save(_tensors(state))}
    for name, data in (extra_files or {}).items():
        if (Path(name).name != name or name in (EDITOR_FILE, CONFIG_FILE, PENDING_CONFIG_FILE, LEGACY_CONFIG_FILE)
                or name.startswith(".") or name.endswith(durable.STAGED_SUFFIX)):
            raise ValueError(f"extra checkpoint file name {name!r} is not allowed")
        blobs[name] = bytes(data)
    meta = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    meta["hparams"] = dict(config.get("hparams", config.get("training_config")) or {})
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
    core.write_checkpoint(folder, blobs, meta, known_names=_DATA_FILES)
    for legacy in (LEGACY_CONFIG_FILE, durable.pending_manifest_name(LEGACY_CONFIG_FILE)):
        try:
            (folder / legacy).unlink()
        except FileNotFoundError:
            pass
    return folder


def easyedit_export_dir(save_path: str | os.PathLike) -> Path:
    """The checkpoint folder written next to EasyEdit's trainer archive ``save_path``."""
    return Path(f"{os.fspath(save_path)}{EASYEDIT_EXPORT_SUFFIX}")


def _is_editor_folder(path: Path) -> bool:
    has_editor = (path / EDITOR_FILE).is_file() or (path / durable.staged_name(EDITOR_FILE)).is_file()
    return has_editor and _manifest_name(path) is not None


def resolve_archive(archive: str | os.PathLike | None, field: str = "archive", source: str | None = None) -> Path:
    """The checkpoint named by ``archive``: a checkpoint folder (also given as its
    ``editor.safetensors``), or an EasyEdit trainer archive file."""
    if archive is None or not str(archive).strip():
        raise CheckpointError(field, "no trained editor checkpoint is given",
                              _train_fix(source, "set it to the folder written by InstructEditTrainer "
                                                 "(e.g. results/models/InstructEdit/<model>/best)"), source)
    return core.resolve_archive(
        archive, _is_editor_folder, what=f"InstructEdit checkpoint (needs {EDITOR_FILE} and {CONFIG_FILE}, or an "
                                         "EasyEdit trainer archive file)",
        fix=_train_fix(source), field=field, source=source, subfolders=(),
        file_names=(EDITOR_FILE,), accept_file=lambda p: p.suffix != ".safetensors")


def _read_manifest(folder: Path, field: str, source: str | None) -> dict[str, Any]:
    """The manifest of a folder in any readable format, as today's: ``hparams`` and ``training_config``
    both set, format 1 and 2 keys kept."""
    name = _manifest_name(folder) or CONFIG_FILE
    meta = core.read_manifest(folder, {FORMAT_NAME: READABLE_VERSIONS}, field=field, source=source,
                              manifest_name=name, fix=_RETRY, what="an InstructEdit editor") \
        if _looks_current(folder, name) else \
        _read_format_1(folder, name, field, source)
    _check_manifest(meta, folder, field, source)
    return meta


def _looks_current(folder: Path, name: str) -> bool:
    """Format 1 manifests name no format and carry ``sha256`` instead of ``files``."""
    try:
        meta = json.loads(durable.manifest_path(folder, name).read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return True  # the core reports it
    return not (isinstance(meta, dict) and meta.get("format_version") == 1)


def _read_format_1(folder: Path, name: str, field: str, source: str | None) -> dict[str, Any]:
    path = durable.manifest_path(folder, name)
    meta = core.read_json(path.read_bytes(), path, field=field, source=source, fix=_RETRY)
    sha = meta.get("sha256")
    meta["files"] = {EDITOR_FILE: sha} if isinstance(sha, str) else {}
    return meta


def _check_manifest(meta: dict[str, Any], where: Any, field: str, source: str | None) -> None:
    """Fields today's code needs; format 2's ``training_config`` becomes ``hparams`` (both kept)."""
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(field, f"{where}: checkpoint format {version!r} is not one of {READABLE_VERSIONS}",
                              "retrain the editor with this plugin version", source)
    if "hparams" not in meta and "training_config" in meta:
        meta["hparams"] = meta["training_config"]
    if version >= 2:
        if meta.get("format") != FORMAT_NAME:
            raise CheckpointError(field, f"{where} is not an InstructEdit editor (format {meta.get('format')!r})",
                                  _train_fix(source), source)
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        base = meta.get("base_model")
        if not isinstance(base, Mapping) or not isinstance(base.get("fingerprint"), str):
            missing.append("base_model.fingerprint")
        if missing:
            raise CheckpointError(field, f"{where}: the manifest lacks {sorted(set(missing))} (modified or incomplete)",
                                  _RETRY, source)
        if _version_tuple(meta.get("plugin_version")) > _version_tuple(plugin_version()):
            LOG.warning("%s was written by instructedit-plugin %s, newer than this %s", where, meta.get("plugin_version"),
                        plugin_version())
    meta.setdefault("training_config", meta.get("hparams", {}))


def _version_tuple(text: Any) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "0").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def load_editor(archive: str | os.PathLike, field: str = "archive", source: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint without unpickling: ``(tensors, manifest)``.

    ``archive`` is a checkpoint folder of any readable format (or its ``editor.safetensors``), whose
    tensor file must match the manifest's sha256, or an EasyEdit trainer archive (see
    :func:`load_easyedit_archive`).
    """
    path = resolve_archive(archive, field, source)
    if path.is_file():
        return load_easyedit_archive(path, field, source)
    meta = _read_manifest(path, field, source)
    if meta["format_version"] == 1:
        LOG.warning("%s is a format-1 InstructEdit checkpoint: its base model cannot be verified; "
                    "re-save it with this plugin (load_editor + save_editor) to add the manifest", path)
    name = _manifest_name(path) or CONFIG_FILE
    blob = core.read_file(path, meta, EDITOR_FILE, field=field, source=source, fix=_RETRY, manifest_name=name)
    return core.read_tensors(blob, path / EDITOR_FILE, field=field, source=source, fix=_RETRY), meta


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
        raise CheckpointError(field, f"{path} is not readable ({type(exc).__name__})", _train_fix(source), source) from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every refusal becomes the same clear error
        raise CheckpointError(
            field, f"{path} cannot be read safely: torch.load(weights_only=True) refused it: {_refusal_reason(exc)}; "
            "the plugin never unpickles arbitrary objects",
            f"use an archive saved by EasyEdit's trainer for InstructEdit, the {EASYEDIT_EXPORT_SUFFIX} folder written "
            "next to it, or a folder written by InstructEditTrainer", source) from None
    state = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(field, f"{path} is not an EasyEdit trainer archive (no 'model' state dict)", _train_fix(source), source)
    meta = decode_meta(state.get(META_KEY))
    if meta is None or meta.get("alg") != "InstructEdit":
        raise CheckpointError(field, f"{path} is not an InstructEdit archive (its state dict has no '{META_KEY}' "
                               "entry; another algorithm's, or saved without the plugin)", _train_fix(source), source)
    hparams = meta.get("hparams", meta.get("training_config", {}))
    meta = {k: v for k, v in meta.items() if k not in _WRITER_KEYS}
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, hparams=hparams,
                files={path.name: hashlib.sha256(data).hexdigest()}, easyedit_archive=str(path))
    for key in ("step", "val_stats", "elapsed_time"):
        if key in obj:
            meta[key] = _jsonable(obj[key])
    _check_manifest(meta, path, field, source)
    tensors = {k: v for k, v in state.items()
               if isinstance(v, torch.Tensor) and (k.startswith("hypernet.") or k == "edit_lrs")}
    if "edit_lrs" not in tensors:
        raise CheckpointError(field, f"{path}: the InstructEdit state dict has no edit_lrs", _train_fix(source), source)
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def verify_base_model(meta: Mapping[str, Any], model: Any, where: Any, field: str = "archive",
                      source: str | None = None) -> None:
    """Refuse an editor trained for another base model (architecture config fingerprint differs);
    a format-1 manifest names none (:func:`load_editor` warned)."""
    saved = meta.get("base_model")
    core.verify_base_model(saved if isinstance(saved, Mapping) else None, model, f"the editor {where} was", field=field,
                           source=source, fix="point archive at an editor trained for this model (or set model_name "
                                              "to the model the editor was trained for), or train one for it")


# ------------------------------------------------------------------ trainer state
def trainer_state_files(optimizer_state: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, bytes]:
    """``{trainer_state.safetensors: ..., trainer_state.json: ...}`` for :func:`save_editor`'s ``extra_files``
    (the core's layout)."""
    return core.trainer_state_files(optimizer_state, extra)


def load_trainer_state(folder: str | os.PathLike, field: str = "resume",
                       source: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(optimizer_state, info)`` saved in a ``last/`` folder by :func:`save_editor` with
    :func:`trainer_state_files`; ``info`` holds ``step``, ``best_value``, ``history``...

    Both files are verified against the sha256 the manifest lists (a committed save whose renames
    were interrupted reads its staged copies); a format-1 folder's state against the sha256 its
    ``trainer_state.json`` carries.

    Returns ``None`` when ``folder`` holds no committed checkpoint (no manifest): nothing to resume.

    Raises:
        CheckpointError: (``field``) the folder holds a checkpoint whose trainer state is absent,
            not listed in the manifest, modified, corrupted or unreadable.
    """
    folder = Path(folder)
    name = _manifest_name(folder)
    if name is None:
        return None
    meta = _read_manifest(folder, field, source)
    if meta["format_version"] >= 2:
        return core.read_trainer_state(folder, meta, field=field, source=source, fix=_RETRY, manifest_name=name)
    try:  # format 1: the manifest hashes the editor only; the state carries its own sha256
        info_bytes, blob = (folder / TRAINER_JSON).read_bytes(), (folder / TRAINER_FILE).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(field, f"{folder} holds no trainer state to resume from ({TRAINER_FILE} and "
                                     f"{TRAINER_JSON} are needed)", _RETRY, source) from None
    except OSError as exc:
        raise CheckpointError(field, f"{exc.filename} is not readable ({type(exc).__name__})", _RETRY, source) from None
    info = core.read_json(info_bytes, folder / TRAINER_JSON, field=field, source=source, fix=_RETRY)
    if info.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(field, f"{folder / TRAINER_FILE} does not match the sha256 in {TRAINER_JSON} "
                                     "(modified, corrupted or from another save)", _RETRY, source)
    return core.parse_trainer_state(blob, info, folder, field=field, source=source, fix=_RETRY), info
