"""InstructEd as a question answerer for multi-hop evaluation (MQuAKE).

:func:`~instructedit_plugin.instructed.multihop.evaluate_multihop` retrieves one
fact per hop and asks ``answer_fn(question, instructions)``. Here the retrieved
facts become one instruction (joined in retrieval order) in front of the
question, answered greedily by the frozen model with the trained prefixes; with
no facts retrieved the plain, unedited model answers.

The answer is the first non-empty line of the generation; decoding stops once
that line is complete, so a short answer costs few decoding steps and a larger
``max_new_tokens`` only costs time where the model keeps talking on one line.

:func:`instructed_token_accuracy_fn` scores the way the InstructEd release does (``score_fn`` of
``evaluate_multihop``): ``question + " " + answer`` in one teacher-forced pass, the fraction of the
answer's tokens that are the argmax at the position before them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .lm import InstructedLM

__all__ = ["first_line", "instructed_answer_fn", "instructed_token_accuracy_fn", "join_instructions"]


def join_instructions(instructions: Sequence[str]) -> str | None:
    """One instruction text from the retrieved facts (``None`` when nothing was retrieved)."""
    facts = [text.strip() for text in instructions if text and text.strip()]
    return " ".join(facts) if facts else None


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped."""
    return text.strip().split("\n", 1)[0].strip()


class _FirstLineDone(StoppingCriteria):
    """Stops a batch-of-one generation once the new text holds a line break after some content.

    It is first called after the first new token, which fixes where the new tokens start (the
    model's input may be longer than the caller's: :class:`InstructedLM` prepends the instruction).
    """

    def __init__(self, tok: Any):
        self.tok = tok
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        done = any("\n" in self.tok.decode(row[self.start:], skip_special_tokens=True).lstrip() for row in input_ids)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def instructed_answer_fn(lm: InstructedLM, tok: Any, max_new_tokens: int = 8) -> Callable[[str, Sequence[str]], str]:
    """``answer_fn`` for ``evaluate_multihop`` backed by an :class:`InstructedLM`."""

    def answer(question: str, instructions: Sequence[str]) -> str:
        enc = tok([question], return_tensors="pt").to(lm.device)
        instruction = join_instructions(instructions)
        stop = _FirstLineDone(tok)
        with torch.no_grad():
            out = lm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              instructions=[instruction], max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([stop]))
        return first_line(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))

    return answer


def instructed_token_accuracy_fn(lm: InstructedLM, tok: Any) -> Callable[[str, Sequence[str], str], float]:
    """``score_fn`` for ``evaluate_multihop``: teacher-forced token accuracy of ``answer`` after ``question``
    with the retrieved facts as the instruction (the plain model when there are none)."""

    def score(question: str, instructions: Sequence[str], answer: str) -> float:
        q_ids = tok(question)["input_ids"]
        full = tok(f"{question} {answer}")["input_ids"]
        if len(full) <= len(q_ids):
            raise ValueError(f"answer {answer!r} adds no tokens to {question!r}")
        ids = torch.tensor([full], device=lm.device)
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids),
                        instructions=[join_instructions(instructions)]).logits
        predicted = logits[0, len(q_ids) - 1: len(full) - 1].argmax(-1).cpu()
        return float((predicted == torch.tensor(full[len(q_ids):])).float().mean())

    return score
