"""InstructEd attention integration (prefixes + Eq. 15 re-weighting) on the four tiny architectures."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from instructedit_plugin.errors import HyperParamsError, PluginError, RequestError
from instructedit_plugin.instructed.attention import (
    HANDLE_ATTR,
    INSTRUCTED_ATTENTION,
    instructed_attention_forward,
    instructed_attention_mask,
)
from instructedit_plugin.instructed.context import (
    InstructionContext,
    current_instruction_context,
    instruction_context,
)
from instructedit_plugin.instructed.prefix import (
    PrefixBank,
    attach_instructed,
    default_prefix_layers,
    detach_instructed,
    find_attention_modules,
    get_instructed_handle,
)
from tests.support.tiny_models import TINY_ARCHS, tiny_config

ARCHS = list(TINY_ARCHS)
PREFIX_LAYERS = [1, 2]  # a contiguous middle block of the 4-layer tiny models
PAD = 0
N_PAD = 4  # left padding of example 0
SEQ = 14
SPANS = [(N_PAD, N_PAD + 5), (0, 6)]  # instruction spans in padded coordinates
ATOL = 1e-5


def _build(arch: str, attn: str = "sdpa", seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: fixed-length greedy decoding
    model.generation_config.pad_token_id = PAD
    return model


def _batch(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :N_PAD] = PAD
    mask[0, :N_PAD] = 0
    return ids, mask


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits


def _generate(model, ids, mask, n=6):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def _real(logits, mask):
    """Logits of the non-padded positions only (padded rows are never used)."""
    return logits[mask.bool()]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def models():
    cache = {}

    def get(arch, attn="sdpa"):
        if (arch, attn) not in cache:
            cache[(arch, attn)] = _build(arch, attn)
        return cache[(arch, attn)]

    yield get
    for model in cache.values():
        detach_instructed(model)


# ----------------------------------------------------------------------------------------------
# registration and stock equivalence
# ----------------------------------------------------------------------------------------------
def test_attention_and_mask_functions_are_registered_under_one_name():
    assert ALL_ATTENTION_FUNCTIONS[INSTRUCTED_ATTENTION] is instructed_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[INSTRUCTED_ATTENTION] is instructed_attention_mask


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_prefix_sim_one_equals_stock(models, arch, base):
    model = models(arch, base)
    ids, mask = _batch(model)
    ref = _forward(model, ids, mask)
    check_generate = base == "sdpa"  # generate() is the slow part; the eager base is checked on forward
    if check_generate:
        ref_seq, ref_gen = _generate(model, ids, mask, n=4)

    handle = attach_instructed(model, layers=PREFIX_LAYERS, prefix_len=5)
    assert model.config._attn_implementation == INSTRUCTED_ATTENTION
    assert handle.base_implementation == base
    # (a) the re-weighting path itself (spans + sim = 1, prefix off) is the custom eager computation
    with instruction_context(spans=SPANS, sim=torch.ones(2), use_prefix=False):
        out = _forward(model, ids, mask)
        if check_generate:
            seq, gen = _generate(model, ids, mask, n=4)
    torch.testing.assert_close(_real(out, mask), _real(ref, mask), atol=ATOL, rtol=0)
    if check_generate:
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(gen, ref_gen, atol=ATOL, rtol=0)
    # (b) no context and prefixes switched off on the handle: delegated to the stock implementation
    handle.prefix_enabled = False
    torch.testing.assert_close(_real(_forward(model, ids, mask), mask), _real(ref, mask), atol=ATOL, rtol=0)
    if check_generate:
        seq, gen = _generate(model, ids, mask, n=4)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(gen, ref_gen, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_restores_stock_outputs_exactly(models, arch):
    model = models(arch)
    ids, mask = _batch(model)
    ref = _forward(model, ids, mask)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = attach_instructed(model, layers=PREFIX_LAYERS)
    assert get_instructed_handle(model) is handle
    with instruction_context(spans=SPANS, sim=0.3):
        assert not torch.allclose(_forward(model, ids, mask), ref)
    handle.detach()
    assert model.config._attn_implementation == "sdpa"
    assert get_instructed_handle(model) is None
    assert not any(hasattr(m, HANDLE_ATTR) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with instruction_context(spans=SPANS, sim=0.3):  # a context has no effect on a detached model
        assert torch.equal(_forward(model, ids, mask), ref)
    assert torch.equal(_forward(model, ids, mask), ref)
    handle.detach()  # idempotent
    # attach again works, and the context-manager form detaches on exit
    with attach_instructed(model, layers=PREFIX_LAYERS):
        assert model.config._attn_implementation == INSTRUCTED_ATTENTION
    assert torch.equal(_forward(model, ids, mask), ref)


# ----------------------------------------------------------------------------------------------
# training: only the prefixes learn
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reaches_only_prefix_embeddings(models, arch):
    model = models(arch)
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, prefix_len=5)
    assert [p for p in model.parameters() if p.requires_grad] == []
    assert [p is handle.bank.embeddings for p in handle.parameters()] == [True]
    model.train()
    try:
        with instruction_context(spans=SPANS, sim=torch.tensor([0.8, 0.4])):
            out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())
    grad = handle.bank.embeddings.grad
    assert grad is not None and grad.shape == (len(PREFIX_LAYERS), 5, model.config.hidden_size)
    assert all(grad[i].abs().sum() > 0 for i in range(len(PREFIX_LAYERS)))


# ----------------------------------------------------------------------------------------------
# re-weighting (Eq. 15)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_reweighting_only_acts_on_instruction_spans(models, arch):
    model = models(arch)
    ids, mask = _batch(model)
    ref = _forward(model, ids, mask)
    attach_instructed(model, layers=PREFIX_LAYERS)
    with instruction_context(spans=None, sim=0.5, use_prefix=False):
        assert torch.equal(_forward(model, ids, mask), ref)
    with instruction_context(spans=[None, (3, 3)], sim=0.5, use_prefix=False):
        assert torch.equal(_forward(model, ids, mask), ref)
    with instruction_context(spans=[None, (2, 7)], sim=0.5, use_prefix=False):
        out = _forward(model, ids, mask)
    # example 0 has no span: unchanged; example 1 changes from its first instruction token on
    torch.testing.assert_close(_real(out[:1], mask[:1]), _real(ref[:1], mask[:1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :2], ref[1, :2], atol=ATOL, rtol=0)
    assert (out[1, 2:] - ref[1, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["paper", "release"])
@pytest.mark.parametrize("arch", ARCHS)
def test_negative_sim_is_zero_and_never_unmasks(models, arch, mode):
    model = models(arch)
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode=mode)
    spans = [(0, N_PAD + 5), (0, 6)]  # example 0's span also covers its padding
    with instruction_context(spans=spans, sim=torch.tensor([-2.0, -0.5])):
        neg = _forward(model, ids, mask)
    with instruction_context(spans=spans, sim=torch.zeros(2)):
        zero = _forward(model, ids, mask)
    assert torch.isfinite(_real(neg, mask)).all()
    torch.testing.assert_close(_real(neg, mask), _real(zero, mask), atol=ATOL, rtol=0)

    other = ids.clone()
    other[0, :N_PAD] = torch.arange(N_PAD) + 7  # different ids at the padded positions
    future = ids.clone()
    future[:, -1] = (future[:, -1] + 1) % model.config.vocab_size  # a different last token
    with instruction_context(spans=spans, sim=-1.0):
        base = _forward(model, ids, mask)
        padded = _forward(model, other, mask)
        changed = _forward(model, future, mask)
    torch.testing.assert_close(_real(padded, mask), _real(base, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(changed[:, :-1], base[:, :-1], atol=ATOL, rtol=0)
    assert handle.mode == mode


@pytest.mark.parametrize("arch", ARCHS)
def test_release_mode_differs_from_paper_mode(models, arch):
    model = models(arch)
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode="paper")
    with instruction_context(spans=SPANS, sim=torch.tensor([0.5, 0.3])):
        paper = _forward(model, ids, mask)
        handle.mode = "release"
        release = _forward(model, ids, mask)
    assert (_real(paper, mask) - _real(release, mask)).abs().max() > 1e-3
    with instruction_context(spans=SPANS, sim=1.0):  # sim = 1 is the identity in both modes
        release_one = _forward(model, ids, mask)
        handle.mode = "paper"
        paper_one = _forward(model, ids, mask)
    torch.testing.assert_close(_real(release_one, mask), _real(paper_one, mask), atol=ATOL, rtol=0)
    with pytest.raises(HyperParamsError):
        handle.mode = "bogus"


# ----------------------------------------------------------------------------------------------
# prefixes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_changes_logits_per_example(models, arch):
    model = models(arch)
    ids, mask = _batch(model)
    ref = _forward(model, ids, mask)
    handle = attach_instructed(model, layers=PREFIX_LAYERS)
    with torch.no_grad():
        handle.bank.embeddings.normal_(0.0, 1.0)
    on = _forward(model, ids, mask)  # no context: the handle's default (prefix on)
    assert (_real(on, mask) - _real(ref, mask)).abs().amax(dim=-1).min() > 1e-4  # every real position changes
    with instruction_context(use_prefix=[True, False]):
        mixed = _forward(model, ids, mask)
    torch.testing.assert_close(_real(mixed[:1], mask[:1]), _real(on[:1], mask[:1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], ref[1], atol=ATOL, rtol=0)
    # layers before the prefix block are untouched, the first prefix layer changes its output
    with torch.no_grad():
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), output_hidden_states=True)
        hs_on = model(**kwargs).hidden_states
        with instruction_context(use_prefix=False):
            hs_off = model(**kwargs).hidden_states
    first = PREFIX_LAYERS[0]
    torch.testing.assert_close(hs_on[first][mask.bool()], hs_off[first][mask.bool()], atol=0, rtol=0)
    assert (hs_on[first + 1][mask.bool()] - hs_off[first + 1][mask.bool()]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("mode", ["paper", "release"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_matches_full_forward(models, arch, mode):
    """Prefixes are re-added at every decoding step and instruction columns stay re-weighted via the cache.

    Gemma 3's sliding window (8) is shorter than prompt + generated tokens, so its sliding caches roll over.
    """
    model = models(arch)
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode=mode)
    with torch.no_grad():
        handle.bank.embeddings.normal_(0.0, 1.0)
    n_new = 8
    with instruction_context(spans=SPANS, sim=torch.tensor([0.6, 0.3])):
        seq, gen_logits = _generate(model, ids, mask, n=n_new)
        full_mask = torch.cat([mask, torch.ones(2, n_new, dtype=mask.dtype)], dim=-1)
        full = _forward(model, seq, full_mask)
    torch.testing.assert_close(gen_logits, full[:, SEQ - 1 : SEQ - 1 + n_new], atol=ATOL, rtol=0)
    # step-by-step decoding reproduces the full forward as well (explicit cache loop)
    with torch.no_grad(), instruction_context(spans=SPANS, sim=torch.tensor([0.6, 0.3])):
        out = model(input_ids=seq[:, :SEQ], attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        cache, last = out.past_key_values, [out.logits[:, -1]]
        for t in range(SEQ, SEQ + 3):
            step_mask = full_mask[:, : t + 1]
            out = model(
                input_ids=seq[:, t : t + 1], attention_mask=step_mask, past_key_values=cache,
                position_ids=_positions(step_mask)[:, -1:], use_cache=True,
            )
            cache = out.past_key_values
            last.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(last, 1), full[:, SEQ - 1 : SEQ + 3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_kv_are_the_layers_own_keys_values_without_rope(models, arch):
    """Prefix K/V == what the frozen layer itself computes for those hidden states with an identity rotation.

    The layer is run directly on the prefix embeddings with cos = 1, sin = 0 (RoPE switched off; GPT-2 has
    none), and the key/value it hands to the attention function are captured: this checks the projection,
    the head split, Qwen2's biases and Gemma 3's k_norm without re-implementing any of them.
    """
    model = models(arch)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, prefix_len=3)
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured["kv"] = (key, value)
        return torch.zeros_like(query).transpose(1, 2), None

    AttentionInterface.register("instructed_test_capture", capture)
    AttentionMaskInterface.register("instructed_test_capture", instructed_attention_mask)
    module = find_attention_modules(model)[2]
    emb = handle.bank.embedding(2).detach()[None]  # [1, P, hidden]
    model.set_attn_implementation("instructed_test_capture")
    try:
        with torch.no_grad():
            if arch == "gpt2":
                module(emb)
            else:
                head_dim = module.head_dim
                rope = (torch.ones(1, 3, head_dim), torch.zeros(1, 3, head_dim))
                module(emb, position_embeddings=rope, attention_mask=None)
    finally:
        model.set_attn_implementation(INSTRUCTED_ATTENTION)
    key, value = captured["kv"]
    with torch.no_grad():
        pk, pv = handle.prefix_key_value(module, 2, num_kv_heads=key.shape[1])
    torch.testing.assert_close(pk, key, atol=1e-6, rtol=0)
    torch.testing.assert_close(pv, value, atol=1e-6, rtol=0)


def test_beam_search_expands_the_context(models):
    model = models("qwen2")
    ids, mask = _batch(model)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**kwargs)
    attach_instructed(model, layers=PREFIX_LAYERS)
    # per-example spans/sim/use_prefix are repeated for the 2 beams of each example (batch 2 -> 4)
    with torch.no_grad(), instruction_context(spans=SPANS, sim=[1.0, 1.0], use_prefix=[False, False]):
        assert torch.equal(model.generate(**kwargs), ref)


def test_prefix_kv_memo_follows_parameter_updates(models):
    model = models("llama")
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS)
    first = _forward(model, ids, mask)
    assert torch.equal(_forward(model, ids, mask), first)  # memoised K/V give identical results
    with torch.no_grad():
        handle.bank.embeddings.mul_(10.0)  # an optimizer-style in-place update
    assert not torch.allclose(_forward(model, ids, mask), first)


# ----------------------------------------------------------------------------------------------
# exact semantics of the attention function on small tensors
# ----------------------------------------------------------------------------------------------
class _FakeAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_idx = 0
        self.is_causal = True


@pytest.mark.parametrize("mask_kind", ["bool", "float16"])
@pytest.mark.parametrize("mode", ["paper", "release"])
def test_reweighting_semantics_on_probabilities_and_rows(mode, mask_kind):
    g = torch.Generator().manual_seed(0)
    b, h, q, d = 2, 2, 6, 4
    query, key, value = (torch.randn(b, h, q, d, generator=g) for _ in range(3))
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask4d = instructed_attention_mask(batch_size=b, q_length=q, kv_length=q, attention_mask=pad.bool())
    module = _FakeAttention()
    handle = type("H", (), {})()  # minimal duck-typed handle: no prefix layers
    handle.attached, handle.layer_set, handle.prefix_enabled = True, frozenset(), False
    handle.mode, handle.base_implementation = mode, "sdpa"
    handle.fused_attention = False  # the eager path returns the probabilities this test checks
    setattr(module, HANDLE_ATTR, handle)
    spans = [(1, 3), (2, 4)]
    sim = torch.tensor([0.25, -1.0])  # the negative one acts as 0
    given = mask4d
    if mask_kind == "float16":  # a user-built additive mask (no offsets tag): same result expected
        given = torch.where(mask4d, 0.0, torch.finfo(torch.float16).min).to(torch.float16)
    with instruction_context(spans=spans, sim=sim):
        out, probs = instructed_attention_forward(module, query, key, value, given, scaling=d**-0.5)
        handle.fused_attention = True  # paper: the fused kernel (no probabilities), the same output to rounding
        fused_out, fused_probs = instructed_attention_forward(module, query, key, value, given, scaling=d**-0.5)

    scores = query @ key.transpose(-1, -2) * d**-0.5
    bias = torch.where(mask4d, 0.0, torch.finfo(torch.float32).min)
    pos = torch.arange(q)
    s = torch.tensor([0.25, 0.0])
    inside = torch.stack([(pos >= a) & (pos < e) for a, e in spans])  # [b, q]
    if mode == "paper":  # key columns, after the softmax, not renormalised
        w = torch.where(inside, s[:, None], 1.0)[:, None, None, :]
        expected = torch.softmax(scores + bias, -1) * w
    else:  # query rows, before the softmax, mask added afterwards
        r = torch.where(inside, s[:, None], 1.0)[:, None, :, None]
        expected = torch.softmax(scores * r + bias, -1)
    expected = expected.masked_fill(~mask4d.any(-1, keepdim=True), 0.0)  # a fully padded row: zeros, like SDPA
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert (probs[0, :, :, 0] == 0).all()  # the padded key column stays masked in every mode
    assert (probs.triu(1) == 0).all()  # causal: nothing above the diagonal
    torch.testing.assert_close(out, (expected @ value).transpose(1, 2), atol=1e-6, rtol=0)
    if mode == "paper":
        assert fused_probs is None
        torch.testing.assert_close(fused_out, (expected @ value).transpose(1, 2), atol=1e-5, rtol=0)
    else:  # release re-weights query rows: always eager
        assert torch.equal(fused_out, out) and fused_probs is not None


# ----------------------------------------------------------------------------------------------
# API / validation
# ----------------------------------------------------------------------------------------------
def test_context_validation_and_batch_expansion():
    assert current_instruction_context() is None
    with instruction_context(spans=[(0, 2), None], sim=[0.5, 2.0]) as ctx:
        assert current_instruction_context() is ctx
        with instruction_context(sim=0.1) as inner:
            assert current_instruction_context() is inner
        assert current_instruction_context() is ctx
        assert ctx.spans_for(4, torch.device("cpu")).tolist() == [[0, 2], [0, 2], [0, 0], [0, 0]]
        assert ctx.sim_for(2, torch.device("cpu")).tolist() == [0.5, 1.0]
        with pytest.raises(RequestError):
            ctx.spans_for(3, torch.device("cpu"))
    assert current_instruction_context() is None
    for bad in ([(3, 1)], [(-1, 2)], [("a", 2)], torch.zeros(2, 3, dtype=torch.long)):
        with pytest.raises(RequestError):
            InstructionContext.build(spans=bad)
    with pytest.raises(RequestError):
        InstructionContext.build(sim=float("nan"))
    with pytest.raises(RequestError):
        InstructionContext.build(spans=[(0, 1)] * 2, sim=[0.1, 0.2, 0.3])


def test_attach_validation(models):
    model = models("gpt2")
    assert default_prefix_layers(4) == [1] and default_prefix_layers(12) == [4, 5, 6, 7]
    with pytest.raises(HyperParamsError):
        attach_instructed(model, layers=[1, 9])
    with pytest.raises(HyperParamsError):
        attach_instructed(model, layers=[1], mode="bogus")
    bank = PrefixBank([1, 2], prefix_len=3, hidden_size=model.config.hidden_size)
    handle = attach_instructed(model, bank=bank)
    assert handle.bank is bank and handle.layers == (1, 2)
    with pytest.raises(PluginError):
        attach_instructed(model)
    handle.detach()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(HyperParamsError):
        PrefixBank([1], prefix_len=0, hidden_size=8)


@pytest.mark.parametrize("mode", ["paper", "question_rows", "pre_softmax", "release"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_independent_tensors_are_computed_once_per_mask_with_identical_outputs(models, arch, mode, monkeypatch):
    """The bias / re-weighting factors every layer shares are built once per mask and call (not once per layer):
    fewer builds than attention calls, and forward and cached generation bit-identical to building them per layer
    (Gemma 3's sliding window rolls over during generation: equal shapes, new masks)."""
    from instructedit_plugin.instructed import attention as attention_module

    model = models(arch)
    ids, mask = _batch(model)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode=mode)
    with torch.no_grad():
        handle.bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    builds, calls = [], []
    real_layout, real_core = attention_module._layout, attention_module._instructed_core
    real_fused = attention_module._fused_core
    monkeypatch.setattr(attention_module, "_layout", lambda *a, **k: builds.append(1) or real_layout(*a, **k))
    monkeypatch.setattr(attention_module, "_instructed_core", lambda *a, **k: calls.append(1) or real_core(*a, **k))
    monkeypatch.setattr(attention_module, "_fused_core", lambda *a, **k: calls.append(1) or real_fused(*a, **k))

    def run():
        with instruction_context(spans=SPANS, sim=torch.tensor([0.6, 0.3])):
            return _forward(model, ids, mask), _generate(model, ids, mask, n=8)

    forward, (seq, gen_logits) = run()
    n_layers = model.config.num_hidden_layers
    assert 0 < len(builds) < len(calls) and len(calls) >= n_layers
    # _layout_for(ctx, module, mask, batch, q, kv, n_prefix, device, dtype, plan, default_on, fused)
    per_layer = lambda ctx, module, mask_, *rest: real_layout(module, mask_, *rest[:-2], fused=rest[-1])  # noqa: E731
    monkeypatch.setattr(attention_module, "_layout_for", per_layer)
    want_forward, (want_seq, want_logits) = run()
    assert torch.equal(forward, want_forward) and torch.equal(seq, want_seq) and torch.equal(gen_logits, want_logits)
