"""MQuAKE cases as InstructEd multi-hop training requests, drawn by hop count and disjoint from the evaluated cases.

The InstructEd paper (Han et al. 2024, Sec. 4.1) trains its prefixes on CounterFact edits plus 2,200
MQuAKE-CF-3k cases with 2, 3 and 4 hops in the ratio 1000:910:290 (:data:`PAPER_HOP_RATIO`). One
case becomes one training request (:func:`multihop_training_request`):

* ``instruction``: the case's new facts, one sentence per requested rewrite in the case's order,
  joined by spaces (``"Hey Jude was performed by Madonna. The director of Madonna is ..."``,
  :func:`case_instruction`) -- the instruction a 4-hop question gets at evaluation when retrieval
  finds its four facts;
* ``prompt``: the first multi-hop question, ``rephrase_prompt``: its paraphrases; ``target_new``: the
  new answer (``ground_truth``: the old one).

:func:`select_training_cases` draws cases seeded, in the paper's hop ratio over the hop counts the
data has (MQuAKE-hard is all 4-hop, so there it draws 4-hop cases only; the drawn counts are
returned), never a case that shares its id, a multi-hop question or a requested rewrite with an
evaluated case. :func:`check_disjoint` is the check an evaluation runs on the case ids a training run
recorded: any overlap raises :class:`~instructedit_plugin.errors.RequestError`.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import RequestError
from .multihop import edit_instruction

__all__ = [
    "PAPER_HOP_RATIO",
    "case_hops",
    "case_instruction",
    "check_disjoint",
    "hop_quotas",
    "multihop_training_request",
    "select_training_cases",
]

#: Hop count -> share of the paper's MQuAKE training cases (1000:910:290 for 2, 3, 4 hops).
PAPER_HOP_RATIO: dict[int, int] = {2: 1000, 3: 910, 4: 290}


def case_hops(case: Any) -> int:
    """A case's hop count: its gold chain's length (``new_single_hops``), else its number of edits."""
    return len(case.new_single_hops) or len(case.edits)


def case_instruction(case: Any) -> str:
    """The case's new facts as one instruction: one sentence per requested rewrite, joined by spaces."""
    return " ".join(edit_instruction(edit) for edit in case.edits)


def multihop_training_request(case: Any) -> dict[str, Any]:
    """One InstructEd training request (EasyEdit request layout) for a multi-hop case; see the module docs."""
    if not case.questions:
        raise RequestError(f"MQuAKE case {case.case_id}: no multi-hop questions. Fix: drop the case")
    first = case.edits[0] if case.edits else {}
    return {
        "prompt": case.questions[0],
        "rephrase_prompt": list(case.questions[1:]),
        "target_new": case.new_answer,
        "ground_truth": case.answer,
        "instruction": case_instruction(case),
        "subject": first.get("subject"),
        "case_id": case.case_id,
        "hops": case_hops(case),
        "recipe_source": "mquake",
    }


def hop_quotas(available: Mapping[int, int], n: int, ratio: Mapping[int, int] = PAPER_HOP_RATIO) -> dict[int, int]:
    """How many cases of each hop count to draw: ``n`` split in ``ratio`` over the hop counts present in
    ``available`` (ratio renormalised over them; largest remainders), each capped by what is available."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RequestError(f"multihop_cases: expected a non-negative int, got {n!r}. Fix: pass e.g. 60")
    hops = [h for h in sorted(ratio) if available.get(h, 0) > 0 and ratio[h] > 0]
    if not hops or n == 0:
        return {}
    total = sum(ratio[h] for h in hops)
    exact = {h: n * ratio[h] / total for h in hops}
    quotas = {h: int(exact[h]) for h in hops}
    for h in sorted(hops, key=lambda h: exact[h] - quotas[h], reverse=True)[: n - sum(quotas.values())]:
        quotas[h] += 1
    return {h: min(q, available[h]) for h, q in quotas.items()}


def _keys(case: Any) -> tuple[set[str], set[str]]:
    questions = {" ".join(q.split()).lower() for q in case.questions}
    return questions, {edit_instruction(e) for e in case.edits}


def select_training_cases(cases: Sequence[Any], n: int, evaluated: Iterable[Any] = (), *, seed: int = 0,
                          ratio: Mapping[int, int] = PAPER_HOP_RATIO) -> tuple[list[Any], dict[str, Any]]:
    """``(cases, stats)``: ``n`` cases drawn (seeded) from ``cases`` in ``ratio`` by hop count, none
    sharing a case id, a multi-hop question or a requested rewrite with a case of ``evaluated``.

    ``stats``: ``by_hops`` (drawn per hop count), ``quotas``, ``excluded_overlap`` and ``case_ids``.
    """
    evaluated = list(evaluated)
    eval_ids = {c.case_id for c in evaluated}
    eval_questions: set[str] = set()
    eval_edits: set[str] = set()
    for case in evaluated:
        questions, edits = _keys(case)
        eval_questions |= questions
        eval_edits |= edits
    pool: dict[int, list[Any]] = {}
    excluded = 0
    for case in cases:
        questions, edits = _keys(case)
        if case.case_id in eval_ids or questions & eval_questions or edits & eval_edits:
            excluded += 1
            continue
        pool.setdefault(case_hops(case), []).append(case)
    quotas = hop_quotas({h: len(v) for h, v in pool.items()}, n, ratio)
    rng = random.Random(seed)
    chosen: list[Any] = []
    for hops, quota in sorted(quotas.items()):
        chosen += rng.sample(pool[hops], quota)
    rng.shuffle(chosen)
    by_hops: dict[str, int] = {}
    for case in chosen:
        by_hops[str(case_hops(case))] = by_hops.get(str(case_hops(case)), 0) + 1
    stats = {"requested": n, "taken": len(chosen), "by_hops": dict(sorted(by_hops.items())),
             "quotas": {str(h): q for h, q in sorted(quotas.items())}, "paper_ratio": {str(h): r for h, r in ratio.items()},
             "excluded_overlap": excluded, "case_ids": sorted(c.case_id for c in chosen)}
    return chosen, stats


def check_disjoint(training_case_ids: Iterable[Any], evaluated: Sequence[Any], *, what: str = "the prefixes") -> None:
    """Raise :class:`RequestError` when a case evaluated here (``evaluated``: cases) was a training case."""
    overlap = sorted({c.case_id for c in evaluated} & set(training_case_ids))
    if overlap:
        shown = ", ".join(str(i) for i in overlap[:10]) + (" ..." if len(overlap) > 10 else "")
        raise RequestError(f"{what} were trained on {len(overlap)} of the evaluated MQuAKE cases (case_id {shown}). "
                           "Fix: evaluate other cases (a smaller --ds_size) or train without them")
