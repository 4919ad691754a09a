"""KnowEdit locality (#14 item 4): the relation gate, the subject-masked similarity, their calibration.

KnowEdit asks its locality questions about the edit's *own subject* under another relation. On the
tiny InstructEd world (:mod:`tests._instructed_world`, prefixes trained by the plugin's trainer), a
question about the edited person's other relation gets the edit's instruction in gold mode and, through
the memory's std gate (the subject dominates the retrieval score), in retrieval mode too; these tests
check that the relation gate hands such a question to the unedited model, and that the edit's own
questions keep their instruction.
"""
from __future__ import annotations

import pytest
import torch

from instructedit_plugin.errors import HyperParamsError, PluginError
from instructedit_plugin.instructed import InstructEdHyperParams
from instructedit_plugin.instructed.data import build_examples, fill_similarities
from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, reset_memory
from instructedit_plugin.instructed.lm import load_encoder
from instructedit_plugin.instructed.similarity import (
    calibrate_relation_gate, mask_subject, relation_gate_open, relation_similarity, similarity,
)
from instructedit_plugin.instructed.templates import instruction_of

from ._instructed_world import RELATIONS, make_edits, world

#: the threshold the tests use: above every same-subject question of the world's edits (at most 0.31 with the
#: packaged encoder), below their own questions but one rephrase ("What does Beethoven work as?", 0.30)
GATE = 0.35


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("default")


def _same_subject_requests(n: int = 8) -> list[dict]:
    """World edits whose locality questions ask about the *same* person under every other relation
    (KnowEdit's Relation_Specificity), answered by the world's facts."""
    facts = world()
    out = []
    for req in make_edits(n, seed=7):
        subject = req["subject"]
        relation = next(r for r, (_, _, qs) in RELATIONS.items() if qs[0].format(subject) == req["prompt"])
        others = [r for r in RELATIONS if r != relation]
        out.append(dict(req, locality={"Relation_Specificity": {
            "prompt": [RELATIONS[r][2][0].format(subject) for r in others],
            "ground_truth": [facts[(subject, r)] for r in others]}}))
    return out


# ----------------------------------------------------------------------------------------------
# Similarity
# ----------------------------------------------------------------------------------------------
def test_mask_subject_rules():
    assert mask_subject("The taxon rank of Epaspidoceras is", "Epaspidoceras") == "The taxon rank of is"
    assert mask_subject("Where does MOZART live? mozart!", "Mozart") == "Where does live? !"
    assert mask_subject("Mozart", "Mozart") == "Mozart"  # nothing would be left: kept whole
    assert mask_subject("Where does Mozart live?", None) == "Where does Mozart live?"


def test_subject_masked_similarity_tells_relations_apart(encoder):
    instruction = "Where does Mozart live? Rome."
    questions = ["Which sport does Mozart play?", "In which city does Mozart live?"]
    plain = similarity(encoder, questions, [instruction] * 2, mode="cosine")
    masked = similarity(encoder, questions, [instruction] * 2, ["Mozart"] * 2, mode="subject_masked")
    # the subject makes the other relation's question look close; without it, it is not
    assert masked[0] < plain[0] - 0.1 and masked[0] < GATE, (plain, masked)
    assert masked[1] >= GATE, masked
    # no subject: scored as cosine
    assert torch.allclose(similarity(encoder, questions, [instruction] * 2, [None] * 2, "subject_masked"), plain)
    with pytest.raises(PluginError, match="Fix:"):
        similarity(encoder, questions, [instruction] * 2, mode="jaccard")


def test_relation_similarity_uses_the_edits_own_question(encoder):
    # a long answer in the instruction lowers the question's similarity to it; the edit's own question does not
    instruction = "Where does Mozart live? In a small house near the old harbour of Rome."
    own = relation_similarity(encoder, ["Where does Mozart live?"], [instruction], ["Mozart"],
                              ["Where does Mozart live?"])
    alone = relation_similarity(encoder, ["Where does Mozart live?"], [instruction], ["Mozart"])
    assert own[0] > 0.99 and alone[0] < own[0]
    assert relation_gate_open(encoder, ["Which sport does Mozart play?"], [instruction], ["Mozart"], None) == [True]


def test_calibration_separates_own_questions_from_same_subject_ones(encoder):
    result = calibrate_relation_gate(encoder, _same_subject_requests())
    print("relation gate calibration on the world:", result)
    assert result["n_own"] == 16 and result["n_locality"] == 8 * (len(RELATIONS) - 1)
    # measured: threshold 0.378, keeps 15 of 16 own questions, blocks all 24 same-subject ones
    assert result["kept_own"] >= 0.9 and result["blocked_locality"] >= 0.9, result
    assert 0.31 < result["threshold"] <= 0.4
    own = [(q, instruction_of(r), r["subject"], r["prompt"]) for r in _same_subject_requests()
           for q in (r["prompt"], r["rephrase_prompt"])]
    questions, instructions, subjects, relations = map(list, zip(*own))
    kept = relation_gate_open(encoder, questions, instructions, subjects, GATE, relations)
    assert sum(kept) >= 0.9 * len(own)
    with pytest.raises(PluginError, match="Fix:"):
        calibrate_relation_gate(encoder, [dict(r, locality={}) for r in _same_subject_requests(2)])


def test_training_examples_carry_the_subject_and_masked_similarity(encoder):
    requests = _same_subject_requests(2)
    examples = build_examples(requests, unrelated_locality=0)
    assert {e.subject for e in examples} == {r["subject"] for r in requests}
    fill_similarities(encoder, examples)
    plain = {(e.kind, e.question): e.sim for e in examples}
    fill_similarities(encoder, examples, mode="subject_masked")
    loc = [e for e in examples if e.kind == "loc"]
    assert loc and all(e.sim < plain[(e.kind, e.question)] for e in loc)
    assert all(e.sim >= GATE for e in examples if e.kind == "rel")


# ----------------------------------------------------------------------------------------------
# The gate on the tiny world (trained prefixes)
# ----------------------------------------------------------------------------------------------
def _world_model(instructed_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()
    return model, tok


def _hp(instructed_world, **kw):
    return InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                                                archive=str(instructed_world["results_dir"]), device="cpu",
                                                max_length=40, **kw))


def _logits(lm, tok, question: str) -> torch.Tensor:
    with torch.no_grad():
        return lm(**tok([question], return_tensors="pt")).logits


@pytest.mark.parametrize("source", ["gold", "retrieval"])
def test_relation_gate_keeps_the_unedited_answer_for_the_subjects_other_relations(instructed_world, source):
    model, tok = _world_model(instructed_world)
    requests = _same_subject_requests()
    changed_without_gate = 0
    checked = 0
    for req in requests:
        probes = req["locality"]["Relation_Specificity"]["prompt"]
        for gate in (None, GATE):
            reset_memory(model)
            lm, _ = apply_instructed_to_model(model, tok, [req], _hp(instructed_world, instruction_source=source,
                                                                     relation_gate=gate))
            # the edit itself holds with and without the gate
            enc = tok([req["prompt"] + " " + req["target_new"]], return_tensors="pt")
            with torch.no_grad():
                assert lm(**enc).logits[0, -2].argmax().item() == enc["input_ids"][0, -1].item(), (gate, req)
            for question in probes:
                logits = _logits(lm, tok, question)
                with torch.no_grad():
                    base = model(**tok([question], return_tensors="pt")).logits
                if gate is None:
                    checked += 1
                    changed_without_gate += int(not torch.equal(logits, base))
                else:  # the gate hands the question to the unedited model: its logits exactly
                    assert torch.equal(logits, base), (req["prompt"], question)
        reset_memory(model)
    # without the gate the instruction reaches (nearly) every such question: the option is what keeps them
    print(f"{source}: {changed_without_gate} of {checked} same-subject questions altered without the gate")
    assert changed_without_gate >= 0.9 * checked
    assert not editing_state(model).entries


def test_relation_gate_needs_the_subject_and_is_validated(instructed_world):
    model, tok = _world_model(instructed_world)
    req = {k: v for k, v in _same_subject_requests(1)[0].items() if k != "subject"}
    lm, _ = apply_instructed_to_model(model, tok, [req], _hp(instructed_world, relation_gate=GATE))
    # without a subject the texts are compared whole: the subject makes the other relation look close
    question = req["locality"]["Relation_Specificity"]["prompt"][0]
    with torch.no_grad():
        base = model(**tok([question], return_tensors="pt")).logits
    assert not torch.equal(_logits(lm, tok, question), base)
    reset_memory(model)
    with pytest.raises(HyperParamsError, match="relation_gate"):
        _hp(instructed_world, relation_gate=2.0)
    with pytest.raises(HyperParamsError, match="similarity"):
        _hp(instructed_world, similarity="jaccard")


# ----------------------------------------------------------------------------------------------
# The benchmark's KnowEdit section: intervals and targets (no model)
# ----------------------------------------------------------------------------------------------
def _knowedit_script():
    from pathlib import Path

    from ._scripts import load_script

    return load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "instructed_knowedit.py",
                       "benchmark_script_instructed_knowedit")


def test_bootstrap_intervals_hold_the_point_and_repeat():
    run = _knowedit_script()
    records = [[1.0, 1.0, 0.5, 0.0], [1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, None], [1.0, 1.0, 0.0, 0.5]] * 5
    out = run.summarize(records)
    assert out["n"] == 20 and out["Rel"] == 75.0 and out["Loc"] == 62.5 and out["Por"] == 50.0
    assert out == run.summarize(records)  # seeded
    for key in ("Rel", "Gen", "Loc", "Por", "H"):
        lo, hi = out["ci"][key]
        assert lo <= out[key] <= hi and lo < hi, (key, out)
    assert run.summarize(records, resamples=0)["ci"] == {}
    assert run.summarize([[1.0, None, 1.0, None]])["ci"]["Rel"] == [100.0, 100.0]


def test_h_interval_uses_only_resamples_that_hold_every_measured_metric():
    run = _knowedit_script()
    # portability measured on one record of ten (as on KnowEdit's WikiData-Recent): H = H(100, 100, 10) = 25
    records = [[1.0, None, 1.0, None]] * 9 + [[1.0, None, 1.0, 0.1]]
    out = run.summarize(records)
    assert out["H"] == 25.0
    # a resample without that record would give H of Rel and Loc alone (100): not the same figure
    assert out["ci"]["H"] == [25.0, 25.0], out["ci"]


def test_resummarize_recomputes_saved_rows_from_their_records_and_says_so():
    run = _knowedit_script()
    records = [[1.0, None, 1.0, None]] * 9 + [[1.0, None, 1.0, 0.1]]
    current = dict(run.summarize(records), records=records)
    stale = dict(current, ci=dict(current["ci"], H=[25.0, 100.0]))  # as an older summarize() wrote it
    saved = {"datasets": {"wiki_recent": {"ft": current, "gold_shipped_cosine_gate": stale}}}
    out = run.resummarize(saved, "python benchmarks/instructed_cpu.py --knowedit --resummarize")
    assert out["datasets"]["wiki_recent"]["gold_shipped_cosine_gate"]["ci"]["H"] == [25.0, 25.0]
    assert saved["datasets"]["wiki_recent"]["gold_shipped_cosine_gate"]["ci"]["H"] == [25.0, 100.0]  # a copy
    (entry,) = out["merged_runs"]
    assert entry["keys"] == ["datasets.wiki_recent.gold_shipped_cosine_gate"] and "nothing re-run" in entry["note"]
    assert run.resummarize({"datasets": {"zsre": {"ft": current}}}, "c").get("merged_runs") is None


def test_targets_compare_with_rome_on_romes_own_records():
    run = _knowedit_script()
    good = [[1.0, 1.0, 1.0, 1.0]] * 5 + [[1.0, 1.0, 1.0, 0.0]] * 5  # Por 0 on the last five
    row = dict(run.summarize(good), records=good)
    base = {"ft": run.summarize([[0.5, 0.5, 0.5, 0.5]] * 10), "rome": run.summarize([[0.9, 0.9, 0.9, 0.9]] * 5)}
    out = {"datasets": {"zsre": {**base, "gold_shipped_cosine_gate": row}}}
    (name, ok, figures), = run.check_targets(out)
    # on ROME's five records (the first five) every metric is 100
    assert ok and "100.0 vs rome 90.0 (first 5 records)" in figures, figures
    weak = dict(row, Loc=79.9)
    out["datasets"]["zsre"]["gold_shipped_cosine_gate"] = weak
    assert not run.check_targets(out)[0][1]


def test_merge_refuses_rows_from_another_easyedit_flavour(tmp_path):
    """FT and the metrics differ between EasyEdit PyPI and main: a merge that would mix them is refused
    (one such merge once put main's FT into a PyPI file), naming both flavours and the fix."""
    run = _knowedit_script()
    out = tmp_path / "k.json"
    run.check_same_easyedit({"easyedit": "pypi"}, "pypi", out)
    run.check_same_easyedit({}, "main", out)  # files written before the flavour was recorded
    with pytest.raises(PluginError, match=r"measured with EasyEdit pypi, this run imports EasyEdit main.*Fix: unset EASYEDIT_SRC"):
        run.check_same_easyedit({"easyedit": "pypi"}, "main", out)
    with pytest.raises(PluginError, match=r"Fix: set EASYEDIT_SRC"):
        run.check_same_easyedit({"easyedit": "main"}, "pypi", out)
