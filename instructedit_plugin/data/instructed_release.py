"""Loaders for the InstructEd (Han et al. 2024) data variants.

InstructEd augments the ZsRE and ROME-style CounterFact eval sets; each variant
is the base format plus one field, so these loaders reuse the base converters
and only add (and require) that field:

=================================  ====================  ===========================================
format                             extra source field    where it goes in the request
=================================  ====================  ===========================================
``zsre_mend_ins``                  ``ins``               ``instruction`` (str)
``counterfact_rome_ins``           ``ins``               ``instruction`` (str)
``zsre_mend_dec``                  ``questions_dec``     ``questions_dec`` (list of cloze strings)
``zsre_subject_replace``           ``alter_subject_      portability ``subject_replace``: that
                                   question``            question, answer ``alt``; plus
                                                         ``alternative_subject``
``counterfact_subject_replace``    ``alternative_        portability ``subject_replace``: the
                                   subject``             prompt template filled with the
                                                         alternative subject, answer ``target_new``
``zsre_inverse_relation``          ``inverse question``  portability ``inverse_relation``: that
                                                         question, answer = the edited ``subject``
=================================  ====================  ===========================================

The subject-replace files name the same entity differently (an alias), so the
edited fact should transfer to it; the inverse-relation question asks the
relation backwards from the new object (``"Who is Marian Clairmont's sister?"``
after editing Claire Clairmont's sister to Marian Clairmont), so its answer is
the original subject.
"""
from __future__ import annotations

import os
from typing import Any

from .common import Request, one_hop_portability, pair
from .counterfact_rome import COUNTERFACT_ROME_SPEC, fill_template, rome_request
from .schema import ListOf, load_checked
from .zsre import ZSRE_CORE_SPEC, ZSRE_MEND_SPEC, zsre_request

__all__ = [
    "load_counterfact_rome_ins", "load_counterfact_subject_replace", "load_zsre_inverse_relation",
    "load_zsre_mend_dec", "load_zsre_mend_ins", "load_zsre_subject_replace",
]

INVERSE_QUESTION_KEY = "inverse question"

ZSRE_INS_SPEC = ZSRE_MEND_SPEC.extend(required={"ins": str})
ZSRE_DEC_SPEC = ZSRE_MEND_SPEC.extend(required={"questions_dec": ListOf(str)})
ZSRE_SUBJECT_REPLACE_SPEC = ZSRE_CORE_SPEC.extend(
    required={"alternative_subject": str, "alter_subject_question": str}
)
ZSRE_INVERSE_SPEC = ZSRE_CORE_SPEC.extend(required={INVERSE_QUESTION_KEY: str})
COUNTERFACT_INS_SPEC = COUNTERFACT_ROME_SPEC.extend(required={"ins": str})
COUNTERFACT_SUBJECT_REPLACE_SPEC = COUNTERFACT_ROME_SPEC.extend(required={"alternative_subject": str})


def _zsre_ins(record: dict[str, Any]) -> Request:
    return zsre_request(record, one_hop_portability(record), instruction=record["ins"])


def _zsre_dec(record: dict[str, Any]) -> Request:
    return zsre_request(record, one_hop_portability(record), questions_dec=list(record["questions_dec"]))


def _zsre_subject_replace(record: dict[str, Any]) -> Request:
    portability = {
        **one_hop_portability(record),
        "subject_replace": pair(record["alter_subject_question"], record["alt"]),
    }
    return zsre_request(record, portability, alternative_subject=record["alternative_subject"])


def _zsre_inverse(record: dict[str, Any]) -> Request:
    portability = {
        **one_hop_portability(record),
        "inverse_relation": pair(record[INVERSE_QUESTION_KEY], record["subject"]),
    }
    return zsre_request(record, portability)


def _counterfact_ins(record: dict[str, Any]) -> Request:
    return rome_request(record, one_hop_portability(record), instruction=record["ins"])


def _counterfact_subject_replace(record: dict[str, Any]) -> Request:
    rewrite = record["requested_rewrite"]
    alternative = record["alternative_subject"]
    portability = {
        **one_hop_portability(record),
        "subject_replace": pair(fill_template(rewrite["prompt"], alternative), rewrite["target_new"]["str"]),
    }
    return rome_request(record, portability, alternative_subject=alternative)


def load_zsre_mend_ins(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``zsre_mend_eval_portability_gpt4_ins.json``: ZsRE plus ``instruction``."""
    return load_checked(path, ZSRE_INS_SPEC, _zsre_ins, limit)


def load_zsre_mend_dec(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``zsre_mend_eval_portability_gpt4_dec.jsonl``: ZsRE plus ``questions_dec``."""
    return load_checked(path, ZSRE_DEC_SPEC, _zsre_dec, limit)


def load_zsre_subject_replace(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``zsre_subject_replace.json``: portability key ``subject_replace``."""
    return load_checked(path, ZSRE_SUBJECT_REPLACE_SPEC, _zsre_subject_replace, limit)


def load_zsre_inverse_relation(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``zsre_inverse_relation.json``: portability key ``inverse_relation``."""
    return load_checked(path, ZSRE_INVERSE_SPEC, _zsre_inverse, limit)


def load_counterfact_rome_ins(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``counterfact_portability_gpt4_ins.json``: ROME-style CounterFact plus ``instruction``."""
    return load_checked(path, COUNTERFACT_INS_SPEC, _counterfact_ins, limit)


def load_counterfact_subject_replace(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load ``counterfact_subject_replace.json``: portability key ``subject_replace``."""
    return load_checked(path, COUNTERFACT_SUBJECT_REPLACE_SPEC, _counterfact_subject_replace, limit)
