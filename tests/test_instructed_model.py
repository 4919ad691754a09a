"""InstructedLM: exactness without instruction, exact slicing with one, gradients, generate, templates."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructedit_plugin.errors import RequestError
from instructedit_plugin.instructed.context import instruction_context
from instructedit_plugin.instructed.lm import GoldInstructions, InstructedLM, RetrievedInstructions
from instructedit_plugin.instructed.prefix import PrefixBank, attach_instructed, get_instructed_handle
from instructedit_plugin.instructed.templates import InstructionTemplate, instruction_of, request_prompts


class FixedEncoder:
    """Deterministic stand-in for the sentence encoder: cosine is a constant (or 1 for equal texts)."""

    identity = "fixed-test-encoder"

    def __init__(self, value: float = 0.7):
        self.value = value

    def encode(self, texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

    def cosine(self, a, b):
        return torch.tensor([1.0 if x == y else self.value for x, y in zip(a, b)])


def _load(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok


def _bank(model, layers=(1, 2), seed=0):
    torch.manual_seed(seed)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    bank = PrefixBank(list(layers), 5, hidden, init_std=0.5)
    bank.requires_grad_(False)
    return bank


PROMPTS = ["What is the capital of France? Paris", "Who is the CEO of Apple?"]


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request):
    model, tok = _load(request.getfixturevalue(f"tiny_{request.param}_dir"))
    return model, tok


@torch.no_grad()
def test_no_instruction_is_exactly_the_base_model(tiny):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    base = model(**enc).logits
    lm = InstructedLM(model, tok, _bank(model), encoder=FixedEncoder(1.0))
    assert torch.equal(lm(**enc).logits, base)  # no provider: plain model
    assert torch.equal(lm(**enc, instructions=[None, None]).logits, base)
    # mixed batch: the row without instruction is still exactly the base model's row
    mixed = lm(**enc, instructions=["The capital of France is Rome.", None]).logits
    assert torch.equal(mixed[1], base[1])
    assert not torch.allclose(mixed[0][enc["attention_mask"][0].bool()], base[0][enc["attention_mask"][0].bool()])
    # the base model is stock again outside the call
    assert get_instructed_handle(model) is None
    assert torch.equal(model(**enc).logits, base)


@torch.no_grad()
def test_attached_without_prefix_and_sim_one_matches_base(tiny):
    """Prefix off + sim 1 + the plain input: the instructed attention path equals stock attention."""
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # what run() gives left-padded rows
    base = model(**enc, position_ids=positions).logits
    lm = InstructedLM(model, tok, _bank(model), encoder=FixedEncoder(1.0))
    out = lm.run(enc["input_ids"], enc["attention_mask"], [None, None], 1.0, False).logits
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(out[mask], base[mask], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_instruction_is_prefixed_and_logits_sliced_back_exactly(tiny):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    instructions = ["The capital of France is Rome.", "The CEO of Apple is Tim Cook."]
    lm = InstructedLM(model, tok, _bank(model), encoder=FixedEncoder(0.6))
    got = lm(**enc, instructions=instructions).logits
    assert got.shape == (*enc["input_ids"].shape, model.config.vocab_size)

    template = InstructionTemplate(tok)
    handle = attach_instructed(model, bank=lm.bank, freeze=False)
    try:
        for i, ins in enumerate(instructions):
            row = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            prefix = template.encode_instruction(ins)
            assert tok.decode(prefix.ids) == f"Instructions: {ins}\nInput: "
            assert tok.decode(prefix.ids[prefix.span[0]:prefix.span[1]]) == ins
            ids = torch.tensor([prefix.ids + row])
            with instruction_context(spans=[prefix.span], sim=torch.tensor([0.6]), use_prefix=True):
                manual = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prefix.ids):]
            torch.testing.assert_close(got[i][enc["attention_mask"][i].bool()], manual, rtol=1e-5, atol=1e-5)
            assert torch.all(got[i][~enc["attention_mask"][i].bool()] == 0)
    finally:
        handle.detach()


def test_gradient_reaches_only_the_prefixes(tiny_llama_dir):
    model, tok = _load(tiny_llama_dir)
    bank = PrefixBank([1, 2], 5, model.config.hidden_size)
    handle = attach_instructed(model, bank=bank, freeze=True)
    try:
        lm = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.8))
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        batch = lm.build([r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])],
                         lm.select([[1]] * 2, ["The capital of France is Rome.", "Tim Cook."]))
        logits = lm.run(batch.input_ids, batch.attention_mask, batch.spans, batch.sim, True).logits
        logits[:, -1].logsumexp(-1).sum().backward()
        assert bank.embeddings.grad is not None and bank.embeddings.grad.abs().sum() > 0
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    finally:
        handle.detach()
    assert all(p.requires_grad for p in model.parameters())


@torch.no_grad()
def test_generate_with_and_without_instruction(tiny_llama_dir):
    model, tok = _load(tiny_llama_dir)
    enc = tok(["Who is the CEO of Apple?"], return_tensors="pt")
    lm = InstructedLM(model, tok, _bank(model), encoder=FixedEncoder(0.9))
    plain = lm.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, model.generate(**enc, max_new_tokens=5, do_sample=False))
    ins = "The CEO of Apple is Tim Cook."
    out = lm.generate(**enc, instructions=[ins], max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    # manual greedy decoding with full forwards (no KV cache) gives the same tokens
    ids = enc["input_ids"]
    for _ in range(5):
        nxt = lm(input_ids=ids, attention_mask=torch.ones_like(ids), instructions=[ins]).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(out, ids)


def test_providers_pick_instructions():
    gold = GoldInstructions([("Fact A.", ["Question A?"]), ("Fact B.", ["Question B?", "Rephrase B?"])], FixedEncoder())
    chosen = gold.choose(["Question A? x", "Rephrase B? y z", "Question B?"])
    assert [c.instruction for c in chosen] == ["Fact A.", "Fact B.", "Fact B."]
    assert [c.question for c in chosen] == ["Question A?", "Rephrase B?", "Question B?"]
    # B's locality probe is A's own question: in a batch with both edits it belongs to A (A changed it)
    batch = GoldInstructions([("Fact B.", ["Question B?", "Question A?"]), ("Fact A.", ["Question A?"])], FixedEncoder(),
                             own_prompts=[["Question B?"], ["Question A?"]])
    assert [c.instruction for c in batch.choose(["Question A? x", "Question B? y"])] == ["Fact A.", "Fact B."]

    class Memory:
        def select(self, query, gate, top_k):
            return type("Hit", (), {"text": "Fact A."})() if "A" in query else None

    retrieved = RetrievedInstructions(Memory(), prompts=["Question A?"]).choose(["Question A? answer", "Other?"])
    assert retrieved[0].instruction == "Fact A." and retrieved[0].question == "Question A?"
    assert retrieved[1] is None


def test_instruction_of_request():
    assert instruction_of({"instruction": " Given. ", "prompt": "p", "target_new": "t"}) == "Given."
    assert instruction_of({"prompt": "When was X launched?", "target_new": "2006"}) == "When was X launched? 2006."
    assert instruction_of({"prompt": "The capital of France is", "target_new": "Rome"}) == "The capital of France is Rome."
    with pytest.raises(RequestError):
        instruction_of({"target_new": "x"})
    req = {"prompt": "p?", "rephrase_prompt": "r?", "locality": {"n": {"prompt": ["l1", "l2"], "ground_truth": ["a", "b"]}},
           "portability": {"o": {"prompt": "q?", "ground_truth": "a"}}}
    assert request_prompts(req) == ["p?", "r?", "q?", "l1", "l2"]


def test_template_with_bos_tokenizer(tiny_llama_dir):
    """A tokenizer that adds BOS: one BOS at the start, the question's own BOS is dropped."""
    _, tok = _load(tiny_llama_dir)

    class BosTok:
        bos_token_id = 2
        pad_token_id = 0
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([2] if add_special_tokens else []) + ids}

    template = InstructionTemplate(BosTok())
    prefix = template.encode_instruction("Fact.")
    assert prefix.ids[0] == 2 and prefix.ids.count(2) == 1
    assert template.strip_bos([2, 5, 6]) == [5, 6]


@pytest.mark.parametrize("mode", ["paper", "release"])
def test_a_rows_logits_do_not_depend_on_the_padding_of_its_batch(tiny_llama_dir, mode):
    """Prefix keys carry no rotary embedding: with positions counted from the padded start, a row's
    attention to them would change with the padding its batch gives it (it did, by up to 0.2 in logits,
    until ``InstructedLM.run`` passed positions that skip the padding)."""
    model, tok = _load(tiny_llama_dir)
    bank = _bank(model)
    lm = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.6), mode=mode)
    facts = ["The capital of France is Rome.", "Tim Cook leads Apple, a company in California, since 2011."]
    question = "What is the capital of France? Paris"
    with torch.no_grad():
        alone = lm(**tok([question], return_tensors="pt"), instructions=facts[:1]).logits[0]
        enc = tok([question, question], return_tensors="pt", padding=True)
        batched = lm(**enc, instructions=facts).logits  # row 0's instruction is shorter: it gets padding
    torch.testing.assert_close(batched[0][enc["attention_mask"][0].bool()], alone, atol=2e-5, rtol=0)


def test_prefix_keys_values_are_projected_once_across_calls(tiny_llama_dir, monkeypatch):
    """Each call attaches the bank anew, but the prefixes' keys/values are projected only on the first call (the
    wrapper's memo outlives the attachment); later calls give bit-identical logits; an in-place update of the bank
    (as an optimizer step makes) projects them again, and the new logits are the fresh wrapper's."""
    from instructedit_plugin.instructed import prefix as prefix_module

    model, tok = _load(tiny_llama_dir)
    bank = _bank(model)
    projected = []
    real = prefix_module.project_prefix_kv
    monkeypatch.setattr(prefix_module, "project_prefix_kv", lambda *a, **k: projected.append(1) or real(*a, **k))
    lm = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.6))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        first = lm(**enc, instructions="The capital of France is Rome.").logits
        assert len(projected) == len(bank.layers)
        second = lm(**enc, instructions="The capital of France is Rome.").logits
        assert len(projected) == len(bank.layers) and torch.equal(first, second)
        assert get_instructed_handle(model) is None  # the stock model between calls
        bank.embeddings.mul_(1.5)
        third = lm(**enc, instructions="The capital of France is Rome.").logits
        assert len(projected) == 2 * len(bank.layers) and not torch.allclose(third, first)
        fresh = InstructedLM(model, tok, bank, encoder=FixedEncoder(0.6))(**enc, instructions="The capital of France is Rome.")
        assert torch.equal(third, fresh.logits)
