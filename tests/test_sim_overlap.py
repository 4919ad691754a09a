"""#15 item 3, query cost: ``sim`` computed beside the forward (``sim_overlap``), the bfloat16 sentence encoder
(``encoder_dtype``), and the cached-instruction query's single-row output path.

``sim_overlap`` must give the very logits of computing ``sim`` first (bit for bit), with the question's encoding
really running while the forward starts, and the first attention waiting for it (a forward that read another
``sim`` -- ones, or none at all -- gives other logits, which these tests would catch).
"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructedit_plugin.errors import HyperParamsError
from instructedit_plugin.instructed.lm import InstructedLM, load_encoder
from instructedit_plugin.instructed.prefix import PrefixBank

QUESTIONS = ["What is the capital of France? Paris", "Who is the CEO of Apple?", "The Moon orbits the Earth"]
FACTS = ["The capital of France is Rome.", "Tim Cook leads Apple, a company in California, since 2011.", "Moon."]


@pytest.fixture(scope="module")
def tiny(tiny_gemma3_dir):
    tok = AutoTokenizer.from_pretrained(tiny_gemma3_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    model.config.sliding_window = 256  # the tiny Gemma's window (8) is shorter than an instruction
    bank = PrefixBank([1, 2], 4, model.config.hidden_size, init_std=0.0)
    with torch.no_grad():
        bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    bank.requires_grad_(False)
    return model, tok, bank


def _lm(tiny, encoder, **kw):
    model, tok, bank = tiny
    return InstructedLM(model, tok, bank, encoder=encoder, mode="question_rows", instruction_cache=8, **kw)


class GatedEncoder:
    """The default encoder, whose ``encode`` first waits (up to 20 s) until the LM's embedding layer has run:
    it can only finish early when the forward started while it was encoding."""

    cosine_from_encode = True

    def __init__(self, inner, started: threading.Event):
        self.inner, self.started = inner, started
        self.identity, self.dim = inner.identity, inner.dim
        self.overlapped: list[bool] = []

    def encode(self, texts):
        self.overlapped.append(self.started.wait(timeout=20))
        return self.inner.encode(texts)

    def cosine(self, a, b):
        return self.inner.cosine(a, b)


@torch.no_grad()
def test_overlapped_sim_gives_the_sequential_logits_bit_for_bit(tiny):
    encoder = load_encoder("default")
    sequential, overlapped = _lm(tiny, encoder), _lm(tiny, encoder, sim_overlap=True)
    tok = tiny[1]
    for questions, facts in ((QUESTIONS[:1], FACTS[:1]), (QUESTIONS, FACTS)):  # one row (EasyEdit's); padded batch
        enc = tok(questions, return_tensors="pt", padding=True)
        want = sequential(**enc, instructions=facts).logits
        got = overlapped(**enc, instructions=facts).logits
        assert torch.equal(got, want)
    assert overlapped.instruction_cache.misses == sequential.instruction_cache.misses == 3  # the cached forward ran
    # sim matters here: the same forward with sim = 1 (what a forward that never waited would read) differs
    sims = sequential.similarities(QUESTIONS, FACTS)
    assert bool((sims < 0.9).all())
    ones = _lm(tiny, encoder)
    ones.__dict__["similarities"] = lambda *a, **k: torch.ones(len(a[0]))
    real = enc["attention_mask"].bool()
    assert (ones(**enc, instructions=FACTS).logits[real] - want[real]).abs().max() > 1e-3


@torch.no_grad()
def test_the_question_is_encoded_while_the_forward_runs_and_the_first_attention_waits(tiny):
    model, tok, _ = tiny
    inner = load_encoder("default")
    started = threading.Event()
    gated = GatedEncoder(inner, started)
    hook = model.get_input_embeddings().register_forward_hook(lambda *a: started.set())
    try:
        lm = _lm(tiny, gated, sim_overlap=True)
        started.set()  # warm-up, not timed: the instructions' keys/values and embeddings
        lm.warm_instructions(FACTS)
        lm.similarities(QUESTIONS, FACTS)
        gated.overlapped.clear()
        started.clear()
        enc = tok(QUESTIONS, return_tensors="pt", padding=True)
        got = lm(**enc, instructions=FACTS).logits
    finally:
        hook.remove()
    # the question's encoding waited for the forward's embeddings: the forward ran before sim existed
    assert gated.overlapped == [True]  # one encoder call: the questions (the instructions' embeddings are cached)
    want = _lm(tiny, inner)(**enc, instructions=FACTS).logits
    assert torch.equal(got, want)


@torch.no_grad()
def test_an_error_computing_sim_reaches_the_caller(tiny):
    class Broken:
        cosine_from_encode = True
        identity = "broken"

        def encode(self, texts):
            raise RuntimeError("encoder exploded")

        def cosine(self, a, b):
            raise RuntimeError("encoder exploded")

    lm = _lm(tiny, Broken(), sim_overlap=True)
    enc = tiny[1](QUESTIONS[:1], return_tensors="pt")
    with pytest.raises(RuntimeError, match="encoder exploded"):
        lm(**enc, instructions=FACTS[:1])


def test_sim_overlap_is_refused_without_the_cached_instruction_forward(tiny, tiny_llama_dir):
    from instructedit_plugin.errors import PluginError
    from instructedit_plugin.instructed import InstructEdHyperParams

    model, tok, bank = tiny
    with pytest.raises(PluginError, match="sim_overlap.*Fix: set reweight_mode: question_rows"):
        InstructedLM(model, tok, bank, encoder=load_encoder("default"), mode="paper", sim_overlap=True)
    base = dict(alg_name="InstructEd", model_name=str(tiny_llama_dir), archive=str(tiny_llama_dir), device="cpu")
    with pytest.raises(HyperParamsError) as err:
        InstructEdHyperParams.from_dict(dict(base, sim_overlap=True))  # reweight_mode paper
    assert err.value.field == "sim_overlap" and "Fix: set reweight_mode: question_rows" in str(err.value)
    with pytest.raises(HyperParamsError) as err:
        InstructEdHyperParams.from_dict(dict(base, reweight_mode="question_rows", instruction_cache=0, sim_overlap=True))
    assert err.value.field == "sim_overlap"
    hp = InstructEdHyperParams.from_dict(dict(base, reweight_mode="question_rows", sim_overlap=True))
    assert hp.sim_overlap and hp.encoder_dtype == "float32"
    with pytest.raises(HyperParamsError) as err:
        InstructEdHyperParams.from_dict(dict(base, encoder_dtype="int4"))
    assert err.value.field == "encoder_dtype" and "Fix:" in str(err.value)


def test_bfloat16_encoder_moves_sim_by_thousandths_and_says_so_in_its_identity():
    full, half = load_encoder("default"), load_encoder("default", dtype="bfloat16")
    pairs = (QUESTIONS + ["Who wrote Hamlet?"], FACTS + ["Hamlet was written by Christopher Marlowe."])
    a, b = full.cosine(*pairs), half.cosine(*pairs)
    assert 0 < float((a - b).abs().max()) < 0.01
    assert half.encode(["x"]).dtype == torch.float32 and next(half.model.parameters()).dtype == torch.bfloat16
    assert half.identity["dtype"] == "bfloat16" and "dtype" not in full.identity  # float32's identity unchanged
    assert half.identity["weights_sha256"] != full.identity["weights_sha256"]


@torch.no_grad()
def test_one_unpadded_row_gets_the_same_logits_as_in_a_padded_batch(tiny):
    """The single-row output (a slice of the kept logits) lines up with the caller's positions exactly as the
    general path (which copies each row onto its positions) does for the same row inside a padded batch."""
    from instructedit_plugin.instructed.lm import pad_left

    tok = tiny[1]
    for bos in ([], [tok.bos_token_id]):  # the caller's BOS (Gemma's tokenizer adds one) is the template's own
        lm = _lm(tiny, load_encoder("default"))
        if bos:  # as for a tokenizer that starts every text with BOS: the template leads with it, rows drop theirs
            lm.template.bos_id = tok.bos_token_id
            assert lm.template.strip_bos(bos + [7]) == [7]
        rows = [bos + tok(q)["input_ids"] for q in QUESTIONS]
        ids, mask, _ = pad_left(rows, tok.pad_token_id)
        together = lm(input_ids=ids, attention_mask=mask, instructions=FACTS).logits
        for i, (row, fact) in enumerate(zip(rows, FACTS)):
            one = torch.tensor([row])
            alone = lm(input_ids=one, attention_mask=torch.ones_like(one), instructions=[fact]).logits
            real = mask[i].bool()
            assert alone.shape[1] == int(real.sum()) == len(row)
            torch.testing.assert_close(alone[0], together[i, real], atol=2e-4, rtol=0)


def test_a_warmed_edit_leaves_a_retrieval_query_only_its_search_encoding(instructed_world):
    """``warm_instruction_cache`` computes an edit's instruction embedding at edit time too: a retrieval query then
    encodes nothing beyond its memory search (before, each edit's first query also encoded its instruction), with
    the logits of the lazily filled cache, and the same again with ``sim_overlap``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, release

    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()

    def hparams(**kw):
        return InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                                                    archive=str(instructed_world["archive"]), device="cpu",
                                                    reweight_mode="question_rows", instruction_source="retrieval", **kw))

    edits = [dict(e) for e in instructed_world["test"][:3]]
    try:
        logits = {}
        for warm, overlap in ((False, False), (True, False), (True, True)):
            release(model)
            lm, _ = apply_instructed_to_model(model, tok, edits, hparams(warm_instruction_cache=warm, sim_overlap=overlap))
            cache = lm.embedding_cache
            assert cache.misses == (3 if warm else 0)  # warmed: every instruction encoded at edit time, alone
            encoded = []
            encoder = editing_state(model).encoder
            inner = encoder.encode
            encoder.encode = lambda texts: (encoded.extend(texts), inner(texts))[1]
            try:
                with torch.no_grad():
                    logits[warm, overlap] = [lm(**tok([e["prompt"]], return_tensors="pt")).logits for e in edits]
            finally:
                del encoder.encode
            questions = [e["prompt"] for e in edits]
            if warm:  # only the memory searches' encodings of the questions
                assert encoded == questions and cache.misses == 3
            else:  # each first query under an instruction also encoded the instruction
                assert cache.misses >= 1 and len(encoded) == 3 + cache.misses and set(questions) <= set(encoded)
        for key in ((True, False), (True, True)):
            assert all(torch.equal(a, b) for a, b in zip(logits[key], logits[False, False]))
    finally:
        release(model)
