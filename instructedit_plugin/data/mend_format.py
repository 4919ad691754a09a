"""Loader for EasyEdit/MEND-style CounterFact (``counterfact-{train,val,edit}.json``).

These files are what EasyEdit's MEND/SERAC/InstructEdit trainers read: flat
records with one locality prompt each. The locality pair becomes the
``neighborhood`` locality entry (a single prompt/answer string, the same key
the ROME-style CounterFact loader uses for its neighborhood prompts), so
evaluation code sees one key name for CounterFact locality whichever file it
came from. ``case_id`` is kept.
"""
from __future__ import annotations

import os
from typing import Any

from .common import Request, make_request, pair
from .schema import Fields, load_checked

__all__ = ["COUNTERFACT_MEND_SPEC", "counterfact_mend_to_request", "load_counterfact_mend"]

COUNTERFACT_MEND_SPEC = Fields(
    required={
        "prompt": str,
        "target_new": str,
        "ground_truth": str,
        "subject": str,
        "rephrase_prompt": str,
        "locality_prompt": str,
        "locality_ground_truth": str,
    },
    optional={"case_id": int},
)


def counterfact_mend_to_request(record: dict[str, Any]) -> Request:
    """Convert one schema-checked MEND-style CounterFact record into an EasyEdit request."""
    return make_request(
        prompt=record["prompt"],
        target_new=record["target_new"],
        ground_truth=record["ground_truth"],
        subject=record["subject"],
        rephrase_prompt=record["rephrase_prompt"],
        locality={"neighborhood": pair(record["locality_prompt"], record["locality_ground_truth"])},
        case_id=record.get("case_id"),
    )


def load_counterfact_mend(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``counterfact-train/val/edit.json`` as EasyEdit requests."""
    return load_checked(path, COUNTERFACT_MEND_SPEC, counterfact_mend_to_request, limit)
