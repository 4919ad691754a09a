"""`instructedit demo` end to end on a tiny model (the real run uses Gemma-3-270M)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructedit_plugin.demo import DemoConfig, find_hparams_dir, run_demo
from instructedit_plugin.errors import PluginError


REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_writes_results(instructed_world, shared_data_dir, tmp_path):  # noqa: F811
    # The demo reads hparams/InstructEd/gemma-3-270m.yaml; point it at the tiny model's settings.
    hparams = tmp_path / "hparams"
    (hparams / "InstructEd").mkdir(parents=True)
    text = (REPO / "hparams/InstructEd/tiny.yaml").read_text().replace("max_length: 40", "max_length: 256")
    (hparams / "InstructEd/gemma-3-270m.yaml").write_text(text)  # the tiny tokenizer splits real words finely
    out = tmp_path / "demo"
    result = run_demo(DemoConfig(n_facts=1, data_dir=str(shared_data_dir), out_dir=str(out),
                                 model_dir=str(instructed_world["base_dir"]), archive=str(instructed_world["archive"]),
                                 hparams_dir=str(hparams), methods=("in_context", "instructed", "retrieval"), dtype="float32"))
    assert [f["dataset"] for f in result["facts"]] == ["counterfact", "zsre"]
    for fact in result["facts"]:
        assert fact["prompt"] and fact["target_new"] and isinstance(fact["after"], str)
    assert set(result["table"]) == {"in-context (no prefixes)", "InstructEd (gold)", "InstructEd (retrieval, sequential)"}
    for row in result["table"].values():
        assert row["n_edits"] == 2
        assert all(row[k] is None or 0.0 <= row[k] <= 100.0 for k in ("Rel", "Gen", "Loc", "Por", "Score", "H"))
    saved = json.loads((out / "demo.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result["table"]))
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "| InstructEd (gold) |" in (out / "demo.md").read_text()


def test_hparams_dir_must_exist(tmp_path):
    with pytest.raises(PluginError, match="cannot find the hparams/ folder"):
        find_hparams_dir(str(tmp_path))
