"""A sequential edit run's progress on disk, so a stopped run resumes after its last finished edit.

EasyEdit main's WISE edits Gemma-3-270M in minutes per edit on a CPU, so the 100 sequential edits of #15
item 4 take longer than one working session; background jobs end with the session. After every edit,
:meth:`SequentialCheckpoint.save` writes one crash-safe folder (:func:`instructedit_plugin.core.durable.commit_folder`):

* ``modules.pt`` -- the modules EasyEdit put at the hparams' edited paths (WISE's ``WISEAdapter`` with its
  side memory, masks and activation statistics; GRACE's codebook adapter), pickled whole;
* ``state.pt`` -- the method's module-level state that its next edit reads (:data:`METHOD_GLOBALS`: WISE's
  edit history and its cached context templates), the torch / NumPy / Python random states (WISE draws its
  gradient masks from NumPy), the pre-edit metrics of every request and the edit times so far;
* ``progress.json`` -- the manifest: the run's fingerprint, how many edits are done, the file hashes.

A tensor of a saved module that is bit-identical to a tensor of the *unedited* module at the same path (WISE
keeps two copies of the original down-projection beside its side memory) is stored as a reference, with the
unedited tensor's SHA-256, and taken from the freshly loaded model on resume (format 2): a Gemma-3-270M WISE
folder is 2.6 MB of side memory plus its mask instead of three weight copies, small enough to commit when a
run must go on in another session's machine. A model whose unedited tensor differs is refused.

:meth:`SequentialCheckpoint.load` puts all of it back into a freshly loaded model, so the remaining edits
run as they would have without the stop (tested: a run stopped after two edits and resumed gives the
uninterrupted run's metrics and adapter tensors). A folder written for another run (method, dataset,
requests, hparams or dtype differ) is refused with an error naming the field.

The files are pickles of EasyEdit objects: load only folders this script wrote.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructedit_plugin.core.durable import commit_folder, has_manifest, manifest_files, manifest_path, read_verified

__all__ = ["METHOD_GLOBALS", "CheckpointMismatchError", "Resumed", "SequentialCheckpoint", "run_fingerprint"]

LOG = logging.getLogger("sequential_checkpoint")

MANIFEST = "progress.json"
FORMAT = 2  # 1: every tensor pickled; 2: tensors equal to the unedited module's stored as references (both read)

#: Module-level variables of EasyEdit main that an edit reads and the previous edits wrote, per ``alg_name``.
METHOD_GLOBALS: dict[str, tuple[tuple[str, str], ...]] = {
    "WISE": (("easyeditor.models.wise.WISE", "edit_history"),
             ("easyeditor.models.wise.WISE", "merge_group_edit_history"),
             ("easyeditor.models.wise.utils", "CONTEXT_TEMPLATES_CACHE")),
    "GRACE": (),
}


class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds another run's progress (the message names the field and the fix)."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def run_fingerprint(method: str, dataset: str, requests: Sequence[Mapping[str, Any]], hparams_yaml: Path,
                    dtype: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the row's method, the dataset, the requests (their
    count and a hash of their prompts and targets), the hparams YAML's bytes and the model's dtype."""
    return {"method": method, "dataset": dataset, "n": len(requests),
            "requests_sha256": _digest([[r.get("prompt"), r.get("target_new")] for r in requests]),
            "hparams_sha256": hashlib.sha256(Path(hparams_yaml).read_bytes()).hexdigest(), "dtype": dtype}


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``module`` by dotted name (an object reachable by two names counted once)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _set_module_at(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@dataclass
class Resumed:
    """What :meth:`SequentialCheckpoint.load` gives back besides the restored model state."""

    done: int  #: edits already applied
    pre: list[dict]  #: the pre-edit metrics of every request
    edit_ms: list[float]  #: the time of each applied edit


class SequentialCheckpoint:
    """The progress folder of one sequential run (single writer).

    Args:
        folder: where the progress lives (created on the first save).
        fingerprint: :func:`run_fingerprint` of the run; a saved folder must carry the same one.
        alg_name: EasyEdit's name of the method (picks :data:`METHOD_GLOBALS`).
        module_paths: the model's module paths the method's edits live in (``edited_module_paths``).
    """

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, Any], alg_name: str, module_paths: Sequence[str]):
        if alg_name not in METHOD_GLOBALS:
            raise CheckpointMismatchError(
                f"--checkpoint_dir: {alg_name} runs cannot be resumed (the module state of its edits is not known here). "
                f"Fix: use it only for the sequential methods {', '.join(sorted(METHOD_GLOBALS))}")
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.alg_name = alg_name
        self.module_paths = list(module_paths)
        self._unedited: dict[str, dict[str, torch.Tensor]] = {}  # path -> the unedited module's tensors (load)
        self._unedited_sha: dict[str, dict[str, str]] = {}  # and their SHA-256, computed once

    # ------------------------------------------------------------------ reading
    def _manifest(self) -> dict | None:
        if not has_manifest(self.folder, MANIFEST):
            return None
        manifest = json.loads(manifest_path(self.folder, MANIFEST).read_text(encoding="utf-8"))
        saved = manifest.get("fingerprint") or {}
        for key, value in self.fingerprint.items():
            if saved.get(key) != value:
                raise CheckpointMismatchError(
                    f"{self.folder / MANIFEST}: field {key!r} is {saved.get(key)!r}, this run's is {value!r} -- the "
                    "folder holds another run's progress. Fix: pass another --checkpoint_dir, or delete the folder "
                    "to start this run from its first edit")
        return manifest

    def load(self, model: torch.nn.Module) -> Resumed | None:
        """Put the saved edit state into ``model`` (which must be the unedited model) and return the
        progress; ``None`` when the folder holds no save yet. The unedited tensors at the module paths are
        remembered here, so :meth:`save` can store copies of them as references."""
        self._unedited = {path: {name: t.detach().clone() for name, t in _module_tensors(model.get_submodule(path)).items()}
                          for path in self.module_paths}
        self._unedited_sha = {path: {name: _tensor_sha256(t) for name, t in tensors.items()}
                              for path, tensors in self._unedited.items()}
        manifest = self._manifest()
        if manifest is None:
            return None
        if manifest.get("format") not in (1, FORMAT):
            raise CheckpointMismatchError(f"{self.folder / MANIFEST}: format {manifest.get('format')!r} is not one this "
                                          f"script reads (1, {FORMAT}). Fix: resume it with the version that wrote it")
        files = manifest_files(manifest, MANIFEST)
        modules = torch.load(io.BytesIO(read_verified(self.folder, "modules.pt", files["modules.pt"])),
                             weights_only=False)  # our own pickle of EasyEdit's adapter modules
        state = torch.load(io.BytesIO(read_verified(self.folder, "state.pt", files["state.pt"])), weights_only=False)
        device = next(model.parameters()).device
        for path, refs in (state.get("unedited_refs") or {}).items():  # format 2: copies of the unedited tensors
            tensors = _module_tensors(modules[path])
            for name, (ref, digest) in refs.items():
                unedited = self._unedited[path].get(ref)
                if unedited is None or self._unedited_sha[path][ref] != digest:
                    raise CheckpointMismatchError(
                        f"{self.folder / 'state.pt'}: the unedited {path}.{ref} of this model is not the one the run "
                        "started from. Fix: resume with the same model and dtype, or delete the folder to start over")
                tensors[name].data = unedited.clone()
        for path, module in modules.items():
            _set_module_at(model, path, module.to(device))
        for (module_name, attr), value in zip(METHOD_GLOBALS[self.alg_name], state["globals"]):
            setattr(importlib.import_module(module_name), attr, value)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        LOG.info("resumed %s after %d of %d edits from %s", self.fingerprint.get("method"), manifest["done"],
                 self.fingerprint.get("n"), self.folder)
        return Resumed(int(manifest["done"]), state["pre"], [float(x) for x in state["edit_ms"]])

    # ------------------------------------------------------------------ writing
    def save(self, model: torch.nn.Module, done: int, pre: list[dict], edit_ms: list[float]) -> None:
        """Write the state after ``done`` edits (one crash-safe step: a stop mid-save leaves the previous save)."""
        modules = {path: model.get_submodule(path) for path in self.module_paths}
        refs: dict[str, dict[str, tuple[str, str]]] = {}
        held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its data) while the pickle leaves it out
        try:
            for path, module in modules.items():
                for name, tensor in _module_tensors(module).items():
                    ref = next((r for r, u in self._unedited.get(path, {}).items() if u.dtype == tensor.dtype
                                and u.shape == tensor.shape and torch.equal(u, tensor.detach().to(u.device))), None)
                    if ref is not None:
                        refs.setdefault(path, {})[name] = (ref, self._unedited_sha[path][ref])
                        held.append((tensor, tensor.data))
                        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            modules_bytes = _torch_bytes(modules)
        finally:
            for tensor, data in held:
                tensor.data = data
        state = {
            "globals": [getattr(importlib.import_module(m), a) for m, a in METHOD_GLOBALS[self.alg_name]],
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "pre": pre, "edit_ms": list(edit_ms), "unedited_refs": refs,
        }
        commit_folder(self.folder, {"modules.pt": modules_bytes, "state.pt": _torch_bytes(state)}, MANIFEST,
                      {"format": FORMAT, "fingerprint": self.fingerprint, "done": done})
