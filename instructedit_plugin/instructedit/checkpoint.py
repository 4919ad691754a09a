"""Editor checkpoints: safetensors tensors + JSON metadata, written atomically, loaded without pickle.

A checkpoint folder holds

* ``editor.safetensors``: hypernetwork parameters and running statistics, ``edit_lrs``;
* ``editor_config.json``: format version, layer specs, hypernetwork settings, the
  training config, step/validation stats and the sha256 of ``editor.safetensors``;
* for resuming (``last/`` only): ``trainer_state.safetensors`` (optimiser
  tensors) and ``trainer_state.json`` (optimiser structure, step, best value).

Every file is written to a temporary file in the same folder, flushed, fsynced
and moved into place with :func:`os.replace`; the JSON (which carries the
tensor file's hash) is written last, so a crash leaves either the previous
complete checkpoint or a detectable mismatch, never a silently mixed one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..durable import atomic_write_bytes, atomic_write_json
from ..errors import HyperParamsError

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
EDITOR_FILE = "editor.safetensors"
CONFIG_FILE = "editor_config.json"
TRAINER_FILE = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_editor(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``editor.safetensors`` then ``editor_config.json`` (with the tensor file's sha256)."""
    folder = Path(folder)
    blob = st_save(_tensors(state))
    atomic_write_bytes(folder / EDITOR_FILE, blob)
    meta = dict(config)
    meta["format_version"] = FORMAT_VERSION
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_json(folder / CONFIG_FILE, meta)
    return folder


def resolve_archive(archive: str | os.PathLike | None, field: str = "archive", source: str | None = None) -> Path:
    """The checkpoint folder named by ``archive`` (the folder or its ``editor.safetensors``)."""
    if archive is None or not str(archive).strip():
        raise HyperParamsError(field, "no trained editor checkpoint is given",
                               "set it to the folder written by InstructEditTrainer (e.g. results/models/InstructEdit/<model>/best)", source)
    path = Path(archive).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not (path / EDITOR_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise HyperParamsError(field, f"no InstructEdit checkpoint at {path} (needs {EDITOR_FILE} and {CONFIG_FILE})",
                               "train an editor first (InstructEditTrainer(...).run()) and point archive at its best/ folder", source)
    return path


def load_editor(archive: str | os.PathLike, field: str = "archive", source: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint without unpickling: ``(tensors, config)``; checks the hash."""
    folder = resolve_archive(archive, field, source)
    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise HyperParamsError(field, f"checkpoint format {meta.get('format_version')!r} is not {FORMAT_VERSION}",
                               "retrain the editor with this plugin version", source)
    blob = (folder / EDITOR_FILE).read_bytes()
    if meta.get("sha256") and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise HyperParamsError(field, f"{folder / EDITOR_FILE} does not match {CONFIG_FILE} (interrupted write?)",
                               "use another checkpoint (e.g. best/ or last/) or retrain", source)
    return st_load(blob), meta


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


def save_trainer_state(folder: str | os.PathLike, optimizer_state: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    folder = Path(folder)
    tensors, structure = flatten_optimizer_state(optimizer_state)
    blob = st_save(tensors) if tensors else st_save({"_empty": torch.zeros(1)})
    atomic_write_bytes(folder / TRAINER_FILE, blob)
    atomic_write_json(folder / TRAINER_JSON, {"optimizer": structure, "sha256": hashlib.sha256(blob).hexdigest(), **extra})


def load_trainer_state(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    folder = Path(folder)
    if not (folder / TRAINER_FILE).is_file() or not (folder / TRAINER_JSON).is_file():
        return None
    meta = json.loads((folder / TRAINER_JSON).read_text(encoding="utf-8"))
    blob = (folder / TRAINER_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        LOG.warning("trainer state in %s is inconsistent; not resuming from it", folder)
        return None
    return unflatten_optimizer_state(st_load(blob), meta["optimizer"]), meta
