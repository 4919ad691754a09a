"""``reweight_mode: question_only`` (not in the paper; #15 item 3): re-weighting from the question's first token.

The rows of the whole template prefix (``[BOS] Instructions: {instruction}\\nInput: ``) attend without ``sim``, so
their keys/values are cached per instruction and a query runs over the question's own tokens only. Checked on the
tiny models: the rows before the question do not move with ``sim`` and the rows from it do; the cached query gives
the full forward's logits; the mode differs from ``question_rows`` (whose template tail *is* re-weighted); bad
configurations fail with a clear error.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructedit_plugin.errors import HyperParamsError, RequestError
from instructedit_plugin.instructed.context import instruction_context
from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.prefix import PrefixBank, attach_instructed, detach_instructed
from tests.support.tiny_models import TINY_ARCHS, tiny_config
# the questions, facts, stand-in encoder and model loading of the question_rows cache tests
from tests.test_instruction_cache import ATOL, FACTS, QUESTIONS, CosineByLength, _model


def _lm(model, tok, cache, mode="question_only"):
    g = torch.Generator().manual_seed(0)
    bank = PrefixBank([1, 2], 4, model.config.hidden_size, init_std=0.0)
    with torch.no_grad():
        bank.embeddings.normal_(0.0, 1.0, generator=g)
    bank.requires_grad_(False)
    return InstructedLM(model, tok, bank, encoder=CosineByLength(), mode=mode, instruction_cache=cache)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_only_rows_from_the_question_start_move_with_sim(arch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa").eval()
    handle = attach_instructed(model, layers=[1, 2], mode="question_only")
    try:
        with torch.no_grad():
            handle.bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        ids = torch.randint(3, model.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(1))
        span, start = (1, 6), 9  # instruction at 1..5, template tail at 6..8, question from 9

        def logits(sim, mode="question_only"):
            handle.mode = mode
            with torch.no_grad(), instruction_context(spans=[span], sim=sim, question_starts=[start]):
                return model(input_ids=ids).logits

        low, one = logits(0.2), logits(1.0)
        torch.testing.assert_close(low[:, :start], one[:, :start], atol=1e-6, rtol=0)  # head, instruction, tail
        assert (low[:, start:] - one[:, start:]).abs().max() > 1e-3  # the question's rows are re-weighted
        # question_rows re-weights the template tail's rows too: those differ between the modes
        rows = logits(0.2, mode="question_rows")
        assert (rows[:, span[1]:start] - low[:, span[1]:start]).abs().max() > 1e-3
        torch.testing.assert_close(rows[:, :span[1]], low[:, :span[1]], atol=1e-6, rtol=0)
    finally:
        detach_instructed(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cached_template_prefix_gives_the_full_forward_logits(request, arch):
    model, tok = _model(request.getfixturevalue(f"tiny_{arch}_dir"))
    if arch == "gemma3":  # the tiny Gemma's sliding window (8 tokens) is shorter than an instruction
        model.config.sliding_window = 256
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        want = full(**enc, instructions=FACTS).logits
        got = cached(**enc, instructions=FACTS).logits
        rows = _lm(model, tok, cache=0, mode="question_rows")(**enc, instructions=FACTS).logits
        plain = model(**enc).logits
    assert cached.instruction_cache.misses == 3
    # every entry holds the whole template prefix, tail included: a query runs over its own tokens only
    for fact in FACTS:
        encoded = cached.template.encode_instruction(fact)
        key = (tuple(encoded.ids), tuple(encoded.span))
        assert cached.instruction_cache._entries[key].length == len(encoded.ids) > encoded.span[1]
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    assert (want[real] - plain[real]).abs().max() > 100 * ATOL  # the instruction matters
    assert (want[real] - rows[real]).abs().max() > 100 * ATOL  # and the mode is not question_rows


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_callers_bos_position_gets_the_cached_prefix_logits(request, arch):
    """Rows that start with the tokenizer's BOS (Gemma's do): the BOS position's logits predict the question's first
    token from the template's last token, which a cached query no longer runs; they come from the cache entry."""
    model, tok = _model(request.getfixturevalue(f"tiny_{arch}_dir"))
    model.config.sliding_window = 256 if arch == "gemma3" else getattr(model.config, "sliding_window", None)
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    for lm in (full, cached):  # as with a tokenizer that adds BOS (the tiny one does not)
        lm.template.bos_id = tok.bos_token_id
    rows = [[cached.template.bos_id] + tok(q)["input_ids"] for q in QUESTIONS]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask, instructions=FACTS).logits
        got = cached(input_ids=ids, attention_mask=mask, instructions=FACTS).logits
        one = cached(input_ids=ids[1:2, width - len(rows[1]):], instructions=FACTS[1:2]).logits  # the unpadded slice path
    real = mask.bool()
    assert cached.instruction_cache.misses == 3
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(one[0], want[1, width - len(rows[1]):], atol=ATOL, rtol=0)
    first = [int(m.nonzero()[0]) for m in mask]  # the BOS column of each row
    assert all(want[i, c].abs().max() > 0 for i, c in enumerate(first))


def test_cached_template_prefix_on_gpt2_matches_unpadded_rows(tiny_gpt2_dir):
    model, tok = _model(tiny_gpt2_dir)
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    with torch.no_grad():
        for question, fact in zip(QUESTIONS, FACTS):
            enc = tok([question], return_tensors="pt")
            torch.testing.assert_close(cached(**enc, instructions=[fact]).logits,
                                       full(**enc, instructions=[fact]).logits, atol=ATOL, rtol=0)
    assert cached.instruction_cache.misses == 3


def test_bad_question_only_configurations_fail_clearly(tiny_llama_dir):
    from instructedit_plugin.instructed import InstructEdHyperParams, InstructEdTrainingHparams

    model, tok = _model(tiny_llama_dir)
    handle = attach_instructed(model, layers=[1, 2], mode="question_only")
    try:
        ids = torch.tensor([[2, 5, 6, 7, 8]])
        with pytest.raises(RequestError, match="question_starts.*Fix:"), instruction_context(spans=[(1, 3)], sim=0.5):
            model(input_ids=ids)
        for bad in ([-1], [1.5], []):
            with pytest.raises(RequestError, match="question_starts.*Fix:"):
                with instruction_context(spans=[(1, 3)], sim=0.5, question_starts=bad):
                    pass
        with pytest.raises(RequestError, match="question_starts"):  # one start per example
            with instruction_context(spans=[(1, 3), (0, 2)], sim=0.5, question_starts=[3, 4, 5]):
                pass
    finally:
        detach_instructed(model)
    base = dict(alg_name="InstructEd", model_name=str(tiny_llama_dir), archive="unused", device="cpu")
    assert InstructEdHyperParams.from_dict(dict(base, reweight_mode="question_only", sim_overlap=True)).sim_overlap
    with pytest.raises(HyperParamsError, match="sim_overlap.*Fix:"):
        InstructEdHyperParams.from_dict(dict(base, reweight_mode="question_only", sim_overlap=True, instruction_cache=0))
    with pytest.raises(HyperParamsError, match="reweight_mode"):  # evaluation only: not trainable
        InstructEdTrainingHparams.from_dict(dict(alg="InstructEd", model_name=str(tiny_llama_dir),
                                                     reweight_mode="question_only"))
