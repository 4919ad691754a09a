"""Smoke tests: every entry point runs on a tiny model and writes what it promises (issue #11 item 4).

Each test runs one entry point in-process (``main(argv)``), at its smallest setting, on a tiny model
(``tiny_gpt2_dir`` / ``tiny_llama_dir``, or the pretrained tiny base with trained InstructEd prefixes
of the session fixture ``instructed_world``), and checks the files it writes (JSON parses with the
expected keys, markdown tables with the expected rows, PNG magic bytes) and at least one number that
fails when the entry point is broken (an edit raises Rel, training lowers its loss and runs the
requested steps, the requested sizes/records are all there).

Covered here (gaps elsewhere):

* ``instructedit train`` (InstructEdit and InstructEd), ``edit`` (InstructEdit), ``evaluate``
  (InstructEdit), ``analyze`` and ``demo`` (through the CLI's ``main``);
* ``examples/run_instructedit.py``;
* ``benchmarks/instructed_cpu.py``, ``benchmarks/instructedit_cpu.py`` (both with ``--model_dir``),
  ``benchmarks/memory_scale.py`` and ``benchmarks/gate_calibration.py``.

Covered elsewhere with real assertions, not repeated: ``examples/run_instructed.py`` and
``examples/run_mquake.py`` (tests/test_examples.py), ``instructedit edit`` with InstructEd and the
shipped prefixes (tests/test_cli_after_install.py), ``instructedit info`` (tests/test_cli.py).
``benchmarks/demo_timing.py`` clones the repository and builds a venv: not run here.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from ._scripts import load_script
import yaml

from instructedit_plugin.cli import EXIT_OK, main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: InstructEdit training tasks of the CLI runs (small files of the shared data set).
IE_TASKS = {"counterfact": "counterfact/counterfact-train.json", "convsent": "convsent/blender_val.json"}
IE_TRAIN_STEPS = 20


def _script(rel: str):
    """The module of a repository script (``examples/...`` or ``benchmarks/...``), loaded once."""
    path = REPO / rel
    return load_script(path, f"entry_point_{path.parent.name}_{path.stem}")


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of every markdown table in ``markdown`` (header and ``|---|`` lines left out)."""
    rows, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        is_header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("|") and not line.startswith("|---") and not is_header:
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _cli(argv: list[str], capsys) -> str:
    """``instructedit <argv>``; asserts exit code 0 and returns stdout."""
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == EXIT_OK, out
    return out


def _mend_record(i: int, req: dict) -> dict:
    """A synthetic-world edit as a MEND-style CounterFact record (the format of counterfact-*.json)."""
    loc = req["locality"]["neighborhood"]
    return {"case_id": i, "subject": req["subject"], "prompt": req["prompt"], "target_new": req["target_new"],
            "ground_truth": req["ground_truth"], "rephrase_prompt": req["rephrase_prompt"],
            "locality_prompt": loc["prompt"], "locality_ground_truth": loc["ground_truth"]}


def _knowedit_record(req: dict) -> dict:
    """A synthetic-world edit as a KnowEdit record (the format of ZsRE-test-all.json)."""
    loc = req["locality"]["neighborhood"]
    return {"subject": req["subject"], "prompt": req["prompt"], "target_new": req["target_new"],
            "ground_truth": [req["ground_truth"]], "rephrase_prompt": req["rephrase_prompt"],
            "locality": {"Relation_Specificity": [{"prompt": loc["prompt"], "ground_truth": [loc["ground_truth"]]}]},
            "portability": {}}


# ----------------------------------------------------------------------------------------------
# instructedit train / edit / evaluate / analyze with InstructEdit on the tiny GPT-2
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instructedit_trained(tiny_gpt2_dir, shared_data_dir, tmp_path_factory) -> dict:
    """``instructedit train`` of an InstructEdit editor for 0 and for IE_TRAIN_STEPS steps (same data,
    same validation split): ``{steps: (printed summary, results_dir)}``."""
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("instructedit-train")
    runs = {}
    for steps in (0, IE_TRAIN_STEPS):
        argv = ["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEdit/tiny.yaml"),
                "--model_name", str(tiny_gpt2_dir), "--data_dir", str(shared_data_dir), "--limit", "12",
                "--max_steps", str(steps), "--results_dir", str(root / f"steps{steps}")]
        for name, rel in IE_TASKS.items():
            argv += ["--task", f"{name}={rel}"]
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(argv) == EXIT_OK
        runs[steps] = (yaml.safe_load(out.getvalue()), root / f"steps{steps}")
    return runs


def test_cli_train_instructedit_runs_the_steps_and_lowers_the_loss(instructedit_trained):
    untrained, _ = instructedit_trained[0]
    summary, results = instructedit_trained[IE_TRAIN_STEPS]
    assert summary["steps"] == IE_TRAIN_STEPS and summary["best_step"] == IE_TRAIN_STEPS
    assert untrained["steps"] == 0
    # the validation edit loss after training is below the one of the untrained editor (step 0)
    assert math.isfinite(summary["best_value"]) and math.isfinite(untrained["best_value"])
    assert summary["best_value"] < untrained["best_value"] - 0.5, (summary, untrained)
    best, last = Path(summary["best_checkpoint"]), Path(summary["last_checkpoint"])
    assert best.parent.parent.parent.parent == results  # <results_dir>/models/InstructEdit/<model>/best
    assert (best / "editor.safetensors").is_file() and (last / "editor.safetensors").is_file()
    config = json.loads((best / "manifest.json").read_text())
    assert config["alg"] == "InstructEdit" and config["step"] == IE_TRAIN_STEPS
    state = json.loads((last / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [IE_TRAIN_STEPS]
    assert state["history"][-1]["loss/total_edit_val"] == pytest.approx(summary["best_value"])


def test_cli_edit_with_instructedit_raises_rel(instructedit_trained, tiny_gpt2_dir, shared_data_dir, capsys):
    summary, _ = instructedit_trained[IE_TRAIN_STEPS]
    fact = json.loads((shared_data_dir / IE_TASKS["counterfact"]).read_text())[0]
    out = _cli(["edit", "--hparams", str(REPO / "hparams/InstructEdit/tiny.yaml"), "--model_name", str(tiny_gpt2_dir),
                "--archive", summary["best_checkpoint"], "--prompt", fact["prompt"], "--target_new", fact["target_new"],
                "--rephrase", fact["rephrase_prompt"], "--task", "counterfact"], capsys)
    assert out.startswith(f"{fact['prompt']!r} -> {fact['target_new']!r}\n"), out
    lines = re.findall(r"^  (\w+): ([\d.]+) -> ([\d.]+)$", out, re.M)
    scores = {name: (float(pre), float(post)) for name, pre, post in lines}
    assert set(scores) == {"Rel", "Gen"}, out
    pre, post = scores["Rel"]
    assert post > pre, out


def test_cli_evaluate_with_instructedit_writes_results_and_raises_rel(instructedit_trained, tiny_gpt2_dir,
                                                                     shared_data_dir, tmp_path, capsys):
    summary, _ = instructedit_trained[IE_TRAIN_STEPS]
    out_dir = tmp_path / "metrics"
    out = _cli(["evaluate", "--hparams", str(REPO / "hparams/InstructEdit/tiny.yaml"),
                "--model_name", str(tiny_gpt2_dir), "--archive", summary["best_checkpoint"],
                "--data", IE_TASKS["counterfact"], "--data_dir", str(shared_data_dir), "--limit", "2",
                "--metrics_save_dir", str(out_dir), "--name", "smoke"], capsys)
    assert "written: " in out
    payload = json.loads((out_dir / "smoke.json").read_text())
    assert payload["alg_name"] == "InstructEdit" and payload["n_edits"] == 2 and len(payload["per_edit"]) == 2
    assert set(payload["summary"]) == {"pre-edit", "InstructEdit"}
    assert all({"pre", "post"} <= set(record) for record in payload["per_edit"])
    pre, post = payload["summary"]["pre-edit"], payload["summary"]["InstructEdit"]
    assert post["Rel"] > pre["Rel"], payload["summary"]
    assert [row[0] for row in _table_rows((out_dir / "smoke.md").read_text())] == ["pre-edit", "InstructEdit"]
    assert (out_dir / "smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_analyze_writes_separation_figures_and_png(instructedit_trained, tiny_gpt2_dir, shared_data_dir, tmp_path,
                                                      capsys):
    summary, _ = instructedit_trained[IE_TRAIN_STEPS]
    out_dir = tmp_path / "analysis"
    n_per_task = 3
    out = _cli(["analyze", "--archive", summary["best_checkpoint"], "--model", str(tiny_gpt2_dir), "--data_dir",
                str(shared_data_dir), "--tasks", "counterfact,convsent", "--n_per_task", str(n_per_task),
                "--project_dim", "256", "--out_dir", str(out_dir)], capsys)
    assert f"wrote {out_dir / 'edit_gradients.png'}" in out
    assert (out_dir / "edit_gradients.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out_dir / "edit_gradients.json").read_text())
    # every requested edit, with and without its instruction
    assert report["n_edits"] == 2 * 2 * n_per_task and report["n_per_task"] == n_per_task
    assert sorted(report["tasks"]) == ["convsent", "counterfact"] and report["project_dim"] == 256
    assert set(report["groups"]) == {"all", "with_instruction", "without_instruction"}
    for name, group in report["groups"].items():
        assert group["n_edits"] == (2 * 2 if name == "all" else 2) * n_per_task, name
        pair = group["pairs"]["convsent|counterfact"]
        assert all(math.isfinite(pair[k]) for k in ("intra_cosine", "inter_cosine", "separation")), pair
        assert pair["separation"] == pytest.approx(pair["intra_cosine"] - pair["inter_cosine"])
        assert -1.0 <= group["silhouette"]["pca"] <= 1.0
    # gradients of one task's edits point more alike than across tasks
    assert report["groups"]["all"]["pairs"]["convsent|counterfact"]["separation"] > 0.0


# ----------------------------------------------------------------------------------------------
# examples/run_instructedit.py
# ----------------------------------------------------------------------------------------------
def test_run_instructedit_example_trains_editors_and_edits_every_task(tiny_gpt2_dir, shared_data_dir, tmp_path):
    out = tmp_path / "out"
    rc = _script("examples/run_instructedit.py").main(
        ["--data_dir", str(shared_data_dir), "--hparams_dir", str(REPO / "hparams/TRAINING/InstructEdit/tiny.yaml"),
         "--model_dir", str(tiny_gpt2_dir), "--ds_size", "2", "--train_size", "8", "--max_iters", "10",
         "--metrics_save_dir", str(out)])
    assert rc == 0
    methods = ["instructedit", "mend_multitask", "mend_single_task"]
    tasks = ["counterfact", "recent", "convsent", "zsre_holdout"]
    for method in methods:  # every editor was trained and kept its best checkpoint
        assert list((out / "editors" / method).glob("models/InstructEdit/*/best/editor.safetensors")), method
    results = json.loads((out / "InstructEdit_results.json").read_text())
    assert results["n_edits"] == {task: 2 for task in tasks}
    assert {task: sorted(per_method) for task, per_method in results["tasks"].items()} == \
        {t: sorted(methods) for t in tasks}
    assert {task: list(per_method) for task, per_method in results["unseen_instruction"].items()} == \
        {t: ["instructedit"] for t in tasks}
    for task in tasks:
        for method, cell in results["tasks"][task].items():
            assert cell["n_edits"] == 2 and {"Rel", "Gen", "Loc", "Por", "Score"} <= set(cell), (task, method)
    rows = [(row[0], row[1]) for row in _table_rows((out / "InstructEdit_results.md").read_text()) if row[0] in tasks]
    assert rows == [(t, m) for t in tasks for m in methods] + [(t, "instructedit") for t in tasks]
    # each trained editor raises the edits' rewrite accuracy on average (EasyEdit's pre/post metrics)
    for method in methods:
        records = [r for per_task in results["records"]["tasks"].values() for r in per_task[method]]
        assert len(records) == 2 * len(tasks)
        pre = sum(r["pre"]["rewrite_acc"][0] for r in records) / len(records)
        post = sum(r["post"]["rewrite_acc"][0] for r in records) / len(records)
        assert post > pre, (method, pre, post)


# ----------------------------------------------------------------------------------------------
# instructedit train (InstructEd) and instructedit demo on the tiny world
# ----------------------------------------------------------------------------------------------
def test_cli_train_instructed_runs_the_steps_and_lowers_the_validation_loss(instructed_world, tmp_path, capsys):
    steps = 8
    config = yaml.safe_load((REPO / "hparams/TRAINING/InstructEd/tiny.yaml").read_text())
    config.update(val_interval=1, warmup_steps=0, progress=False)  # a validation after every step
    hparams = tmp_path / "train.yaml"
    hparams.write_text(yaml.safe_dump(config))
    train = tmp_path / "counterfact-train.json"
    train.write_text(json.dumps([_mend_record(i, r) for i, r in enumerate(instructed_world["train"])]))
    results = tmp_path / "prefixes"
    out = _cli(["train", "--hparams", str(hparams), "--model_name", str(instructed_world["base_dir"]), "--train",
                str(train), "--max_steps", str(steps), "--results_dir", str(results)], capsys)
    summary = yaml.safe_load(out)
    assert summary["step"] == steps == summary["total_steps"] and summary["stopped_by_budget"] is False
    assert Path(summary["best_dir"]) == results / "best" and (results / "best" / "manifest.json").is_file()
    history = json.loads((results / "last" / "trainer_state.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses) and summary["best_val_loss"] == pytest.approx(min(losses))
    assert losses[-1] < losses[0], losses


def test_cli_demo_on_the_tiny_world_edits_the_answers(instructed_world, tmp_path, monkeypatch, capsys):
    import instructedit_plugin.models.embedded as embedded

    # The demo's model is the embedded Gemma-3-270M; here the tiny world's base stands in for it,
    # with the tiny model's InstructEd and FT settings under the names the demo reads.
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda *args, **kwargs: instructed_world["base_dir"])
    hparams = tmp_path / "hparams"
    for alg, src in (("InstructEd", "InstructEd/tiny.yaml"), ("FT", "FT/tiny-llama.yaml")):
        (hparams / alg).mkdir(parents=True)
        (hparams / alg / "gemma-3-270m.yaml").write_text((REPO / "hparams" / src).read_text())
    data = tmp_path / "data"  # the world's held-out edits where the demo looks for CounterFact and ZsRE
    (data / "counterfact").mkdir(parents=True)
    (data / "zsre").mkdir()
    held_out = instructed_world["test"]
    cf_records = [_mend_record(i, r) for i, r in enumerate(held_out[:4])]
    (data / "counterfact/counterfact-edit.json").write_text(json.dumps(cf_records))
    (data / "zsre/ZsRE-test-all.json").write_text(json.dumps([_knowedit_record(r) for r in held_out[4:]]))
    out_dir = tmp_path / "demo"
    out = _cli(["demo", "--data_dir", str(data), "--out_dir", str(out_dir),
                "--archive", str(instructed_world["archive"]), "--hparams_dir", str(hparams), "--n_facts", "2"], capsys)
    assert f"InstructEd prefixes: given (--archive): {instructed_world['archive']}" in out
    assert out.count("\n- [counterfact] ") == 2 and out.count("\n- [zsre] ") == 2, out
    assert "EasyEdit metrics over 4 edits" in out
    labels = ["in-context (no prefixes)", "InstructEd (gold)", "InstructEd (retrieval, sequential)", "EasyEdit FT"]
    assert [row[0] for row in _table_rows((out_dir / "demo.md").read_text())] == labels
    assert (out_dir / "demo.png").read_bytes()[:8] == PNG_MAGIC
    payload = json.loads((out_dir / "demo.json").read_text())
    assert sorted(payload["table"]) == sorted(labels) and all(row["n_edits"] == 4 for row in payload["table"].values())
    assert payload["model"] == str(instructed_world["base_dir"]) and payload["n_facts"] == 4
    facts = payload["facts"]
    assert [f["prompt"] for f in facts] == [r["prompt"] for r in held_out[:2] + held_out[4:6]]
    # with the fact given as an instruction the greedy answer becomes the new object
    after = sum(f["after"].startswith(f["target_new"]) for f in facts)
    before = sum(f["before"].startswith(f["target_new"]) for f in facts)
    assert after > before, facts


# ----------------------------------------------------------------------------------------------
# benchmarks/
# ----------------------------------------------------------------------------------------------
#: ``benchmarks/instructed_cpu.py`` edits with ``max_length: 40`` (Gemma's tokens); EasyEdit fails a
#: record whose prompt + answer the tiny tokenizer makes longer.
INSTRUCTED_CPU_MAX_LENGTH = 40


def _short_records_first(src: Path, dst: Path, tokenizer, n: int, within: int = 100) -> None:
    """``src`` (a JSON list) written to ``dst`` with the first ``n`` records, among the first ``within``,
    whose every prompt + answer fits INSTRUCTED_CPU_MAX_LENGTH tiny-tokenizer tokens moved to the front
    (the records from ``within`` on, which recipes train on, keep their places)."""
    from instructedit_plugin.data import load_requests

    raw = json.loads(src.read_text())
    requests = load_requests(src, limit=within)
    assert len(requests) == within

    def pairs(req):
        yield req["prompt"], req["target_new"]
        if req.get("rephrase_prompt"):
            yield req["rephrase_prompt"], req["target_new"]
        for field in ("locality", "portability"):
            for group in (req.get(field) or {}).values():
                prompts, answers = group["prompt"], group["ground_truth"]
                if not isinstance(prompts, list):
                    prompts, answers = [prompts], [answers]
                yield from zip(prompts, answers)

    short = [i for i, req in enumerate(requests)
             if all(len(tokenizer(f"{p} {a}")["input_ids"]) <= INSTRUCTED_CPU_MAX_LENGTH for p, a in pairs(req))][:n]
    assert len(short) == n
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps([raw[i] for i in short] + [r for i, r in enumerate(raw) if i not in short]))


def _instructed_cpu_data(tiny_llama_dir, shared_data_dir, tmp_path, monkeypatch, limit: int) -> Path:
    """A data folder for ``benchmarks/instructed_cpu.py`` on the tiny model (evaluation records that fit its
    max_length first); the recipe's prefixes go to the test's cache."""
    from transformers import AutoTokenizer

    from instructedit_plugin.instructed.recipes import BENCHMARK, EVAL_FILES, recipe_files

    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for rel in recipe_files(BENCHMARK):
        if rel in EVAL_FILES.values():
            _short_records_first(shared_data_dir / rel, data / rel, tok, limit)
        else:
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).symlink_to(shared_data_dir / rel)
    return data


def _instructed_cpu_argv(data: Path, model_dir, limit: int, methods: list[str], out_json: Path) -> list[str]:
    return ["--data_dir", str(data), "--model_dir", str(model_dir), "--quick", "--steps", "2", "--n_train", "4",
            "--limit", str(limit), "--methods", ",".join(methods), "--dtype", "float32", "--latency_n", "1",
            "--bootstrap", "300", "--out", str(out_json)]


def _assert_cpu_intervals_recomputable(bench, out: dict, methods: list[str]) -> None:
    """Every evaluated cell is ``[value, low, high]`` as the per-record values in the JSON give it (the same
    bootstrap), with the value inside its interval; each latency interval holds its point."""
    from benchmarks.results_io import summarize_with_intervals

    for ds in ("counterfact", "zsre"):
        for m in methods:
            cell = out["datasets"][ds][m]
            recs = out["records"][ds][m]
            assert len(recs) == out["n_evaluated"][ds][m]
            assert cell == summarize_with_intervals(recs, out["args"]["bootstrap"]), (ds, m)
            for k in bench.METRICS:
                if cell[k] is not None:
                    assert cell[k][1] <= cell[k][0] <= cell[k][2], (ds, m, k, cell[k])
    for m in methods[1:]:
        row = out["latency"][m]
        assert row["query_ratio_ci"][0] <= row["query_ratio"] <= row["query_ratio_ci"][1], (m, row)
        assert row["edit_ms_ci"][0] <= row["edit_ms"] <= row["edit_ms_ci"][1], (m, row)


def test_instructed_cpu_benchmark_trains_the_recipe_and_evaluates_every_method(tiny_llama_dir, shared_data_dir,
                                                                               tmp_path, monkeypatch):
    limit, steps = 2, 2
    data = _instructed_cpu_data(tiny_llama_dir, shared_data_dir, tmp_path, monkeypatch, limit)
    methods = ["unedited", "in_context", "instructed_gold", "instructed_retrieval"]  # FT/ROME: Gemma layer settings
    out_json = tmp_path / "results" / "instructed_cpu.json"
    bench = _script("benchmarks/instructed_cpu.py")
    assert bench.main(_instructed_cpu_argv(data, tiny_llama_dir, limit, methods, out_json)) == 0
    out = json.loads(out_json.read_text())
    assert set(out) <= bench.RESULT_KEYS
    assert out["model"] == f"{tiny_llama_dir} (float32)" and out["args"]["model_dir"] == str(tiny_llama_dir)
    # the recipe trained exactly the requested steps, here, into the test's cache
    assert out["recipe"]["steps"] == steps == out["recipe"]["planned_steps"] and not out["recipe"]["stopped_by_budget"]
    assert out["recipe"]["config"]["name"] == "benchmark-cf-quick" and out["train_edits"] > 0
    assert list((tmp_path / "cache").glob("instructed_recipes/*/results/best/manifest.json"))
    # every method edited every record (a failing record is counted in errors, not in n)
    assert out["errors"] == {}
    assert out["n_evaluated"] == {ds: {m: limit for m in methods} for ds in ("counterfact", "zsre")}
    for ds, per_method in out["datasets"].items():
        assert list(per_method) == methods, ds
        assert per_method["unedited"]["Loc"] == [100.0, 100.0, 100.0]  # the unedited model agrees with itself
    _assert_cpu_intervals_recomputable(bench, out, methods)
    assert out["latency_inputs"] == 2 and list(out["latency"]) == methods
    assert all(v["query_ratio"] > 0 for v in out["latency"].values())
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    rows = _table_rows(md)
    for method in methods:  # one row per dataset in the results tables, one in the latency table
        assert sum(row[0] == method and row[1] == str(limit) for row in rows) == 2, method
        assert sum(row[0] == method and len(row) == 3 for row in rows) == 1, method
    gold_rows = [r for r in rows if r[0] == "instructed_gold" and len(r) == 8]  # counterfact's, then zsre's
    for row, ds in zip(gold_rows, ("counterfact", "zsre")):  # each cell: the value and its interval
        assert row[2:] == [f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"
                           for v in (out["datasets"][ds]["instructed_gold"][k] for k in bench.METRICS)], (ds, row)


def _merge_source(model: str, limit: int, baseline_limit, recipe_key: str = "other-prefixes") -> dict:
    """An earlier result of ``instructed_cpu.py`` as the committed file has it: bare baseline figures (no per-record
    values), one latency figure re-measured by a later ``--latency_only`` run, and InstructEd rows of other prefixes."""
    row = lambda base: {k: base + i for i, k in enumerate(("Rel", "Gen", "Loc", "Por", "Score", "H"))}  # noqa: E731
    datasets = {ds: {"in_context": row(10.0 + j), "instructed_gold": row(90.0), "ft": row(30.0 + j), "rome": row(50.0 + j)}
                for j, ds in enumerate(("counterfact", "zsre"))}
    main_cmd = f"python benchmarks/instructed_cpu.py --limit {limit} --threads 1"
    return {
        "model": model, "datasets": datasets, "command": main_cmd, "date": "2026-01-01",
        "args": {"limit": limit, "baseline_limit": baseline_limit, "dtype": "float32"},
        "n_evaluated": {ds: {"in_context": limit, "instructed_gold": limit, "ft": limit, "rome": limit}
                        for ds in datasets},
        "latency": {"unedited": {"edit_ms": 0.0, "query_ratio": 1.0}, "in_context": {"edit_ms": 9.0, "query_ratio": 1.2},
                    "instructed_gold": {"edit_ms": 9.5, "query_ratio": 1.4},
                    "ft": {"edit_ms": 1500.0, "query_ratio": 1.01}, "rome": {"edit_ms": 16000.0, "query_ratio": 1.02}},
        "errors": {"rome": ["zsre record 1: RuntimeError: boom"]},
        "recipe": {"key": recipe_key},
        "merged_runs": [{"command": main_cmd + " --latency_only --retime_edits ft", "date": "2026-01-02",
                         "keys": ["latency.ft.edit_ms", "latency.ft.query_ratio"]}],
    }


def test_instructed_cpu_merge_keeps_the_rows_of_another_run_and_names_their_commands(tiny_llama_dir, shared_data_dir,
                                                                                     tmp_path, monkeypatch):
    limit = 2
    data = _instructed_cpu_data(tiny_llama_dir, shared_data_dir, tmp_path, monkeypatch, limit)
    bench = _script("benchmarks/instructed_cpu.py")
    source = _merge_source(f"{tiny_llama_dir} (float32)", limit, None)
    source_json = tmp_path / "earlier.json"
    source_json.write_text(json.dumps(source))
    methods = ["unedited", "instructed_gold"]  # in_context, ft and rome come from the earlier result
    out_json = tmp_path / "results" / "instructed_cpu.json"
    assert bench.main(_instructed_cpu_argv(data, tiny_llama_dir, limit, methods, out_json)
                      + ["--merge", str(source_json)]) == 0
    out = json.loads(out_json.read_text())
    assert set(out) <= bench.RESULT_KEYS
    for ds in ("counterfact", "zsre"):
        # tables in the script's method order; merged rows keep their figures exactly; gold is this run's
        assert list(out["datasets"][ds]) == ["unedited", "in_context", "instructed_gold", "ft", "rome"]
        for m in ("in_context", "ft", "rome"):
            assert out["datasets"][ds][m] == source["datasets"][ds][m], (ds, m)
            assert out["n_evaluated"][ds][m] == limit
        assert out["datasets"][ds]["instructed_gold"] != source["datasets"][ds]["instructed_gold"]
    _assert_cpu_intervals_recomputable(bench, out, methods)
    assert {m: out["latency"][m] for m in ("in_context", "ft", "rome")} == {
        m: source["latency"][m] for m in ("in_context", "ft", "rome")}
    assert out["errors"]["rome"] == source["errors"]["rome"]
    # every merged key names the command that produced it: the earlier run's, or the --latency_only run it merged
    by_command = {run["command"]: run for run in out["merged_runs"]}
    assert set(by_command) == {source["command"], source["merged_runs"][0]["command"]}
    first, retimed = by_command[source["command"]], by_command[source["merged_runs"][0]["command"]]
    assert first["date"] == "2026-01-01" and retimed["date"] == "2026-01-02"
    assert set(retimed["keys"]) == {"latency.ft.edit_ms", "latency.ft.query_ratio"}
    assert {"datasets.counterfact.ft", "datasets.zsre.rome", "latency.rome.edit_ms", "latency.in_context.query_ratio",
            "n_evaluated.zsre.in_context", "errors.rome"} <= set(first["keys"])
    assert not any(k.startswith(("datasets.counterfact.instructed_gold", "latency.instructed_gold"))
                   for run in out["merged_runs"] for k in run["keys"])
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    assert f"* `{source['command']}` (2026-01-01): " in md and "Taken by `--merge" in md
    ft_row = next(r for r in _table_rows(md) if r[0] == "ft" and len(r) == 8)
    assert ft_row[2:] == ["30.0", "31.0", "32.0", "33.0", "34.0", "35.0"]  # bare: the earlier run kept no records
    assert "Rows without an interval (counterfact/in_context, counterfact/ft, counterfact/rome" in md
    # --latency_only re-measures the methods it names; the merged methods keep their latency and its provenance
    before = json.loads(out_json.read_text())
    assert bench.main(_instructed_cpu_argv(data, tiny_llama_dir, limit, methods, out_json)
                      + ["--latency_only", "--retime_edits", "instructed_gold"]) == 0
    after = json.loads(out_json.read_text())
    assert {m: after["latency"][m] for m in ("in_context", "ft", "rome")} == {
        m: source["latency"][m] for m in ("in_context", "ft", "rome")}
    assert list(after["latency"]) == ["unedited", "in_context", "instructed_gold", "ft", "rome"]
    assert after["merged_runs"][:-1] == before["merged_runs"] and after["datasets"] == before["datasets"]
    assert set(after["merged_runs"][-1]["keys"]) == {
        "latency.instructed_gold.query_ratio", "latency.instructed_gold.query_ratio_ci", "latency.instructed_gold.edit_ms",
        "latency.instructed_gold.edit_ms_ci", "base_query_ms", "latency_inputs", "retrieval_hits"}
    gold = after["latency"]["instructed_gold"]
    assert gold["edit_ms_ci"][0] <= gold["edit_ms"] <= gold["edit_ms_ci"][1]


@pytest.mark.parametrize("field, theirs, message", [
    ("limit", 3, "its --limit is 3, this run's is 2; rows of different record limits / dtypes must not share a table. "
                 "Fix: run with --limit 3 (or re-run the merged methods with this --limit)"),
    ("baseline_limit", 1, "its --baseline_limit is 1, this run's is None; rows of different record limits / dtypes "
                          "must not share a table. Fix: run with --baseline_limit 1 (or re-run the merged methods with "
                          "this --baseline_limit)"),
    ("model", "other-model (float32)", "its model is 'other-model (float32)', this run's is 'tiny (float32)'. "
                                       "Fix: merge a result of the same model (--model_dir / --dtype)"),
])
def test_instructed_cpu_merge_refuses_other_records_or_models_before_any_work(tmp_path, field, theirs, message):
    bench = _script("benchmarks/instructed_cpu.py")
    source = _merge_source("tiny (float32)", 2, None)
    if field == "model":
        source["model"] = theirs
    else:
        source["args"][field] = theirs
    (tmp_path / "earlier.json").write_text(json.dumps(source))
    # a data folder that does not exist: the refusal comes before the recipe, the model or the data are touched
    argv = ["--data_dir", str(tmp_path / "missing"), "--model_dir", "tiny", "--dtype", "float32", "--limit", "2",
            "--merge", str(tmp_path / "earlier.json"), "--out", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert str(err.value) == f"--merge {tmp_path / 'earlier.json'}: {message}"
    assert not (tmp_path / "out.json").exists()


def test_instructed_cpu_merge_refuses_instructed_rows_of_other_prefixes():
    bench = _script("benchmarks/instructed_cpu.py")
    source = _merge_source("tiny (float32)", 2, None, recipe_key="aaaa")
    out = {"datasets": {"counterfact": {}, "zsre": {}}, "n_evaluated": {"counterfact": {}, "zsre": {}},
           "latency": {}, "errors": {}, "recipe": {"key": "bbbb"}}
    with pytest.raises(SystemExit, match=r"its instructed_gold rows come from other prefixes \(recipe key 'aaaa', this "
                                         r"run's 'bbbb'\)\. Fix: add instructed_gold to --methods so this run evaluates "
                                         r"them$"):
        bench.merge_methods(out, source, "earlier.json", ["unedited", "instructed_retrieval"])
    assert out["datasets"] == {"counterfact": {}, "zsre": {}} and "merged_runs" not in out  # nothing half-merged
    # the same prefixes: the gold rows are taken, with the earlier run's command
    source["recipe"]["key"] = "bbbb"
    assert bench.merge_methods(out, source, "earlier.json", ["unedited", "instructed_retrieval"]) == [
        "in_context", "instructed_gold", "ft", "rome"]
    assert out["datasets"]["zsre"]["instructed_gold"] == source["datasets"]["zsre"]["instructed_gold"]


def test_instructedit_cpu_benchmark_trains_three_editors_the_same_steps(tiny_llama_dir, shared_data_dir, tmp_path):
    n_test = 2
    out_json = tmp_path / "results" / "instructedit_cpu.json"
    bench = _script("benchmarks/instructedit_cpu.py")
    # a budget below the 3 timed calibration steps: every editor trains exactly those 3 steps
    assert bench.main(["--data_dir", str(shared_data_dir), "--model_dir", str(tiny_llama_dir),
                       "--budget_minutes", "1e-6", "--n_test", str(n_test), "--n_train", "8", "--layers", "2,3",
                       "--rank", "16", "--dtype", "float32", "--max_pairs", "1", "--work_dir", str(tmp_path / "work"),
                       "--out", str(out_json)]) == 0
    out = json.loads(out_json.read_text())
    assert set(out) <= bench.RESULT_KEYS
    assert out["model"] == f"{tiny_llama_dir} (float32, CPU)"
    assert out["train_steps"] == 3
    methods = ["instructedit", "mend_multitask", "mend_single_task"]
    assert list(out["runs"]) == methods
    assert out["inner_params"] == [f"model.layers.{i}.mlp.{w}_proj.weight" for i in (2, 3) for w in ("up", "down")]
    for method in methods:
        assert list((tmp_path / "work" / method).glob("models/InstructEdit/*/best/editor.safetensors")), method
    tasks = list(bench.TASK_ORDER)
    assert out["n_edits"] == {t: n_test for t in tasks} and out["test_records"] == {t: n_test for t in tasks}
    assert {t: list(per_method) for t, per_method in out["tasks"].items()} == {t: methods for t in tasks}
    assert list(out["unseen_instruction"]) == tasks
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    rows = [(row[0], row[1], row[-1]) for row in _table_rows(md)
            if row[0] in tasks and not row[1].startswith("*paper:")]  # the paper's quoted rows are not ours
    # the paper protocol (the default): instructed metric inputs, InstructEdit's plain-input scores beside
    assert out["protocol"]["name"] == "paper" and out["protocol"]["metric_inputs"] == ["instructed", "plain"]
    assert rows == ([(t, m, str(n_test)) for t in tasks for m in methods]
                    + [(t, "instructedit", str(n_test)) for t in tasks] * 3)
    sent = out["tasks"]["convsent"]["instructedit"]["sentiment"]
    assert sent["fluency_post"] is not None and sent["es"] is not None
    _assert_intervals_recomputable(bench, out)


def _assert_intervals_recomputable(bench, out):
    """Every cell of every table is what its per-edit values in the JSON give, and each interval holds its
    point estimate; it has width zero exactly where the edits agree."""
    sections = [s for s, _ in bench.SECTIONS if out.get(s)]
    assert sections == ["tasks", "unseen_instruction", "tasks_plain_inputs", "unseen_instruction_plain_inputs"]
    assert set(out["records"]) == set(sections)
    for section in sections:
        for task, per_method in out[section].items():
            for method, cell in per_method.items():
                cols = out["records"][section][task][method]
                assert cell == bench.cell_from_columns(cols, out["args"]["bootstrap"], out["args"]["seed"])
                for m in (*bench.METRICS, "Score"):
                    if cell[m] is None:
                        continue
                    lo, hi = cell["ci"][m]
                    assert lo <= cell[m] <= hi, (section, task, method, m)
                    vals = [v for v in cols.get(m, []) if v is not None]
                    if vals and m != "Score":
                        assert (lo < hi) == (len(set(vals)) > 1), (section, task, method, m, vals, cell["ci"][m])
                sent = cell.get("sentiment")
                if sent:
                    for k, (lo, hi) in sent["ci"].items():
                        assert lo <= sent[k] <= hi, (section, method, k)
    for method, v in out["latency"].items():
        lo, hi = v["ci"]["edit_ms"]
        assert lo <= v["edit_ms"] <= hi and v["n"] == len(out["edit_ms_per_edit"][method])
    ratio, lo, hi = out["latency_ratio"]["instructedit/mend_multitask"]
    assert lo <= ratio <= hi


def test_instructedit_cpu_benchmark_max_iters_trains_every_editor_exactly_n_steps(tiny_llama_dir, shared_data_dir, tmp_path):
    out_json = tmp_path / "instructedit_cpu.json"
    bench = _script("benchmarks/instructedit_cpu.py")
    assert bench.main(["--data_dir", str(shared_data_dir), "--model_dir", str(tiny_llama_dir), "--max_iters", "2",
                       "--n_test", "3", "--n_train", "8", "--layers", "2,3", "--rank", "16", "--dtype", "float32",
                       "--max_pairs", "1", "--bootstrap", "300", "--no_single_task", "--work_dir", str(tmp_path / "work"),
                       "--out", str(out_json)]) == 0
    out = json.loads(out_json.read_text())
    assert out["train_steps"] == 2 and {name: r["steps"] for name, r in out["runs"].items()} == {
        "instructedit": 2, "mend_multitask": 2}
    assert out["protocol"]["name"] == "paper" and out["args"]["max_iters"] == 2
    assert out["n_edits"] == {t: 3 for t in bench.TASK_ORDER}
    _assert_intervals_recomputable(bench, out)
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    # the markdown shows each interval of the JSON
    rel = out["tasks"]["zsre_holdout"]["instructedit"]
    assert f"| zsre_holdout | instructedit | {rel['Rel']:.2f} [{rel['ci']['Rel'][0]:.2f}, {rel['ci']['Rel'][1]:.2f}] |" in md
    # the paper's figures are quoted beside the instructed-input tables only (it never scores plain inputs)
    blocks = {b.split("\n", 1)[0]: b for b in md.split("\n## ")[1:]}
    assert "*paper: InstructEdit (Table 3" in blocks["Seen instruction / baselines"]
    assert "*paper: InstructEdit, unseen" in blocks["Unseen (held-back) instruction"]
    assert not any("*paper:" in b for h, b in blocks.items() if "plain inputs" in h)
    # --render rebuilds the same markdown from the JSON alone
    out_json.with_suffix(".md").unlink()
    assert bench.main(["--render", "--out", str(out_json)]) == 0
    assert out_json.with_suffix(".md").read_text() == md


def test_instructedit_cpu_tasks_option_evaluates_in_order_and_rewrites_results_after_each_task(
        tiny_llama_dir, shared_data_dir, tmp_path, monkeypatch):
    out_json = tmp_path / "instructedit_cpu.json"
    bench = _script("benchmarks/instructedit_cpu.py")
    written = []
    write = bench.write_results

    def recording_write(path, out, *args, **kwargs):
        written.append((list(out["tasks"]), out.get("evaluated_tasks"), sorted(out["n_edits"])))
        return write(path, out, *args, **kwargs)

    monkeypatch.setattr(bench, "write_results", recording_write)
    assert bench.main(["--data_dir", str(shared_data_dir), "--model_dir", str(tiny_llama_dir), "--max_iters", "1",
                       "--n_test", "2", "--n_train", "8", "--layers", "3", "--rank", "16", "--dtype", "float32",
                       "--max_pairs", "1", "--bootstrap", "200", "--no_single_task", "--tasks", "zsre_holdout,recent",
                       "--work_dir", str(tmp_path / "work"), "--out", str(out_json)]) == 0
    # a partial file after the first task, the whole file after the second; tables keep the usual task order
    assert written == [(["zsre_holdout"], ["zsre_holdout"], ["zsre_holdout"]),
                       (["recent", "zsre_holdout"], ["zsre_holdout", "recent"], ["recent", "zsre_holdout"])]
    out = json.loads(out_json.read_text())
    assert set(out) <= bench.RESULT_KEYS and out["args"]["tasks"] == "zsre_holdout,recent"
    assert {t: list(m) for t, m in out["tasks"].items()} == {t: ["instructedit", "mend_multitask"]
                                                            for t in ("recent", "zsre_holdout")}
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    assert "- evaluated tasks (in this order): zsre_holdout, recent; not evaluated: counterfact, convsent" in md
    assert out["latency"]["instructedit"]["n"] == 4  # seen-instruction edits of both tasks
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "recent,recent"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "zsre"])


def test_memory_scale_benchmark_measures_every_requested_size(tmp_path):
    sizes = [1000, 5000]
    out_json = tmp_path / "memory_scale.json"
    bench = _script("benchmarks/memory_scale.py")
    result = bench.main(["--sizes", *map(str, sizes), "--queries", "40", "--repeats", "10", "--out", str(out_json)])
    out = json.loads(out_json.read_text())
    assert out == json.loads(json.dumps(result)) and set(out) <= bench.RESULT_KEYS
    kinds = ["dense", "flat", "ivf"]
    assert [(r["size"], r["kind"]) for r in out["rows"]] == [(s, k) for s in sizes for k in kinds]
    assert [r["active_index"] for r in out["rows"]] == ["dense", "flat", "dense (too small for IVF)",
                                                        "dense", "flat", "ivf"]
    for r in out["rows"]:
        assert r["timed_queries"] >= 5 and r["query_ms"] > 0 and 0 < r["query_cpu_ms"] and r["build_s"] >= 0
        assert r["recall_at_1"] == 1.0 or (r["kind"] == "ivf" and r["recall_at_1"] >= 0.9), r
        # RAM: the float32 matrix, plus a float32 copy (flat) or 8-bit codes, ids and centroids (ivf)
        extra = {"dense": 0, "flat": 1536}.get(r["active_index"], 0)
        if r["active_index"] == "ivf":
            assert 1536 + 384 < r["ram_bytes_per_entry"] < 1536 + 384 + 8 + 60
        else:
            assert r["ram_bytes_per_entry"] == 1536 + extra
        assert r["disk_bytes_per_entry"] > 1536  # the float32 matrix is saved; IVF adds its codes
    assert out["targets"] == []  # 100k and 1M were not run
    md = out_json.with_suffix(".md").read_text()
    assert md == bench.render_markdown(out)
    table = [row for row in _table_rows(md) if len(row) == 10 and row[0][0].isdigit()]
    assert [(int(row[0].replace(",", "")), row[1]) for row in table] == [(s, k) for s in sizes for k in kinds]

def test_gate_calibration_benchmark_reports_default_and_calibrated_gates(shared_data_dir, tmp_path):
    size = 120
    out_json = tmp_path / "gate_calibration.json"
    bench = _script("benchmarks/gate_calibration.py")
    result = bench.main(["--sizes", str(size), "--data_dir", str(shared_data_dir), "--variants", "default",
                         "--out", str(out_json)])
    out = json.loads(out_json.read_text())
    assert out == json.loads(json.dumps(result)) and set(out) <= bench.RESULT_KEYS
    rows = out["rows"]
    assert [(r["size"], r["score"], r["std"], r["pad"], r["threshold_kind"]) for r in rows] == [
        (size, "cosine", "population", "zero", "default"), (size, "cosine", "population", "zero", "calibrated")]
    default, calibrated = rows
    assert default["threshold"] == 0.1 and calibrated["threshold"] != 0.1
    for r in rows:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["report_positives"] == size // 2
        f1 = 2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"]) if r["precision"] + r["recall"] else 0
        assert r["f1"] == pytest.approx(f1, abs=2e-4)
    assert out["timing"][0]["sentences"] == 3 * size
    assert out_json.with_suffix(".md").read_text() == bench.render_markdown(out)


def test_instructed_cpu_markdown_names_one_producer_per_merged_key():
    """A key a later run replaced is listed under that run only (the JSON keeps the whole history)."""
    bench = _script("benchmarks/instructed_cpu.py")
    runs = [{"command": "first", "date": None, "keys": ["latency.ft.edit_ms", "latency.rome.query_ratio"]},
            {"command": "migration", "date": "2026-01-01", "keys": ["n_evaluated"]},
            {"command": "retime", "date": "2026-01-02", "keys": ["latency.ft.edit_ms", "n_evaluated"]}]
    assert bench.current_merged_runs(runs) == [
        {"command": "first", "date": None, "keys": ["latency.rome.query_ratio"]},
        {"command": "retime", "date": "2026-01-02", "keys": ["latency.ft.edit_ms", "n_evaluated"]}]
    assert runs[0]["keys"] == ["latency.ft.edit_ms", "latency.rome.query_ratio"]  # not changed in place
