"""InstructEd checkpoints: prefixes in safetensors + JSON, written atomically, loaded without pickle.

A checkpoint folder holds

* ``prefixes.safetensors`` -- the :class:`~instructedit_plugin.instructed.prefix.PrefixBank`
  state (``embeddings``, ``layer_ids``);
* ``instructed_config.json`` -- format version, plugin version, bank shape, re-weighting mode,
  template, encoder identity, the base model's config fingerprint, the training hparams and the
  step / validation figures;
* optionally (the trainer's ``last/`` folder) ``trainer_state.safetensors`` (optimizer tensors)
  and ``trainer_state.json`` (optimizer param groups, scheduler state, step, best value...);
* ``manifest.json`` -- sha256 of every other file, written **last**.

Every file is written to a temporary file in the same folder, flushed, fsynced and moved into
place with :func:`os.replace`, then the folder is fsynced. A crash leaves either the previous
complete checkpoint or files whose hashes disagree with the manifest, which
:func:`load_checkpoint` detects and reports; it never loads a silently mixed checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import durable
from ..errors import HyperParamsError, PluginError
from .prefix import PrefixBank

LOG = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint", "resolve_archive",
    "model_fingerprint", "save_trainer_state", "load_trainer_state", "atomic_write_bytes",
]

FORMAT_NAME = "instructedit_plugin/InstructEd-prefixes"
FORMAT_VERSION = 1
PREFIX_FILE = "prefixes.safetensors"
CONFIG_FILE = "instructed_config.json"
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST_FILE = "manifest.json"

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation", "attn_implementation",
                         "_attn_implementation_internal", "torch_dtype", "dtype", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Crash-safe write (see :mod:`instructedit_plugin.durable`); returns the data's sha256."""
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
    """A loaded checkpoint: the prefix bank and its JSON config."""

    folder: Path
    bank: PrefixBank
    config: dict[str, Any]

    @property
    def mode(self) -> str:
        return self.config["reweight_mode"]

    @property
    def template(self) -> str:
        return self.config["template"]


def _write_manifest(folder: Path, hashes: dict[str, str]) -> None:
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": hashes}
    atomic_write_bytes(folder / MANIFEST_FILE, _json_bytes(manifest))


def _existing_hashes(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        return dict(data.get("files", {}))
    except (OSError, ValueError):
        return {}


def save_checkpoint(folder: str | os.PathLike, bank: PrefixBank, *, reweight_mode: str, template: str,
                    encoder: str, model_config: Any, training: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None, trainer_state: tuple[dict, dict] | None = None) -> Path:
    """Write (or overwrite) a checkpoint folder; returns it.

    ``trainer_state`` is ``(tensors, json_state)`` from :func:`save_trainer_state`'s helpers; without
    it any trainer state already in the folder is removed (a ``best/`` folder needs none).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}
    hashes = {PREFIX_FILE: atomic_write_bytes(folder / PREFIX_FILE, st_save(tensors))}
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
        "base_model_fingerprint": model_fingerprint(model_config),
        "base_model_type": getattr(model_config, "model_type", None),
        "training": dict(training or {}),
        "info": dict(info or {}),
    }
    hashes[CONFIG_FILE] = atomic_write_bytes(folder / CONFIG_FILE, _json_bytes(config))
    if trainer_state is not None:
        state_tensors, state_json = trainer_state
        hashes[STATE_FILE] = atomic_write_bytes(folder / STATE_FILE, st_save(state_tensors))
        hashes[STATE_JSON] = atomic_write_bytes(folder / STATE_JSON, _json_bytes(state_json))
    _write_manifest(folder, hashes)
    if trainer_state is None:
        for name in (STATE_FILE, STATE_JSON):
            try:
                (folder / name).unlink()
            except FileNotFoundError:
                pass
    return folder


def resolve_archive(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, its ``best/`` sub-folder (a results
    folder), or the folder of a ``prefixes.safetensors`` file."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.name in (PREFIX_FILE, CONFIG_FILE, MANIFEST_FILE):
        p = p.parent
    if (p / MANIFEST_FILE).is_file():
        return p
    for sub in ("best", "last"):
        if (p / sub / MANIFEST_FILE).is_file():
            return p / sub
    raise HyperParamsError("archive", f"{str(path)!r} holds no InstructEd checkpoint ({MANIFEST_FILE} not found)",
                           "point it at the folder InstructEdTrainer wrote (<results_dir>/best)")


def _verified_bytes(folder: Path, name: str, hashes: Mapping[str, str]) -> bytes:
    data = (folder / name).read_bytes()
    expected = hashes.get(name)
    if expected is None:
        raise PluginError(f"{folder}: {name} is not listed in {MANIFEST_FILE}; the checkpoint is incomplete")
    if hashlib.sha256(data).hexdigest() != expected:
        raise PluginError(f"{folder}: {name} does not match the sha256 in {MANIFEST_FILE} (interrupted write?); "
                          "re-save or re-train the checkpoint")
    return data


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint folder (see :func:`resolve_archive`)."""
    folder = resolve_archive(path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME:
        raise PluginError(f"{folder}: not an InstructEd prefix checkpoint (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise PluginError(f"{folder}: written by a newer plugin (format {manifest['format_version']}); upgrade the plugin")
    hashes = manifest.get("files", {})
    config = json.loads(_verified_bytes(folder, CONFIG_FILE, hashes).decode())
    tensors = st_load(_verified_bytes(folder, PREFIX_FILE, hashes))
    bank = PrefixBank(config["prefix_layers"], config["prefix_len"], config["hidden_size"], device=device)
    bank.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    bank.requires_grad_(False)
    return Checkpoint(folder, bank, config)


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
    info = json.loads(_verified_bytes(folder, STATE_JSON, hashes).decode())
    tensors = st_load(_verified_bytes(folder, STATE_FILE, hashes))
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
