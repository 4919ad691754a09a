"""The in-context baseline (``use_prefixes: false``): same input layout, plain frozen model."""
from __future__ import annotations

import torch

from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.templates import InstructionTemplate

from .test_instructed_model import PROMPTS, FixedEncoder, _bank, tiny  # noqa: F401 - fixtures


def test_in_context_is_the_plain_model_on_the_instructed_input(tiny):  # noqa: F811
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    instructions = ["The capital of France is Rome.", "The CEO of Apple is Tim Cook."]
    bank = _bank(model)
    in_context = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.6), use_prefixes=False)
    with_prefix = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.6))
    got = in_context(**enc, instructions=instructions).logits
    assert not torch.allclose(got, with_prefix(**enc, instructions=instructions).logits)

    template = InstructionTemplate(tok)
    for i, ins in enumerate(instructions):
        row = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        prefix = template.encode_instruction(ins)
        ids = torch.tensor([prefix.ids + row])
        with torch.no_grad():
            manual = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prefix.ids):]
        torch.testing.assert_close(got[i][enc["attention_mask"][i].bool()], manual, rtol=1e-5, atol=1e-5)

    # generate() takes the same path: greedy tokens equal the plain model's on the instructed input.
    out = in_context.generate(**{k: v[:1] for k, v in enc.items()}, instructions=instructions[:1],
                              max_new_tokens=3, do_sample=False)
    prefix = template.encode_instruction(instructions[0])
    row = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    ids = torch.tensor([prefix.ids + row])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out[0, enc["input_ids"].shape[1]:].tolist() == ref[0, ids.shape[1]:].tolist()
