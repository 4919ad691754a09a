"""The committed benchmark results (``benchmarks/results/``) are regenerable from their JSON.

Each ``<name>.json`` is the single source of its ``<name>.md``: the script that writes it renders the
markdown from the JSON alone. For every committed JSON these tests re-render the markdown with that
script's ``render_markdown`` and compare it byte for byte, check that the JSON holds only keys the
script writes (its ``RESULT_KEYS``), that the notes in the JSON are the committed notes file's text,
and that the intervals in it are the ones the script computes. Nothing here loads a model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ._scripts import load_script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NOTES = REPO / "benchmarks" / "notes"
#: results stem -> the script that writes it
SCRIPTS = {
    "instructed_cpu": REPO / "benchmarks" / "instructed_cpu.py",
    "instructed_ablations": REPO / "benchmarks" / "instructed_ablations.py",
    "instructed_long_recipe": REPO / "benchmarks" / "instructed_ablations.py",  # --variants paper,long --datasets counterfact
    "instructedit_cpu": REPO / "benchmarks" / "instructedit_cpu.py",
    "instructedit_cpu_cedit1": REPO / "benchmarks" / "instructedit_cpu.py",  # earlier defaults: layers 16-17, cedit 1
    "memory_scale": REPO / "benchmarks" / "memory_scale.py",
    "mquake_cpu": REPO / "examples" / "run_mquake.py",
    "mquake_cpu_subject_chain": REPO / "examples" / "run_mquake.py",
    "mquake_cpu_oracle": REPO / "examples" / "run_mquake.py",
    "mquake_cpu_multihop": REPO / "examples" / "run_mquake.py",
    "mquake_retrieval": REPO / "benchmarks" / "mquake_retrieval.py",
    "demo_timing": REPO / "benchmarks" / "demo_timing.py",
    "gate_calibration": REPO / "benchmarks" / "gate_calibration.py",
    **{f"instructed_knowedit_{name}": REPO / "benchmarks" / "instructed_knowedit.py"
       for name in ("zsre", "wiki_counterfact", "wiki_recent")},
    **{f"instructedit_{a}": REPO / "benchmarks" / "instructedit_analyses.py"
       for a in ("pilot", "scaling", "mixing", "directions")},
    "memory_editors": REPO / "benchmarks" / "memory_editors.py",
    "instructedit_latency": REPO / "benchmarks" / "instructedit_latency.py",
    "instructedit_latency_layer17": REPO / "benchmarks" / "instructedit_latency.py",  # --layers 17: instructedit_cpu's editor
    "memory_editors_sequential": REPO / "benchmarks" / "memory_editors.py",
}
#: results stems whose script also draws a figure, ``<name>.png``, from the JSON
WITH_PNG = {f"instructedit_{a}" for a in ("pilot", "scaling", "mixing", "directions")}
RESULT_STEMS = sorted(p.stem for p in RESULTS.glob("*.json"))


def _script(stem: str):
    return load_script(SCRIPTS[stem], f"benchmark_script_{SCRIPTS[stem].stem}")


def _saved(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8"))


def test_every_result_has_a_script_and_every_markdown_a_json():
    assert RESULT_STEMS, "no committed results"
    assert set(RESULT_STEMS) <= set(SCRIPTS), f"results without a known script: {set(RESULT_STEMS) - set(SCRIPTS)}"
    files = {p.name for p in RESULTS.iterdir()}
    expected = {f"{stem}.{ext}" for stem in RESULT_STEMS for ext in ("json", "md")}
    expected |= {f"{stem}.png" for stem in RESULT_STEMS if stem in WITH_PNG}
    assert files == expected, sorted(files)


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_markdown_is_the_render_of_the_json(stem):
    rendered = _script(stem).render_markdown(_saved(stem))
    committed = (RESULTS / f"{stem}.md").read_bytes()
    assert rendered.encode("utf-8") == committed, (
        f"benchmarks/results/{stem}.md is not what its script renders from {stem}.json; rebuild it with the "
        f"script's --render")


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_json_holds_only_keys_its_script_writes(stem):
    allowed = _script(stem).RESULT_KEYS
    extra = sorted(set(_saved(stem)) - set(allowed))
    assert not extra, f"{stem}.json: keys {SCRIPTS[stem].name} never writes: {extra}"


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_notes_come_from_the_committed_notes_file(stem):
    from benchmarks.results_io import read_notes

    out, notes_file = _saved(stem), NOTES / f"{stem}.md"
    if notes_file.is_file():
        assert out.get("notes") == read_notes(notes_file), f"rebuild with --render --notes {notes_file.relative_to(REPO)}"
    else:
        assert not out.get("notes"), f"{stem}.json has notes but there is no {notes_file.relative_to(REPO)}"


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_merged_runs_name_their_command_and_keys(stem):
    for run in _saved(stem).get("merged_runs") or []:
        assert run["command"].strip() and run["keys"] and "date" in run, run


@pytest.mark.parametrize("stem", [s for s in RESULT_STEMS if s.startswith("mquake_cpu")])
def test_mquake_intervals_are_the_scripts_wilson_intervals(stem):
    run = _script(stem)
    out = _saved(stem)
    assert set(out["ci95"]) == set(out["results"]) == set(out["settings"])
    for setting, rows in out["results"].items():
        assert set(out["ci95"][setting]) == set(rows)
        for name, s in rows.items():
            ci = out["ci95"][setting][name]
            assert ci["Por_Nhop"] == run.wilson_interval(s["questions_correct"], s["questions"])
            assert ci["Por_any"] == run.wilson_interval(s["cases_correct"], s["cases"])
            assert ci["Hop-Acc"] == run.wilson_interval(s["single_hops_correct"], s["single_hop_questions"])
            assert s["Por_Nhop"] == s["por_paper"] == round(100 * s["questions_correct"] / s["questions"], 4)
            low, high = ci["Por_Nhop_release"]
            assert low <= s["por_release"] <= high


def test_instructed_cpu_intervals_are_the_scripts_bootstrap_of_its_records():
    """Every evaluated cell of ``instructed_cpu.json`` is ``[value, low, high]`` as the script computes it from the
    per-record values the JSON keeps; merged cells without records are the ones *Merged into this file* names."""
    from benchmarks.results_io import summarize_with_intervals

    out = _saved("instructed_cpu")
    merged = {k for run in out.get("merged_runs") or [] for k in run["keys"]}
    for ds, rows in out["datasets"].items():
        for method, cell in rows.items():
            recs = (out.get("records") or {}).get(ds, {}).get(method)
            if recs is None:
                assert f"datasets.{ds}.{method}" in merged, (ds, method)
                continue
            assert len(recs) == out["n_evaluated"][ds][method]
            assert cell == summarize_with_intervals(recs, out["args"]["bootstrap"]), (ds, method)
            assert all(v[1] <= v[0] <= v[2] for v in cell.values() if v is not None), (ds, method)


def test_summation_decides_a_committed_cell_at_a_rounding_boundary():
    """``edit_figures``'s ``summation``: the committed InstructEd cells were written with ``sum`` and
    ``memory_editors*.json`` with ``math.fsum``; on one committed cell the two round differently, so each
    script keeps its own (the reason for the keyword)."""
    import math

    from benchmarks.results_io import summarize_with_intervals

    out = _saved("instructed_cpu")
    recs, cell = out["records"]["counterfact"]["rome"], out["datasets"]["counterfact"]["rome"]
    assert summarize_with_intervals(recs, out["args"]["bootstrap"])["Loc"] == cell["Loc"]
    assert summarize_with_intervals(recs, out["args"]["bootstrap"], summation=math.fsum)["Loc"] != cell["Loc"]


@pytest.mark.parametrize("stem", [s for s in RESULT_STEMS if s.startswith("instructed_knowedit_")])
def test_instructed_knowedit_rows_are_the_scripts_summary_of_their_records(stem):
    """Every KnowEdit row is ``summarize`` of the per-record values it keeps (what ``--resummarize`` recomputes):
    the figures, their intervals and n, rounded as the committed file has them."""
    run, out = _script(stem), _saved(stem)
    for ds, rows in out["datasets"].items():
        for method, row in rows.items():
            assert {k: v for k, v in row.items() if k != "records"} == run.summarize(row["records"]), (ds, method)


def test_instructed_cpu_is_the_long_recipe_and_agrees_with_the_long_recipe_file():
    """#15 item 5: the committed benchmark runs the longer step-count recipe to its end, and its CounterFact gold row
    is ``instructed_long_recipe``'s ``long`` row (the same prefixes, records and evaluation)."""
    out, long_run = _saved("instructed_cpu"), _saved("instructed_long_recipe")
    assert out["recipe"]["config"]["name"] == "benchmark-cf-long" and out["recipe"]["steps"] == 600
    assert not out["recipe"]["stopped_by_budget"] and not any(k.startswith("zsre") for k in out["recipe"]["sources"])
    assert out["recipe"]["key"] == long_run["recipes"]["long"]["key"]
    assert out["args"]["limit"] == long_run["args"]["limit"] == 100
    gold = {k: v for k, v in out["datasets"]["counterfact"]["instructed_gold"].items()}
    assert gold == {k: v for k, v in long_run["datasets"]["counterfact"]["long"].items() if k != "n"}
    assert gold["Gen"][0] >= 85  # the recipe's target


def test_wilson_interval():
    run = _script("mquake_cpu")
    assert run.wilson_interval(19, 25) == [56.6, 88.5]  # the textbook formula, z = 1.96
    assert run.wilson_interval(0, 10)[0] == 0.0 and run.wilson_interval(10, 10)[1] == 100.0
    lo, hi = run.wilson_interval(5, 10)
    assert lo < 50 < hi and lo == pytest.approx(100 - hi, abs=0.1)
    assert run.wilson_interval(0, 0) is None


def _main_render(stem: str, folder: Path, *extra: str) -> Path:
    """The script's own --render on a copy of the committed JSON in ``folder``; returns the new markdown."""
    shutil.copy(RESULTS / f"{stem}.json", folder / f"{stem}.json")
    module = _script(stem)
    if stem.startswith("mquake_cpu"):
        rc = module.main(["--render", "--metrics_save_dir", str(folder), "--name", stem, *extra])
    else:
        rc = module.main(["--render", "--out", str(folder / f"{stem}.json"), *extra])
    assert rc in (0, None) or isinstance(rc, dict)
    return folder / f"{stem}.md"


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_render_option_rebuilds_the_committed_markdown(stem, tmp_path):
    md = _main_render(stem, tmp_path)
    assert md.read_bytes() == (RESULTS / f"{stem}.md").read_bytes()
    assert json.loads((tmp_path / f"{stem}.json").read_text(encoding="utf-8")) == _saved(stem)


@pytest.mark.parametrize("stem", RESULT_STEMS)
def test_render_with_notes_puts_the_file_into_the_json_and_the_markdown(stem, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("\n## What these numbers mean\n\n* A sentence only this test writes.\n\n", encoding="utf-8")
    md = _main_render(stem, tmp_path, "--notes", str(notes))
    out = json.loads((tmp_path / f"{stem}.json").read_text(encoding="utf-8"))
    assert out["notes"] == "## What these numbers mean\n\n* A sentence only this test writes.\n"
    assert md.read_text(encoding="utf-8").endswith("\n\n## What these numbers mean\n\n* A sentence only this test writes.\n")
    assert {k: v for k, v in out.items() if k != "notes"} == {k: v for k, v in _saved(stem).items() if k != "notes"}


def test_merged_runs_are_listed_in_the_markdown():
    from benchmarks.results_io import merged_into, merged_runs_lines

    out = {"latency": {}, "merged_runs": [{"command": "python x.py --latency_only", "keys": ["latency.ft.edit_ms"],
                                           "date": "2026-01-02"}]}
    text = "\n".join(merged_runs_lines(out))
    assert "`python x.py --latency_only` (2026-01-02): `latency.ft.edit_ms`." in text
    assert merged_into(out, "latency") and merged_into(out, "latency.ft.edit_ms") and not merged_into(out, "datasets")
    assert merged_runs_lines({}) == []


#: results run under an earlier default of their script: the options that re-create those settings today
EARLIER_DEFAULTS: dict[str, list[str]] = {"instructedit_cpu_cedit1": ["--layers", "16,17", "--cedit", "1.0"]}
EDITOR_OPTIONS = ("layers", "rank", "lr", "edit_lr", "lr_lr", "cedit", "cloc", "max_pairs", "dtype")


@pytest.mark.parametrize("stem", [s for s in RESULT_STEMS if SCRIPTS[s].name in ("instructedit_cpu.py",
                                                                                   "instructedit_analyses.py")])
def test_instructedit_commands_still_parse_to_the_editor_settings_they_ran_with(stem):
    """Re-running a committed command (plus ``EARLIER_DEFAULTS``) must train the editor the result describes:
    a change of the scripts' shared editor defaults may not silently change what an old command does."""
    import shlex

    out = _saved(stem)
    tokens = shlex.split(out["command"])
    argv = tokens[next(i for i, t in enumerate(tokens) if t.endswith(SCRIPTS[stem].name)) + 1:]
    parsed = vars(_script(stem).parse_args(argv + EARLIER_DEFAULTS.get(stem, [])))
    assert {k: parsed[k] for k in EDITOR_OPTIONS} == {k: out["args"][k] for k in EDITOR_OPTIONS}
    layers = [int(x) for x in parsed["layers"].split(",")]
    assert out["inner_params"] == [f"model.layers.{i}.mlp.{w}_proj.weight" for i in layers for w in ("up", "down")]
