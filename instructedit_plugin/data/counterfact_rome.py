"""Loader for ROME-style CounterFact records (``counterfact_portability_gpt4.json`` and kin).

ROME's CounterFact stores the edit as ``requested_rewrite`` with a prompt
template (``"{} originates from"``) and ``target_new`` / ``target_true`` objects.
This loader fills the template with the subject and maps the record to an
EasyEdit request:

* ``rephrase_prompt``: the first of ``paraphrase_prompts`` (all kept under
  ``paraphrase_prompts``);
* locality ``neighborhood``: all ``neighborhood_prompts``, each with the
  ``target_true`` string as its answer (these prompts name other subjects that
  share the true object, so an edit must not change them);
* portability ``one_hop``: the GPT-4 ``New Question`` / ``New Answer`` pair when
  present (``Recalled Relation`` is kept at the top level as ``recalled_relation``);
* ``attribute_prompts``, ``generation_prompts``, ``case_id``, ``pararel_idx`` and
  ``relation_id`` are kept as extras.

:func:`rome_request` is reused by the InstructEd variants in :mod:`.instructed`.
"""
from __future__ import annotations

import os
from typing import Any

from .common import ONE_HOP_SPEC, Request, make_request, one_hop_portability, pair
from .schema import Fields, ListOf, Template, load_checked

__all__ = [
    "COUNTERFACT_ROME_SPEC", "REWRITE_SPEC",
    "counterfact_rome_to_request", "fill_template", "load_counterfact_rome", "rome_request",
]

_TARGET = Fields({"str": str}, optional={"id": str})

#: ``requested_rewrite`` of ROME's CounterFact (MQuAKE adds ``question``).
REWRITE_SPEC = Fields(
    required={"prompt": Template(), "subject": str, "target_new": _TARGET, "target_true": _TARGET},
    optional={"relation_id": str},
)

COUNTERFACT_ROME_SPEC = Fields(
    required={
        "case_id": int,
        "requested_rewrite": REWRITE_SPEC,
        "paraphrase_prompts": ListOf(str),
        "neighborhood_prompts": ListOf(str),
    },
    optional={
        "pararel_idx": int,
        "attribute_prompts": ListOf(str),
        "generation_prompts": ListOf(str),
        "portability": ONE_HOP_SPEC,
    },
)


def fill_template(template: str, subject: str) -> str:
    """Put ``subject`` into the ``{}`` slot(s) of a ROME prompt template.

    ``str.replace`` rather than ``str.format`` so that stray braces in a
    template cannot raise.
    """
    return template.replace("{}", subject)



def rome_request(record: dict[str, Any], portability: dict[str, Any], **extras: Any) -> Request:
    """Build the request for a ROME-style record with the given portability entries."""
    rewrite = record["requested_rewrite"]
    target_true = rewrite["target_true"]["str"]
    paraphrases = record["paraphrase_prompts"]
    neighbors = record["neighborhood_prompts"]
    locality = {"neighborhood": pair(list(neighbors), [target_true] * len(neighbors))} if neighbors else {}
    return make_request(
        prompt=fill_template(rewrite["prompt"], rewrite["subject"]),
        target_new=rewrite["target_new"]["str"],
        ground_truth=target_true,
        subject=rewrite["subject"],
        rephrase_prompt=paraphrases[0] if paraphrases else None,
        locality=locality,
        portability=portability,
        case_id=record["case_id"],
        pararel_idx=record.get("pararel_idx"),
        relation_id=rewrite.get("relation_id"),
        paraphrase_prompts=list(paraphrases),
        attribute_prompts=record.get("attribute_prompts"),
        generation_prompts=record.get("generation_prompts"),
        recalled_relation=(record.get("portability") or {}).get("Recalled Relation"),
        **extras,
    )


def counterfact_rome_to_request(record: dict[str, Any]) -> Request:
    """Convert one schema-checked ROME-style CounterFact record into an EasyEdit request."""
    return rome_request(record, one_hop_portability(record))


def load_counterfact_rome(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ROME-style CounterFact (optionally with GPT-4 portability) as EasyEdit requests."""
    return load_checked(path, COUNTERFACT_ROME_SPEC, counterfact_rome_to_request, limit)
