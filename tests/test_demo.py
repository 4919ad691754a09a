"""`instructedit demo` end to end on a tiny model (the real run uses Gemma-3-270M)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructedit_plugin.demo import DemoConfig, find_hparams_dir, run_demo
from instructedit_plugin.errors import PluginError


REPO = Path(__file__).resolve().parents[1]


def _world_data_folder(root: Path, edits: list[dict]) -> Path:
    """The demo's two evaluation files (MEND CounterFact, KnowEdit ZsRE) holding the tiny world's
    held-out edits, so the tiny model knows the facts the demo edits."""
    half = len(edits) // 2
    cf = [{"case_id": i, "prompt": e["prompt"], "target_new": e["target_new"], "ground_truth": e["ground_truth"],
           "subject": e["subject"], "rephrase_prompt": e["rephrase_prompt"],
           "locality_prompt": e["locality"]["neighborhood"]["prompt"],
           "locality_ground_truth": e["locality"]["neighborhood"]["ground_truth"]} for i, e in enumerate(edits[:half])]
    zsre = [{"subject": e["subject"], "prompt": e["prompt"], "target_new": e["target_new"],
             "ground_truth": [e["ground_truth"]], "rephrase_prompt": e["rephrase_prompt"],
             "locality": {"Relation_Specificity": [{"prompt": e["locality"]["neighborhood"]["prompt"],
                                                    "ground_truth": [e["locality"]["neighborhood"]["ground_truth"]]}]}}
            for e in edits[half:]]
    (root / "counterfact").mkdir(parents=True)
    (root / "zsre").mkdir()
    (root / "counterfact/counterfact-edit.json").write_text(json.dumps(cf))
    (root / "zsre/ZsRE-test-all.json").write_text(json.dumps(zsre))
    return root


def test_demo_edits_the_facts_and_writes_results(instructed_world, tmp_path):
    """On the tiny world's held-out facts (in the demo's file formats) InstructEd's trained prefixes
    make the edits the in-context row cannot. Measured: gold Rel/Gen/Loc 100/100/100, retrieval
    100/100/87.5, in-context 0/0/0."""
    hparams = tmp_path / "hparams"
    (hparams / "InstructEd").mkdir(parents=True)
    (hparams / "InstructEd/gemma-3-270m.yaml").write_text((REPO / "hparams/InstructEd/tiny.yaml").read_text())
    data = _world_data_folder(tmp_path / "data", instructed_world["test"])
    out = tmp_path / "demo"
    result = run_demo(DemoConfig(n_facts=4, data_dir=str(data), out_dir=str(out),
                                 model_dir=str(instructed_world["base_dir"]), archive=str(instructed_world["archive"]),
                                 hparams_dir=str(hparams), methods=("in_context", "instructed", "retrieval"), dtype="float32"))
    assert [f["dataset"] for f in result["facts"]] == ["counterfact"] * 4 + ["zsre"] * 4
    assert set(result["table"]) == {"in-context (no prefixes)", "InstructEd (gold)", "InstructEd (retrieval, sequential)"}
    gold, plain = result["table"]["InstructEd (gold)"], result["table"]["in-context (no prefixes)"]
    retrieval = result["table"]["InstructEd (retrieval, sequential)"]
    assert all(row["n_edits"] == 8 for row in result["table"].values())
    assert gold["Rel"] >= 75 and gold["Gen"] >= 75, gold
    assert gold["Gen"] - plain["Gen"] >= 50, (gold, plain)
    assert retrieval["Rel"] >= 75, retrieval  # 8 facts in memory, each question retrieves its own
    # the before/after answers: the edited model now says most new targets, the unedited one none
    said = [f["target_new"] in f["after"] for f in result["facts"]]
    assert sum(said) >= 6 and not any(f["target_new"] in f["before"] for f in result["facts"]), result["facts"]
    saved = json.loads((out / "demo.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result["table"]))
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| InstructEd (gold) | {gold['Rel']:.1f} | {gold['Gen']:.1f} | {gold['Loc']:.1f} |" in (out / "demo.md").read_text()


def test_demo_without_a_data_folder_uses_the_packaged_set_and_says_so(instructed_world, tmp_path, monkeypatch):
    """A fresh clone has no ../shared: the demo falls back to the data set inside the package."""
    from instructedit_plugin.data.demo_set import DEMO_DATA_DIR

    monkeypatch.delenv("INSTRUCTEDIT_DATA_DIR", raising=False)
    hparams = tmp_path / "hparams"
    (hparams / "InstructEd").mkdir(parents=True)
    text = (REPO / "hparams/InstructEd/tiny.yaml").read_text().replace("max_length: 40", "max_length: 256")
    (hparams / "InstructEd/gemma-3-270m.yaml").write_text(text)
    result = run_demo(DemoConfig(n_facts=1, out_dir=str(tmp_path / "demo"), model_dir=str(instructed_world["base_dir"]),
                                 archive=str(instructed_world["archive"]), hparams_dir=str(hparams),
                                 methods=("instructed",), dtype="float32"))
    assert result["data_origin"] == "packaged demo data set" and Path(result["data_dir"]) == DEMO_DATA_DIR
    packaged = json.loads((DEMO_DATA_DIR / "counterfact/counterfact-edit.json").read_text())
    assert result["facts"][0]["prompt"] == packaged[0]["prompt"]
    # the environment variable wins over the packaged set, --data_dir over both
    monkeypatch.setenv("INSTRUCTEDIT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(PluginError, match="nowhere"):
        run_demo(DemoConfig(n_facts=1, out_dir=str(tmp_path / "demo2"), model_dir=str(instructed_world["base_dir"]),
                            archive=str(instructed_world["archive"]), hparams_dir=str(hparams)))


def test_demo_checks_its_data_before_anything_slow(tmp_path, monkeypatch):
    """A missing data file is a one-line error with the fix within 2 s; no model is prepared or loaded."""
    import time

    import instructedit_plugin.models.embedded as embedded
    import instructedit_plugin.models.loading as loading
    from instructedit_plugin import cli

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was prepared or loaded before the data check")

    monkeypatch.setattr(embedded, "embedded_model_dir", forbidden)
    monkeypatch.setattr(loading, "load_causal_lm", forbidden)
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre/ZsRE-test-all.json").write_text("[{\"subject\": ")  # truncated JSON
    for args, pattern in ((["--data_dir", str(tmp_path)], "counterfact/counterfact-edit.json"),
                          (["--data_dir", str(tmp_path), "--train"], "counterfact/counterfact-train.json")):
        t0 = time.perf_counter()
        with pytest.raises(PluginError, match=pattern) as info:
            run_demo(DemoConfig(data_dir=args[1], train="--train" in args, out_dir=str(tmp_path / "out")))
        assert time.perf_counter() - t0 < 2.0
        assert "Fix:" in str(info.value) and "\n" not in str(info.value)
    # the truncated file is named too once the missing ones exist
    for rel in ("counterfact/counterfact-edit.json",):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text((REPO / "instructedit_plugin/demo_data" / rel).read_text())
    with pytest.raises(PluginError, match="ZsRE-test-all.json.*Fix:"):
        run_demo(DemoConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "out")))
    # through the CLI: exit code 1, one line on stderr
    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["demo", "--data_dir", str(tmp_path / "empty")]) == 1
    assert err.getvalue().count("\n") == 1 and "Fix:" in err.getvalue()


def test_hparams_dir_must_exist(tmp_path):
    with pytest.raises(PluginError, match="cannot find the hparams/ folder"):
        find_hparams_dir(str(tmp_path))
