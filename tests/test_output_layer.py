"""``models.output_layer``: a frozen model's output layer gets standard-strided inputs during ``generate``.

torch sends ``F.linear`` with a frozen weight and ``generate``'s one-token view ``hidden[:, -1:, :]`` down a
path that copies the whole weight per token (3 s instead of 65 ms per token on Gemma-3-270M; see the module).
These tests check what makes the difference -- the strides the output layer receives -- and that the logits
and generated tokens are unchanged; the timing itself is a benchmark figure, not a unit test.
"""
from __future__ import annotations

import torch

from instructedit_plugin.instructed.prefix import attach_instructed
from instructedit_plugin.instructedit.editable import InstructEditModel
from instructedit_plugin.models.loading import load_causal_lm
from instructedit_plugin.models.output_layer import has_standard_strides, keep_output_layer_dense

from .test_instructedit_editing import training_config


def test_standard_strides_tells_generates_view_from_a_fresh_tensor():
    hidden = torch.randn(1, 7, 16)
    view = hidden[:, -1:, :]
    assert view.is_contiguous() and not has_standard_strides(view)  # why .contiguous() is no fix
    assert has_standard_strides(view.clone(memory_format=torch.contiguous_format))
    assert has_standard_strides(torch.randn(2, 3, 16)) and not has_standard_strides(hidden.transpose(1, 2))


def _head_inputs(model):
    """Record the strides-check of every input the output layer's forward receives (after pre-hooks)."""
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(has_standard_strides(args[0])))
    return seen


def _generate(model, tok):
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)


def test_attach_instructed_freezes_with_the_hook_and_detach_takes_it_off(tiny_gemma3_dir):
    model, tok = load_causal_lm(tiny_gemma3_dir)
    model.eval()
    seen = _head_inputs(model)
    expected = _generate(model, tok)
    assert False in seen  # generate feeds the output layer a non-standard view (the case the hook exists for)
    handle = attach_instructed(model, layers=[0], freeze=True)
    handle.prefix_enabled = False  # stock attention: only the hook differs from the run above
    assert not any(p.requires_grad for p in model.parameters())
    seen.clear()
    assert torch.equal(_generate(model, tok), expected)
    assert seen and all(seen)
    handle.detach()
    seen.clear()
    assert torch.equal(_generate(model, tok), expected)
    assert False in seen  # the hook went with the handle


def test_the_hook_keeps_the_logits_bit_identical(tiny_gemma3_dir):
    model, tok = load_causal_lm(tiny_gemma3_dir)
    model.eval()
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**enc).last_hidden_state
        view = hidden[:, -1:, :]
        expected = model.get_output_embeddings()(view.clone(memory_format=torch.contiguous_format))
        assert keep_output_layer_dense(model) is not None
        assert keep_output_layer_dense(model) is None  # once per layer
        assert torch.equal(model.get_output_embeddings()(view), expected)


def test_instructedit_editable_model_freezes_with_the_hook(tiny_gpt2_dir, tmp_path):
    model, tok = load_causal_lm(tiny_gpt2_dir)
    model.eval()
    cfg = training_config(tiny_gpt2_dir, tmp_path)
    wrapper = InstructEditModel(model, cfg)
    assert not any(p.requires_grad for p in wrapper.model.parameters())
    seen = _head_inputs(wrapper.model)
    _generate(wrapper.model, tok)
    assert seen and all(seen)
