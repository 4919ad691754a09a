"""The EasyEdit-style example scripts ``examples/run_instructed.py`` and ``examples/run_mquake.py``.

Both run in-process (``main(argv)``) on the session's tiny world of ``test_instructed_training``: a
tiny LLaMA pretrained to follow ``Instructions: {fact}\\nInput: {question}`` plus InstructEd prefixes
trained on 40 synthetic edits. The edits evaluated here are the world's 8 held-out edits, written as
KnowEdit / MQuAKE files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
    assert post["Rel"] >= 90 and post["Gen"] >= 75 and post["Loc"] >= 90, post
    assert pre["Rel"] < 50

    seq = _run_instructed(instructed_world, knowedit_dir, tmp_path / "seq", "--archive", str(instructed_world["archive"]),
                          "--instruction_source", "retrieval", "--sequential_edit")
    post = seq["summary"]["InstructEd"]
    print("run_instructed retrieval, sequential:", post)
    assert seq["instruction_source"] == "retrieval" and seq["sequential_edit"] is True
    assert post["Rel"] >= 90, post


def test_run_instructed_trains_prefixes_without_archive(instructed_world, knowedit_dir, tmp_path):  # noqa: F811
    summary = _run_instructed(instructed_world, knowedit_dir, tmp_path / "out", "--train_data", "train_knowedit.json",
                              "--max_steps", "20", "--results_dir", str(tmp_path / "prefixes"))
    training = summary["training"]
    assert training["steps"] == 20 and Path(training["archive"]) == tmp_path / "prefixes" / "best"
    assert (tmp_path / "prefixes" / "best" / "manifest.json").is_file() and summary["archive"] == training["archive"]
    # training edits sharing a subject or a question with an evaluated record were left out
    test_subjects = {r["subject"] for r in instructed_world["test"]}
    assert training["train_edits"] == sum(r["subject"] not in test_subjects for r in instructed_world["train"]) > 0
    assert summary["summary"]["InstructEd"]["Rel"] > summary["summary"]["pre-edit"]["Rel"]


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
def _rewrite(prompt: str, subject: str, new: str, true: str, question: str) -> dict:
    return {"prompt": prompt, "relation_id": "P0", "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"}, "subject": subject, "question": question}


COMPOSER = _rewrite("The composer of {} is", "Moonlight Sonata", "Mozart", "Beethoven", "Who composed Moonlight Sonata?")
RESIDENCE = _rewrite("{} lives in", "Mozart", "Tokyo", "Vienna", "Where does Mozart live?")
OTHERS = [_rewrite("{} lives in", s, c, "Paris", f"Where does {s} live?")
          for s, c in (("Tiger Woods", "Rome"), ("Marie Curie", "Madrid"), ("Leo Tolstoy", "London"))]
TWO_HOP = "Where does the composer of Moonlight Sonata live?"
FACT1, FACT2 = "The composer of Moonlight Sonata is Mozart.", "Mozart lives in Tokyo."


def _case(case_id: int, edits: list[dict]) -> dict:
    def hop(question, cloze, answer):
        return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": []}

    return {"case_id": case_id, "requested_rewrite": edits, "questions": [TWO_HOP], "answer": "Vienna",
            "answer_alias": [], "new_answer": "Tokyo", "new_answer_alias": [], "single_hops": [],
            "new_single_hops": [hop("Who composed Moonlight Sonata?", "The composer of Moonlight Sonata is", "Mozart"),
                                hop("Where does Mozart live?", "Mozart lives in", "Tokyo")]}


@pytest.fixture
def mquake_file(tmp_path) -> Path:
    """Three versions of one hand-built two-hop case (each case gets its own memory): both facts,
    the second hop's fact missing, the first hop's fact missing; other edits as distractors."""
    cases = [_case(1, [COMPOSER, RESIDENCE, *OTHERS]), _case(2, [COMPOSER, *OTHERS]), _case(3, [RESIDENCE, *OTHERS])]
    path = tmp_path / "mquake_two_hop.json"
    path.write_text(json.dumps(cases))
    return path


def _run_mquake(world, data: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    argv = ["--hparams_dir", TINY_YAML, "--model_dir", str(world["base_dir"]), "--archive", str(world["archive"]),
            "--data_dir", str(data), "--metrics_save_dir", str(out), "--name", "mq", "--max_new_tokens", "4", *extra]
    assert _load_example("run_mquake").main(argv) == 0
    summary = json.loads((out / "mq.json").read_text())
    records = json.loads((out / "mq_records.json").read_text())
    assert "| method | Por_Nhop |" in (out / "mq.md").read_text()
    assert summary["n_cases"] == 3 and summary["cases_by_hops"] == {"2": 3}
    for name, row in summary["methods"].items():
        assert {"Por_Nhop", "Hop-Acc", "por_by_hops", "question_acc", "retrieval_recall"} <= set(row), name
    return summary, records


def test_run_mquake_retrieves_one_fact_per_hop_and_applies_edits(instructed_world, mquake_file, tmp_path):  # noqa: F811
    summary, records = _run_mquake(instructed_world, mquake_file, tmp_path)
    assert list(summary["methods"]) == ["instructed", "in_context", "unedited"]
    full, no_second, no_first = records["instructed"]
    # one fact per hop, from the question alone: the bridge fact first, then the fact it leads to
    assert full["questions"][0]["instructions"] == [FACT1, FACT2]
    assert FACT1 not in no_first["questions"][0]["instructions"]
    assert FACT2 not in no_second["questions"][0]["instructions"]
    # the tiny model with its prefixes answers the edited single-hop fact; unedited it does not
    hop = full["single_hops"][1]
    assert hop["instructions"] == [FACT2] and hop["correct"], hop
    assert not records["unedited"][0]["single_hops"][1]["correct"]
    assert summary["methods"]["instructed"]["Hop-Acc"] > summary["methods"]["unedited"]["Hop-Acc"]


_LINK = re.compile(r"^(?:The composer of )?(?P<subject>.+?) (?:is|lives in) (?P<object>.+)\.$")


def _chain_reader(question: str, instructions) -> str:
    """Stand-in for an LM that composes facts (the tiny test models cannot): follows the given facts
    from the question's entity; answers the closed-book 'Vienna' unless two facts chain."""
    links = {}
    for fact in instructions:
        match = _LINK.match(fact)
        if match:
            links[match["subject"]] = match["object"]
    entity, hops = "Moonlight Sonata", 0
    while entity in links and hops < 4:
        entity, hops = links[entity], hops + 1
    return entity if hops >= 2 else "Vienna"


def test_run_mquake_two_hop_answer_needs_both_facts_in_memory(instructed_world, mquake_file, tmp_path,  # noqa: F811
                                                              monkeypatch):
    import instructedit_plugin.instructed.answering as answering

    seen = []

    def answer_fn(lm, tok, max_new_tokens=8):
        def answer(question, instructions):
            seen.append((question, list(instructions)))
            return _chain_reader(question, instructions)
        return answer

    monkeypatch.setattr(answering, "instructed_answer_fn", answer_fn)
    summary, records = _run_mquake(instructed_world, mquake_file, tmp_path, "--methods", "instructed", "--no_single_hops")
    assert [r["correct"] for r in records["instructed"]] == [True, False, False]
    assert summary["methods"]["instructed"]["Por_Nhop"] == pytest.approx(100 / 3, abs=0.01)
    assert seen[0] == (TWO_HOP, [FACT1, FACT2])
