"""The InstructEd prefixes shipped in the package for the embedded Gemma-3-270M (issue #10 item 3).

They must be the current default recipe's output for the converted model (the recipe key in their
``recipe.json`` is recomputed here: change the recipe or the packaged data and this fails until
``python -m instructedit_plugin.instructed.shipped --regenerate`` is run), load with a manifest that
matches the converted model, and beat the instruction in context without prefixes on real facts.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from instructedit_plugin.data.demo_set import demo_data_dir
from instructedit_plugin.instructed.checkpoint import load_checkpoint, read_manifest, verify_base_model
from instructedit_plugin.instructed.recipes import DEFAULT, _data_identity, model_identity, recipe_key
from instructedit_plugin.instructed.shipped import shipped_prefixes_dir, shipped_recipe_info

N_FACTS = 5


def test_shipped_prefixes_are_the_default_recipe_for_the_converted_model(embedded_model_dir):
    folder = shipped_prefixes_dir()
    info = shipped_recipe_info()
    # the recipe that trained them is the current default, on the packaged data, for this model
    expected = recipe_key(DEFAULT, model_identity(embedded_model_dir), _data_identity(demo_data_dir(), DEFAULT))
    assert info["key"] == expected, ("the shipped prefixes are stale: regenerate them with "
                                     "`python -m instructedit_plugin.instructed.shipped --regenerate`")
    assert info["recipe"]["steps"] == DEFAULT.steps and info["steps"] == DEFAULT.steps
    assert not info["stopped_by_budget"]
    # kilobytes, not megabytes
    assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000
    # the manifest names the converted model; loading verifies every file's hash
    manifest = read_manifest(folder)
    ckpt = load_checkpoint(folder)
    config = AutoConfig.from_pretrained(embedded_model_dir, local_files_only=True)
    verify_base_model(ckpt, config)  # raises BaseModelMismatchError for another model
    assert manifest["base_model"]["model_type"] == config.model_type
    assert ckpt.bank.prefix_len == DEFAULT.prefix_len
    assert list(ckpt.bank.layers) == list(range(6, 12))  # the middle third of Gemma's 18 layers
    assert torch.isfinite(ckpt.bank.embeddings).all()


def test_shipped_prefixes_refuse_another_model(tiny_gemma3_dir):
    from instructedit_plugin.instructed.checkpoint import BaseModelMismatchError

    ckpt = load_checkpoint(shipped_prefixes_dir())
    with pytest.raises(BaseModelMismatchError, match="archive"):
        verify_base_model(ckpt, AutoConfig.from_pretrained(tiny_gemma3_dir, local_files_only=True))


@pytest.fixture(scope="module")
def gemma(embedded_model_dir):
    from instructedit_plugin.models.loading import load_causal_lm

    model, tok = load_causal_lm(embedded_model_dir, dtype="bfloat16")
    model.eval()
    return str(embedded_model_dir), model, tok


def _gen_on_demo_facts(gemma, use_prefixes: bool) -> dict:
    from instructedit_plugin.compat import make_editor, run_edit_requests
    from instructedit_plugin.data import load_requests
    from instructedit_plugin.evaluation import summarize_metrics
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import reset_memory

    model_dir, model, tok = gemma
    requests = load_requests(demo_data_dir() / "counterfact/counterfact-edit.json", limit=N_FACTS)
    hp = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=model_dir,
                                              archive=str(shipped_prefixes_dir()), device="cpu",
                                              use_prefixes=use_prefixes, instruction_source="gold"))
    editor = make_editor(hp, model, tok)
    metrics, _, _ = run_edit_requests(editor, requests)
    reset_memory(model)
    return summarize_metrics(metrics)


def test_shipped_prefixes_beat_the_instruction_in_context_on_generalisation(gemma):
    with_prefixes = _gen_on_demo_facts(gemma, use_prefixes=True)
    in_context = _gen_on_demo_facts(gemma, use_prefixes=False)
    print("gold InstructEd:", json.dumps(with_prefixes), "\nin-context:", json.dumps(in_context))
    assert with_prefixes["n_edits"] == in_context["n_edits"] == N_FACTS
    assert with_prefixes["Gen"] > in_context["Gen"]
    assert with_prefixes["Rel"] >= 80.0
