"""Editing-gradient analysis: separation figures, projections, PNG + JSON, CLI hooks."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from instructedit_plugin.instructedit import (
    InstructEditModel,
    InstructEditTrainingHparams,
    save_editor,
)
from instructedit_plugin.instructedit.analysis import (
    add_analyze_arguments,
    analyze_edit_gradients,
    analyze_gradient_vectors,
    gradient_separation,
)
from instructedit_plugin.instructedit.instructedit_main import load_editor_for
from instructedit_plugin.models.loading import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"


def _separable(n: int = 12, dim: int = 64, seed: int = 0):
    """Two tasks whose directions cluster around orthogonal centres (with instruction), mixed without."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:2] * 4.0
    vecs, tasks, instructed = [], [], []
    for t, name in enumerate(("counterfact", "convsent")):
        for _ in range(n):
            vecs.append(centres[t] + rng.normal(scale=0.5, size=dim))
            tasks.append(name)
            instructed.append(True)
            vecs.append(rng.normal(size=dim))  # without instruction: no task structure
            tasks.append(name)
            instructed.append(False)
    vecs = np.stack(vecs)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), tasks, instructed


def test_separable_gradients_report_intra_above_inter_and_high_silhouette(tmp_path):
    vecs, tasks, instructed = _separable()
    report = analyze_gradient_vectors(vecs, tasks, instructed, tmp_path, name="toy")
    png, js = tmp_path / "toy.png", tmp_path / "toy.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(js.read_text())
    with_instr = saved["groups"]["with_instruction"]
    pair = with_instr["pairs"]["convsent|counterfact"]
    assert pair["intra_cosine"] > pair["inter_cosine"] + 0.5
    assert with_instr["silhouette"]["pca"] > 0.5
    assert with_instr["silhouette"]["tsne"] > 0.5
    assert with_instr["silhouette_cosine"] > 0.5
    # without instruction the same tasks are not separable
    without = saved["groups"]["without_instruction"]
    assert without["pairs"]["convsent|counterfact"]["separation"] < 0.2
    assert without["silhouette"]["pca"] < 0.5
    assert report["groups"]["all"]["n_edits"] == len(tasks)


def test_gradient_separation_on_identical_tasks_is_zero():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(10, 16))
    stats = gradient_separation(vecs, ["a"] * 5 + ["b"] * 5)
    assert set(stats["pairs"]) == {"a|b"}
    assert abs(stats["pairs"]["a|b"]["separation"]) < 0.3


def test_analyze_edit_gradients_on_a_tiny_model_writes_png_and_json(tiny_gpt2_dir, tmp_path):
    torch.set_num_threads(1)
    model, tok = load_causal_lm(tiny_gpt2_dir)
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.model_name = str(tiny_gpt2_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wrapper = InstructEditModel(model, cfg)
    save_editor(tmp_path / "ckpt", wrapper.state_dict(), {"alg": "InstructEdit", **wrapper.editor_config()})
    tasks = {
        "counterfact": [{"prompt": f"The capital of Country{i} is", "target_new": f"City{i}", "subject": f"Country{i}"}
                        for i in range(4)],
        "convsent": [{"prompt": f"What do you think of topic{i}?", "target_new": "I like it.", "topic": f"topic{i}",
                      "pos": ["I like it."], "neg": ["Bad."]} for i in range(4)],
    }
    editor = load_editor_for(model, tmp_path / "ckpt")
    layer = editor.specs[-1].name
    report = analyze_edit_gradients(model, tok, editor, tasks, tmp_path / "out", layers=[layer], n_per_task=4,
                                    project_dim=256)
    assert (tmp_path / "out" / "edit_gradients.png").is_file()
    saved = json.loads((tmp_path / "out" / "edit_gradients.json").read_text())
    assert saved["layers"] == [layer] and saved["n_edits"] == 16
    assert set(saved["groups"]) == {"all", "with_instruction", "without_instruction"}
    for group in saved["groups"].values():
        assert -1.0 <= group["silhouette"]["pca"] <= 1.0
        assert -1.0 <= group["pairs"]["convsent|counterfact"]["inter_cosine"] <= 1.0
    assert report["dim"] <= 256


def test_cli_arguments_parse():
    parser = add_analyze_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--archive", "x", "--n_per_task", "3", "--layers", "a,b"])
    assert args.archive == "x" and args.n_per_task == 3 and args.model == "embedded"


def test_all_zero_directions_are_a_clear_error_not_a_crash(tmp_path):
    """An editor whose output is zero gives all-zero directions; t-SNE used to crash the process on them."""
    import pytest

    from instructedit_plugin.errors import PluginError
    from instructedit_plugin.instructedit.analysis import analyze_gradient_vectors

    with pytest.raises(PluginError, match="all zero.*Fix:"):
        analyze_gradient_vectors(np.zeros((8, 5)), ["a", "b"] * 4, [True, False] * 4, tmp_path)
    with pytest.raises(PluginError, match="not finite"):
        analyze_gradient_vectors(np.full((8, 5), np.nan), ["a", "b"] * 4, [True, False] * 4, tmp_path)
