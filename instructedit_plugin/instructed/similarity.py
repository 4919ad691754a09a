"""The question-instruction similarity ``sim`` that InstructEd re-weights attention by.

``similarity: cosine`` (the paper's default, Eq. 15): ``sim = cos(Enc(question), Enc(instruction))``
with the sentence encoder, texts as given.

``similarity: subject_masked`` (an option, not in the paper; issue #14 item 4, KnowEdit locality):
the edit's *subject* is removed from both texts before they are encoded, so ``sim`` measures whether
the question asks about the instruction's *relation*. KnowEdit's locality questions ask about the same
subject under another relation ("The taxon rank of Epaspidoceras is" after an edit of Epaspidoceras'
family); with the subject in both texts their plain cosine is high and the instruction takes over the
answer. The subject is the request's ``subject`` field (EasyEdit passes it with ``subject=[...]``;
retrieval reads it from the memory item's metadata). Rules:

* every case-insensitive occurrence of the subject is removed and the whitespace closed up;
* a text that would become empty (the question *is* the subject) is kept whole;
* without a subject (the request has none) the pair is scored as ``cosine`` does.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import PluginError

__all__ = ["SIMILARITIES", "mask_subject", "similarity", "relation_similarity", "relation_gate_open",
           "calibrate_relation_gate"]

#: The choices of the ``similarity`` hparam; the first is the paper's default.
SIMILARITIES = ("cosine", "subject_masked")


def mask_subject(text: str, subject: str | None) -> str:
    """``text`` without any case-insensitive occurrence of ``subject`` (see the module docstring)."""
    if not subject or not subject.strip():
        return text
    masked = re.sub(re.escape(subject.strip()), " ", text, flags=re.IGNORECASE)
    masked = " ".join(masked.split())
    return masked if masked.strip(" .,;:?!'\"") else text


def similarity(encoder: Any, questions: Sequence[str], instructions: Sequence[str],
               subjects: Sequence[str | None] | None = None, mode: str = "cosine") -> torch.Tensor:
    """``[n]`` float32 similarities of paired question/instruction texts under ``mode``
    (:data:`SIMILARITIES`); ``subjects`` (one per pair, ``None`` allowed) serve ``subject_masked``."""
    if mode not in SIMILARITIES:
        raise PluginError(f"unknown similarity {mode!r}. Fix: use one of {', '.join(SIMILARITIES)}")
    if not questions:
        return torch.zeros(0)
    questions, instructions = list(questions), list(instructions)
    if mode == "subject_masked" and subjects is not None:
        if len(subjects) != len(questions):
            raise PluginError(f"{len(subjects)} subjects for {len(questions)} questions. Fix: pass one subject "
                              "(or None) per question")
        questions = [mask_subject(q, s) for q, s in zip(questions, subjects)]
        instructions = [mask_subject(i, s) for i, s in zip(instructions, subjects)]
    sim = encoder.cosine(questions, instructions)
    return torch.as_tensor(sim, dtype=torch.float32).detach().cpu().reshape(-1)


# ----------------------------------------------------------------------------------------------
# The relation gate
# ----------------------------------------------------------------------------------------------
def relation_similarity(encoder: Any, questions: Sequence[str], instructions: Sequence[str],
                        subjects: Sequence[str | None], relations: Sequence[str | None] | None = None) -> torch.Tensor:
    """What the relation gate compares with its threshold: the ``subject_masked`` similarity of each question
    to its instruction, or to the edit's own question (``relations``: the request's ``prompt``, ``None``
    allowed) when that is higher (the instruction also carries the new answer, which the question lacks)."""
    sims = similarity(encoder, questions, instructions, subjects, "subject_masked")
    if relations is not None:
        known = [i for i, r in enumerate(relations) if r]
        if known:
            other = similarity(encoder, [questions[i] for i in known], [relations[i] for i in known],
                               [subjects[i] for i in known], "subject_masked")
            sims[known] = torch.maximum(sims[known], other)
    return sims


def relation_gate_open(encoder: Any, questions: Sequence[str], instructions: Sequence[str],
                       subjects: Sequence[str | None], threshold: float | None,
                       relations: Sequence[str | None] | None = None) -> list[bool]:
    """Whether each question keeps its instruction under ``relation_gate: threshold`` (an option, not in the
    paper; #14 item 4): its :func:`relation_similarity` is at least ``threshold``. A question about the
    edit's subject under another relation scores low and is answered without the instruction (by the
    unedited model). ``threshold=None`` (the default): every question keeps it."""
    if threshold is None or not questions:
        return [True] * len(questions)
    sims = relation_similarity(encoder, questions, instructions, subjects, relations)
    return [bool(s >= threshold) for s in sims.tolist()]


def calibrate_relation_gate(encoder: Any, requests: Sequence[Any], *,
                            locality_keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Pick the relation gate's threshold on held-out edit requests (with ``subject`` and locality prompts).

    Positives are each request's own questions (prompt, rephrase, portability: the instruction should stay),
    negatives its locality questions (``locality_keys``, default all: KnowEdit's are about the same subject);
    the threshold maximises balanced accuracy (mean of the kept and blocked rates; the lower one on ties).
    Returns ``{"threshold", "balanced_accuracy", "kept_own", "blocked_locality", "n_own", "n_locality"}``.
    """
    from .templates import instruction_of, request_prompts

    rows: dict[bool, list[tuple[str, str, Any, Any]]] = {True: [], False: []}
    for req in requests:
        subject, instruction, prompt = req.get("subject"), instruction_of(req), req.get("prompt")
        for q in request_prompts(req, include_locality=False):
            rows[True].append((q, instruction, subject, prompt))
        for key, entry in (req.get("locality") or {}).items():
            if locality_keys is not None and key not in locality_keys:
                continue
            prompts = entry.get("prompt")
            for q in [prompts] if isinstance(prompts, str) else list(prompts or []):
                rows[False].append((q, instruction, subject, prompt))
    if not rows[True] or not rows[False]:
        raise PluginError("calibrating the relation gate needs requests with their own questions and locality "
                          "questions. Fix: pass KnowEdit-style requests (subject, prompt, locality)")
    own, loc = (relation_similarity(encoder, *map(list, zip(*rows[k]))).tolist() for k in (True, False))
    best = None
    for t in sorted(set(own)):
        kept = sum(s >= t for s in own) / len(own)
        blocked = sum(s < t for s in loc) / len(loc)
        if best is None or (kept + blocked) / 2 > best[0] + 1e-12:
            best = ((kept + blocked) / 2, t, kept, blocked)
    acc, t, kept, blocked = best
    return {"threshold": round(float(t), 4), "balanced_accuracy": round(acc, 4), "kept_own": round(kept, 4),
            "blocked_locality": round(blocked, 4), "n_own": len(own), "n_locality": len(loc)}
