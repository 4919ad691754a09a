"""Loader for MEND/EasyEdit-style ZsRE (``zsre_mend_eval*.json``).

MEND's ZsRE records name the question ``src``, the edit target ``alt``, the
accepted answers ``answers`` and one Natural Questions locality pair
``loc`` / ``loc_ans``. Mapping to an EasyEdit request:

* ``prompt`` = ``src``, ``target_new`` = ``alt``, ``rephrase_prompt`` = ``rephrase``;
* ``ground_truth`` = ``answers[0]``, all answers under ``ground_truth_aliases``;
* locality ``nq``: ``loc`` kept verbatim, *including* its ``"nq question: "``
  prefix, with ``loc_ans`` as answer. This matches EasyEdit's ZsRE dataset and
  example scripts, which feed ``loc`` unchanged, so scores stay comparable;
* portability ``one_hop``: the GPT-4 ``New Question`` / ``New Answer`` pair when
  present (``Recalled Relation`` kept as ``recalled_relation``);
* ``cond`` (``"pred >> alt || src"``, read by MEND-style hypernetworks) and
  ``pred`` are kept as extras.

:data:`ZSRE_CORE_SPEC` and :func:`zsre_request` are reused by the InstructEd
variants in :mod:`.instructed`, whose files lack ``loc`` and/or ``portability``.
"""
from __future__ import annotations

import os
from typing import Any

from .common import ONE_HOP_SPEC, Request, make_request, one_hop_portability, pair
from .schema import Fields, ListOf, load_checked

__all__ = ["ZSRE_CORE_SPEC", "ZSRE_MEND_SPEC", "load_zsre_mend", "zsre_mend_to_request", "zsre_request"]

#: Keys every MEND-style ZsRE record (and InstructEd derivative) has.
ZSRE_CORE_SPEC = Fields(
    required={"subject": str, "src": str, "alt": str, "answers": ListOf(str, min_len=1), "rephrase": str},
    optional={"pred": str, "cond": str, "loc": str, "loc_ans": str, "portability": ONE_HOP_SPEC},
    together=(("loc", "loc_ans"),),
)

#: ``zsre_mend_eval*.json``: the core plus the NQ locality pair.
ZSRE_MEND_SPEC = ZSRE_CORE_SPEC.extend(required={"loc": str, "loc_ans": str})


def zsre_request(record: dict[str, Any], portability: dict[str, Any], **extras: Any) -> Request:
    """Build the request for a ZsRE-style record with the given portability entries."""
    locality = {"nq": pair(record["loc"], record["loc_ans"])} if "loc" in record else {}
    return make_request(
        prompt=record["src"],
        target_new=record["alt"],
        ground_truth=list(record["answers"]),
        subject=record["subject"],
        rephrase_prompt=record["rephrase"],
        locality=locality,
        portability=portability,
        cond=record.get("cond"),
        pred=record.get("pred"),
        recalled_relation=(record.get("portability") or {}).get("Recalled Relation"),
        **extras,
    )



def zsre_mend_to_request(record: dict[str, Any]) -> Request:
    """Convert one schema-checked MEND-style ZsRE record into an EasyEdit request."""
    return zsre_request(record, one_hop_portability(record))


def load_zsre_mend(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load MEND-style ZsRE (optionally with GPT-4 portability) as EasyEdit requests."""
    return load_checked(path, ZSRE_MEND_SPEC, zsre_mend_to_request, limit)
