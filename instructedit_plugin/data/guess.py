"""Guess a dataset file's format from its name, else from its first record's keys.

The upstream releases use stable file names, so the name is tried first (no
I/O). Renamed files fall back to key signatures: the first rule whose keys are
all present in the first record wins, most specific rules first. Both rule
lists are data, so adding a format means adding a row, not a branch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import PluginError
from .reader import read_records

__all__ = ["KEY_RULES", "NAME_RULES", "format_from_keys", "format_from_name", "guess_format"]

#: (regex searched in the lower-cased file name, format). Order matters.
NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^blender_.*\.jsonl?$", "convsent"),
    (r"mquake", "mquake"),
    (r"counterfact.*_ins\.jsonl?$", "counterfact_rome_ins"),
    (r"zsre.*_ins\.jsonl?$", "zsre_mend_ins"),
    (r"zsre.*_dec\.jsonl?$", "zsre_mend_dec"),
    (r"^counterfact_subject_replace", "counterfact_subject_replace"),
    (r"^zsre_subject_replace", "zsre_subject_replace"),
    (r"^zsre_inverse_relation", "zsre_inverse_relation"),
    (r"^counterfact-(train|val|edit)\.jsonl?$", "counterfact_mend"),
    (r"^counterfact_portability", "counterfact_rome"),
    (r"^zsre_mend", "zsre_mend"),
    (r"(^|_)(train_cf|test_cf|recent_train|recent_test)|zsre-test-all|^benchmark_", "knowedit"),
)

#: (keys that must all be present in the first record, format). Most specific first.
KEY_RULES: tuple[tuple[frozenset[str], str], ...] = tuple(
    (frozenset(keys), fmt)
    for keys, fmt in (
        (("ent", "pos", "neg"), "convsent"),
        (("requested_rewrite", "questions", "new_answer"), "mquake"),
        (("requested_rewrite", "ins"), "counterfact_rome_ins"),
        (("requested_rewrite", "alternative_subject"), "counterfact_subject_replace"),
        (("requested_rewrite",), "counterfact_rome"),
        (("src", "alt", "ins"), "zsre_mend_ins"),
        (("src", "alt", "questions_dec"), "zsre_mend_dec"),
        (("src", "alt", "alter_subject_question"), "zsre_subject_replace"),
        (("src", "alt", "inverse question"), "zsre_inverse_relation"),
        (("src", "alt"), "zsre_mend"),
        (("prompt", "target_new", "locality_prompt"), "counterfact_mend"),
        (("prompt", "target_new", "subject"), "knowedit"),
    )
)


def format_from_name(path: str | os.PathLike[str]) -> str | None:
    """The format implied by the file name, or None."""
    name = Path(path).name.lower()
    return next((fmt for pattern, fmt in NAME_RULES if re.search(pattern, name)), None)


def format_from_keys(record: Any) -> str | None:
    """The format implied by one record's keys, or None."""
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    return next((fmt for required, fmt in KEY_RULES if required <= keys), None)


def guess_format(path: str | os.PathLike[str]) -> str:
    """Guess the format of ``path``: by file name, else by its first record's keys.

    Raises:
        PluginError: neither rule matches (pass ``fmt=`` explicitly).
    """
    fmt = format_from_name(path)
    if fmt is not None:
        return fmt
    first = read_records(path, limit=1)
    fmt = format_from_keys(first[0]) if first else None
    if fmt is None:
        known = sorted({f for _, f in KEY_RULES})
        found = sorted(first[0].keys()) if first and isinstance(first[0], dict) else "no records"
        raise PluginError(
            f"{path}: cannot tell the dataset format from the file name or the first record "
            f"(keys: {found}). Fix: pass fmt= with one of {known}"
        )
    return fmt
