"""InstructEd checkpoints: a PEFT adapter folder plus the plugin's manifest.

What is InstructEd's own here (the format, hashes, identity and trainer state are
:mod:`instructedit_plugin.core.checkpoint`'s): which tensors and which config. A checkpoint folder
(format 2, written now) holds

* ``adapter_model.safetensors`` + ``adapter_config.json`` -- the prefix bank as a PEFT adapter of
  :class:`~.tuner.InstructEdConfig` (bank shape, re-weighting mode, template, encoder identity, base
  model fingerprint), exactly what ``PeftModel.save_pretrained`` writes, so the folder also loads
  with ``PeftModel.from_pretrained(base_model, folder)``;
* ``manifest.json`` -- the core manifest (sha256 of every other file, plugin version, base-model
  identity, the training hparams as ``hparams``) plus ``bank`` (its shape) and ``info`` (step,
  validation figures);
* for resuming (the trainer's ``last/``): the core's trainer state (``trainer_state.safetensors`` /
  ``.json``; the scheduler and the trainer's counters in the JSON).

:func:`load_checkpoint` also reads

* a format-1 folder (``prefixes.safetensors`` + ``instructed_config.json`` + ``manifest.json``, the
  layout before the PEFT adapter; e.g. the prefixes shipped in the package), converted on load;
* a bare PEFT folder from ``save_pretrained`` (no manifest: nothing to check hashes against; the
  base model is checked with the fingerprint in ``adapter_config.json``).

Nothing is ever unpickled. Saves are crash-safe (:func:`instructedit_plugin.core.durable.commit_folder`):
a save killed at any moment leaves the previous checkpoint or the new one, complete, and a file whose
hash matches no manifest (an outside modification) is reported, not loaded.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..core import checkpoint as core
from ..core import durable
from ..core.checkpoint import BaseModelMismatchError, CheckpointError, model_fingerprint
from ..errors import fix_for
from .prefix import PrefixBank
from .tuner import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    InstructEdConfig,
    adapter_config_bytes,
    adapter_tensors,
    adapter_tensors_of,
    bank_from_adapter,
    config_from_dict,
)

LOG = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "BaseModelMismatchError",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "load_checkpoint",
    "load_trainer_state",
    "model_fingerprint",
    "read_manifest",
    "resolve_archive",
    "save_checkpoint",
    "save_trainer_state",
    "verify_base_model",
]

FORMAT_NAME = "instructedit_plugin/InstructEd-prefixes"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = core.MANIFEST_FILE
NEXT_MANIFEST_FILE = core.PENDING_MANIFEST_FILE  # manifest.next.json
STATE_FILE = core.TRAINER_TENSORS
STATE_JSON = core.TRAINER_JSON
STAGED_SUFFIX = durable.STAGED_SUFFIX
#: Format 1's files (read, converted; never written).
PREFIX_FILE = "prefixes.safetensors"
CONFIG_FILE = "instructed_config.json"
_DATA_FILES = (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, STATE_FILE, STATE_JSON, PREFIX_FILE, CONFIG_FILE)
_REDO = "re-save or re-train the checkpoint"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Crash-safe write (see :mod:`instructedit_plugin.core.durable`); returns the data's sha256."""
    durable.atomic_write_bytes(path, data)
    return durable.sha256_bytes(data)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the prefix bank, its config and the manifest it was verified against.

    ``config`` has the same keys in every format (``prefix_layers``, ``prefix_len``, ``hidden_size``,
    ``reweight_mode``, ``template``, ``encoder``, ``base_model_fingerprint``, ``base_model_type``,
    ``training``, ``info``); ``manifest`` is empty for a bare PEFT folder."""

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

    @property
    def peft_config(self) -> InstructEdConfig:
        """The bank as a PEFT adapter config (for ``get_peft_model`` / ``save_pretrained``)."""
        return _adapter_config(self.bank, self.config)


def _adapter_config(bank: PrefixBank, config: Mapping[str, Any]) -> InstructEdConfig:
    return InstructEdConfig(prefix_layers=list(bank.layers), prefix_len=bank.prefix_len, hidden_size=bank.hidden_size,
                            reweight_mode=config["reweight_mode"], template=config["template"],
                            encoder=config.get("encoder"), base_model_fingerprint=config.get("base_model_fingerprint"),
                            base_model_type=config.get("base_model_type"), inference_mode=True)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest a load of ``folder`` uses (``manifest.next.json`` when a save committed but did not
    finish its renames, else ``manifest.json``); format and version checked."""
    return core.read_manifest(folder, {FORMAT_NAME: READABLE_VERSIONS}, fix=_archive_fix(),
                              what="an InstructEd prefix checkpoint")


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_checkpoint(folder: str | os.PathLike, bank: PrefixBank, *, reweight_mode: str, template: str,
                    encoder: str, model_config: Any, training: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None, trainer_state: tuple[dict, dict] | None = None) -> Path:
    """Write (or overwrite) a checkpoint folder crash-safely (see the module docs); returns it.

    ``trainer_state`` is ``(tensors, json_state)`` from :func:`save_trainer_state`; without it any
    trainer state already in the folder is removed (a ``best/`` folder needs none).
    """
    folder = Path(folder)
    identity = core.base_model_identity(model_config)
    config = {"reweight_mode": reweight_mode, "template": template, "encoder": encoder,
              "base_model_fingerprint": identity["fingerprint"], "base_model_type": identity["model_type"]}
    adapter = _adapter_config(bank, config)
    adapter.base_model_name_or_path = identity["name"]
    blobs = {ADAPTER_WEIGHTS_FILE: st_save(adapter_tensors(bank), metadata={"format": "pt"}),
             ADAPTER_CONFIG_FILE: adapter_config_bytes(adapter)}
    if trainer_state is not None:
        state_tensors, state_json = trainer_state
        blobs[STATE_FILE] = st_save({k: v.detach().cpu().contiguous() for k, v in state_tensors.items()})
        blobs[STATE_JSON] = core.json_bytes(state_json)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": identity,
        "bank": {"prefix_layers": list(bank.layers), "prefix_len": bank.prefix_len, "hidden_size": bank.hidden_size},
        "hparams": dict(training or {}),
        "info": dict(info or {}),
    }
    core.write_checkpoint(folder, blobs, manifest, known_names=_DATA_FILES)
    return folder


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _archive_fix() -> str:
    return fix_for("point it at the folder InstructEdTrainer wrote (<results_dir>/best) or at a folder written by "
                   "PeftModel.save_pretrained",
                   "pass --archive the folder `instructedit train` printed as best_dir (<results_dir>/best), or --archive "
                   "default for the prefixes shipped with the embedded Gemma-3-270M")


def _is_checkpoint(folder: Path) -> bool:
    return durable.has_manifest(folder, MANIFEST_FILE) or (folder / ADAPTER_CONFIG_FILE).is_file()


def resolve_archive(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: the folder itself (with a manifest, or a PEFT adapter
    folder), its ``best/`` (else ``last/``) sub-folder (a results folder), or the folder of one of
    its files."""
    return core.resolve_archive(path, _is_checkpoint, what=f"InstructEd checkpoint ({MANIFEST_FILE} or "
                                                           f"{ADAPTER_CONFIG_FILE} not found)", fix=_archive_fix(),
                                file_names=(ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, MANIFEST_FILE, PREFIX_FILE,
                                            CONFIG_FILE))


def verify_base_model(ckpt: Checkpoint, model_config: Any) -> None:
    """Raise :class:`BaseModelMismatchError` (field ``archive``) unless ``ckpt`` was trained for a model
    with ``model_config``'s architecture (same :func:`model_fingerprint`); a bare PEFT folder without
    a fingerprint passes with a warning."""
    saved = ckpt.config.get("base_model_fingerprint")
    if saved is None:
        LOG.warning("%s names no base model: it cannot be checked against this one", ckpt.folder)
        return
    core.verify_base_model({"fingerprint": saved, "model_type": ckpt.config.get("base_model_type")}, model_config,
                           f"the prefixes in {ckpt.folder} were",
                           fix="set `model_name` to the model the prefixes were trained on, or train prefixes for this "
                               "model (InstructEdTrainer / `instructedit train`) and point `archive` at them")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    model_config: Any = None) -> Checkpoint:
    """Load and verify a checkpoint folder of any readable kind (see the module docs and
    :func:`resolve_archive`).

    Every file's sha256 is checked against the manifest, the config's fields and the tensors' shapes
    against each other, and, with ``model_config``, the base model the prefixes were trained for
    (:func:`verify_base_model`).

    Raises:
        CheckpointError: (``archive``) no checkpoint at ``path``, or a missing, corrupted, modified
            or foreign file.
        BaseModelMismatchError: (``archive``) trained for another base model than ``model_config``'s.
    """
    folder = resolve_archive(path)
    if durable.has_manifest(folder, MANIFEST_FILE):
        manifest = read_manifest(folder)
        read = lambda name: core.read_file(folder, manifest, name, fix=_REDO)
    else:  # a bare PEFT adapter folder: nothing to check the files against
        manifest = {}
        read = lambda name: _read_plain(folder, name)
    if manifest.get("format_version") == 1:
        ckpt = _load_format_1(folder, manifest, read, device)
    else:
        ckpt = _load_adapter(folder, manifest, read, device)
    if model_config is not None:
        verify_base_model(ckpt, model_config)
    return ckpt


def _read_plain(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError("archive", f"{folder}: {name} is missing; a PEFT adapter folder needs "
                                         f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}", _archive_fix()) from None
    except OSError as exc:
        raise CheckpointError("archive", f"{folder / name} is not readable ({type(exc).__name__})", _REDO) from None


def _load_adapter(folder: Path, manifest: Mapping[str, Any], read: Any, device: Any) -> Checkpoint:
    """Format 2, or a bare PEFT folder."""
    raw = core.read_json(read(ADAPTER_CONFIG_FILE), folder / ADAPTER_CONFIG_FILE, fix=_REDO)
    if raw.get("peft_type") != "INSTRUCTED":
        raise CheckpointError("archive", f"{folder / ADAPTER_CONFIG_FILE} is a PEFT adapter of type "
                                         f"{raw.get('peft_type')!r}, not InstructEd prefixes ('INSTRUCTED')", _archive_fix())
    try:
        adapter = config_from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError("archive", f"{folder / ADAPTER_CONFIG_FILE} is not an InstructEd adapter config "
                                         f"({str(exc)[:200]})", _REDO) from None
    tensors = core.read_tensors(read(ADAPTER_WEIGHTS_FILE), folder / ADAPTER_WEIGHTS_FILE, fix=_REDO)
    try:
        bank = bank_from_adapter(adapter, tensors, device)
    except ValueError as exc:
        raise CheckpointError("archive", f"{folder}: {ADAPTER_WEIGHTS_FILE} does not fit {ADAPTER_CONFIG_FILE}: {exc}",
                              _REDO) from None
    base = manifest.get("base_model")
    if isinstance(base, Mapping) and base.get("fingerprint") != adapter.base_model_fingerprint:
        raise CheckpointError("archive", f"{folder}: {MANIFEST_FILE} and {ADAPTER_CONFIG_FILE} name different base "
                                         "models; the checkpoint was modified", _REDO)
    config = {"prefix_layers": list(bank.layers), "prefix_len": bank.prefix_len, "hidden_size": bank.hidden_size,
              "reweight_mode": adapter.reweight_mode, "template": adapter.template, "encoder": adapter.encoder,
              "base_model_fingerprint": adapter.base_model_fingerprint, "base_model_type": adapter.base_model_type,
              "training": dict(manifest.get("hparams") or {}), "info": dict(manifest.get("info") or {}),
              "plugin_version": manifest.get("plugin_version")}
    return Checkpoint(folder, bank, config, dict(manifest))


def _load_format_1(folder: Path, manifest: Mapping[str, Any], read: Any, device: Any) -> Checkpoint:
    """``prefixes.safetensors`` (``embeddings``, ``layer_ids``) + ``instructed_config.json``."""
    config = core.read_json(read(CONFIG_FILE), folder / CONFIG_FILE, fix=_REDO)

    def bad(key: str, problem: str) -> CheckpointError:
        return CheckpointError("archive", f"{folder}: {CONFIG_FILE}: '{key}' {problem}", _REDO)

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
        raise CheckpointError("archive", f"{folder}: {MANIFEST_FILE} and {CONFIG_FILE} name different base models; "
                                         "the checkpoint was modified", _REDO)
    tensors = core.read_tensors(read(PREFIX_FILE), folder / PREFIX_FILE, fix=_REDO)
    adapter = InstructEdConfig(prefix_layers=layers, prefix_len=config["prefix_len"], hidden_size=config["hidden_size"],
                               reweight_mode=config["reweight_mode"])
    try:
        bank = bank_from_adapter(adapter, adapter_tensors_of(tensors), device)
    except ValueError as exc:
        raise CheckpointError("archive", f"{folder}: {PREFIX_FILE} does not fit {CONFIG_FILE}: {exc}", _REDO) from None
    return Checkpoint(folder, bank, config, dict(manifest))


# ----------------------------------------------------------------------------------------------
# Trainer state (optimizer + scheduler), in the core's layout
# ----------------------------------------------------------------------------------------------
def save_trainer_state(optimizer: torch.optim.Optimizer, scheduler: Any, info: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(tensors, json_state)`` describing optimizer and scheduler (the core's optimiser layout plus
    ``optimizer_class``, the JSON-able ``scheduler`` state and ``info``)."""
    tensors, structure = core.flatten_optimizer_state(optimizer.state_dict())
    sched = {}
    if scheduler is not None:
        for key, value in scheduler.state_dict().items():
            try:
                json.dumps(value)
            except TypeError:
                continue
            sched[key] = value
    return tensors, {**dict(info), "optimizer": structure, "optimizer_class": type(optimizer).__name__,
                     "scheduler": sched}


def load_trainer_state(folder: str | os.PathLike, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer and scheduler from ``folder`` (either optimiser layout); returns the JSON
    state (step, best...)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    state, info = core.read_trainer_state(folder, manifest, fix="resume from another checkpoint or train from scratch")
    if info.get("optimizer_class") not in (None, type(optimizer).__name__):
        raise CheckpointError("resume", f"{folder}: saved optimizer {info.get('optimizer_class')} != "
                                        f"{type(optimizer).__name__}", "resume with the same optimizer or train from scratch")
    for group in state["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict(state)
    if scheduler is not None and info.get("scheduler"):
        current = scheduler.state_dict()
        current.update(info["scheduler"])
        scheduler.load_state_dict(current)
    return info
