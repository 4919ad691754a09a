"""The InstructEd input layout and the instruction of an edit request.

The model sees ``Instructions: {instruction}\\nInput: {question}``. The three pieces (text before
the instruction, the instruction, text after it) are tokenised *separately* and the question's
token ids are appended unchanged, so that

* the instruction's token span is exact (the span attention re-weights by ``sim``), and
* the question keeps the very token ids the caller passed: EasyEdit's metrics tokenise
  ``prompt + ' ' + target`` themselves and read logits at those positions, so the question is
  never re-tokenised (:class:`~instructedit_plugin.instructed.lm.InstructedLM` slices the
  logits back onto the caller's positions).

When the tokenizer adds a BOS token (LLaMA, Gemma), the instructed sequence starts with one BOS
and the question's own leading BOS is dropped.

An instruction longer than ``instruction_max_length`` tokens is cut to its first
``instruction_max_length`` tokens, and a ``logging`` warning names the instruction and both lengths
(once per instruction and template object, so a long fact does not flood the log on every forward).
Any text is accepted: empty instructions give an empty span, any unicode is tokenised as given.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError
from .instructed_hparams import DEFAULT_TEMPLATE

__all__ = ["InstructionTemplate", "instruction_of", "request_prompts"]

LOG = logging.getLogger(__name__)
_WARNED_MAX = 1024  # instructions remembered per template for the once-only truncation warning


def _first(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[0], str):
        return value[0]
    return None


def instruction_of(request: Mapping[str, Any]) -> str:
    """The natural-language instruction stating ``request``'s new fact.

    Uses ``request['instruction']`` (the InstructEd ``_ins`` files: the CounterFact fact sentence,
    or the ZsRE question with its answer) when present, else builds it from ``prompt`` and
    ``target_new``: a question becomes ``"{question} {answer}."`` (ZsRE style, e.g. "When was X
    launched? 2006."), a cloze prompt becomes ``"{prompt} {target}."`` (CounterFact style).
    """
    given = request.get("instruction")
    if isinstance(given, str) and given.strip():
        return given.strip()
    prompt = _first(request.get("prompt"))
    target = _first(request.get("target_new"))
    if not prompt or target is None:
        raise RequestError("an InstructEd request has neither an 'instruction' nor a 'prompt' and 'target_new' to build "
                           "one from. Fix: give the request an 'instruction' (the new fact as a sentence) or a non-empty "
                           "'prompt' and its 'target_new'")
    target = str(target).strip()
    sentence = f"{prompt.rstrip()} {target}"
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []  # None, or anything that is not text (validated elsewhere)


def request_prompts(request: Mapping[str, Any], include_locality: bool = True) -> list[str]:
    """Every question of ``request`` (prompt, rephrase, portability and optionally locality prompts)."""
    out = _as_list(request.get("prompt")) + _as_list(request.get("rephrase_prompt"))
    keys = ("portability", "locality") if include_locality else ("portability",)
    for key in keys:
        block = request.get(key) or {}
        if isinstance(block, Mapping):
            for entry in block.values():
                if isinstance(entry, Mapping):
                    out += _as_list(entry.get("prompt"))
    return [p for p in dict.fromkeys(out) if p]


@dataclass(frozen=True)
class EncodedPrefix:
    """Token ids of ``template`` with one instruction filled in, and the instruction's span in them."""

    ids: list[int]
    span: tuple[int, int]


class InstructionTemplate:
    """Tokenises ``template`` around instructions; see the module docstring.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: text with one ``{instruction}`` placeholder; the question follows its end.
        instruction_max_length: instructions are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Any, template: str = DEFAULT_TEMPLATE, instruction_max_length: int = 128):
        if template.count("{instruction}") != 1:
            raise RequestError(f"template {template!r} must contain '{{instruction}}' exactly once")
        self.tokenizer = tokenizer
        self.template = template
        if isinstance(instruction_max_length, bool) or int(instruction_max_length) < 1:
            raise RequestError(f"instruction_max_length must be a positive number of tokens, got {instruction_max_length!r}")
        self.instruction_max_length = int(instruction_max_length)
        self._warned: set[int] = set()
        head, tail = template.split("{instruction}")
        self.head_ids = self._encode(head)
        self.tail_ids = self._encode(tail)
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a")["input_ids"]
        self.bos_id: int | None = bos if bos is not None and probe and probe[0] == bos else None

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_instruction(self, instruction: str) -> EncodedPrefix:
        """Ids of ``[BOS] head instruction tail`` and the ``(start, end)`` span of the instruction."""
        body = self._encode(instruction)
        if len(body) > self.instruction_max_length:
            key = hash(instruction)
            if key not in self._warned:
                if len(self._warned) < _WARNED_MAX:
                    self._warned.add(key)
                preview = instruction if len(instruction) <= 80 else instruction[:77] + "..."
                LOG.warning("InstructEd instruction of %d tokens truncated to instruction_max_length=%d: %r",
                            len(body), self.instruction_max_length, preview)
            body = body[: self.instruction_max_length]
        lead = [self.bos_id] if self.bos_id is not None else []
        start = len(lead) + len(self.head_ids)
        return EncodedPrefix(lead + self.head_ids + body + self.tail_ids, (start, start + len(body)))

    def strip_bos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` without the tokenizer's leading BOS (the instructed sequence has its own)."""
        ids = list(ids)
        if self.bos_id is not None and ids and ids[0] == self.bos_id:
            return ids[1:]
        return ids

    def question_ids(self, text: str) -> list[int]:
        """Ids of a question as the tokenizer gives them (with its BOS, if it adds one)."""
        return list(self.tokenizer(text)["input_ids"])
