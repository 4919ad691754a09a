"""Shared pieces of the EasyEdit request dicts that every loader produces.

A request is the dict that EasyEdit's ``BaseEditor.edit_requests`` /
``compute_edit_quality`` consume::

    {"prompt": str, "target_new": str, "ground_truth": str, "subject": str,
     "rephrase_prompt": str (optional),
     "locality":    {key: {"prompt": str | list[str], "ground_truth": str | list[str]}},
     "portability": {key: {"prompt": str | list[str], "ground_truth": str | list[str]}},
     ...source-specific extras (case_id, instruction, ...)}

When a locality/portability entry holds several prompts, ``prompt`` and
``ground_truth`` are lists of equal length (one answer string per prompt),
because EasyEdit scores them pairwise. Sources that give several acceptable
answers (alias lists) keep the first alias as the answer string and all of them
under ``ground_truth_aliases``; EasyEdit ignores that extra key.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .schema import AnyOf, Fields, ListOf

__all__ = [
    "GROUND_TRUTH_SPEC", "ONE_HOP_SPEC", "Request", "alias_list", "flatten_prompt_items",
    "make_request", "one_hop_portability", "pair",
]

Request = dict[str, Any]

#: A KnowEdit answer: a string, a list of aliases, or a list of alias lists (one per answer).
GROUND_TRUTH_SPEC = AnyOf(
    (str, ListOf(str), ListOf(ListOf(str))),
    "a string, a list of strings or a list of lists of strings",
)

#: The GPT-4 one-hop portability block of the ZsRE and CounterFact eval files.
ONE_HOP_SPEC = Fields({"New Question": str, "New Answer": str}, optional={"Recalled Relation": str})


def alias_list(ground_truth: str | list[Any]) -> list[str]:
    """Flatten an answer (string, alias list or list of alias lists) into unique non-empty strings."""
    if isinstance(ground_truth, str):
        flat: Iterable[str] = [ground_truth]
    else:
        flat = (a for item in ground_truth for a in ([item] if isinstance(item, str) else item))
    return list(dict.fromkeys(a for a in flat if a))


def pair(prompt: str | list[str], ground_truth: str | list[str]) -> dict[str, Any]:
    """One locality/portability entry."""
    return {"prompt": prompt, "ground_truth": ground_truth}


def one_hop_portability(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"one_hop": {New Question, New Answer}}`` from a record's GPT-4 block, or ``{}``."""
    block = record.get("portability")
    return {"one_hop": pair(block["New Question"], block["New Answer"])} if block else {}


def flatten_prompt_items(items: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Turn KnowEdit ``[{prompt, ground_truth}, ...]`` into one entry with parallel lists.

    Each item contributes one prompt and one answer string (its first alias);
    all of its aliases go to ``ground_truth_aliases``. Items whose answer has no
    string at all (KnowEdit has a few ``[[]]`` answers) cannot be scored and are
    dropped. Returns None when nothing is left, so callers can omit the key.
    """
    prompts: list[str] = []
    answers: list[str] = []
    aliases: list[list[str]] = []
    for item in items:
        found = alias_list(item["ground_truth"])
        if not found:
            continue
        prompts.append(item["prompt"])
        answers.append(found[0])
        aliases.append(found)
    if not prompts:
        return None
    return {"prompt": prompts, "ground_truth": answers, "ground_truth_aliases": aliases}


def make_request(
    *,
    prompt: str,
    target_new: str,
    ground_truth: str | list[Any],
    subject: str,
    rephrase_prompt: str | None = None,
    locality: dict[str, Any] | None = None,
    portability: dict[str, Any] | None = None,
    **extras: Any,
) -> Request:
    """Build a request dict; a list ``ground_truth`` becomes its first alias plus ``ground_truth_aliases``.

    ``extras`` whose value is None are left out, so optional source fields only
    appear when the source has them.
    """
    request: Request = {"prompt": prompt, "target_new": target_new, "subject": subject}
    if isinstance(ground_truth, str):
        request["ground_truth"] = ground_truth
    else:
        found = alias_list(ground_truth)
        request["ground_truth"] = found[0] if found else ""
        request["ground_truth_aliases"] = found
    if rephrase_prompt is not None:
        request["rephrase_prompt"] = rephrase_prompt
    request["locality"] = dict(locality or {})
    request["portability"] = dict(portability or {})
    request.update({k: v for k, v in extras.items() if v is not None})
    return request
