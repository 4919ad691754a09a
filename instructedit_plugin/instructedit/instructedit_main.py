"""Editing with a trained InstructEdit editor: EasyEdit's ``apply_algo`` for ``alg_name: InstructEdit``.

:func:`apply_to_model` has the signature ``BaseEditor`` calls. It loads the
editor from ``hparams.archive`` (cached per *model*, keyed by the checkpoint's
path and file stamp, so several editors in one process never share state),
prefixes each request's prompt with its instruction, computes the edit and
writes the new weights into the model in place. The returned ``weights_copy``
holds the original weights, which EasyEdit copies back after evaluating.

The edit loss is computed from logits at the answer positions only
(``sparse_logits``): the same NLL and gradients as full-sequence logits, without
running the output layer (262k rows for Gemma 3) over the instruction and
prompt tokens, whose logits the loss never reads.

The checkpoint is checked before use: file hashes against its manifest, and its
base model (architecture config fingerprint) against ``model``; an editor trained
for another model is a ``HyperParamsError`` naming ``archive``.

Instruction per request: ``request["instruction"]`` (free text, used as the
description) if present, else the description of ``request["task"]`` (or
``hparams.default_task``) chosen by ``hparams.description_index`` (default: the
family's first training description). A prompt the caller already templated
(``Task: ...\nDescription: ...\nInput: ...``, as EasyEdit's ``MultiTaskDataset``
and ``examples/test_InstructEdit.py`` write them) is used as it is: no second
instruction (:func:`is_instructed`).
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import functools
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HyperParamsError, RequestError
from ..instructions import (
    DEFAULT_TEMPLATE, InstructionLibrary, default_library, load_instruction_library, load_instructions,
)
from .checkpoint import load_editor, manifest_file, resolve_archive, verify_base_model
from .dataset import encode_pairs
from .editable import compute_edited_weights, resolve_layer_specs
from .hypernet import InstructEditHypernet, LayerSpec, layer_specs_from_json

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedEditor:
    """A trained editor detached from any model: hypernetwork, edit lrs and layer specs."""

    hypernet: InstructEditHypernet
    edit_lrs: torch.Tensor
    specs: list[LayerSpec]
    meta: dict[str, Any]
    path: Path

    def new_weights(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        new, info = compute_edited_weights(model, self.hypernet, self.edit_lrs, self.specs, batch, sparse_logits=True)
        return {k: v.detach() for k, v in new.items()}, info


def load_editor_for(model: nn.Module, archive: str | os.PathLike, inner_params: Sequence[str] | None = None,
                    source: str | None = None) -> LoadedEditor:
    """Read a checkpoint and check it against ``model`` (layer names and shapes)."""
    path = resolve_archive(archive, source=source)
    tensors, meta = load_editor(path, source=source)
    verify_base_model(meta, model, path, source=source)
    specs = layer_specs_from_json(meta["layers"])
    names = [s.name for s in specs]
    if inner_params is not None and list(inner_params) != names:
        raise HyperParamsError("inner_params", f"{list(inner_params)} differ from the checkpoint's {names}",
                               "remove inner_params (it is read from the checkpoint) or use a matching checkpoint", source)
    actual = resolve_layer_specs(model, names, source)
    if actual != specs:
        raise HyperParamsError("archive", f"checkpoint {path} was trained for layers {specs}, the model has {actual}",
                               "use a checkpoint trained for this model", source)
    hypernet = InstructEditHypernet(specs, **meta["hypernet"])
    state = {k[len("hypernet."):]: v for k, v in tensors.items() if k.startswith("hypernet.")}
    try:
        hypernet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HyperParamsError("archive", f"the tensors of {path} do not match its hypernetwork settings "
                               f"({str(exc).splitlines()[0][:200]})", "use another checkpoint or retrain", source) from None
    if "edit_lrs" not in tensors or tensors["edit_lrs"].shape != (len(specs),):
        raise HyperParamsError("archive", f"{path} has no edit_lrs for its {len(specs)} layers",
                               "use another checkpoint or retrain", source)
    device = next(model.parameters()).device
    hypernet.to(device).eval()
    for p in hypernet.parameters():
        p.requires_grad_(False)
    edit_lrs = tensors["edit_lrs"].to(device)
    return LoadedEditor(hypernet, edit_lrs, specs, meta, path)


#: model -> {checkpoint key: LoadedEditor}; entries disappear with the model.
_EDITORS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, LoadedEditor]]" = weakref.WeakKeyDictionary()


def _checkpoint_key(path: Path) -> tuple:
    """Changes whenever a save commits: keyed on the manifest in force (a committed save whose renames
    were interrupted has only its pending manifest and staged files)."""
    stat = (path if path.is_file() else manifest_file(path)).stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def editor_for(model: nn.Module, hparams: Any) -> LoadedEditor:
    """The editor for ``hparams.archive`` on ``model``, loaded once per model and checkpoint file."""
    source = getattr(hparams, "_source", None)
    path = resolve_archive(getattr(hparams, "archive", None), source=source)
    key = (_checkpoint_key(path), tuple(getattr(hparams, "inner_params", None) or ()))
    per_model = _EDITORS.setdefault(model, {})
    editor = per_model.get(key)
    device = next(model.parameters()).device
    if editor is None or editor.edit_lrs.device != device:
        editor = load_editor_for(model, path, getattr(hparams, "inner_params", None), source)
        per_model[key] = editor
    return editor


#: instructions_dir -> (file stamps, library): a folder is read again only when its YAML files change.
_LIBRARIES: dict[str, tuple[tuple, InstructionLibrary]] = {}


def _folder_stamp(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()
                            if p.suffix in (".yaml", ".yml")))
    except OSError:
        return ()


def _library(hparams: Any) -> InstructionLibrary:
    if getattr(hparams, "instructions", None):  # a library by name or path (instructions: easyedit)
        return _named_library(str(hparams.instructions))
    folder = getattr(hparams, "instructions_dir", None)
    if not folder:
        return default_library()
    key = f"{os.environ.get('INSTRUCTEDIT_INSTRUCTIONS_DIR', '')}|{Path(folder).expanduser().resolve()}"
    stamp = _folder_stamp(Path(folder).expanduser())
    cached = _LIBRARIES.get(key)
    if cached is None or cached[0] != stamp:
        cached = (stamp, load_instruction_library([folder]))
        _LIBRARIES[key] = cached
    return cached[1]


@functools.lru_cache(maxsize=8)
def _named_library(spec: str) -> InstructionLibrary:
    return load_instructions(spec)


def is_instructed(prompt: str) -> bool:
    """Whether ``prompt`` already carries an instruction: it starts with ``Task: `` and has the
    template's ``Description:`` and ``Input:`` lines after it, in that order."""
    if not prompt.lstrip().startswith("Task: "):
        return False
    at = prompt.find("\nDescription: ")
    return at >= 0 and prompt.find("\nInput: ", at) >= 0


def instructed_prompt(request: Mapping[str, Any], hparams: Any, library: InstructionLibrary | None = None) -> str:
    """The instruction-prefixed edit prompt of ``request``."""
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(f"request 'prompt' must be a string, got {type(prompt).__name__}")
    if not getattr(hparams, "use_instructions", True) or is_instructed(prompt):
        return prompt
    library = library or _library(hparams)
    task = request.get("task") or getattr(hparams, "default_task", None) or "counterfact"
    instruction = request.get("instruction")
    if instruction:
        if task in library:
            family = library.get(task)
            return family.render(prompt, family.fill(str(instruction), request))
        return DEFAULT_TEMPLATE.format(task=task, description=str(instruction), input=prompt)
    family = library.get(task)
    index = getattr(hparams, "description_index", None)
    return family.format(prompt, index, request)


def build_edit_batch(tok: Any, requests: Sequence[Mapping[str, Any]], hparams: Any, device: Any) -> dict[str, torch.Tensor]:
    library = _library(hparams)
    pairs = []
    for request in requests:
        target = request.get("target_new")
        if isinstance(target, list) and len(target) == 1:
            target = target[0]
        if not isinstance(target, str) or not target:
            raise RequestError(f"request 'target_new' must be a non-empty string, got {target!r}")
        pairs.append((instructed_prompt(request, hparams, library), target))
    batch = encode_pairs(tok, pairs, int(getattr(hparams, "edit_max_length", 96)))
    return {k: v.to(device) for k, v in batch.items()}


def apply_to_model(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    hparams: Any,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` in place (or a deep copy with ``copy=True``) for all ``requests`` at once.

    Returns ``(model, weights_copy)``; ``weights_copy`` maps each edited weight's
    name to its value before the edit when ``return_orig_weights`` is true.
    """
    if isinstance(requests, Mapping):
        requests = [requests]
    if not requests:
        return model, {}
    if copy:
        model = copy_module.deepcopy(model)
    editor = editor_for(model, hparams)
    device = next(model.parameters()).device
    batch = build_edit_batch(tok, requests, hparams, device)
    was_training = model.training
    model.eval()
    try:
        new_weights, info = editor.new_weights(model, batch)
    finally:
        model.train(was_training)
    params = dict(model.named_parameters())
    weights_copy: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in new_weights.items():
            if return_orig_weights:
                weights_copy[name] = params[name].detach().clone()
            params[name].copy_(value)
    LOG.info("InstructEdit applied %d edit(s): pre-edit loss %.4f", len(requests), info["edit/loss_pre"])
    return model, weights_copy
