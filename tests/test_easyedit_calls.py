"""``benchmarks/easyedit_calls.py``: one request -> ``BaseEditor.edit`` keyword arguments, one edit per request."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.easyedit_calls import NO_GROUND_TRUTH, edit_kwargs, run_edits  # noqa: E402

REQUEST = {
    "prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris", "subject": "France",
    "rephrase_prompt": "France's capital city is",
    "locality": {"neighborhood": {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}},
    "portability": {"one_hop": {"prompt": "The capital of France speaks", "ground_truth": "Italian"}},
}


def test_edit_kwargs_carries_every_section_as_one_item_lists():
    kw = edit_kwargs(REQUEST)
    assert kw == {
        "prompts": ["The capital of France is"], "target_new": ["Rome"], "ground_truth": ["Paris"],
        "rephrase_prompts": ["France's capital city is"],
        "locality_inputs": {"neighborhood": {"prompt": ["The capital of Spain is"], "ground_truth": ["Madrid"]}},
        "portability_inputs": {"one_hop": {"prompt": ["The capital of France speaks"], "ground_truth": ["Italian"]}},
    }
    assert edit_kwargs(REQUEST, with_subject=True)["subject"] == ["France"]
    assert edit_kwargs(REQUEST, loc_prompt="Water boils at 100 degrees.")["loc_prompts"] == ["Water boils at 100 degrees."]


def test_edit_kwargs_leaves_out_what_the_request_lacks():
    bare = {"prompt": "p", "target_new": "t", "ground_truth": None, "locality": {}, "portability": None}
    kw = edit_kwargs(bare)
    assert kw == {"prompts": ["p"], "target_new": ["t"], "ground_truth": [NO_GROUND_TRUTH]}


class _Editor:
    """Records every call; fails on the prompts it is told to."""

    def __init__(self, failing: set[str]):
        self.failing, self.calls = failing, []

    def edit(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs["prompts"][0] in self.failing:
            raise ValueError("no such subject")
        return [{"case": kwargs["prompts"][0]}], f"model after {kwargs['prompts'][0]}", {}


def test_run_edits_keeps_going_after_a_failing_record_and_names_it():
    requests = [dict(REQUEST, prompt=f"p{i}") for i in range(4)]
    editor = _Editor(failing={"p1"})
    metrics, edited, errors = run_edits(editor, requests, "test", with_subject=True)
    assert [m["case"] for m in metrics] == ["p0", "p2", "p3"]
    assert edited == "model after p3"
    assert errors == ["record 1: ValueError: no such subject"]
    assert all(c["keep_original_weight"] is True and c["subject"] == ["France"] for c in editor.calls)
    assert len(editor.calls) == 4
