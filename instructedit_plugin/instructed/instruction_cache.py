"""Keys and values of an instruction, computed once and reused by every question asked under it.

In ``reweight_mode: question_rows`` (see :mod:`.attention`) the rows of ``[BOS] Instructions: {instruction}``
attend without the question's ``sim``, so their keys and values in every layer depend only on the
instruction, the prefixes and the frozen model. :class:`InstructionKVCache` keeps them per instruction
(least recently used first out, at most ``max_entries``), and :meth:`InstructionKVCache.assemble` lays the
entries of a batch out as a transformers ``DynamicCache``: each example's instruction keys/values
left-padded to the longest, followed by the example's own tokens (the template's tail and the question),
which are all a query then runs through the model. In ``reweight_mode: question_only`` (not in the paper) the
template's tail attends without ``sim`` too, so an entry holds ``[BOS] Instructions: {instruction}\nInput: `` whole
and the query runs over the question's own tokens only.

Exactness: the cached rows are computed with the same attention as in a full forward (prefixes active,
positions ``0 .. len-1``), so a batch of one gives the full forward's logits to float rounding. Rows are
given their natural positions (the instruction from 0, the question right after it, padding never counted):
rotary models (LLaMA, Qwen2, Gemma) match a full left-padded forward for any batch; a model with absolute
positions (GPT-2) matches it for unpadded rows, where the full forward itself shifts padded rows' positions.

An entry is bound to the prefix bank it was computed with: it is dropped when the bank's embeddings
change (their tensor version counter moves, as after an optimizer step) or another bank is used.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .context import instruction_context

__all__ = ["CachedInstruction", "InstructionKVCache"]


@dataclass(frozen=True)
class CachedInstruction:
    """Per-layer ``(keys, values)`` (``[1, kv_heads, length, head_dim]``) of one instruction's head tokens."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int  # tokens cached: [BOS] + template head + instruction (+ the template's tail in question_only)
    span: tuple[int, int]  # the instruction's span inside them
    #: ``[vocab]`` logits at the last cached position (``keep_logits``): in ``question_only`` they predict the
    #: question's first token, which a query no longer computes
    last_logits: torch.Tensor | None = None


class InstructionKVCache:
    """Least-recently-used store of :class:`CachedInstruction` entries for one model and prefix bank."""

    def __init__(self, max_entries: int = 1024):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[tuple, CachedInstruction] = OrderedDict()
        self._bank_key: tuple | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def _key_of_bank(bank: Any) -> tuple:
        emb = bank.embeddings
        return (id(bank), id(emb), emb._version, emb.dtype)

    def entry(self, model: Any, ids: list[int], span: tuple[int, int], bank: Any,
              keep_logits: bool = False) -> CachedInstruction:
        """The cached keys/values of ``ids`` (``[BOS] head instruction``, and the tail in ``question_only``),
        computing them on a miss (no row of ``ids`` is re-weighted: ``sim`` 1, the question after them).

        ``model`` must have ``bank``'s prefixes attached (inside ``InstructedLM.activated()``). ``keep_logits``:
        keep the logits of the last cached position too (``question_only``; an entry without them is recomputed).
        """
        bank_key = self._key_of_bank(bank)
        if bank_key != self._bank_key:
            self._entries.clear()
            self._bank_key = bank_key
        key = (tuple(ids), span)
        hit = self._entries.get(key)
        if hit is not None and (hit.last_logits is not None or not keep_logits):
            self.hits += 1
            self._entries.move_to_end(key)
            return hit
        self.misses += 1
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.no_grad(), instruction_context(spans=[span], sim=1.0, use_prefix=True,
                                                  question_starts=[len(ids)]):
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                        logits_to_keep=1)
        cache = out.past_key_values
        layers = tuple((layer.keys.detach(), layer.values.detach()) for layer in cache.layers)
        last = out.logits[0, -1].detach() if keep_logits else None
        entry = CachedInstruction(layers, len(ids), span, last)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    @staticmethod
    def assemble(model: Any, entries: list[CachedInstruction], tails: list[list[int]], pad_id: int
                 ) -> dict[str, Any]:
        """Model inputs for ``tails`` (template tail + question ids) after their instructions' cached keys.

        Returns ``input_ids``, ``attention_mask`` (over cached + new columns), ``position_ids``,
        ``past_key_values`` (a fresh ``DynamicCache``), ``spans`` (in column coordinates of cached + new),
        ``tail_start`` (the column of each tail's first token within the new columns) and ``head`` (the cached
        columns: the first new column in those coordinates).
        """
        device = next(model.parameters()).device
        head = max(e.length for e in entries)
        width = max(len(t) for t in tails)
        batch = len(entries)
        ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(batch, head + width, dtype=torch.long, device=device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        spans, tail_start = [], []
        for i, (entry, tail) in enumerate(zip(entries, tails)):
            pad_head, pad_tail = head - entry.length, width - len(tail)
            ids[i, pad_tail:] = torch.tensor(tail, dtype=torch.long, device=device)
            mask[i, pad_head:head] = 1
            mask[i, head + pad_tail:] = 1
            positions[i, pad_tail:] = torch.arange(entry.length, entry.length + len(tail), device=device)
            spans.append((entry.span[0] + pad_head, entry.span[1] + pad_head))
            tail_start.append(pad_tail)
        cache = DynamicCache(config=model.config)
        for layer_idx in range(len(entries[0].layers)):
            keys, values = [], []
            for entry in entries:
                k, v = entry.layers[layer_idx]
                pad = head - entry.length
                if pad:
                    k = torch.cat([k.new_zeros(*k.shape[:2], pad, k.shape[-1]), k], dim=2)
                    v = torch.cat([v.new_zeros(*v.shape[:2], pad, v.shape[-1]), v], dim=2)
                keys.append(k)
                values.append(v)
            cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_key_values": cache,
                "spans": spans, "tail_start": tail_start, "head": head}
