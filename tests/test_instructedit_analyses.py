"""The paper's analyses (``benchmarks/instructedit_analyses.py``) end to end on a tiny synthetic world.

A tiny GPT-2 first learns four relations of 16 countries (capital, language, currency, sport);
each relation stands for one of the paper's tasks (counterfact, recent, convsent, zsre), with
counterfactual edits, rephrases and same-relation neighbours as locality data. Training
records use 12 countries, test records the other 4. Every analysis then runs through the
script's ``main`` with a shared editor cache, and the tests check what each result says.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.fact_world import Relation, WorldRecipe, build_world_model_dir, neighbours, world_truth

from ._scripts import load_script

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
COUNTRIES = "France Germany Italy Spain Japan China England Russia Canada Egypt India Brazil Greece Poland Sweden Mexico".split()
N_TRAIN_COUNTRIES = 12
#: one relation per task of the paper
RELATIONS = (
    Relation("counterfact", "The capital of {} is", "Which city is the capital of {}?", ("Paris", "Berlin", "Rome", "Tokyo", "London")),
    Relation("recent", "The official language of {} is", "People in {} speak", ("French", "German", "Spanish", "English")),
    Relation("convsent", "The currency of {} is", "In {} people pay with the", ("Euro", "Dollar", "Yen", "Pound")),
    Relation("zsre", "The favourite sport of {} is", "People in {} love to play", ("football", "tennis", "golf", "chess")),
)
#: the world model learns the plain facts only (150 full-batch steps)
WORLD = WorldRecipe(steps=150)
STEPS = 150
N_TEST = 8


def world_data() -> dict:
    truth = world_truth(RELATIONS, COUNTRIES)
    rng = random.Random(0)
    train, test = {}, {}
    for relation in RELATIONS:
        task = relation.task
        recs = {"train": [], "test": []}
        for k, c in enumerate(COUNTRIES):
            locality = neighbours(relation, c, truth, COUNTRIES, rng)
            for target in [a for a in relation.answers if a != truth[task][c]][:3]:
                recs["train" if k < N_TRAIN_COUNTRIES else "test"].append({
                    "prompt": relation.prompt.format(c), "target_new": target, "ground_truth": truth[task][c],
                    "subject": c, "rephrase_prompt": relation.rephrase.format(c), "topic": c, "label": "positive",
                    "portability": {}, "locality": locality})
        rng.shuffle(recs["test"])
        train[task] = recs["train"]
        test["zsre_holdout" if task == "zsre" else task] = recs["test"]
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = build_world_model_dir(RELATIONS, COUNTRIES, WORLD)
    root = tmp_path_factory.mktemp("analyses")
    (root / "world.json").write_text(json.dumps(world_data()))
    yield {"root": root, "model_dir": model_dir, "data_json": root / "world.json"}
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/instructedit_analyses.py")


def _argv(world, shared_data_dir, analysis: str, *extra: str) -> list[str]:
    return [analysis, "--data_json", str(world["data_json"]), "--data_dir", str(shared_data_dir),
            "--model_dir", str(world["model_dir"]), "--train_yaml", str(TINY_YAML), "--layers", "yaml",
            "--dtype", "float32", "--steps", str(STEPS), "--n_test", str(N_TEST), "--rank", "64", "--lr", "1e-3",
            "--edit_lr", "1e-3", "--lr_lr", "1e-3", "--cloc", "0.1", "--max_pairs", "2", "--bootstrap", "200",
            "--project_dim", "1024", "--work_dir", str(world["root"] / "editors"),
            "--out_dir", str(world["root"] / "results"), *extra]


@pytest.fixture(scope="module")
def results(world, script, shared_data_dir) -> dict:
    """Every analysis run once, in this order (directions reuses the editors of pilot and scaling)."""
    out = {}
    for analysis in ("pilot", "scaling", "mixing", "directions"):
        assert script.main(_argv(world, shared_data_dir, analysis)) == 0
        path = world["root"] / "results" / f"instructedit_{analysis}.json"
        out[analysis] = json.loads(path.read_text())
    return out


def _files_ok(world, script, analysis: str, out: dict) -> None:
    base = world["root"] / "results" / f"instructedit_{analysis}"
    assert set(out) <= script.RESULT_KEYS and out["analysis"] == analysis
    assert base.with_suffix(".md").read_text() == script.render_markdown(out)
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every editor of the analysis trained the same number of steps (or none: the untrained floor)
    assert {e["steps"] for e in out["editors"].values()} - {0} == {STEPS}


def _inside(cell: dict, metric: str) -> None:
    lo, hi = cell[f"{metric}_ci"]
    assert lo <= cell[metric] <= hi, (metric, cell)


def test_pilot_in_domain_editors_beat_the_untrained_editor(world, script, results):
    out = results["pilot"]
    _files_ok(world, script, "pilot", out)
    cells = out["cells"]
    assert set(cells) == {"counterfact", "zsre"}
    assert set(cells["counterfact"]) == {"trained_on_counterfact", "trained_on_zsre", "untrained"}
    for task, editor in (("counterfact", "trained_on_counterfact"), ("zsre", "trained_on_zsre")):
        trained, floor = cells[task][editor], cells[task]["untrained"]
        assert trained["n"] == floor["n"] == N_TEST
        # in-domain editing works and the untrained network does not: the intervals do not even overlap
        assert trained["Rel"] >= 80.0 and trained["Rel_ci"][0] > floor["Rel_ci"][1], (trained, floor)
        for m in ("Rel", "Gen", "Loc"):
            _inside(trained, m)
    assert out["editors"]["untrained"]["steps"] == 0
    assert out["editors"]["trained_on_counterfact"]["tasks"] == ["counterfact"]
    md = (world["root"] / "results" / "instructedit_pilot.md").read_text()
    assert "| counterfact | zsre |" in md and "| zsre | zsre |" in md


def test_scaling_trains_one_two_three_tasks_in_the_papers_order(world, script, results):
    out = results["scaling"]
    _files_ok(world, script, "scaling", out)
    assert list(out["cells"]["zsre_holdout"]) == ["recent", "recent+counterfact", "recent+counterfact+convsent"]
    assert [e["tasks"] for e in out["editors"].values()] == [
        ["recent"], ["counterfact", "recent"], ["convsent", "counterfact", "recent"]]
    for cell in out["cells"]["zsre_holdout"].values():
        assert cell["n"] == N_TEST
        _inside(cell, "Rel")
    # the editors differ: their hold-out results are not all the same
    assert len({json.dumps(c, sort_keys=True) for c in out["cells"]["zsre_holdout"].values()}) == 3


def test_mixing_variants_draw_tasks_in_the_stated_shares(world, script, results):
    out = results["mixing"]
    _files_ok(world, script, "mixing", out)
    shares = {name: m["task_share"] for name, m in out["mixing"].items()}
    assert shares["uniform"] == {"convsent": 0.5, "recent": 0.5}
    assert shares["unbalanced"]["convsent"] == pytest.approx(14390 / (14390 + 570), abs=1e-4)
    assert shares["balanced"]["convsent"] == pytest.approx(0.5, abs=1e-4)  # 36 records each in the tiny world
    assert set(out["cells"]) == {"recent", "counterfact", "zsre_holdout"}
    for per in out["update_norms"].values():
        assert set(per) == {"recent", "counterfact", "zsre_holdout"}
        for v in per.values():
            assert v["mean"] > 0 and v["ci"][0] <= v["mean"] <= v["ci"][1]


def test_directions_compare_three_editors_on_the_same_points(world, script, results):
    from sklearn.metrics import silhouette_score

    out = results["directions"]
    _files_ok(world, script, "directions", out)
    assert list(out["directions"]) == ["instructedit", "mend_multitask", "mend_single_task"]
    labels = ["recent"] * N_TEST + ["counterfact"] * N_TEST + ["zsre_holdout"] * N_TEST
    for d in out["directions"].values():
        assert d["tasks"] == labels and len(d["tsne"]) == d["n"] == 3 * N_TEST
        # the reported silhouette is the one of these points under these labels
        assert d["silhouette_tsne"] == pytest.approx(silhouette_score(np.array(d["tsne"]), labels), abs=1e-3)
        lo, hi = d["silhouette_cosine_ci"]
        assert lo <= d["silhouette_cosine"] <= hi
        # overall silhouette = mean over edits = the per-task means weighted by their edits (N_TEST each)
        per_task = d["silhouette_by_task"]
        assert set(per_task) == set(labels)
        assert d["silhouette_cosine"] == pytest.approx(sum(v["mean"] for v in per_task.values()) / 3, abs=1e-3)
    # the single-task and pilot editors were reused, not retrained
    assert out["editors"]["mend_single_task[counterfact]"]["reused"]
    assert out["editors"]["mend_single_task[zsre_holdout]"]["reused"]
    assert out["editors"]["instructedit"]["reused"]  # scaling's 3-task editor, same settings and data


def test_direction_vectors_differ_between_editors_and_silhouette_follows_labels(world, script, results, shared_data_dir):
    from sklearn.metrics import silhouette_score

    args = script.parse_args(_argv(world, shared_data_dir, "directions"))
    ctx = script.Context(args)
    train, test = script.load_analysis_data(args)
    tests = {t: test[t] for t in ("recent", "counterfact")}
    ie = ctx.editor("instructedit_3tasks", {t: train[t] for t in ("counterfact", "recent", "convsent")}, instructions=True)
    mend = ctx.editor("mend_multitask", {t: train[t] for t in ("counterfact", "recent", "convsent")}, instructions=False)
    assert ie["reused"] and mend["reused"]
    vecs = script.collect_directions(ctx, {"ie": (ie["checkpoint"], True), "mend": (mend["checkpoint"], False)}, tests, 4)
    a, b = vecs["ie"]["vectors"], vecs["mend"]["vectors"]
    assert a.shape == b.shape and vecs["ie"]["tasks"] == vecs["mend"]["tasks"]
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)  # one unit direction per edit
    assert not np.allclose(a, b, atol=1e-3)  # two editors, two sets of directions
    # the instruction changes InstructEdit's direction for the same edit
    plain = script.collect_directions(ctx, {"ie": (ie["checkpoint"], False)}, tests, 4)["ie"]["vectors"]
    assert not np.allclose(a, plain, atol=1e-3)
    labels = vecs["ie"]["tasks"]
    sep = script.separation(a, labels, 50, 0)
    assert sep["silhouette_cosine"] == pytest.approx(silhouette_score(a, labels, metric="cosine"), abs=1e-4)
    shuffled = labels[2:] + labels[:2]  # two edits of each task carry the other task's label: a different figure
    assert script.separation(a, shuffled, 50, 0)["silhouette_cosine"] != pytest.approx(sep["silhouette_cosine"], abs=1e-4)


def test_render_rebuilds_markdown_and_png_from_the_json(world, script, results, shared_data_dir):
    folder = world["root"] / "results"
    md = folder / "instructedit_pilot.md"
    before = md.read_text()
    md.write_text("stale")
    (folder / "instructedit_pilot.png").unlink()
    assert script.main(["pilot", "--render", "--out_dir", str(folder)]) == 0
    assert md.read_text() == before and (folder / "instructedit_pilot.png").is_file()


def test_bad_names_and_missing_data_fail_with_a_fix_before_any_training(world, script, shared_data_dir, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(script, "Context", no_training)
    with pytest.raises(script.AnalysisError, match=r"analysis 'tsne' is unknown\. Fix: name one of pilot, scaling"):
        script.main(_argv(world, shared_data_dir, "tsne"))
    with pytest.raises(script.AnalysisError, match=r"--mixings .*Fix:"):
        script.main(_argv(world, shared_data_dir, "mixing", "--mixings", "balanced,skewed"))
    with pytest.raises(script.AnalysisError, match=r"--scaling_order .*Fix:"):
        script.main(_argv(world, shared_data_dir, "scaling", "--scaling_order", "recent,recent,convsent"))
    partial = tmp_path / "partial.json"
    data = world_data()
    del data["train"]["zsre"]
    partial.write_text(json.dumps(data))
    argv = _argv(world, shared_data_dir, "pilot")
    argv[argv.index("--data_json") + 1] = str(partial)
    with pytest.raises(script.AnalysisError, match=r"needs data for zsre.*Fix:"):
        script.main(argv)
    argv[argv.index("--data_json") + 1] = str(tmp_path / "absent.json")
    with pytest.raises(script.AnalysisError, match=r"no such file\. Fix:"):
        script.main(argv)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(script.AnalysisError, match=r"missing counterfact/.*Fix:"):
        script.main(["pilot", "--data_dir", str(empty), "--out_dir", str(tmp_path)])
