"""The EasyEdit-style example scripts ``examples/run_instructed.py`` and ``examples/run_mquake.py``.

Both run in-process (``main(argv)``) on the session's tiny world (``test_instructed_training``,
:mod:`tests._instructed_world`): a tiny LLaMA that cannot use an ``Instructions: {fact}\\nInput:
{question}`` instruction by itself, plus the InstructEd prefixes the plugin's trainer produced for it
from 40 synthetic edits. The edits evaluated here are the world's 8 held-out edits, written as a
KnowEdit file, and two-hop cases built from the world's people, written as an MQuAKE file; the
answers are the real model's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ._instructed_world import chain_rewrites, distractor_rewrites, make_chain, mquake_record
from ._scripts import load_script


REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "hparams/InstructEd/tiny.yaml")
SUMMARY_KEYS = {"Rel", "Gen", "Loc", "Por", "Score", "H", "n_edits"}


def _load_example(name: str):
    return load_script(REPO / "examples" / f"{name}.py", f"example_{name}")


def _knowedit(req: dict) -> dict:
    """A world edit as a KnowEdit record (no instruction: the script builds it from prompt + target)."""
    loc = req["locality"]["neighborhood"]
    return {"subject": req["subject"], "prompt": req["prompt"], "target_new": req["target_new"],
            "ground_truth": [req["ground_truth"]], "rephrase_prompt": req["rephrase_prompt"],
            "locality": {"Relation_Specificity": [{"prompt": loc["prompt"], "ground_truth": [loc["ground_truth"]]}]},
            "portability": {}}


@pytest.fixture
def knowedit_dir(instructed_world, tmp_path) -> Path:  # noqa: F811
    """``<tmp>/zsre/ZsRE-test-all.json`` (the held-out edits, where ``--data_type zsre`` looks) and
    ``<tmp>/train_knowedit.json`` (the training edits)."""
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre" / "ZsRE-test-all.json").write_text(json.dumps([_knowedit(r) for r in instructed_world["test"]]))
    (tmp_path / "train_knowedit.json").write_text(json.dumps([_knowedit(r) for r in instructed_world["train"]]))
    return tmp_path


def _run_instructed(world, data_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["--editing_method", "InstructEd", "--hparams_dir", TINY_YAML, "--model_dir", str(world["base_dir"]),
            "--data_dir", str(data_dir), "--datatype", "zsre", "--metrics_save_dir", str(out), *extra]
    assert _load_example("run_instructed").main(argv) == 0
    stem = f"InstructEd_zsre_{world['base_dir'].name}"
    per_edit = json.loads((out / f"{stem}_results.json").read_text())
    summary = json.loads((out / f"{stem}_summary.json").read_text())
    table = (out / f"{stem}_summary.md").read_text()
    assert "| method | Rel | Gen | Loc | Por | Score | H |" in table and "| InstructEd |" in table
    assert isinstance(per_edit, list) and len(per_edit) == summary["n_edits"]
    for record in per_edit:  # EasyEdit's per-edit metrics from compute_edit_quality
        assert {"pre", "post", "case_id", "requested_rewrite"} <= set(record)
        assert {"rewrite_acc", "rephrase_acc", "locality"} <= set(record["post"])
    assert set(summary["summary"]) == {"pre-edit", "InstructEd"}
    for row in summary["summary"].values():
        assert SUMMARY_KEYS <= set(row)
    return summary


# ----------------------------------------------------------------------------------------------
# run_instructed.py
# ----------------------------------------------------------------------------------------------
def test_run_instructed_edits_with_trained_prefixes(instructed_world, knowedit_dir, tmp_path):  # noqa: F811
    summary = _run_instructed(instructed_world, knowedit_dir, tmp_path / "gold", "--archive", str(instructed_world["archive"]),
                              "--ds_size", "8")
    post, pre = summary["summary"]["InstructEd"], summary["summary"]["pre-edit"]
    print("run_instructed gold:", pre, post)
    assert summary["n_edits"] == 8 and summary["training"] is None and summary["instruction_source"] == "gold"
    # measured: post 100/100/100, pre Rel/Gen 0 (8 edits: one miss is 12.5 points)
    assert post["Rel"] >= 87.5 and post["Gen"] >= 87.5 and post["Loc"] >= 87.5, post
    assert pre["Rel"] <= 12.5 and pre["Gen"] <= 12.5, pre

    seq = _run_instructed(instructed_world, knowedit_dir, tmp_path / "seq", "--archive", str(instructed_world["archive"]),
                          "--instruction_source", "retrieval", "--sequential_edit")
    post = seq["summary"]["InstructEd"]
    print("run_instructed retrieval, sequential:", post)
    assert seq["instruction_source"] == "retrieval" and seq["sequential_edit"] is True
    # measured: 100/100/87.5 (a locality question retrieves another person's edit of its relation)
    assert post["Rel"] >= 87.5 and post["Gen"] >= 87.5 and post["Loc"] >= 75, post


#: prefix-training steps of the example's own training (from a random bank, 20-odd training edits)
TRAIN_STEPS = 40


def test_run_instructed_trains_prefixes_without_archive(instructed_world, knowedit_dir, tmp_path):  # noqa: F811
    summary = _run_instructed(instructed_world, knowedit_dir, tmp_path / "out", "--train_data", "train_knowedit.json",
                              "--max_steps", str(TRAIN_STEPS), "--results_dir", str(tmp_path / "prefixes"))
    training = summary["training"]
    assert training["steps"] == TRAIN_STEPS and Path(training["archive"]) == tmp_path / "prefixes" / "best"
    assert (tmp_path / "prefixes" / "best" / "manifest.json").is_file() and summary["archive"] == training["archive"]
    # training edits sharing a subject or a question with an evaluated record were left out
    test_subjects = {r["subject"] for r in instructed_world["test"]}
    assert training["train_edits"] == sum(r["subject"] not in test_subjects for r in instructed_world["train"]) > 0
    # the untrained bank scores 0 on this world (test_instructed_ablation); these few steps already
    # find prefixes that work (measured: Rel/Gen/Loc 100/87.5/100; 20 steps gave 75/87.5/100)
    post, pre = summary["summary"]["InstructEd"], summary["summary"]["pre-edit"]
    print("run_instructed, prefixes trained here:", post)
    assert post["Rel"] >= 75 and post["Gen"] >= 75 and post["Loc"] >= 75, post
    assert pre["Rel"] <= 12.5, pre


def test_run_instructed_refuses_bad_arguments(tmp_path):
    run = _load_example("run_instructed")
    with pytest.raises(SystemExit, match="editing_method"):
        run.main(["--editing_method", "ROME", "--hparams_dir", TINY_YAML])
    with pytest.raises(SystemExit, match="data_type"):
        run.main(["--hparams_dir", TINY_YAML, "--data_dir", str(tmp_path), "--data_type", "wikibio"])
    assert run.data_type_of("wikirecent") == "recent" and run.data_type_of("ZsRE") == "zsre"


# ----------------------------------------------------------------------------------------------
# run_mquake.py
# ----------------------------------------------------------------------------------------------
CHAIN = make_chain("Mozart")  # Mozart's best friend becomes Tim Cook; Tim Cook moves to London
FIRST, SECOND = chain_rewrites(CHAIN)
OTHERS = distractor_rewrites(CHAIN)  # three other people's new cities
FACT1, FACT2 = CHAIN.fact1, CHAIN.fact2


@pytest.fixture
def mquake_file(tmp_path) -> Path:
    """Three versions of one two-hop case of the world (each case gets its own memory): both facts,
    the first fact missing, the second fact missing; other people's city edits as distractors."""
    cases = [mquake_record(1, CHAIN, [FIRST, SECOND, *OTHERS]), mquake_record(2, CHAIN, [SECOND, *OTHERS]),
             mquake_record(3, CHAIN, [FIRST, *OTHERS])]
    path = tmp_path / "mquake_two_hop.json"
    path.write_text(json.dumps(cases))
    return path


def _run_mquake(world, data: Path, out: Path, *extra: str, setting: str = "oracle") -> tuple[dict, dict]:
    """Run the script with one ``--settings`` entry; ``(json with that setting's rows as "methods", its records)``."""
    argv = ["--hparams_dir", TINY_YAML, "--model_dir", str(world["base_dir"]), "--archive", str(world["archive"]),
            "--data_dir", str(data), "--metrics_save_dir", str(out), "--name", "mq", "--max_new_tokens", "4",
            "--settings", setting, *extra]
    assert _load_example("run_mquake").main(argv) == 0
    summary = json.loads((out / "mq.json").read_text())
    records = json.loads((out / "mq_records.json").read_text())[setting]
    assert "| setting | method | Por_Nhop |" in (out / "mq.md").read_text()
    assert summary["n_cases"] == 3 and summary["cases_by_hops"] == {"2": 3} and summary["settings"] == [setting]
    summary["methods"] = summary["results"][setting]
    for name, row in summary["methods"].items():
        assert {"Por_Nhop", "por_release", "Hop-Acc", "por_by_hops", "question_acc", "retrieval_recall"} <= set(row), name
        assert set(summary["ci95"][setting][name]) == {"Por_Nhop", "Por_Nhop_release", "Por_any", "Hop-Acc"}
    return summary, records


def test_run_mquake_retrieves_one_fact_per_hop_and_applies_edits(instructed_world, mquake_file, tmp_path):  # noqa: F811
    summary, records = _run_mquake(instructed_world, mquake_file, tmp_path)  # the oracle memory: one per case
    assert list(summary["methods"]) == ["instructed", "in_context", "unedited"]
    full, no_first, no_second = records["instructed"]
    # one fact per hop, from the question alone: the bridge fact first, then the fact it leads to
    assert full["questions"][0]["instructions"] == [FACT1, FACT2]
    assert FACT1 not in no_first["questions"][0]["instructions"]
    assert FACT2 not in no_second["questions"][0]["instructions"]
    # the tiny model with its trained prefixes composes the two facts; with the second fact alone
    # (nobody says Tim Cook is Mozart's friend) it keeps the answer it knew
    assert full["correct"] and not no_first["correct"], (full["questions"], no_first["questions"])
    assert all(CHAIN.old_city in q["prediction"] for q in no_first["questions"]), no_first["questions"]
    # the edited single hop "Where does Tim Cook live?" is answered from its fact; unedited it is not
    hop = full["single_hops"][1]
    assert hop["instructions"] == [FACT2] and hop["correct"], hop
    assert not records["unedited"][0]["single_hops"][1]["correct"]
    # the same facts in context without the prefixes: the plain model does not answer from them
    assert not records["in_context"][0]["single_hops"][1]["correct"]
    assert all(q["prediction"].startswith("Output:") for q in records["in_context"][0]["questions"])
    methods = summary["methods"]
    assert methods["instructed"]["Hop-Acc"] > max(methods["unedited"]["Hop-Acc"], methods["in_context"]["Hop-Acc"])


def test_run_mquake_two_hop_answer_needs_both_facts_in_memory(instructed_world, mquake_file, tmp_path):  # noqa: F811
    """Por_Nhop over the three cases with the real model: only the case with both facts counts. (The
    first-fact-only case is scored too but not asserted: its answer, the new friend's known city,
    needs a fact from the context composed with one from the weights, which the tiny world does not
    teach; see test_instructed_multihop.)"""
    summary, records = _run_mquake(instructed_world, mquake_file, tmp_path, "--methods", "instructed", "--no_single_hops")
    full, no_first, _ = records["instructed"]
    assert full["correct"] and not no_first["correct"], records["instructed"]
    assert full["questions"][0]["instructions"] == [FACT1, FACT2]
    assert summary["methods"]["instructed"]["por"] >= 100 / 3 - 0.01  # any of its questions (MQuAKE)


def test_run_mquake_shared_iterative_with_a_trained_retriever(instructed_world, mquake_file, tmp_path):  # noqa: F811
    """``--settings shared_iterative --retriever FOLDER``: one memory, N facts per question from the question and
    the facts so far, searched with the retriever's encoder (recorded in the row's configuration and the
    table); a retriever trained on an evaluated case is refused before any model is loaded."""
    from instructedit_plugin.errors import RequestError
    from instructedit_plugin.instructed.retriever_training import MANIFEST, RetrieverConfig, train_retriever

    from .test_mquake_retriever import TRAINING

    run = _load_example("run_mquake")
    folder = train_retriever(TRAINING, [], RetrieverConfig(steps=0), cache_dir=tmp_path / "cache", progress=False)
    summary, records = _run_mquake(instructed_world, mquake_file, tmp_path / "out", "--methods", "instructed",
                                   "--no_single_hops", "--retriever", str(folder), setting="shared_iterative")
    assert summary["evaluation_config"]["shared_iterative"]["retrieval"] == "iterative"
    assert summary["evaluation_config"]["shared_iterative"]["retriever"] == str(folder.resolve())
    assert f"(retriever: `{folder.resolve()}`)" in (tmp_path / "out" / "mq.md").read_text()
    full = records["instructed"][0]
    assert all(len(q["instructions"]) == 2 and q["instructions"][0] == FACT1 for q in full["questions"]), full
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / MANIFEST).write_text(json.dumps({"key": "x", "training": {"case_ids": [7, 2]}}))
    with pytest.raises(RequestError, match=r"was trained on 1 of the evaluated MQuAKE cases \(case_id 2\)\. Fix:"):
        run.main(["--hparams_dir", "does/not/matter.yaml", "--data_dir", str(mquake_file), "--retriever", str(leaky)])
