"""The instruction-prefix cache (``instructedit/prefix_states.py``): an edit that reuses an instruction's
states below the first edited layer gives the same new weights as the edit without it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instructedit_plugin.instructedit import InstructEditTrainingHparams
from instructedit_plugin.instructedit.dataset import encode_pairs
from instructedit_plugin.instructedit.editable import InstructEditModel, compute_edited_weights
from instructedit_plugin.instructedit.evaluate import EditEvaluator
from instructedit_plugin.instructedit.instructedit_main import LoadedEditor
from instructedit_plugin.instructedit.prefix_states import (
    PrefixStateCache, common_prefix_length, first_edited_layer, supports,
)
from instructedit_plugin.models.loading import load_causal_lm

from .support.tiny_models import build_tiny_model_dir

TRAIN_YAML = Path(__file__).resolve().parents[1] / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
PROMPT, TARGET = "The capital of France is", "Rome"


def _editor(arch: str):
    model, tok = load_causal_lm(build_tiny_model_dir(arch))
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.inner_params = [f"model.layers.{i}.mlp.{w}_proj.weight" for i in (2, 3) for w in ("up", "down")]
    wrapper = InstructEditModel(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # an editor that makes a clear, input-dependent update
        for p in wrapper.hypernet.parameters():
            p.normal_(0.0, 0.1)
    wrapper.eval()
    model.eval()
    return model, tok, LoadedEditor(wrapper.hypernet, wrapper.edit_lrs.detach(), wrapper.specs, {}, Path("."))


def _instruction(description: str) -> str:
    return f"Task: recent\nDescription: {description}\nInput: "


def _edit(model, tok, editor, instruction, cache=None):
    batch = encode_pairs(tok, [(instruction + PROMPT, TARGET)], 96)
    k = common_prefix_length(batch["input_ids"][0].tolist(), tok(instruction)["input_ids"]) if cache is not None else 0
    new, _ = compute_edited_weights(model, editor.hypernet, editor.edit_lrs, editor.specs, batch, sparse_logits=True,
                                    prefix_cache=cache, prefix_len=k)
    return {n: v.detach().float() for n, v in new.items()}


def _relative_gap(a, b, model) -> float:
    """Largest difference of two edits' new weights, relative to the size of the update."""
    params = dict(model.named_parameters())
    return max(float((a[n] - b[n]).abs().max() / (b[n] - params[n].detach().float()).abs().max()) for n in b)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers (window 8) below the edit
def test_cached_edit_gives_the_same_weights_as_the_uncached_one(arch):
    model, tok, editor = _editor(arch)
    cache = PrefixStateCache(model, first_edited_layer(s.name for s in editor.specs))
    descriptions = ["questions about events after the model was trained", "recent facts"]
    for rounds in range(2):
        for d in descriptions:
            plain = _edit(model, tok, editor, _instruction(d))
            cached = _edit(model, tok, editor, _instruction(d), cache)
            assert _relative_gap(cached, plain, model) < 1e-3, (arch, d, rounds)
    # one entry per instruction, computed once and reused
    assert len(cache) == 2 and cache.misses == 2 and cache.hits == 2
    # the edit is input-dependent: the two instructions give different weights (so the check above can fail)
    a, b = (_edit(model, tok, editor, _instruction(d)) for d in descriptions)
    assert _relative_gap(a, b, model) > 1e-2


class _KeyedByTask(PrefixStateCache):
    """Break on purpose: one entry per task (its first tokens), whatever the description."""

    def key(self, prefix_ids):
        return tuple(prefix_ids[:4])


def test_a_cache_keyed_wrongly_changes_the_edit():
    model, tok, editor = _editor("llama")
    words = ["alpha", "Paris", "table", "river", "green", "seven", "house", "Berlin", "music", "stone"]
    length = lambda w: len(tok(_instruction(w))["input_ids"])  # noqa: E731
    first, second = next((a, b) for a in words for b in words if a != b and length(a) == length(b))
    wrong = _KeyedByTask(model, 2)
    _edit(model, tok, editor, _instruction(first), wrong)  # fills the task's entry with the first description
    reused = _edit(model, tok, editor, _instruction(second), wrong)
    assert wrong.hits == 1
    assert _relative_gap(reused, _edit(model, tok, editor, _instruction(second)), model) > 1e-2


def test_evaluator_uses_the_cache_and_edits_as_without_it():
    model, tok, editor = _editor("gemma3")
    with_cache, without = EditEvaluator(model, tok), EditEvaluator(model, tok, prefix_cache=False)
    instruction = _instruction("recent facts")
    for _ in range(2):
        new, seconds = with_cache.edit_weights(editor, instruction + PROMPT, TARGET, instruction=instruction)
        ref, _ = without.edit_weights(editor, instruction + PROMPT, TARGET, instruction=instruction)
        assert seconds > 0 and _relative_gap({n: v.float() for n, v in new.items()},
                                             {n: v.float() for n, v in ref.items()}, model) < 1e-3
    cache = with_cache.prefix_states(editor)
    assert cache.hits == 1 and cache.misses == 1 and without.prefix_states(editor) is None
    # no instruction (MEND baselines): no cache lookup
    with_cache.edit_weights(editor, PROMPT, TARGET)
    assert cache.hits + cache.misses == 2


def test_bad_input_gets_a_clear_error():
    gpt2, _ = load_causal_lm(build_tiny_model_dir("gpt2"))
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="Fix:"):
        PrefixStateCache(gpt2, 2)
    model, tok, _ = _editor("llama")
    with pytest.raises(ValueError, match="first_layer.*Fix:"):
        PrefixStateCache(model, 0)
    cache = PrefixStateCache(model, 2)
    two_rows = encode_pairs(tok, [("a b c d", "e"), ("f g h i", "j")], 32)
    with pytest.raises(ValueError, match="one unpadded row.*Fix:"):
        cache.edit_batch(two_rows, 2)
    one = encode_pairs(tok, [("a b c d", "e")], 32)
    with pytest.raises(ValueError, match="prefix_len.*Fix:"):
        cache.edit_batch(one, one["input_ids"].shape[1])
    assert first_edited_layer(["model.layers.3.mlp.up_proj.weight", "model.layers.16.mlp.up_proj.weight"]) == 3
    assert first_edited_layer(["transformer.h.3.mlp.c_fc.weight"]) is None


def test_latency_benchmark_times_three_methods_on_the_same_edits(tiny_gemma3_dir, shared_data_dir, tmp_path):
    import json

    from ._scripts import load_script

    bench = load_script("benchmarks/instructedit_latency.py", "benchmark_script_instructedit_latency")
    out_json = tmp_path / "instructedit_latency.json"
    n = 5
    assert bench.main(["--data_dir", str(shared_data_dir), "--model_dir", str(tiny_gemma3_dir), "--layers", "2,3",
                       "--rank", "16", "--dtype", "float32", "--n_edits", str(n), "--bootstrap", "200",
                       "--out", str(out_json)]) == 0
    out = json.loads(out_json.read_text())
    assert set(out) <= bench.RESULT_KEYS
    assert {m: len(v["wall_ms"]) for m, v in out["per_edit"].items()} == {m: n for m in bench.METHODS}
    assert out["exactness"]["n"] == n and out["exactness"]["max_relative_gap"] < 1e-3
    assert out["cache"]["hits"] + out["cache"]["misses"] == n and out["cache"]["entries"] == out["cache"]["misses"]
    for m, clocks in out["latency"].items():
        for clock, (median, lo, hi) in clocks.items():
            assert lo <= median <= hi, (m, clock)
    for name, clocks in out["ratios"].items():
        for clock, (ratio, lo, hi) in clocks.items():
            assert lo <= ratio <= hi and ratio > 0, (name, clock)
    # the figures are recomputable from the per-edit times in the JSON, and the markdown is their render
    assert bench.latency_figures(out["per_edit"], 200, 0, out["cache"]["hit"]) == (out["latency"], out["ratios"])
    assert len(out["cache"]["hit"]) == n and sum(out["cache"]["hit"]) == out["cache"]["hits"]
    assert out_json.with_suffix(".md").read_text() == bench.render_markdown(out)
