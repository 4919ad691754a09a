"""Exact reuse of an instruction's hidden states below the first edited layer, across edits.

An InstructEdit edit input is ``instruction + prompt + " " + target``. Under causal attention the
hidden states of the instruction's tokens in every layer *below the first edited layer* depend
only on those tokens (the edit is computed with the base weights), so they are the same for every
edit made with the same instruction (task and description). :class:`PrefixStateCache` keeps, per
prefix (keyed by its token ids), the key/value cache of those lower layers and the prefix's
hidden state at the input of the first edited layer. An edit then runs

1. the lower layers on the tokens after the prefix only, attending to the cached keys/values;
2. the edited layers and those above on the whole sequence (cached prefix states + new ones),
   with gradients, as before.

Only the lower layers can be reused: InstructEdit's update sums over the instruction's positions
too, and those positions have a nonzero output gradient at every edited layer but the last, so the
edited layers must see the whole sequence. The result equals the uncached edit up to floating-point
rounding (different matrix shapes). Models whose decoder is ``model.model.layers`` with rotary
positions (Llama, Gemma-3, Qwen2, Mistral, ...) are supported (:func:`supports`); others edit
without the cache.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

LOG = logging.getLogger(__name__)

__all__ = ["PrefixStateCache", "common_prefix_length", "first_edited_layer", "supports"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _decoder(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and hasattr(inner, "rotary_emb") and hasattr(inner, "embed_tokens"):
        return inner
    return None


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder the cache can split (``model.model.layers`` with rotary positions, so the
    hidden states passed on between layers carry no absolute position embedding)."""
    return _decoder(model) is not None


def first_edited_layer(param_names: Iterable[str]) -> int | None:
    """The lowest decoder-layer index among the edited weights (``model.layers.<i>.``); None if one is not in a layer."""
    indices = []
    for name in param_names:
        match = _LAYER.search(name)
        if match is None:
            return None
        indices.append(int(match.group(1)))
    return min(indices) if indices else None


def common_prefix_length(ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
    """How many leading token ids ``ids`` shares with ``prefix_ids``."""
    n = 0
    for a, b in zip(ids, prefix_ids):
        if a != b:
            break
        n += 1
    return n


class PrefixStateCache:
    """Lower-layer states of instruction prefixes of one model, keyed by the prefix's token ids.

    ``first_layer``: the lowest edited decoder layer (states of the layers below it are reused).
    ``max_entries``: prefixes kept (least recently used dropped first). ``hits``/``misses`` count lookups.
    The cache belongs to the model's *current* weights below ``first_layer``: call :meth:`clear` after
    changing them.
    """

    def __init__(self, model: nn.Module, first_layer: int, max_entries: int = 256):
        decoder = _decoder(model)
        if decoder is None:
            raise ValueError(f"{type(model).__name__} has no model.model.layers with rotary positions: the instruction "
                             "prefix cache cannot split it. Fix: edit without the cache (prefix_cache=False)")
        n_layers = len(decoder.layers)
        if not 0 < first_layer < n_layers:
            raise ValueError(f"first_layer must be between 1 and {n_layers - 1} (a layer below it is reused), got "
                             f"{first_layer}. Fix: edit without the cache when the first decoder layer is edited")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}. Fix: pass a positive number")
        self.model = model
        self.decoder = decoder
        self.first_layer = first_layer
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Any, tuple[Any, torch.Tensor]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache
        return True

    def key(self, prefix_ids: Sequence[int]) -> Any:
        """The cache key of a prefix: its token ids (states depend on nothing else)."""
        return tuple(int(i) for i in prefix_ids)

    # ---------------------------------------------------------------- running parts of the stack
    @contextlib.contextmanager
    def only_layers(self, keep: range):
        """Within the block, decoder layers outside ``keep`` pass their input through unchanged."""
        layers = self.decoder.layers
        patched = [layer for i, layer in enumerate(layers) if i not in keep]

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        for layer in patched:
            layer.forward = passthrough
        try:
            yield
        finally:
            for layer in patched:
                del layer.forward

    @torch.no_grad()
    def _lower(self, input_ids: torch.Tensor, past: Any, start: int) -> tuple[Any, torch.Tensor]:
        """The layers below ``first_layer`` on ``input_ids`` at positions ``start...``, after ``past``: the
        updated key/value cache and the hidden states at the input of ``first_layer``."""
        captured: list[torch.Tensor] = []

        def hook(_module, _args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self.decoder.layers[self.first_layer - 1].register_forward_hook(hook)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        try:
            with self.only_layers(range(self.first_layer)):
                out = self.decoder(input_ids=input_ids, position_ids=positions, past_key_values=past, use_cache=True)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"decoder layer {self.first_layer - 1} ran {len(captured)} times in one forward pass")
        return out.past_key_values, captured[0]

    def _prefix(self, prefix_ids: Sequence[int], device: torch.device) -> tuple[Any, torch.Tensor]:
        key = self.key(prefix_ids)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = self._lower(torch.tensor([list(prefix_ids)], dtype=torch.long, device=device), None, 0)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def edit_batch(self, batch: Mapping[str, torch.Tensor], prefix_len: int) -> dict[str, torch.Tensor]:
        """The batch for the upper part of the stack (:meth:`upper_layers`): ``inputs_embeds`` = the hidden
        states at the input of ``first_layer`` for every position (the first ``prefix_len`` from the cache),
        explicit positions and mask, the same ``labels``. ``batch``: one unpadded row."""
        ids = batch["input_ids"]
        if ids.shape[0] != 1 or not bool(batch["attention_mask"].all()):
            raise ValueError("the instruction prefix cache edits one unpadded row at a time. Fix: edit one request "
                             "per call or edit without the cache")
        length = ids.shape[1]
        if not 0 < prefix_len < length:
            raise ValueError(f"prefix_len must leave at least one token after the prefix (1..{length - 1}), got "
                             f"{prefix_len}. Fix: pass the instruction's token count")
        past, prefix_hidden = self._prefix(ids[0, :prefix_len].tolist(), ids.device)
        _, rest_hidden = self._lower(ids[:, prefix_len:], copy.deepcopy(past), prefix_len)
        hidden = torch.cat([prefix_hidden, rest_hidden], dim=1)
        out = {"inputs_embeds": hidden, "attention_mask": batch["attention_mask"],
               "position_ids": torch.arange(length, device=ids.device).unsqueeze(0)}
        if "labels" in batch:
            out["labels"] = batch["labels"]
        return out

    def upper_layers(self):
        """Context: the model's layers below ``first_layer`` pass ``inputs_embeds`` through unchanged."""
        return self.only_layers(range(self.first_layer, len(self.decoder.layers)))
