"""InstructEd answers multi-hop questions from retrieved facts (wiring for MQuAKE evaluation)."""
from __future__ import annotations

import torch

from instructedit_plugin.instructed.answering import instructed_answer_fn, join_instructions
from instructedit_plugin.instructed.lm import InstructedLM

from .test_instructed_model import FixedEncoder, _bank, tiny  # noqa: F401 - fixtures


def test_join_instructions():
    assert join_instructions([]) is None
    assert join_instructions(["  ", ""]) is None
    assert join_instructions(["A is B.", " B is C. "]) == "A is B. B is C."


def test_answer_fn_uses_the_retrieved_facts_and_falls_back_to_the_plain_model(tiny):  # noqa: F811
    model, tok = tiny
    lm = InstructedLM(model, tok, _bank(model), encoder=FixedEncoder(0.9))
    answer = instructed_answer_fn(lm, tok, max_new_tokens=4)
    question = "Who is the CEO of Apple?"

    enc = tok([question], return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    plain_text = tok.decode(plain[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
    assert answer(question, []) == plain_text  # nothing retrieved: the unedited model answers

    facts = ["The CEO of Apple is Tim Cook.", "Tim Cook was born in Alabama."]
    with torch.no_grad():
        ref = lm.generate(**enc, instructions=[" ".join(facts)], max_new_tokens=4, do_sample=False)
    ref_text = tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
    seen = []
    original = lm.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("instructions"))
        return original(*args, **kwargs)

    lm.generate = spy
    assert answer(question, facts) == ref_text
    assert seen == [["The CEO of Apple is Tim Cook. Tim Cook was born in Alabama."]]
