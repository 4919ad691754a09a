"""Loader for KnowEdit's ConvSent (``blender_*.json``): sentiment edits about a topic.

ConvSent does not edit a fact but a *sentiment*: the model should answer
"What do you think of <topic>?" positively (or negatively) after the edit.
Each record lists BlenderBot responses about the topic, ``pos`` and ``neg``.
This loader turns a record into a sentiment edit request::

    {"topic": ent, "subject": ent, "prompt": f"What do you think of {ent}?",
     "target_new": pos[0].strip(), "label": "positive", "ground_truth": "",
     "pos": [...], "neg": [...], "locality": {}, "portability": {}}

``direction`` chooses the sentiment each edit moves towards (``label``, which
also fills the instructions' ``[LABEL]``): ``"positive"`` (the default;
``target_new`` is the first positive response with surrounding whitespace
removed, the raw responses start and end with a space), ``"negative"``
(``neg[0]``), or ``"both"``, as EasyEdit/SERAC evaluate ConvSent: records
alternate, even positions positive and odd positions negative. A record whose
chosen side has no response takes the other side. ``pos``/``neg`` are kept
verbatim for sentiment scoring.
``ground_truth`` is empty because the model's current opinion of the topic is
not in the data. ``subject`` repeats the topic so that subject-locating editors
(ROME/MEMIT) can use the record.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

from .common import Request, make_request
from .schema import Fields, ListOf, load_checked

__all__ = ["CONVSENT_DIRECTIONS", "CONVSENT_SPEC", "convsent_prompt", "convsent_to_request", "load_convsent"]

CONVSENT_DIRECTIONS = ("positive", "negative", "both")

CONVSENT_SPEC = Fields({"ent": str, "pos": ListOf(str, min_len=1), "neg": ListOf(str)})


def convsent_prompt(topic: str) -> str:
    """The question whose answer's sentiment the edit changes."""
    return f"What do you think of {topic}?"


def convsent_to_request(record: dict[str, Any], label: str = "positive") -> Request:
    """Convert one schema-checked ConvSent record into an edit request towards ``label`` sentiment."""
    topic = record["ent"]
    responses = {"positive": [r for r in record["pos"] if r.strip()], "negative": [r for r in record["neg"] if r.strip()]}
    if not responses[label]:  # no response of that sentiment: edit towards the other one
        label = "negative" if label == "positive" else "positive"
    return make_request(
        prompt=convsent_prompt(topic),
        target_new=responses[label][0].strip(),
        ground_truth="",
        subject=topic,
        topic=topic,
        label=label,
        pos=list(record["pos"]),
        neg=list(record["neg"]),
    )


def load_convsent(path: str | os.PathLike[str], limit: int | None = None, direction: str = "positive") -> list[Request]:
    """Load a ConvSent ``blender_*.json`` file as sentiment edit requests (``direction``: see the module)."""
    if direction not in CONVSENT_DIRECTIONS:
        raise ValueError(f"direction must be one of {CONVSENT_DIRECTIONS}, got {direction!r}. "
                         "Fix: use 'both' for EasyEdit's protocol, 'positive' for edits towards positive only")
    if direction != "both":
        return load_checked(path, CONVSENT_SPEC, lambda r: convsent_to_request(r, direction), limit)
    position = itertools.count()
    return load_checked(path, CONVSENT_SPEC,
                        lambda r: convsent_to_request(r, "negative" if next(position) % 2 else "positive"), limit)
