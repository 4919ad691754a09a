"""Loader for MQuAKE (``MQuAKE-hard.json``, same schema as MQuAKE-CF-3k / MQuAKE-T).

An MQuAKE case is not one edit but several (``requested_rewrite``) that must
all be applied before its multi-hop ``questions`` are asked, so it is loaded as
an :class:`MQuAKECase` rather than a flat request. Each edit becomes an EasyEdit
request (template filled with the subject, ``question`` and ``case_id`` kept);
the chains of single-hop facts before and after the edits are :class:`Hop` lists.

:func:`load_mquake_requests` flattens all edits of all cases into requests for
the generic :func:`~instructedit_plugin.data.load_requests` path; multi-hop
evaluation needs :func:`load_mquake`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .common import Request, make_request
from .counterfact_rome import REWRITE_SPEC, fill_template
from .schema import Fields, ListOf, load_checked

__all__ = ["Hop", "MQUAKE_SPEC", "MQuAKECase", "load_mquake", "load_mquake_requests", "mquake_case"]

_HOP_SPEC = Fields({"question": str, "cloze": str, "answer": str, "answer_alias": ListOf(str)})

MQUAKE_SPEC = Fields(
    required={
        "case_id": int,
        "requested_rewrite": ListOf(REWRITE_SPEC.extend(required={"question": str}), min_len=1),
        "questions": ListOf(str, min_len=1),
        "answer": str,
        "answer_alias": ListOf(str),
        "new_answer": str,
        "new_answer_alias": ListOf(str),
        "single_hops": ListOf(_HOP_SPEC),
        "new_single_hops": ListOf(_HOP_SPEC),
    },
    optional={"orig": dict},
)


@dataclass(frozen=True)
class Hop:
    """One single-hop fact of a chain: question, cloze prompt and answer with aliases."""

    question: str
    cloze: str
    answer: str
    answer_alias: list[str]


@dataclass(frozen=True)
class MQuAKECase:
    """One MQuAKE case: its edits, multi-hop questions and answers before/after editing.

    ``orig`` keeps the raw Wikidata triples block (empty if the file lacks it).
    """

    case_id: int
    edits: list[Request]
    questions: list[str]
    answer: str
    answer_alias: list[str]
    new_answer: str
    new_answer_alias: list[str]
    single_hops: list[Hop]
    new_single_hops: list[Hop]
    orig: dict[str, Any] = field(default_factory=dict)


def _hop(raw: dict[str, Any]) -> Hop:
    return Hop(raw["question"], raw["cloze"], raw["answer"], list(raw["answer_alias"]))


def _edit(rewrite: dict[str, Any], case_id: int) -> Request:
    return make_request(
        prompt=fill_template(rewrite["prompt"], rewrite["subject"]),
        target_new=rewrite["target_new"]["str"],
        ground_truth=rewrite["target_true"]["str"],
        subject=rewrite["subject"],
        question=rewrite["question"],
        relation_id=rewrite.get("relation_id"),
        case_id=case_id,
    )


def mquake_case(record: dict[str, Any]) -> MQuAKECase:
    """Convert one schema-checked MQuAKE record into an :class:`MQuAKECase`."""
    case_id = record["case_id"]
    return MQuAKECase(
        case_id=case_id,
        edits=[_edit(rw, case_id) for rw in record["requested_rewrite"]],
        questions=list(record["questions"]),
        answer=record["answer"],
        answer_alias=list(record["answer_alias"]),
        new_answer=record["new_answer"],
        new_answer_alias=list(record["new_answer_alias"]),
        single_hops=[_hop(h) for h in record["single_hops"]],
        new_single_hops=[_hop(h) for h in record["new_single_hops"]],
        orig=dict(record.get("orig", {})),
    )


def load_mquake(path: str | os.PathLike[str], limit: int | None = None) -> list[MQuAKECase]:
    """Load an MQuAKE file as :class:`MQuAKECase` objects (first ``limit`` cases)."""
    return load_checked(path, MQUAKE_SPEC, mquake_case, limit)


def load_mquake_requests(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """All edits of the first ``limit`` MQuAKE cases as flat requests (each carries ``case_id``)."""
    return [edit for case in load_mquake(path, limit) for edit in case.edits]
