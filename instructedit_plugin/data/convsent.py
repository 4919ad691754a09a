"""Loader for KnowEdit's ConvSent (``blender_*.json``): sentiment edits about a topic.

ConvSent does not edit a fact but a *sentiment*: the model should answer
"What do you think of <topic>?" positively (or negatively) after the edit.
Each record lists BlenderBot responses about the topic, ``pos`` and ``neg``.
This loader turns a record into a request for editing towards positive
sentiment::

    {"topic": ent, "subject": ent, "prompt": f"What do you think of {ent}?",
     "target_new": pos[0].strip(), "ground_truth": "",
     "pos": [...], "neg": [...], "locality": {}, "portability": {}}

``target_new`` is the first positive response with surrounding whitespace
removed (the raw responses start and end with a space); ``pos``/``neg`` are kept
verbatim for sentiment scoring or for building the opposite edit.
``ground_truth`` is empty because the model's current opinion of the topic is
not in the data. ``subject`` repeats the topic so that subject-locating editors
(ROME/MEMIT) can use the record.
"""
from __future__ import annotations

import os
from typing import Any

from .common import Request, make_request
from .schema import Fields, ListOf, load_checked

__all__ = ["CONVSENT_SPEC", "convsent_prompt", "convsent_to_request", "load_convsent"]

CONVSENT_SPEC = Fields({"ent": str, "pos": ListOf(str, min_len=1), "neg": ListOf(str)})


def convsent_prompt(topic: str) -> str:
    """The question whose answer's sentiment the edit changes."""
    return f"What do you think of {topic}?"


def convsent_to_request(record: dict[str, Any]) -> Request:
    """Convert one schema-checked ConvSent record into a positive-sentiment edit request."""
    topic = record["ent"]
    return make_request(
        prompt=convsent_prompt(topic),
        target_new=record["pos"][0].strip(),
        ground_truth="",
        subject=topic,
        topic=topic,
        pos=list(record["pos"]),
        neg=list(record["neg"]),
    )


def load_convsent(path: str | os.PathLike[str], limit: int | None = None) -> list[Request]:
    """Load a ConvSent ``blender_*.json`` file as sentiment edit requests."""
    return load_checked(path, CONVSENT_SPEC, convsent_to_request, limit)
