"""InstructEd as a question answerer for multi-hop evaluation (MQuAKE).

:func:`~instructedit_plugin.instructed.multihop.evaluate_multihop` retrieves one
fact per hop and asks ``answer_fn(question, instructions)``. Here the retrieved
facts become one instruction (joined in retrieval order) in front of the
question, answered greedily by the frozen model with the trained prefixes; with
no facts retrieved the plain, unedited model answers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .model import InstructedLM


def join_instructions(instructions: Sequence[str]) -> str | None:
    """One instruction text from the retrieved facts (``None`` when nothing was retrieved)."""
    facts = [text.strip() for text in instructions if text and text.strip()]
    return " ".join(facts) if facts else None


def instructed_answer_fn(lm: InstructedLM, tok: Any, max_new_tokens: int = 8) -> Callable[[str, Sequence[str]], str]:
    """``answer_fn`` for ``evaluate_multihop`` backed by an :class:`InstructedLM`."""

    def answer(question: str, instructions: Sequence[str]) -> str:
        enc = tok([question], return_tensors="pt").to(lm.device)
        instruction = join_instructions(instructions)
        with torch.no_grad():
            out = lm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              instructions=[instruction], max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return text.split("\n", 1)[0].strip()

    return answer
