"""EasyEdit apply function for InstructEd and helpers around the per-model instruction memory.

``apply_instructed_to_model(model, tok, requests, hparams, ...)`` never changes a weight. It

1. loads the trained prefixes from ``hparams.archive`` (cached per base model and archive),
2. adds each request's instruction (``request['instruction']``, else built from prompt and
   ``target_new``) to the instruction memory of this base model, and
3. returns an :class:`~instructedit_plugin.instructed.lm.InstructedLM` whose instruction source
   is ``gold`` (the requests' own instructions) or ``retrieval`` (the memory, gated).

State lives *on the base model object* (``model._instructed_edit_state``): two editors with two
models never share prefixes or memories, and the state goes away with the model.

Memory semantics, matching how EasyEdit restores weights
--------------------------------------------------------
``weights_copy`` is a :class:`MemoryRestore` -- an empty dict (nothing to copy back) whose
``items()``, which EasyEdit calls to restore weights after evaluating an edit, instead removes the
instructions this call added:

* PyPI ``edit(keep_original_weight=True)`` / main ``edit(sequential_edit=False)``: each edit is
  evaluated against the memory holding just that edit (plus anything loaded with
  :func:`load_memory`), and the memory is reset afterwards;
* PyPI ``keep_original_weight=False`` (PyPI restores from ``weights_copy`` after *every* edit, so a
  plain ``{}`` is returned there) / main ``sequential_edit=True`` (main never restores then): the
  memory accumulates edits -- sequential editing.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HyperParamsError, PluginError
from .checkpoint import Checkpoint, load_checkpoint, resolve_archive
from .instructed_hparams import CACHED_REWEIGHT_MODES, InstructEdHyperParams
from .embedding_cache import InstructionEmbeddingCache
from .instruction_cache import InstructionKVCache
from .lm import GoldInstructions, InstructedLM, RetrievedInstructions, encoder_identity, load_encoder, new_memory
from .templates import instruction_of, request_prompts

LOG = logging.getLogger(__name__)

__all__ = [
    "apply_instructed_to_model",
    "InstructedEditor",
    "MemoryRestore",
    "editing_state",
    "load_memory",
    "save_memory",
    "reset_memory",
    "release",
]

STATE_ATTR = "_instructed_edit_state"


@dataclass
class _Entry:
    instruction: str
    prompts: list[str]
    metadata: dict[str, Any]
    memory_id: int | None = None
    own_prompts: list[str] = field(default_factory=list)  # prompt, rephrase, portability (no locality)


@dataclass
class EditingState:
    """Per-base-model InstructEd state: loaded archives, encoder, instruction memory."""

    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)
    encoder_key: str | None = None
    memory: Any = None
    entries: list[_Entry] = field(default_factory=list)  # instructions added by edits, in order
    #: instruction keys/values (``question_rows`` / ``question_only``), one cache per archive, kept across edits
    instruction_caches: dict[str, InstructionKVCache] = field(default_factory=dict)
    #: instruction sentence embeddings, one cache per encoder, kept across edits
    embedding_caches: dict[str, InstructionEmbeddingCache] = field(default_factory=dict)

    def embedding_cache(self, size: int) -> InstructionEmbeddingCache | None:
        if size <= 0 or self.encoder_key is None or not InstructionEmbeddingCache.usable(self.encoder):
            return None
        cache = self.embedding_caches.get(self.encoder_key)
        if cache is None or cache.max_entries != size:
            cache = self.embedding_caches[self.encoder_key] = InstructionEmbeddingCache(size)
        return cache

    def instruction_cache(self, archive: str, size: int) -> InstructionKVCache | None:
        if size <= 0:
            return None
        cache = self.instruction_caches.get(archive)
        if cache is None or cache.max_entries != size:
            cache = self.instruction_caches[archive] = InstructionKVCache(size)
        return cache

    @property
    def encoder(self) -> Any:
        return self.encoders.get(self.encoder_key) if self.encoder_key else None

    def use_encoder(self, spec: Any, device: Any, dtype: str = "float32", backend: str = "torch") -> Any:
        key = spec if isinstance(spec, str) else f"object:{id(spec)}"
        if dtype != "float32" and isinstance(spec, str):
            key = f"{key}@{dtype}"
        if backend != "torch" and isinstance(spec, str):
            key = f"{key}@{backend}"
        if key not in self.encoders:
            self.encoders[key] = load_encoder(spec, device, dtype, backend)
        if self.encoder_key != key:
            self.encoder_key = key
            if self.memory is not None:  # embeddings of another encoder are useless: re-embed the edits
                entries, self.entries = self.entries, []
                self.memory = new_memory(self.encoder)
                self.add(entries)
        return self.encoders[key]

    def add(self, entries: list[_Entry]) -> None:
        if self.memory is None:
            self.memory = new_memory(self.encoder)
        if entries:
            ids = self.memory.add([e.instruction for e in entries], [e.metadata for e in entries])
            for entry, item_id in zip(entries, list(ids) if ids is not None else [None] * len(entries)):
                entry.memory_id = item_id
            self.entries.extend(entries)

    def truncate(self, keep: int) -> None:
        """Forget every instruction added after the first ``keep``."""
        if keep < len(self.entries):
            dropped = self.entries[keep:]
            self.entries = self.entries[:keep]
            self.memory.remove([e.memory_id for e in dropped if e.memory_id is not None])

    def known_prompts(self) -> list[str]:
        return [p for e in self.entries for p in e.prompts]


def editing_state(model: nn.Module) -> EditingState:
    """The InstructEd editing state of ``model`` (created on first use)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = EditingState()
        model.__dict__[STATE_ATTR] = state
    return state


class MemoryRestore(dict):
    """An empty ``weights_copy``; iterating its ``items()`` removes this edit's instructions again.

    EasyEdit restores weights by ``for k, v in weights_copy.items(): ...`` after evaluating a
    non-sequential edit; here that forgets the instructions the edit added (once).
    """

    def __init__(self, state: EditingState, keep: int):
        super().__init__()
        self._state = state
        self._keep = keep
        self._done = False

    def restore(self) -> None:
        if not self._done:
            self._done = True
            self._state.truncate(self._keep)

    def items(self):  # type: ignore[override]
        self.restore()
        return super().items()


def _flavour() -> str | None:
    module = sys.modules.get("easyeditor")
    if module is None:
        return None
    from ..compat.easyeditor_loader import detect_flavour

    return detect_flavour(module)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _checkpoint(state: EditingState, model: nn.Module, hparams: InstructEdHyperParams) -> Checkpoint:
    if not hparams.archive:
        raise HyperParamsError("archive", "is missing; InstructEd edits with trained prefixes",
                               "train prefixes with InstructEdTrainer and set `archive:` to <results_dir>/best")
    folder = str(resolve_archive(hparams.archive).resolve())
    ckpt = state.checkpoints.get(folder)
    if ckpt is None:
        # refuses prefixes trained for another base model (BaseModelMismatchError, field `archive`)
        ckpt = load_checkpoint(folder, device=_device_of(model), model_config=model.config)
        state.checkpoints[folder] = ckpt
    bank = ckpt.bank
    if hparams.prefix_layers is not None and sorted(hparams.prefix_layers) != list(bank.layers):
        raise HyperParamsError("prefix_layers", f"{hparams.prefix_layers} differs from the archive's {list(bank.layers)}",
                               "use null (take them from the archive) or the archive's layers")
    if hparams.prefix_len is not None and hparams.prefix_len != bank.prefix_len:
        raise HyperParamsError("prefix_len", f"{hparams.prefix_len} differs from the archive's {bank.prefix_len}",
                               "use null or the archive's prefix_len")
    return ckpt


def _subject_of(request: dict) -> str | None:
    subject = request.get("subject")
    return subject if isinstance(subject, str) and subject.strip() else None


def _entries(requests: list[dict]) -> list[_Entry]:
    out = []
    for i, req in enumerate(requests):
        out.append(_Entry(instruction_of(req), request_prompts(req),
                          {"prompt": req.get("prompt"), "target_new": req.get("target_new"),
                           "case_id": req.get("case_id", i), "subject": _subject_of(req)},
                          own_prompts=request_prompts(req, include_locality=False)))
    return out


class _LiveMemory:
    """Always the state's current memory (a reset replaces the memory object)."""

    def __init__(self, state: EditingState):
        self._state = state

    @property
    def target(self) -> Any:
        """The memory searched now (its ``gate_calibration`` serves ``retrieval_gate: calibrated``)."""
        return self._state.memory

    def select(self, *args: Any, **kwargs: Any) -> Any:
        return self._state.memory.select(*args, **kwargs)


def build_instructed_lm(model: nn.Module, tok: Any, hparams: InstructEdHyperParams, state: EditingState,
                        ckpt: Checkpoint, gold: list[_Entry] | None) -> InstructedLM:
    encoder = state.encoder
    if hparams.instruction_source == "gold" and gold:
        provider: Any = GoldInstructions([(e.instruction, e.prompts) for e in gold], encoder,
                                         own_prompts=[e.own_prompts for e in gold],
                                         subjects=[e.metadata.get("subject") for e in gold],
                                         relations=[e.metadata.get("prompt") for e in gold])
    else:
        provider = RetrievedInstructions(_LiveMemory(state), hparams.retrieval_gate, hparams.top_k, state.known_prompts(),
                                         score=hparams.gate_score, std=hparams.gate_std, pad=hparams.gate_pad)
    vectors = state.embedding_cache(hparams.embedding_cache)
    cache = None
    if hparams.reweight_mode in CACHED_REWEIGHT_MODES and hparams.use_prefixes:
        cache = state.instruction_cache(str(ckpt.folder), hparams.instruction_cache)
    return InstructedLM(model, tok, ckpt.bank, encoder=encoder, provider=provider, template=hparams.template,
                        instruction_max_length=hparams.instruction_max_length, mode=hparams.reweight_mode,
                        use_prefixes=hparams.use_prefixes, instruction_cache=cache if cache is not None else 0,
                        embedding_cache=vectors if vectors is not None else 0,
                        similarity=hparams.similarity, relation_gate=hparams.relation_gate,
                        sim_overlap=hparams.sim_overlap, fused_attention=hparams.attention_kernel == "fused")


def apply_instructed_to_model(model: nn.Module, tok: Any, requests: list[dict], hparams: InstructEdHyperParams,
                              copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
                              **kwargs: Any) -> tuple[InstructedLM, dict]:
    """EasyEdit ``ALG_DICT['InstructEd']``: returns ``(InstructedLM, weights_copy)``; see the module docstring."""
    if isinstance(model, InstructedLM):
        model = model.model
    if isinstance(requests, dict):
        requests = [requests]
    state = editing_state(model)
    ckpt = _checkpoint(state, model, hparams)
    trained_encoder = ckpt.config.get("encoder")
    state.use_encoder(hparams.encoder, _device_of(model), hparams.encoder_dtype, hparams.encoder_backend)
    if trained_encoder and encoder_identity(state.encoder) != trained_encoder:
        LOG.warning("InstructEd prefixes were trained with encoder %r but editing uses %r", trained_encoder,
                    encoder_identity(state.encoder))
    if ckpt.mode != hparams.reweight_mode:
        LOG.warning("InstructEd prefixes were trained with reweight_mode=%r, editing uses %r", ckpt.mode, hparams.reweight_mode)
    keep = len(state.entries)
    entries = _entries(list(requests))
    state.add(entries)
    lm = build_instructed_lm(model, tok, hparams, state, ckpt, entries)
    if hparams.warm_instruction_cache and lm.instruction_cache is not None:
        lm.warm_instructions([e.instruction for e in entries])
    flavour = _flavour()
    resets = keep_original_weight or flavour == "main"
    return lm, (MemoryRestore(state, keep) if resets else {})


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def reset_memory(model: nn.Module) -> None:
    """Forget every instruction added to ``model``'s memory (a loaded memory is kept)."""
    state = editing_state(model)
    if state.memory is not None:
        state.truncate(0)


def save_memory(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save ``model``'s instruction memory (``InstructionMemory.save``)."""
    state = editing_state(model)
    if state.memory is None:
        raise PluginError("this model has no InstructEd instruction memory yet (nothing was edited)")
    state.memory.save(str(folder))
    return Path(folder)


def load_memory(model: nn.Module, folder: str | os.PathLike, encoder: Any = "default",
                encoder_dtype: str = "float32", encoder_backend: str = "torch") -> Any:
    """Replace ``model``'s instruction memory by one saved with :func:`save_memory`
    (its instructions are kept by later resets; only edits applied afterwards are undone)."""
    from .memory import InstructionMemory  # noqa: PLC0415

    state = editing_state(model)
    state.use_encoder(encoder, _device_of(model), encoder_dtype, encoder_backend)
    state.memory = InstructionMemory.load(str(folder), encoder=state.encoder)
    state.entries = []
    return state.memory


def release(model: nn.Module) -> None:
    """Drop all InstructEd state (archives, encoder, memory) held on ``model``."""
    model.__dict__.pop(STATE_ATTR, None)


class InstructedEditor:
    """Convenience front end without EasyEdit: edit, then query the edited model.

    ``InstructedEditor(model, tok, hparams).edit(requests)`` adds the requests to the memory and
    returns the :class:`InstructedLM` (retrieval over everything edited so far when
    ``instruction_source`` is ``retrieval``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: InstructEdHyperParams):
        self.model, self.tokenizer, self.hparams = model, tokenizer, hparams

    def edit(self, requests: list[dict]) -> InstructedLM:
        lm, _ = apply_instructed_to_model(self.model, self.tokenizer, requests, self.hparams)
        return lm

    def model_with_memory(self) -> InstructedLM:
        """An :class:`InstructedLM` retrieving from the memory (no gold instruction)."""
        state = editing_state(self.model)
        ckpt = _checkpoint(state, self.model, self.hparams)
        state.use_encoder(self.hparams.encoder, _device_of(self.model), self.hparams.encoder_dtype,
                          self.hparams.encoder_backend)
        if state.memory is None:
            state.add([])
        return build_instructed_lm(self.model, self.tokenizer, self.hparams, state, ckpt, None)

    def save_memory(self, folder: str | os.PathLike) -> Path:
        return save_memory(self.model, folder)

    def load_memory(self, folder: str | os.PathLike) -> Any:
        return load_memory(self.model, folder, self.hparams.encoder, self.hparams.encoder_dtype,
                           self.hparams.encoder_backend)

    def reset(self) -> None:
        reset_memory(self.model)
