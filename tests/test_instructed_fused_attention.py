"""InstructEd layers in torch's SDPA (the fused kernel, #15 item 3) give the eager path's outputs and gradients.

``paper`` multiplies the probabilities of the prefix and instruction columns by one ``sim`` per example for every
row, which equals SDPA over the same scores with those columns' *values* scaled by ``sim``; the fused kernel uses
that wherever the weights do not depend on the row. These tests run the tiny LLaMA / Qwen2 / Gemma 3 / GPT-2 with
prefixes, left padding and two different ``sim``s through both paths (``InstructedHandle.fused_attention``) and
check that the fused one was taken, that logits and prefix gradients agree to float32 rounding, and that rows
which may attend to nothing still give zeros.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructedit_plugin.instructed import attention as attention_module
from instructedit_plugin.instructed.attention import (
    HANDLE_ATTR,
    instructed_attention_forward,
    instructed_attention_mask,
)
from instructedit_plugin.instructed.context import instruction_context
from instructedit_plugin.instructed.prefix import attach_instructed, detach_instructed
from tests.support.tiny_models import TINY_ARCHS, tiny_config

ARCHS = list(TINY_ARCHS)
PREFIX_LAYERS = [1, 2]
N_PAD, SEQ = 4, 14
SPANS = [(N_PAD, N_PAD + 5), (0, 6)]
SIM = torch.tensor([0.6, 0.3])
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _model(arch: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    return model.eval()


def _batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :N_PAD], mask[0, :N_PAD] = 0, 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _run(model, handle, fused: bool, ids, mask, positions, spans=SPANS, sim=SIM):
    """Logits (every position, padding included) and the prefix embeddings' gradient of one path."""
    handle.fused_attention = fused
    handle.bank.embeddings.grad = None
    with instruction_context(spans=spans, sim=sim):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits.float().square().mean().backward()
    return logits.detach(), handle.bank.embeddings.grad.clone()


def _count_fused(monkeypatch) -> list:
    calls = []
    real = attention_module._fused_core
    monkeypatch.setattr(attention_module, "_fused_core", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["paper", "none"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_kernel_gives_the_eager_logits_and_gradients(arch, mode, monkeypatch):
    model = _model(arch)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode=mode)
    try:
        with torch.no_grad():
            handle.bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        ids, mask, positions = _batch(model)
        eager_logits, eager_grad = _run(model, handle, False, ids, mask, positions)
        calls = _count_fused(monkeypatch)
        fused_logits, fused_grad = _run(model, handle, True, ids, mask, positions)
        # paper re-weights the instruction columns in every layer; none only changes the prefix layers
        assert len(calls) == (model.config.num_hidden_layers if mode == "paper" else len(PREFIX_LAYERS))
        torch.testing.assert_close(fused_logits, eager_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(fused_grad, eager_grad, atol=ATOL, rtol=1e-4)
        assert eager_grad.abs().sum() > 0
        # the re-weighting is really applied: the same run with sim = 1 gives other logits
        other, _ = _run(model, handle, True, ids, mask, positions, sim=torch.ones(2))
        assert (mode == "none") == torch.allclose(other, fused_logits, atol=1e-4)
    finally:
        detach_instructed(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_question_rows_takes_the_fused_kernel_only_where_no_row_precedes_the_instruction_end(arch, monkeypatch):
    """A full forward re-weights only the rows after the instruction (row-dependent: eager); a forward whose rows
    all follow the instruction (spans before the first column) is fused and equals the eager path."""
    model = _model(arch)
    handle = attach_instructed(model, layers=PREFIX_LAYERS, mode="question_rows")
    try:
        with torch.no_grad():
            handle.bank.embeddings.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        ids, mask, positions = _batch(model)
        calls = _count_fused(monkeypatch)
        _run(model, handle, True, ids, mask, positions)
        assert calls == []  # rows before the instruction's end keep their probabilities: not fused
        ids, mask, positions = ids[1:], mask[1:], positions[1:]
        with torch.no_grad():
            cache = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6],
                          use_cache=True).past_key_values  # the instruction's rows, prefixes on, no sim
        calls.clear()
        results = {}
        for fused in (False, True):
            handle.fused_attention = fused
            with torch.no_grad(), instruction_context(spans=[(0, 6)], sim=0.4):
                step_cache = type(cache)(config=model.config)
                for i, layer in enumerate(cache.layers):
                    step_cache.update(layer.keys.clone(), layer.values.clone(), i)
                results[fused] = model(input_ids=ids[:, 6:], attention_mask=mask, position_ids=positions[:, 6:],
                                       past_key_values=step_cache).logits
        assert len(calls) == model.config.num_hidden_layers
        torch.testing.assert_close(results[True], results[False], atol=ATOL, rtol=0)
    finally:
        detach_instructed(model)


class _FakeAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_idx = 0
        self.is_causal = True


def test_rows_that_attend_to_nothing_give_zeros_and_finite_gradients():
    """A left-padding row outside prefix layers sees no key: zeros in both paths, and no NaN in the backward."""
    g = torch.Generator().manual_seed(0)
    b, h, q, d = 2, 2, 6, 4
    query, key, value = (torch.randn(b, h, q, d, generator=g, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask4d = instructed_attention_mask(batch_size=b, q_length=q, kv_length=q, attention_mask=pad.bool())
    module = _FakeAttention()
    handle = type("H", (), {})()
    handle.attached, handle.layer_set, handle.prefix_enabled = True, frozenset(), False
    handle.mode, handle.base_implementation = "paper", "sdpa"
    setattr(module, HANDLE_ATTR, handle)
    outs, grads = {}, {}
    for fused in (False, True):
        handle.fused_attention = fused
        with instruction_context(spans=[(2, 4), (1, 3)], sim=torch.tensor([0.25, 0.7])):
            out, probs = instructed_attention_forward(module, query, key, value, mask4d, scaling=d**-0.5)
        assert (probs is None) == fused
        (grads[fused],) = torch.autograd.grad(out.square().sum(), [value])
        outs[fused] = out.detach()
    assert (outs[True][0, :2] == 0).all() and (outs[False][0, :2] == 0).all()
    torch.testing.assert_close(outs[True], outs[False], atol=ATOL, rtol=0)
    assert torch.isfinite(grads[True]).all()
    torch.testing.assert_close(grads[True], grads[False], atol=ATOL, rtol=0)


def test_the_attention_kernel_hparam_picks_the_path_through_easyedits_apply(instructed_world, monkeypatch):
    """``attention_kernel: eager`` (how results committed before the fused kernel were made) runs no fused layer;
    the default ``fused`` runs them, with the same answers up to float rounding; a bad value names the field."""
    from instructedit_plugin.errors import HyperParamsError
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, reset_memory
    from instructedit_plugin.models.loading import load_causal_lm

    model, tok = load_causal_lm(instructed_world["base_dir"])
    model.eval()
    base = dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                archive=str(instructed_world["archive"]), device="cpu")
    edit = dict(instructed_world["test"][0])
    enc = tok([edit["prompt"]], return_tensors="pt")
    logits, counts = {}, {}
    for kernel in ("eager", "fused"):
        hp = InstructEdHyperParams.from_dict(dict(base, attention_kernel=kernel))
        reset_memory(model)
        lm, _ = apply_instructed_to_model(model, tok, [dict(edit)], hp, keep_original_weight=False)
        calls = _count_fused(monkeypatch)
        with torch.no_grad():
            logits[kernel] = lm(**enc).logits
        counts[kernel] = len(calls)
        monkeypatch.undo()
    reset_memory(model)
    assert counts["eager"] == 0 and counts["fused"] == model.config.num_hidden_layers
    torch.testing.assert_close(logits["fused"], logits["eager"], atol=ATOL, rtol=0)
    with pytest.raises(HyperParamsError) as err:
        InstructEdHyperParams.from_dict(dict(base, attention_kernel="flash"))
    assert err.value.field == "attention_kernel" and "Fix:" in str(err.value)
