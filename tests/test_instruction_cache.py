"""Instruction keys/values computed once (``reweight_mode: question_rows``) give the full forward's logits.

A query then runs over its own tokens only (#15 item 3). Checked on the pretrained tiny models (rotary:
LLaMA, Qwen2, Gemma 3 -- any batch; GPT-2, with absolute positions: unpadded rows) with a random prefix
bank large enough to move the outputs, a similarity that is not 1, and instructions of different lengths.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.prefix import PrefixBank

QUESTIONS = ["What is the capital of France? Paris", "Who is the CEO of Apple?", "The Moon orbits the Earth"]
FACTS = ["The capital of France is Rome.", "Tim Cook leads Apple, a company in California, since 2011.", "Moon."]
ATOL = 2e-4


class CosineByLength:
    """A deterministic stand-in for the sentence encoder with a different cosine per pair."""

    identity = "length-test-encoder"

    def cosine(self, a, b):
        return torch.tensor([0.3 + 0.6 * (len(x) % 7) / 7 for x in a])


def _model(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def _lm(model, tok, cache, seed=0, mode="question_rows"):
    g = torch.Generator().manual_seed(seed)
    bank = PrefixBank([1, 2], 4, model.config.hidden_size, init_std=0.0)
    with torch.no_grad():
        bank.embeddings.normal_(0.0, 1.0, generator=g)
    bank.requires_grad_(False)
    return InstructedLM(model, tok, bank, encoder=CosineByLength(), mode=mode, instruction_cache=cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cached_instructions_give_the_full_forward_logits_on_rotary_models(request, arch):
    model, tok = _model(request.getfixturevalue(f"tiny_{arch}_dir"))  # (built with gradients on)
    if arch == "gemma3":  # the tiny Gemma's sliding window (8 tokens) is shorter than an instruction
        model.config.sliding_window = 256
    with torch.no_grad():
        _compare_on_a_padded_batch(model, tok)


def test_an_instruction_longer_than_a_sliding_window_runs_the_full_forward(tiny_gemma3_dir):
    model, tok = _model(tiny_gemma3_dir)  # sliding window 8: every instructed input is longer
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want = cached(**enc, instructions=FACTS).logits, full(**enc, instructions=FACTS).logits
    assert cached.instruction_cache.misses == 0 and torch.equal(got, want)


def _compare_on_a_padded_batch(model, tok):
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    want = full(**enc, instructions=FACTS).logits
    got = cached(**enc, instructions=FACTS).logits
    assert cached.instruction_cache.misses == 3 and len(cached.instruction_cache) == 3
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    # the instruction changes the answer (so the comparison is not between two plain forwards)
    plain = model(**enc).logits
    assert (want[real] - plain[real]).abs().max() > 100 * ATOL
    # asked again (other questions share an instruction): served from the cache, same logits
    again = cached(**enc, instructions=[FACTS[0]] * 3).logits
    assert cached.instruction_cache.hits == 3 and cached.instruction_cache.misses == 3
    torch.testing.assert_close(again[real], full(**enc, instructions=[FACTS[0]] * 3).logits[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cached_instructions_on_gpt2_match_unpadded_rows(tiny_gpt2_dir):
    model, tok = _model(tiny_gpt2_dir)
    full, cached = _lm(model, tok, cache=0), _lm(model, tok, cache=8)
    for question, fact in zip(QUESTIONS, FACTS):
        enc = tok([question], return_tensors="pt")
        torch.testing.assert_close(cached(**enc, instructions=[fact]).logits, full(**enc, instructions=[fact]).logits,
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_cache_is_dropped_when_the_prefixes_change(tiny_llama_dir):
    model, tok = _model(tiny_llama_dir)
    lm = _lm(model, tok, cache=8)
    enc = tok(QUESTIONS[:1], return_tensors="pt")
    before = lm(**enc, instructions=FACTS[:1]).logits
    lm.bank.embeddings.mul_(0.5)  # what an optimizer step does to the bank
    after = lm(**enc, instructions=FACTS[:1]).logits
    assert lm.instruction_cache.misses == 2  # recomputed, not served stale
    want = _lm(model, tok, cache=0)
    want.bank.embeddings.data.copy_(lm.bank.embeddings)
    torch.testing.assert_close(after, want(**enc, instructions=FACTS[:1]).logits, atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 100 * ATOL


def test_a_cache_is_refused_where_it_would_not_be_exact(tiny_llama_dir):
    model, tok = _model(tiny_llama_dir)
    with pytest.raises(PluginError, match="question_rows.*Fix:"):
        _lm(model, tok, cache=8, mode="paper")
    assert _lm(model, tok, cache=None, mode="paper").instruction_cache is None
    assert _lm(model, tok, cache=None).instruction_cache.max_entries == 1024


def test_training_never_uses_the_cache(tiny_llama_dir):
    """With gradients on (training), the full forward runs, so gradients reach the prefixes."""
    model, tok = _model(tiny_llama_dir)
    lm = _lm(model, tok, cache=8)
    lm.bank.requires_grad_(True)
    enc = tok(QUESTIONS[:2], return_tensors="pt", padding=True)
    lm(**enc, instructions=FACTS[:2]).logits.sum().backward()
    assert lm.instruction_cache.misses == 0 and lm.bank.embeddings.grad is not None
    assert lm.bank.embeddings.grad.abs().sum() > 0


def test_editing_in_question_rows_mode_keeps_the_cache_across_edits(instructed_world):
    """Through the apply function (what EasyEdit's BaseEditor calls): one cache per model and archive, kept
    from one edit to the next; warmed at edit time on request; the same logits as without a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, release

    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()

    def hparams(**kw):
        return InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                                                    archive=str(instructed_world["archive"]), device="cpu", max_length=40,
                                                    reweight_mode="question_rows", instruction_source="retrieval", **kw))

    edits = instructed_world["test"][:3]
    try:
        first, _ = apply_instructed_to_model(model, tok, [dict(edits[0])], hparams(warm_instruction_cache=True))
        assert first.instruction_cache.misses == 1 and len(first.instruction_cache) == 1  # warmed at edit time
        second, _ = apply_instructed_to_model(model, tok, [dict(e) for e in edits[1:]], hparams(warm_instruction_cache=True))
        assert second.instruction_cache is first.instruction_cache and len(second.instruction_cache) == 3
        enc = tok([e["prompt"] for e in edits], return_tensors="pt", padding=True)
        with torch.no_grad():
            cached = second(**enc).logits
            assert second.instruction_cache.misses == 3  # every question retrieved an instruction already cached
            plain, _ = apply_instructed_to_model(model, tok, [], hparams(instruction_cache=0))
            assert plain.instruction_cache is None
            full = plain(**enc).logits
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(cached[real], full[real], atol=ATOL, rtol=0)
    finally:
        release(model)
