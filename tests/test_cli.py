"""The `instructedit` command line: train -> evaluate round trip on a tiny model, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructedit_plugin.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]

FACTS = [
    ("Alice", "lives in", "Paris", "Rome"),
    ("Bob", "lives in", "London", "Berlin"),
    ("Carol", "works in", "Madrid", "Tokyo"),
    ("Dave", "works in", "Oslo", "Vienna"),
    ("Erin", "lives in", "Cairo", "Lima"),
    ("Frank", "works in", "Dublin", "Athens"),
]


@pytest.fixture()
def fact_file(tmp_path):
    records = [
        {"case_id": i, "subject": s, "prompt": f"{s} {rel}", "target_new": new, "ground_truth": old,
         "rephrase_prompt": f"The city {s} {rel} is", "locality_prompt": "The capital of France is",
         "locality_ground_truth": "Paris"}
        for i, (s, rel, old, new) in enumerate(FACTS)
    ]
    path = tmp_path / "counterfact-train.json"
    path.write_text(json.dumps(records))
    return path


def test_train_then_evaluate_round_trip(tmp_path, fact_file, tiny_llama_dir, capsys):
    results = tmp_path / "run"
    rc = main(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEd/tiny.yaml"), "--model_name",
               str(tiny_llama_dir), "--train", str(fact_file), "--max_iters", "4", "--results_dir", str(results)])
    assert rc == EXIT_OK
    best = results / "best"
    assert (best / "manifest.json").is_file()
    out_dir = tmp_path / "metrics"
    rc = main(["evaluate", "--hparams", str(REPO / "hparams/InstructEd/tiny.yaml"), "--model_name", str(tiny_llama_dir),
               "--archive", str(best), "--data", str(fact_file), "--limit", "2", "--metrics_save_dir", str(out_dir)])
    assert rc == EXIT_OK
    payload = json.loads((out_dir / "evaluation.json").read_text())
    assert payload["n_edits"] == 2 and len(payload["per_edit"]) == 2
    for row in payload["summary"].values():
        for key in ("Rel", "Gen", "Score", "H"):
            assert row[key] is None or 0.0 <= row[key] <= 100.0
    assert (out_dir / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| InstructEd |" in (out_dir / "evaluation.md").read_text()


def test_missing_archive_is_a_one_line_error(tmp_path, fact_file, tiny_llama_dir, capsys):
    rc = main(["evaluate", "--hparams", str(REPO / "hparams/InstructEd/tiny.yaml"), "--model_name", str(tiny_llama_dir),
               "--archive", str(tmp_path / "nope"), "--data", str(fact_file)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR
    assert err.startswith("instructedit: error:") and "field 'archive'" in err and err.count("\n") == 1


def test_missing_data_file_and_bad_task_spec(tmp_path, capsys):
    rc = main(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEd/tiny.yaml"),
               "--train", str(tmp_path / "missing.json")])
    assert rc == EXIT_ERROR and "not found" in capsys.readouterr().err
    rc = main(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEdit/tiny.yaml"), "--task", "oops"])
    assert rc == EXIT_ERROR and "NAME=FILE" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        main(["edit", "--prompt", "x"])
    assert info.value.code == EXIT_USAGE


def test_info_json_lists_registered_methods(capsys):
    assert main(["info", "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert {"InstructEdit", "InstructEd"} <= set(info["plugin_algorithms"])
    assert {"InstructEdit", "InstructEd"} <= set(info["easyedit"]["ALG_DICT"])
    assert info["easyedit"]["flavour"] in ("pypi", "main")
