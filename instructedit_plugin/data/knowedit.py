"""Loader for the KnowEdit benchmark format (ZsRE-test-all, WikiData counterfact/recent).

KnowEdit records already look like EasyEdit requests, except that their
locality/portability sections hold lists of ``{prompt, ground_truth}`` items per
category and the answers come as strings, alias lists or lists of alias lists.
This loader flattens each category into one entry with parallel ``prompt`` /
``ground_truth`` lists (see :func:`~.common.flatten_prompt_items`):

* locality keys: ``Relation_Specificity``, ``Forgetfulness`` (names kept);
* portability keys: ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``
  (names kept, as EasyEdit's KnowEdit scripts use them);
* empty categories and answer-less items (``[[]]``) are dropped, since they
  cannot be scored.

The top-level ``ground_truth`` is absent in ``recent_train.json`` (WikiData
recent edits add a fact the model did not know); it becomes ``""`` there.
EasyEdit itself substitutes ``"<|endoftext|>"``; an empty string keeps the
tokenizer out of the data layer. ``rephrase_prompt`` (or ``rephrase``) and
``cond`` are kept when present, and the ``generate_prompt`` list that
``test_cf-generate-10.jsonl`` adds is kept as ``generate_prompts``.
"""
from __future__ import annotations

import os
from typing import Any

from .common import GROUND_TRUTH_SPEC, Request, flatten_prompt_items, make_request
from .schema import Fields, ListOf, MapOf, load_checked

__all__ = ["KNOWEDIT_SPEC", "knowedit_to_request", "load_knowedit"]

_ITEMS = MapOf(ListOf(Fields({"prompt": str, "ground_truth": GROUND_TRUTH_SPEC})))

KNOWEDIT_SPEC = Fields(
    required={"subject": str, "prompt": str, "target_new": str},
    optional={
        "ground_truth": GROUND_TRUTH_SPEC,
        "rephrase_prompt": str,
        "rephrase": str,
        "cond": str,
        "locality": _ITEMS,
        "portability": _ITEMS,
        "generate_prompt": ListOf(str),
    },
)


def _section(categories: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    flat = {name: flatten_prompt_items(items) for name, items in categories.items()}
    return {name: entry for name, entry in flat.items() if entry is not None}


def knowedit_to_request(record: dict[str, Any]) -> Request:
    """Convert one schema-checked KnowEdit record into an EasyEdit request."""
    return make_request(
        prompt=record["prompt"],
        target_new=record["target_new"],
        ground_truth=record.get("ground_truth", ""),
        subject=record["subject"],
        rephrase_prompt=record.get("rephrase_prompt", record.get("rephrase")),
        locality=_section(record.get("locality", {})),
        portability=_section(record.get("portability", {})),
        cond=record.get("cond"),
        generate_prompts=record.get("generate_prompt"),
    )


def load_knowedit(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load a KnowEdit file (``.json`` array or ``.jsonl``) as EasyEdit requests."""
    return load_checked(path, KNOWEDIT_SPEC, knowedit_to_request, limit)
