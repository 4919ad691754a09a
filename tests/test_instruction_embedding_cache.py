"""Instruction sentence embeddings are computed once per instruction (#15 item 3: a query encodes only its
question), with outputs identical to the first query's, bounded, and kept across edits."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructedit_plugin.instructed.embedding_cache import InstructionEmbeddingCache
from instructedit_plugin.instructed.lm import InstructedLM, load_encoder
from instructedit_plugin.instructed.prefix import PrefixBank

QUESTIONS = ["What is the capital of France?", "Who is the CEO of Apple?", "The Moon orbits the"]
FACTS = ["The capital of France is Rome.", "Tim Cook leads Apple, a company in California.", "The Moon orbits Mars."]


class CountingEncoder:
    """The default sentence encoder, recording every text it encodes."""

    cosine_from_encode = True

    def __init__(self):
        self.inner = load_encoder("default")
        self.identity = self.inner.identity
        self.dim = self.inner.dim
        self.encoded: list[str] = []

    def encode(self, texts):
        self.encoded.extend(texts)
        return self.inner.encode(texts)

    def cosine(self, a, b):
        self.encoded.extend(list(a) + list(b))
        return self.inner.cosine(a, b)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    bank = PrefixBank([1, 2], 4, model.config.hidden_size, init_std=0.0)
    with torch.no_grad():
        bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    bank.requires_grad_(False)
    return model, tok, bank


def _lm(tiny, encoder, mode="paper", **kw):
    model, tok, bank = tiny
    return InstructedLM(model, tok, bank, encoder=encoder, mode=mode, **kw)


@torch.no_grad()
def test_second_query_hits_the_cache_and_gives_identical_logits(tiny):
    encoder = CountingEncoder()
    lm = _lm(tiny, encoder)
    assert isinstance(lm.embedding_cache, InstructionEmbeddingCache)
    enc = tiny[1](QUESTIONS, return_tensors="pt", padding=True)
    first = lm(**enc, instructions=FACTS).logits
    assert lm.embedding_cache.misses == 3 and lm.embedding_cache.hits == 0
    encoder.encoded.clear()
    second = lm(**enc, instructions=FACTS).logits
    assert lm.embedding_cache.hits == 3 and lm.embedding_cache.misses == 3
    assert torch.equal(first, second)
    assert not set(FACTS) & set(encoder.encoded) and set(QUESTIONS) <= set(encoder.encoded)  # only the questions
    # the same as without the cache (question and instruction encoded together), to the encoder's batch rounding
    plain = _lm(tiny, encoder, embedding_cache=0)
    assert plain.embedding_cache is None
    torch.testing.assert_close(plain(**enc, instructions=FACTS).logits, first, atol=1e-4, rtol=0)
    # the cached similarities are the encoder's cosines
    torch.testing.assert_close(lm.similarities(QUESTIONS, FACTS), encoder.inner.cosine(QUESTIONS, FACTS), atol=1e-5, rtol=0)


@torch.no_grad()
def test_no_sentence_encoding_where_sim_is_unused(tiny):
    encoder = CountingEncoder()
    enc = tiny[1](QUESTIONS, return_tensors="pt", padding=True)
    for lm in (_lm(tiny, encoder, mode="none"), _lm(tiny, encoder, use_prefixes=False)):
        lm(**enc, instructions=FACTS)
    assert encoder.encoded == []


def test_the_cache_is_bounded_and_bound_to_its_encoder():
    encoder, other = CountingEncoder(), CountingEncoder()
    cache = InstructionEmbeddingCache(max_entries=2)
    cache.vectors(encoder, FACTS)
    assert len(cache) == 2 and FACTS[0] not in cache and FACTS[2] in cache  # least recently used out
    cache.vectors(encoder, FACTS[1:])
    assert cache.hits == 2
    cache.vectors(other, FACTS[2:])  # another encoder: its vectors, not the first one's
    assert len(cache) == 1 and cache.misses == 4
    with pytest.raises(ValueError, match="max_entries.*Fix:"):
        InstructionEmbeddingCache(0)
    # an encoder with only cosine(), or whose cosine is not its encode()'s dot product, gets no cache
    assert not InstructionEmbeddingCache.usable(type("OnlyCosine", (), {"cosine": lambda self, a, b: None})())
    assert not InstructionEmbeddingCache.usable(type("OwnCosine", (), {"encode": lambda self, t: None})())
    assert InstructionEmbeddingCache.usable(encoder.inner)


def test_editing_keeps_the_embedding_cache_across_edits(instructed_world):
    """Through the apply function: one cache per model and encoder, kept from one edit to the next."""
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, release

    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()
    hp = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                                              archive=str(instructed_world["archive"]), device="cpu", max_length=40,
                                              instruction_source="retrieval"))
    edits = [dict(e) for e in instructed_world["test"][:3]]
    enc = tok([e["prompt"] for e in edits], return_tensors="pt", padding=True)
    try:
        first, _ = apply_instructed_to_model(model, tok, edits, hp)
        with torch.no_grad():
            want = first(**enc).logits
        cache = first.embedding_cache
        assert cache is not None and cache.misses >= 1
        misses, retrieved = cache.misses, cache.misses + cache.hits  # inputs whose retrieval gate opened
        second, _ = apply_instructed_to_model(model, tok, [], hp)  # a later edit (nothing new)
        assert second.embedding_cache is cache
        with torch.no_grad():
            got = second(**enc).logits
        assert cache.misses == misses and cache.hits == retrieved + (retrieved - misses) and torch.equal(got, want)
    finally:
        release(model)


class TextOnlyMemory:
    """A memory offering only ``select`` (no ``encode_queries``): the provider searches by text, as before the
    search's question embedding was reused, so ``sim`` encodes the question a second time."""

    def __init__(self, memory):
        self.inner = memory

    def select(self, *args, **kwargs):
        return self.inner.select(*args, **kwargs)


def _retrieval_lm(tiny, encoder, memory):
    from instructedit_plugin.instructed.lm import RetrievedInstructions

    return _lm(tiny, encoder, provider=RetrievedInstructions(memory, gate=0.0, top_k=3, prompts=QUESTIONS))


@torch.no_grad()
def test_retrieval_encodes_each_question_once_with_the_same_outputs(tiny):
    """Retrieval: the memory search's question embedding is the one ``sim`` uses (one encoder pass per question);
    logits equal the old two-encode path's (bit for bit for one input, to the encoder's batch rounding for three)."""
    from instructedit_plugin.instructed.memory import InstructionMemory

    encoder = CountingEncoder()
    memory = InstructionMemory(encoder)
    memory.add(FACTS)
    lm, old = _retrieval_lm(tiny, encoder, memory), _retrieval_lm(tiny, encoder, TextOnlyMemory(memory))
    for question in QUESTIONS:  # the retrieved instructions' embeddings enter each wrapper's cache
        lm(**tiny[1]([question], return_tensors="pt"))
        old(**tiny[1]([question], return_tensors="pt"))
    for question in QUESTIONS:
        enc = tiny[1]([question], return_tensors="pt")
        encoder.encoded.clear()
        got = lm(**enc).logits
        assert encoder.encoded == [question]  # one encode: the search's
        encoder.encoded.clear()
        want = old(**enc).logits
        assert encoder.encoded == [question, question]  # search, then sim
        assert torch.equal(got, want)
    enc = tiny[1](QUESTIONS, return_tensors="pt", padding=True)
    encoder.encoded.clear()
    got = lm(**enc).logits
    assert sorted(encoder.encoded) == sorted(QUESTIONS)
    torch.testing.assert_close(got, old(**enc).logits, atol=1e-4, rtol=0)
    # the reused embedding gives the encoder's own cosine
    selections = lm.select(lm._rows(enc["input_ids"], enc["attention_mask"]))
    assert all(s is not None and s.encoded is not None for s in selections)
    sims = lm.similarities([s.question for s in selections], [s.instruction for s in selections], None,
                           [s.encoded for s in selections])
    torch.testing.assert_close(sims, encoder.inner.cosine([s.question for s in selections],
                                                          [s.instruction for s in selections]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_search_embedding_from_another_encoder_is_not_reused(tiny):
    """An ``EncodedQueries`` made by another encoder than the wrapper's is ignored: the question is encoded again."""
    from instructedit_plugin.instructed.memory import InstructionMemory

    encoder, other = CountingEncoder(), CountingEncoder()
    memory = InstructionMemory(other)
    memory.add(FACTS)
    lm = _retrieval_lm(tiny, encoder, memory)
    encoder.encoded.clear()
    lm(**tiny[1](QUESTIONS[:1], return_tensors="pt"))
    assert QUESTIONS[0] in encoder.encoded and QUESTIONS[0] in other.encoded
    with pytest.raises(ValueError, match="question_vectors.*Fix:"):
        lm.embedding_cache.similarity(encoder, QUESTIONS, FACTS, question_vectors=torch.zeros(1, 384))
