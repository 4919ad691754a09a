"""``benchmarks/instructedit_cpu.py --merge_from``: a task evaluated by a separate run of the same settings is
added to a saved result. The committed results are split into a saved file and a one-task part; merging the
part back must give the committed figures and intervals, record where they came from, and refuse a part made
with other settings. Nothing here loads a model."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ._scripts import load_script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: committed results of instructedit_cpu.py that keep their per-edit values
STEMS = sorted(p.stem for p in RESULTS.glob("instructedit_cpu*.json")
               if "records" in json.loads(p.read_text(encoding="utf-8")))
FIGURE_KEYS = ("tasks", "unseen_instruction", "tasks_plain_inputs", "unseen_instruction_plain_inputs", "records",
               "n_edits", "edit_ms_per_edit", "latency", "latency_ratio")


def _bench():
    return load_script("benchmarks/instructedit_cpu.py", "benchmark_script_instructedit_cpu")


def _saved(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8"))


def _split_off_last_task(out: dict) -> tuple[dict, dict, str]:
    """(the saved file without the last evaluated task, a part holding only that task, the task): as if the
    run had stopped before that task and a second run with ``--tasks <task>`` had evaluated it."""
    bench = _bench()
    order = bench.evaluated_tasks(out)
    task, n = order[-1], out["n_edits"][order[-1]]
    base, part = copy.deepcopy(out), copy.deepcopy(out)
    for section in bench._TASK_SECTIONS:
        base[section].pop(task)
        base["records"][section].pop(task)
        part[section] = {task: out[section][task]}
        part["records"][section] = {task: out["records"][section][task]}
    base["n_edits"].pop(task)
    part["n_edits"] = {task: n}
    base["evaluated_tasks"], part["evaluated_tasks"] = order[:-1], [task]
    base["edit_ms_per_edit"] = {m: ms[:-n] for m, ms in out["edit_ms_per_edit"].items()}
    part["edit_ms_per_edit"] = {m: ms[-n:] for m, ms in out["edit_ms_per_edit"].items()}
    for block in (base, part):
        block["latency"], ratio = bench.latency_figures(block["edit_ms_per_edit"], out["args"]["bootstrap"],
                                                        out["args"]["seed"])
        block["latency_ratio"] = ratio
    part.pop("merged_runs", None)
    part["command"] = out["command"] + f" --tasks {task} --out /elsewhere/part.json"
    part["args"] = {**out["args"], "tasks": task, "data_dir": "/elsewhere/data"}  # the same data, read from elsewhere
    part["date"], part["eval_seconds"] = "2031-01-02", 1234.0
    return base, part, task


@pytest.mark.parametrize("stem", STEMS)
def test_merging_a_split_off_task_gives_back_the_committed_figures_and_records_where_they_came_from(stem):
    bench, out = _bench(), _saved(stem)
    base, part, task = _split_off_last_task(out)
    merged = bench.merge_results(base, part, merged_by="python benchmarks/instructedit_cpu.py --merge_from p.json")
    # every figure and interval, the per-edit values, the edit counts and the evaluation order come back
    for key in FIGURE_KEYS:
        assert merged.get(key) == out.get(key), key
    assert merged.get("evaluated_tasks") == out.get("evaluated_tasks")
    # the other tasks' figures are the saved file's; the configuration stays the saved run's
    for key in ("command", "args", "date", "runs", "eval_seconds", "wall_seconds", "notes", "method_notes"):
        assert merged.get(key) == base.get(key), key
    # provenance: the part's command, date and every key it set
    entry = merged["merged_runs"][-1]
    assert merged["merged_runs"][:-1] == (base.get("merged_runs") or [])
    assert entry["command"] == part["command"] and entry["date"] == "2031-01-02"
    assert {f"tasks.{task}", f"unseen_instruction.{task}", f"records.tasks.{task}", f"n_edits.{task}",
            "latency", "edit_ms_per_edit"} <= set(entry["keys"])
    assert not [k for k in entry["keys"] if k.startswith("tasks.") and k != f"tasks.{task}"]
    assert "--merge_from p.json" in entry["note"] and "1234 s" in entry["note"]
    md = bench.render_markdown(merged)
    assert "## Merged into this file" in md and f"`{part['command']}` (2031-01-02)" in md


def test_merge_from_writes_the_merged_json_and_its_markdown_and_leaves_the_part_alone(tmp_path):
    bench = _bench()
    base, part, task = _split_off_last_task(_saved(STEMS[0]))
    base_json, part_json = tmp_path / "saved.json", tmp_path / "part.json"
    base_json.write_text(json.dumps(base), encoding="utf-8")
    part_json.write_text(json.dumps(part), encoding="utf-8")
    part_bytes = part_json.read_bytes()
    notes = tmp_path / "notes.md"
    notes.write_text("## What these numbers mean\n\n* Merged.\n", encoding="utf-8")
    assert bench.main(["--merge_from", str(part_json), "--out", str(base_json), "--notes", str(notes)]) == 0
    merged = json.loads(base_json.read_text(encoding="utf-8"))
    assert task in merged["tasks"] and merged["notes"] == "## What these numbers mean\n\n* Merged.\n"
    assert merged["merged_runs"][-1]["note"].endswith(
        f"Merged with `python benchmarks/instructedit_cpu.py --merge_from {part_json} --out {base_json} --notes {notes}`.")
    md = base_json.with_suffix(".md").read_text(encoding="utf-8")
    assert md == bench.render_markdown(merged) and f"| {task} | instructedit |" in md
    assert part_json.read_bytes() == part_bytes
    # the same part again: its task is now in the saved file
    with pytest.raises(bench.MergeError, match=f"tasks {task} are already in .*Fix: merge a part"):
        bench.main(["--merge_from", str(part_json), "--out", str(base_json)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--merge_from", str(part_json), "--render"])


@pytest.mark.parametrize("change", [{"layers": "15,16"}, {"cedit": 0.3}, {"cloc": 0.5}, {"n_test": 50},
                                    {"bootstrap": 1000}, {"convsent_direction": "positive"}])
def test_merge_refuses_a_part_made_with_other_settings_and_writes_nothing(change, tmp_path):
    bench = _bench()
    base, part, _ = _split_off_last_task(_saved(STEMS[0]))
    part["args"].update(change)
    base_json, part_json = tmp_path / "saved.json", tmp_path / "part.json"
    base_json.write_text(json.dumps(base), encoding="utf-8")
    part_json.write_text(json.dumps(part), encoding="utf-8")
    (key, value), = change.items()
    with pytest.raises(bench.MergeError) as err:
        bench.main(["--merge_from", str(part_json), "--out", str(base_json)])
    message = str(err.value)
    assert f"args.{key}: {base['args'][key]!r} here, {value!r} in the part" in message
    assert "Fix: re-run the part with the saved command" in message and base["command"] in message
    assert json.loads(base_json.read_text(encoding="utf-8")) == base and not base_json.with_suffix(".md").exists()


def test_merge_refuses_other_editors_and_results_without_per_edit_values():
    bench = _bench()
    base, part, _ = _split_off_last_task(_saved(STEMS[0]))
    other = dict(part, inner_params=["model.layers.3.mlp.up_proj.weight"], train_steps=part["train_steps"] + 1)
    with pytest.raises(bench.MergeError, match=r"inner_params: .*train_steps: .*Fix: "):
        bench.merge_results(base, other)
    with pytest.raises(bench.MergeError, match=r"no per-edit values .*Fix: "):
        bench.merge_results(base, {k: v for k, v in part.items() if k != "records"})
    if len(STEMS) > 1:  # the committed runs of different editor settings do not merge into each other
        second, _, _ = _split_off_last_task(_saved(STEMS[1]))
        with pytest.raises(bench.MergeError, match=r"args\.(layers|cedit)"):
            bench.merge_results(base, second)
