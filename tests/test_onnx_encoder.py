"""``encoder_backend: onnx`` (#15 item 3): the paper's sentence encoder run by ONNX Runtime.

The backend must compute the *same function* as sentence-transformers (same float32 weights, tokenizer, pooling,
normalisation): vectors within float rounding for single texts, padded batches (a pooling that ignored the mask
would move the short texts' vectors) and batches split over ``batch_size``; ``cls`` pooling and a stack without
``Normalize`` too. InstructEd edited with it gives the torch backend's logits and retrieves the same edits. Stacks it
cannot export, ``bfloat16``, an unknown backend and a missing extra fail naming ``encoder_backend`` with a fix.
"""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from instructedit_plugin.errors import HyperParamsError  # noqa: E402
from instructedit_plugin.instructed.encoder import SentenceEncoder  # noqa: E402
from instructedit_plugin.instructed.onnx_encoder import OnnxSentenceModel, check_onnx_available  # noqa: E402

TEXTS = ["Who is the spouse of Barack Obama?", "a", "The capital of the country where the Eiffel Tower stands is Paris.",
         "Tim Cook leads Apple.", "Which company developed the first iPhone, and in which year was it released?"]
#: float rounding between two runtimes of the same float32 function (measured: at most 2e-7)
TOL = 2e-6


@pytest.fixture(scope="module")
def encoders():
    return SentenceEncoder(), SentenceEncoder(backend="onnx")


def test_onnx_vectors_are_sentence_transformers_vectors(encoders, monkeypatch):
    torch_enc, onnx_enc = encoders
    padded = onnx_enc.encode(TEXTS)  # one padded batch: lengths 2 to 20 tokens
    assert (padded - torch_enc.encode(TEXTS)).abs().max() < TOL
    for i, text in enumerate(TEXTS):  # each alone (no padding) equals its row of the padded batch
        assert (onnx_enc.encode([text])[0] - padded[i]).abs().max() < TOL
    assert torch.allclose(padded.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    split = SentenceEncoder(backend="onnx", batch_size=2).encode(TEXTS)  # three batches, the order kept
    assert (split - padded).abs().max() < TOL
    assert (onnx_enc.cosine(TEXTS[:2], TEXTS[2:4]) - torch_enc.cosine(TEXTS[:2], TEXTS[2:4])).abs().max() < TOL
    assert onnx_enc.encode([]).shape == (0, torch_enc.dim)
    assert onnx_enc.identity == torch_enc.identity  # a runtime, not another encoder
    session, calls = onnx_enc._entry.runner.session, []  # and the vectors above came from ONNX Runtime
    monkeypatch.setattr(onnx_enc._entry.runner, "session",
                        type("Counted", (), {"run": lambda self, *a: calls.append(1) or session.run(*a)})())
    onnx_enc.encode(TEXTS[:1])
    assert calls == [1] and torch_enc._entry.runner is None


def test_cls_pooling_and_a_stack_without_normalize(encoders):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    transformer = encoders[0].model[0]
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(),
                                                              pooling_mode="cls")], device="cpu").eval()
    want = model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=False)
    got = OnnxSentenceModel(model).embed(TEXTS, batch_size=8)
    assert float(want.norm(dim=1).min()) > 1.5  # not normalised: the stack has no Normalize
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())
    mean = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(),
                                                             pooling_mode="mean")], device="cpu").eval()
    assert (OnnxSentenceModel(mean).embed(TEXTS, 8) - got).abs().max() > 0.1  # the pooling mode is honoured


def test_what_onnx_cannot_run_is_refused_with_a_fix(encoders, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Pooling

    transformer = encoders[0].model[0]
    dim = transformer.get_embedding_dimension()
    for modules, words in (([transformer, Pooling(dim, pooling_mode="max")], "'max'"),
                           ([transformer, Pooling(dim), Dense(dim, 8)], "Transformer -> Pooling -> Dense")):
        with pytest.raises(HyperParamsError) as err:
            OnnxSentenceModel(SentenceTransformer(modules=modules, device="cpu"))
        assert err.value.field == "encoder_backend" and words in str(err.value)
        assert str(err.value).endswith("Fix: set encoder_backend: torch")
    with pytest.raises(HyperParamsError) as err:
        SentenceEncoder(backend="onnx", dtype="bfloat16")
    assert err.value.field == "encoder_backend" and "encoder_dtype: float32" in str(err.value)
    with pytest.raises(HyperParamsError) as err:
        SentenceEncoder(backend="tensorrt")
    assert err.value.field == "encoder_backend" and "torch, onnx" in str(err.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as without the extra
    with pytest.raises(HyperParamsError) as err:
        check_onnx_available()
    assert err.value.field == "encoder_backend" and "onnxruntime" in str(err.value)
    assert "pip install 'instructedit-plugin[onnx]'" in str(err.value)


def test_hparams_take_the_backend_and_refuse_bad_combinations(tiny_llama_dir):
    from instructedit_plugin.instructed import InstructEdHyperParams

    base = dict(alg_name="InstructEd", model_name=str(tiny_llama_dir), archive=str(tiny_llama_dir), device="cpu")
    assert InstructEdHyperParams.from_dict(base).encoder_backend == "torch"
    assert InstructEdHyperParams.from_dict(dict(base, encoder_backend="onnx")).encoder_backend == "onnx"
    for bad, words in ((dict(encoder_backend="tensorrt"), "tensorrt"),
                       (dict(encoder_backend="onnx", encoder_dtype="bfloat16"), "float32")):
        with pytest.raises(HyperParamsError) as err:
            InstructEdHyperParams.from_dict(dict(base, **bad))
        assert err.value.field == "encoder_backend" and words in str(err.value) and "Fix:" in str(err.value)


@torch.no_grad()
def test_instructed_editing_with_onnx_matches_torch(instructed_world):
    """Gold and retrieval edits of the tiny world: the onnx backend's logits are the torch backend's (sim moves by
    float rounding only) and retrieval hands every question the same instruction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, release

    base_dir = str(instructed_world["base_dir"])
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    requests = instructed_world["test"][:4]
    texts = [f"{r['prompt']} {r['target_new']}" for r in requests] + [r["rephrase_prompt"] for r in requests]
    out = {}
    for backend in ("torch", "onnx"):
        for source in ("gold", "retrieval"):
            hp = InstructEdHyperParams.from_dict(dict(
                alg_name="InstructEd", model_name=base_dir, archive=str(instructed_world["results_dir"]), device="cpu",
                max_length=40, instruction_source=source, encoder_backend=backend))
            batch = [dict(r) for r in requests] if source == "retrieval" else [dict(requests[0])]
            lm, _ = apply_instructed_to_model(model, tok, batch, hp, keep_original_weight=False)
            enc = tok(texts, return_tensors="pt", padding=True)
            picked = [editing_state(model).memory.select(t, gate=lm.provider.gate, top_k=lm.provider.top_k)
                      for t in texts] if source == "retrieval" else None
            out[backend, source] = lm(**enc).logits, picked, enc["attention_mask"].bool()
            release(model)
    for source in ("gold", "retrieval"):
        (want, picked, real), (got, picked_onnx, _) = out["torch", source], out["onnx", source]
        assert (got[real] - want[real]).abs().max() < 1e-3, source
        assert torch.equal(got[real].argmax(-1), want[real].argmax(-1)), source
    picked, picked_onnx = out["torch", "retrieval"][1], out["onnx", "retrieval"][1]
    assert [p and p.text for p in picked] == [p and p.text for p in picked_onnx]
    assert sum(p is not None for p in picked) >= 4  # retrieval found the edits (the check compares something)
