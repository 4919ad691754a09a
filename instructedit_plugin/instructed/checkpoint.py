"""InstructEd checkpoints: prefixes in safetensors + JSON, written atomically, loaded without pickle.

A checkpoint folder holds

* ``prefixes.safetensors`` -- the :class:`~instructedit_plugin.instructed.prefix.PrefixBank`
  state (``embeddings``, ``layer_ids``);
* ``instructed_config.json`` -- format version, plugin version, bank shape, re-weighting mode,
  template, encoder identity, the base model's config fingerprint, the training hparams and the
  step / validation figures;
* optionally (the trainer's ``last/`` folder) ``trainer_state.safetensors`` (optimizer tensors)
  and ``trainer_state.json`` (optimizer param groups, scheduler state, step, best value...);
* ``manifest.json`` -- format, plugin version, the base model's identity (``base_model``:
  config fingerprint and model type), the hparams the prefixes were trained with, the bank's
  shape and the sha256 of every other file.

Nothing is ever unpickled: tensors are read with safetensors, everything else is JSON.

Crash safety
------------
A save replaces several files, which no single rename can do, so it is a small journal
(:func:`instructedit_plugin.core.durable.commit_folder`, shared with InstructEdit's editor checkpoints):

1. every new file is written (temp file in the same folder, flush, fsync, :func:`os.replace`)
   under a *staged* name, ``<name>.staged``; the current files are untouched;
2. ``manifest.next.json`` -- the new manifest -- is written the same way: **the commit point**;
3. each staged file is renamed over its final name, then ``manifest.next.json`` over
   ``manifest.json``.

A save killed before step 2 leaves the previous checkpoint exactly as it was (staged files are
ignored); one killed after it is the new checkpoint, whose files are each either still staged or
already in place: :func:`load_checkpoint` reads whichever copy has the hash the manifest names
(without touching the folder) and the next save finishes the renames first. Either way a load
returns the previous or the new version complete and bit-identical, never a mix; a file whose hash
matches no manifest (an outside modification) is reported, not loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core import durable
from ..errors import HyperParamsError, PluginError, fix_for
from .prefix import PrefixBank

LOG = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "Checkpoint", "CheckpointError", "BaseModelMismatchError", "save_checkpoint",
    "load_checkpoint", "read_manifest", "resolve_archive", "model_fingerprint", "verify_base_model",
    "save_trainer_state", "load_trainer_state", "atomic_write_bytes",
]

FORMAT_NAME = "instructedit_plugin/InstructEd-prefixes"
FORMAT_VERSION = 1
PREFIX_FILE = "prefixes.safetensors"
CONFIG_FILE = "instructed_config.json"
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
NEXT_MANIFEST_FILE = durable.pending_manifest_name(MANIFEST_FILE)  # manifest.next.json
STAGED_SUFFIX = durable.STAGED_SUFFIX
_DATA_FILES = (PREFIX_FILE, CONFIG_FILE, STATE_FILE, STATE_JSON)

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation", "attn_implementation",
                         "_attn_implementation_internal", "torch_dtype", "dtype", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


class CheckpointError(PluginError):
    """A checkpoint folder is missing, incomplete, corrupted, tampered with or of an unknown format."""


class BaseModelMismatchError(HyperParamsError):
    """The prefixes were trained for a different base model than the one being edited."""


def _plugin_version() -> str:
    from .. import __version__

    return __version__


def model_fingerprint(config: Any) -> str:
    """sha256 of the base model's architecture config (without paths, dtype, attention backend...)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)

    return hashlib.sha256(json.dumps(clean(data), sort_keys=True).encode()).hexdigest()


def _model_type(config: Any) -> str | None:
    value = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Crash-safe write (see :mod:`instructedit_plugin.core.durable`); returns the data's sha256."""
    durable.atomic_write_bytes(path, data)
    return durable.sha256_bytes(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the prefix bank, its JSON config and the manifest it was verified against."""

    folder: Path
    bank: PrefixBank
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.config["reweight_mode"]

    @property
    def template(self) -> str:
        return self.config["template"]


# ----------------------------------------------------------------------------------------------
# Reading manifests (the committed one, or a committed save whose renames were interrupted)
# ----------------------------------------------------------------------------------------------
def _read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: {path.name} is missing; the checkpoint is incomplete. "
                              "Fix: re-save or re-train it") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: the {what} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]}); "
                              "only JSON and safetensors are read (never pickle). Fix: re-save or re-train "
                              "the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} is a {type(data).__name__}, not a JSON object. "
                              "Fix: re-save or re-train the checkpoint")
    return data


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest a load of ``folder`` uses: ``manifest.next.json`` when a save committed but did
    not finish its renames, else ``manifest.json``; format and version checked."""
    folder = Path(folder)
    path = durable.manifest_path(folder, MANIFEST_FILE)
    return _check_manifest(folder, path, _read_json_file(path, "manifest"))


def _check_manifest(folder: Path, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder}: not an InstructEd prefix checkpoint (format {manifest.get('format')!r}). "
                              "Fix: point `archive` at a folder written by InstructEdTrainer")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer; the manifest was modified")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer plugin (format {version}, plugin "
                              f"{manifest.get('plugin_version')!r}); this plugin reads up to {FORMAT_VERSION}. "
                              "Fix: upgrade instructedit-plugin")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and Path(k).name == k and k in _DATA_FILES
                                              and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{path}: 'files' must map the checkpoint's file names to sha256 digests; "
                              "the manifest was modified. Fix: re-save or re-train the checkpoint")
    return manifest


def _existing_hashes(folder: Path) -> dict[str, str]:
    try:
        return dict(read_manifest(folder)["files"])
    except PluginError:
        return {}


def _verified_bytes(folder: Path, name: str, hashes: Mapping[str, str]) -> bytes:
    """The bytes of ``name`` whose sha256 the manifest lists: its staged copy (a committed save whose
    renames were interrupted) or the file itself."""
    expected = hashes.get(name)
    if expected is None:
        raise CheckpointError(f"{folder}: {name} is not listed in {MANIFEST_FILE}; the checkpoint is incomplete. "
                              "Fix: re-save or re-train it")
    try:
        return durable.read_verified(folder, name, expected)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {name} is missing; the checkpoint is incomplete. "
                              "Fix: re-save or re-train it") from None
    except durable.DigestMismatchError:
        raise CheckpointError(f"{folder}: {name} does not match the sha256 in {MANIFEST_FILE} (modified, corrupted or "
                              "replaced file); it is not loaded. Fix: re-save or re-train the checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{exc.filename or folder / name}: unreadable ({exc})") from exc


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def _pending_check(folder: Path) -> Any:
    """What a pending ``manifest.next.json`` must pass to be completed (else it is moved aside)."""
    return lambda manifest: _check_manifest(folder, folder / NEXT_MANIFEST_FILE, manifest)


def save_checkpoint(folder: str | os.PathLike, bank: PrefixBank, *, reweight_mode: str, template: str,
                    encoder: str, model_config: Any, training: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None, trainer_state: tuple[dict, dict] | None = None) -> Path:
    """Write (or overwrite) a checkpoint folder crash-safely (see the module docs); returns it.

    ``trainer_state`` is ``(tensors, json_state)`` from :func:`save_trainer_state`'s helpers; without
    it any trainer state already in the folder is removed (a ``best/`` folder needs none).
    """
    folder = Path(folder)
    fingerprint = model_fingerprint(model_config)
    model_type = _model_type(model_config)
    training = dict(training or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "plugin_version": _plugin_version(),
        "prefix_layers": list(bank.layers),
        "prefix_len": bank.prefix_len,
        "hidden_size": bank.hidden_size,
        "reweight_mode": reweight_mode,
        "template": template,
        "encoder": encoder,
        "base_model_fingerprint": fingerprint,
        "base_model_type": model_type,
        "training": training,
        "info": dict(info or {}),
    }
    blobs = {PREFIX_FILE: st_save(tensors), CONFIG_FILE: _json_bytes(config)}
    if trainer_state is not None:
        state_tensors, state_json = trainer_state
        blobs[STATE_FILE] = st_save(state_tensors)
        blobs[STATE_JSON] = _json_bytes(state_json)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "plugin_version": _plugin_version(),
        "base_model": {"fingerprint": fingerprint, "model_type": model_type},
        "bank": {"prefix_layers": list(bank.layers), "prefix_len": bank.prefix_len, "hidden_size": bank.hidden_size},
        "hparams": training,
    }
    durable.commit_folder(folder, blobs, MANIFEST_FILE, manifest, encode=_json_bytes, check=_pending_check(folder),
                          known_names=_DATA_FILES)  # "files" (the sha256 of each blob) is added there
    return folder


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def resolve_archive(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, its ``best/`` sub-folder (a results
    folder), or the folder of a ``prefixes.safetensors`` file."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.name in (PREFIX_FILE, CONFIG_FILE, MANIFEST_FILE):
        p = p.parent

    def has_manifest(folder: Path) -> bool:
        return durable.has_manifest(folder, MANIFEST_FILE)

    if has_manifest(p):
        return p
    for sub in ("best", "last"):
        if has_manifest(p / sub):
            return p / sub
    what = "is a file, not a checkpoint folder" if p.is_file() else f"holds no InstructEd checkpoint ({MANIFEST_FILE} not found)"
    raise HyperParamsError("archive", f"{str(path)!r} {what}", fix_for(
        "point it at the folder InstructEdTrainer wrote (<results_dir>/best)",
        "pass --archive the folder `instructedit train` printed as best_dir (<results_dir>/best), or --archive "
        "default for the prefixes shipped with the embedded Gemma-3-270M"))


def verify_base_model(ckpt: Checkpoint, model_config: Any) -> None:
    """Raise :class:`BaseModelMismatchError` (field ``archive``) unless ``ckpt`` was trained for a model
    with ``model_config``'s architecture (same :func:`model_fingerprint`)."""
    saved = ckpt.config.get("base_model_fingerprint")
    given = model_fingerprint(model_config)
    if saved != given:
        saved_type = ckpt.config.get("base_model_type")
        given_type = _model_type(model_config)
        raise BaseModelMismatchError(
            "archive",
            f"the prefixes in {ckpt.folder} were trained for another base model (model_type {saved_type!r}, "
            f"config fingerprint {str(saved)[:12]}...), not for this one (model_type {given_type!r}, "
            f"fingerprint {given[:12]}...)",
            "set `model_name` to the model the prefixes were trained on, or train prefixes for this model "
            "(InstructEdTrainer / `instructedit train`) and point `archive` at them",
        )


def _check_config(folder: Path, config: dict[str, Any], manifest: Mapping[str, Any]) -> None:
    def bad(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{folder}: {CONFIG_FILE}: '{key}' {problem}. Fix: re-save or re-train the checkpoint")

    layers = config.get("prefix_layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise bad("prefix_layers", f"must be a non-empty list of layer indices, got {layers!r}")
    for key in ("prefix_len", "hidden_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, f"must be a positive integer, got {value!r}")
    for key in ("reweight_mode", "template"):
        if not isinstance(config.get(key), str):
            raise bad(key, f"must be a string, got {config.get(key)!r}")
    base = manifest.get("base_model")
    if isinstance(base, Mapping) and base.get("fingerprint") != config.get("base_model_fingerprint"):
        raise CheckpointError(f"{folder}: {MANIFEST_FILE} and {CONFIG_FILE} name different base models; "
                              "the checkpoint was modified. Fix: re-save or re-train it")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    model_config: Any = None) -> Checkpoint:
    """Load and verify a checkpoint folder (see :func:`resolve_archive`).

    Every file's sha256 is checked against the manifest, the config's fields and the tensors'
    shapes against each other, and, with ``model_config``, the base model the prefixes were
    trained for (:func:`verify_base_model`).

    Raises:
        HyperParamsError: (``archive``) no checkpoint at ``path``.
        CheckpointError: a missing, corrupted, modified or foreign file.
        BaseModelMismatchError: (``archive``) trained for another base model than ``model_config``'s.
    """
    folder = resolve_archive(path)
    manifest = read_manifest(folder)
    hashes = manifest["files"]
    config = _read_json_bytes(folder, CONFIG_FILE, _verified_bytes(folder, CONFIG_FILE, hashes))
    _check_config(folder, config, manifest)
    try:
        tensors = st_load(_verified_bytes(folder, PREFIX_FILE, hashes))
    except PluginError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError)
        raise CheckpointError(f"{folder}: {PREFIX_FILE} is not a safetensors file ({exc}); only safetensors is "
                              "read (never pickle). Fix: re-save or re-train the checkpoint") from None
    layers, prefix_len, hidden = config["prefix_layers"], config["prefix_len"], config["hidden_size"]
    emb, layer_ids = tensors.get("embeddings"), tensors.get("layer_ids")
    if (emb is None or layer_ids is None or tuple(emb.shape) != (len(layers), prefix_len, hidden)
            or not emb.is_floating_point() or layer_ids.tolist() != layers):
        shape = None if emb is None else tuple(emb.shape)
        raise CheckpointError(f"{folder}: {PREFIX_FILE} holds embeddings of shape {shape} for layers "
                              f"{None if layer_ids is None else layer_ids.tolist()}, but {CONFIG_FILE} says "
                              f"{len(layers)} x {prefix_len} x {hidden} for layers {layers}. "
                              "Fix: re-save or re-train the checkpoint")
    bank = PrefixBank(layers, prefix_len, hidden, device=device)
    bank.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    bank.requires_grad_(False)
    ckpt = Checkpoint(folder, bank, config, manifest)
    if model_config is not None:
        verify_base_model(ckpt, model_config)
    return ckpt


def _read_json_bytes(folder: Path, name: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: {name} is not JSON ({exc}). Fix: re-save or re-train the checkpoint") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{folder}: {name} is not a JSON object. Fix: re-save or re-train the checkpoint")
    return value


# ----------------------------------------------------------------------------------------------
# Trainer state (optimizer + scheduler), without pickle
# ----------------------------------------------------------------------------------------------
def save_trainer_state(optimizer: torch.optim.Optimizer, scheduler: Any, info: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(tensors, json_state)`` describing optimizer and scheduler; tensors go to safetensors."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    sched = {}
    if scheduler is not None:
        for key, value in scheduler.state_dict().items():
            try:
                json.dumps(value)
            except TypeError:
                continue
            sched[key] = value
    return tensors, {
        "optimizer_class": type(optimizer).__name__,
        "param_groups": json.loads(json.dumps(state["param_groups"], default=_json_default)),
        "optimizer_scalars": scalars,
        "scheduler": sched,
        **dict(info),
    }


def load_trainer_state(folder: str | os.PathLike, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer and scheduler from ``folder``; returns the JSON state (step, best...)."""
    folder = Path(folder)
    hashes = _existing_hashes(folder)
    if STATE_FILE not in hashes or STATE_JSON not in hashes:
        raise PluginError(f"{folder}: no trainer state to resume from (only a final/best checkpoint?)")
    info = _read_json_bytes(folder, STATE_JSON, _verified_bytes(folder, STATE_JSON, hashes))
    try:
        tensors = st_load(_verified_bytes(folder, STATE_FILE, hashes))
    except PluginError:
        raise
    except Exception as exc:  # SafetensorError
        raise CheckpointError(f"{folder}: {STATE_FILE} is not a safetensors file ({exc}); only safetensors is "
                              "read (never pickle). Fix: resume from another checkpoint or train from scratch") from None
    if not isinstance(info.get("param_groups"), list) or not all(name.count(".") >= 2 for name in tensors):
        raise CheckpointError(f"{folder}: {STATE_JSON} / {STATE_FILE} do not describe an optimizer state. "
                              "Fix: resume from another checkpoint or train from scratch")
    if info.get("optimizer_class") != type(optimizer).__name__:
        raise PluginError(f"{folder}: saved optimizer {info.get('optimizer_class')} != {type(optimizer).__name__}")
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = value
    for idx, entry in info.get("optimizer_scalars", {}).items():
        per_param.setdefault(int(idx), {}).update(entry)
    groups = info["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if scheduler is not None and info.get("scheduler"):
        current = scheduler.state_dict()
        current.update(info["scheduler"])
        scheduler.load_state_dict(current)
    return info
