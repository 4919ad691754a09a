"""MQuAKE in the InstructEd paper's setting: one memory holding every case's edits, the top-N facts of
an N-hop question as one instruction, the paper's and the release's scores, and multi-hop training
cases kept apart from the evaluated ones.

The retrieval tests use the real sentence encoder (the packaged all-MiniLM-L6-v2) and a fake
answerer (``reader`` of :mod:`tests.test_instructed_multihop`); the end-to-end tests run the session's
tiny world model (:mod:`tests._instructed_world`) with its trained prefixes.
"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from instructedit_plugin.data.common import make_request
from instructedit_plugin.data.mquake import Hop, MQuAKECase, load_mquake
from instructedit_plugin.errors import RequestError
from instructedit_plugin.instructed.answering import join_instructions
from instructedit_plugin.instructed.encoder import SentenceEncoder
from instructedit_plugin.instructed.memory import InstructionMemory
from instructedit_plugin.instructed.multihop import edit_instruction, evaluate_multihop
from instructedit_plugin.instructed.multihop_training import (
    case_instruction,
    check_disjoint,
    hop_quotas,
    multihop_training_request,
    select_training_cases,
)

from ._instructed_world import chain_rewrites, distractor_rewrites, make_chain, mquake_record, world_lm
from ._scripts import load_script
from .test_instructed_multihop import reader, two_hop_case

SPOUSE = "The spouse of Alice Vermeer is Bruno Castellanos."
CITIZEN = "Bruno Castellanos is a citizen of Chile."


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def _case(case_id: int, edits: list[tuple[str, str, str]], questions: list[str], hops: int | None = None,
          new_answer: str = "Lima") -> MQuAKECase:
    """A case whose edits are ``(prompt, target, subject)``; ``hops`` gold sub-questions (default: one per edit)."""
    reqs = [make_request(prompt=p, target_new=t, ground_truth="old", subject=s, question=f"{p}?", case_id=case_id)
            for p, t, s in edits]
    n = len(edits) if hops is None else hops
    singles = [Hop(f"{edits[i][0]}?", edits[i][0], edits[i][1], []) for i in range(n)]
    return MQuAKECase(case_id=case_id, edits=reqs, questions=questions, answer="old", answer_alias=[],
                      new_answer=new_answer, new_answer_alias=[], single_hops=[], new_single_hops=singles)


def _distractor_cases() -> list[MQuAKECase]:
    """Other cases' edits: two more spouse/citizenship chains (same relations) and unrelated facts."""
    return [
        _case(2, [("The capital of Peru is", "Lima", "Peru"), ("The author of Dune is", "Frank Herbert", "Dune")],
              ["What is the capital of Peru?"]),
        _case(3, [("Frank Herbert is a citizen of", "Norway", "Frank Herbert"),
                  ("Mount Kenya is located in", "Africa", "Mount Kenya")], ["Where is Mount Kenya?"]),
        _case(4, [("The spouse of Marie Curie is", "Pierre Curie", "Marie Curie"),
                  ("Pierre Curie is a citizen of", "Japan", "Pierre Curie")], ["Which country is Marie Curie's spouse from?"]),
        _case(5, [("The spouse of Carl Jansen is", "Ada Lovelace", "Carl Jansen"),
                  ("Ada Lovelace is a citizen of", "Brazil", "Ada Lovelace")], ["Which country is Carl Jansen's spouse from?"]),
    ]


# ---------------------------------------------------------------------------- retrieval from one shared memory
def test_shared_memory_retrieval_picks_the_hop_facts_among_distractors(encoder):
    """Alice Vermeer's two facts in one memory with eight facts of four other cases (two of them the same
    spouse -> citizenship chain): subject-chained retrieval gives exactly her two facts in hop order for
    all three phrasings; the paper's top-N gives two facts led by the first hop's. (Its second fact is
    another citizenship fact: the question does not name Bruno Castellanos -- the recall gap the
    benchmark measures.)"""
    cases = [two_hop_case(), *_distractor_cases()]
    chained = evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), shared_memory=True,
                                retrieval="subject_chain", single_hops=False)
    for q in chained.records[0].questions:
        assert q.instructions == [SPOUSE, CITIZEN], (q.question, q.instructions)
        assert q.correct and q.retrieval_recall == 1.0, q  # the reader answers with the last fact's object
    assert chained.records[0].question_acc == 1.0
    top_n = evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), shared_memory=True,
                              retrieval="top_n", single_hops=False)
    for q in top_n.records[0].questions:
        assert q.instructions[0] == SPOUSE and len(q.instructions) == 2, q.instructions
        assert q.scores == sorted(q.scores, reverse=True)


def test_the_instruction_of_an_n_hop_question_holds_n_facts(encoder):
    """Every multi-hop question is asked once with N facts (N = its case's hop count: 2 and 3 here),
    joined into one instruction; with ``hop_instructions="question"`` every sub-question gets the first
    question's facts (the release's Hop-Acc); the paper's setting applies no gate at this step."""
    three_hop = _case(7, [("The spouse of Marie Curie is", "Pierre Curie", "Marie Curie"),
                          ("Pierre Curie is a citizen of", "Japan", "Pierre Curie"),
                          ("The capital of Japan is", "Osaka", "Japan")],
                      ["What is the capital of the country of citizenship of Marie Curie's spouse?"], new_answer="Osaka")
    cases = [two_hop_case(), three_hop, *_distractor_cases()[:2]]
    calls: list[tuple[str, list[str]]] = []

    def recording(question: str, instructions: list[str]) -> str:
        calls.append((question, list(instructions)))
        return reader(question, instructions)

    for retrieval in ("top_n", "subject_chain"):
        calls.clear()
        result = evaluate_multihop(cases, recording, lambda: InstructionMemory(encoder), shared_memory=True,
                                   retrieval=retrieval, hop_instructions="question")
        asked = dict(calls)
        for case, record in zip(cases, result.records):
            n = len(case.new_single_hops)
            for q in record.questions:
                assert len(asked[q.question]) == n and len(set(asked[q.question])) == n, (retrieval, asked[q.question])
                assert join_instructions(asked[q.question]).count(". ") == n - 1
            for hop in record.single_hops:
                assert hop.instructions == record.questions[0].instructions
    # the gated chain (the old shared mode) gives the two-hop question fewer facts than it has hops
    gated = evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), shared_memory=True, retrieval="chain",
                              gate=0.1, single_hops=False)
    assert gated.summary["mean_facts_per_question"] < 2


def test_multihop_gate_only_decides_whether_a_question_gets_any_facts(encoder):
    cases = [two_hop_case(), *_distractor_cases()]
    shut = evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), shared_memory=True, retrieval="top_n",
                             multihop_gate=10.0, single_hops=False)
    assert all(q.instructions == [] for r in shut.records for q in r.questions)
    open_ = evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), shared_memory=True, retrieval="top_n",
                              multihop_gate=0.0, single_hops=False)
    assert all(len(q.instructions) == len(c.new_single_hops) for c, r in zip(cases, open_.records) for q in r.questions)
    with pytest.raises(RequestError, match="retrieval"):
        evaluate_multihop(cases, reader, lambda: InstructionMemory(encoder), retrieval="top_5")


# ---------------------------------------------------------------------------- the paper's and the release's scores
def test_paper_and_release_scores_differ_on_a_hand_made_case(encoder):
    """Case A: its first question wrong (release token accuracy 0.5), the two paraphrases right; case B:
    the first right (1.0), the paraphrases wrong. Paper (every question): 3 of 6 = 50; release (first
    question, token accuracy): (0.5 + 1.0) / 2 = 75; MQuAKE's any-of-3: 2 of 2 = 100."""
    a = two_hop_case()
    b = dataclasses.replace(two_hop_case(), case_id=2, questions=["Bruno's wife Alice: what country is he from?",
                                                                  "Alice Vermeer's husband is from?", "Spouse country?"])
    right = {a.questions[1], a.questions[2], b.questions[0]}
    answer = lambda question, instructions: "Chile" if question in right else "Spain"  # noqa: E731
    score = lambda question, instructions, gold: {a.questions[0]: 0.5, b.questions[0]: 1.0}.get(question, 0.25)  # noqa: E731
    result = evaluate_multihop([a, b], answer, lambda: InstructionMemory(encoder), shared_memory=True, retrieval="top_n",
                               score_fn=score, single_hops=False)
    s = result.summary
    assert (s["por_paper"], s["por_release"], s["por"]) == (50.0, 75.0, 100.0), s
    assert [r.question_acc for r in result.records] == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert [r.release_acc for r in result.records] == [0.5, 1.0]
    assert (s["questions"], s["questions_correct"], s["cases_correct"]) == (6, 3, 2)
    run = load_script("examples/run_mquake.py", "run_mquake_for_scores")
    ci = run.row_intervals({**s, "single_hops_correct": 0, "single_hop_questions": 0}, [0.5, 1.0])
    assert ci["Por_Nhop"] == run.wilson_interval(3, 6) and ci["Por_any"] == run.wilson_interval(2, 2)
    assert ci["Por_Nhop_release"] == [50.0, 100.0] and ci["Hop-Acc"] is None


def test_answer_cache_answers_an_identical_question_and_facts_once(encoder):
    calls = []

    def counting(question: str, instructions: list[str]) -> str:
        calls.append(question)
        return reader(question, instructions)

    cache: dict = {}
    cases = [two_hop_case(), *_distractor_cases()]
    first = evaluate_multihop(cases, counting, lambda: InstructionMemory(encoder), shared_memory=True,
                              retrieval="subject_chain", answer_cache=cache)
    n = len(calls)
    second = evaluate_multihop(cases, counting, lambda: InstructionMemory(encoder), shared_memory=True,
                               retrieval="subject_chain", answer_cache=cache)
    assert len(calls) == n and first.summary == second.summary


# ---------------------------------------------------------------------------- multi-hop training cases
def test_training_cases_never_overlap_the_evaluated_ones():
    evaluated = [two_hop_case(), *_distractor_cases()[:1]]
    same_id = _case(1, [("The capital of Chad is", "Rome", "Chad")], ["Q same id?"])
    same_edit = _case(10, [("The spouse of Alice Vermeer is", "Bruno Castellanos", "Alice Vermeer"),
                           ("The capital of Chad is", "Rome", "Chad")], ["Q shared edit?"])
    same_question = _case(11, [("The capital of Mali is", "Oslo", "Mali")], [evaluated[0].questions[1]])
    clean = [_case(20 + i, [(f"The capital of Land{i} is", f"City{i}", f"Land{i}")] * (2 + i % 3), [f"Q{i}?"])
             for i in range(12)]
    chosen, stats = select_training_cases([same_id, same_edit, same_question, *clean], 6, evaluated, seed=1)
    assert {c.case_id for c in chosen} <= {c.case_id for c in clean} and len(chosen) == 6
    assert stats["excluded_overlap"] == 3 and stats["case_ids"] == sorted(c.case_id for c in chosen)
    check_disjoint(stats["case_ids"], evaluated)  # disjoint: no error
    with pytest.raises(RequestError, match=r"case_id 1\b.*Fix:"):
        check_disjoint([1, 20], evaluated)


def test_hop_quotas_follow_the_paper_ratio_where_the_data_allows():
    assert hop_quotas({2: 500, 3: 500, 4: 500}, 22) == {2: 10, 3: 9, 4: 3}  # 1000:910:290
    assert hop_quotas({2: 500, 3: 500, 4: 500}, 2200) == {2: 500, 3: 500, 4: 290}  # capped by what exists
    assert hop_quotas({4: 329}, 60) == {4: 60}  # MQuAKE-hard: 4-hop cases only
    assert hop_quotas({3: 5, 4: 5}, 12) == {3: 5, 4: 3}
    with pytest.raises(RequestError, match="multihop_cases"):
        hop_quotas({4: 3}, -1)


def test_training_request_is_the_case_facts_the_question_and_the_new_answer():
    case = two_hop_case()
    req = multihop_training_request(case)
    assert req["instruction"] == case_instruction(case) == f"{SPOUSE} {CITIZEN}"
    assert (req["prompt"], req["rephrase_prompt"], req["target_new"]) == (case.questions[0], case.questions[1:], "Chile")


def test_recipe_adds_mquake_cases_after_the_evaluated_ones(shared_data_dir):
    from instructedit_plugin.instructed.recipes import DEFAULT, MULTIHOP, MULTIHOP_FIELDS, multihop_split

    assert not set(MULTIHOP_FIELDS) & set(DEFAULT.to_dict())  # recipes without MQuAKE keep their cache keys
    assert set(MULTIHOP_FIELDS) <= set(MULTIHOP.to_dict())
    config = dataclasses.replace(MULTIHOP, multihop_cases=12, multihop_skip=30)
    requests, stats = multihop_split(config, shared_data_dir)
    cases = load_mquake(shared_data_dir / config.multihop_file)
    evaluated_ids = {c.case_id for c in cases[:30]}
    assert len(requests) == 12 == stats["taken"] and stats["by_hops"] == {"4": 12}
    assert not evaluated_ids & set(stats["case_ids"])
    evaluated_edits = {edit_instruction(e) for c in cases[:30] for e in c.edits}
    by_id = {c.case_id: c for c in cases}
    for req in requests:  # the case's own four facts, none of them an evaluated case's edit
        case = by_id[req["case_id"]]
        assert req["instruction"] == case_instruction(case) and len(case.edits) == 4
        assert not {edit_instruction(e) for e in case.edits} & evaluated_edits


def test_run_mquake_refuses_prefixes_trained_on_an_evaluated_case(tmp_path):
    archive = tmp_path / "results" / "best"
    archive.mkdir(parents=True)
    (tmp_path / "recipe.json").write_text(json.dumps({"steps": 5, "data": {"multihop": {"case_ids": [5, 1]}}}))
    run = load_script("examples/run_mquake.py", "run_mquake_for_disjoint")
    args = SimpleNamespace(multihop_archive=str(archive), data_dir=None)
    with pytest.raises(RequestError, match=r"case_id 1\b.*Fix:"):
        run.multihop_prefixes(args, [two_hop_case()], "unused")
    (tmp_path / "recipe.json").write_text(json.dumps({"steps": 5, "data": {"multihop": {"case_ids": [5]}}}))
    assert run.multihop_prefixes(args, [two_hop_case()], "unused")[0] == str(archive)


# ---------------------------------------------------------------------------- the tiny model, end to end
def test_tiny_model_in_the_shared_memory_setting(instructed_world, encoder, tmp_path):
    """Three two-hop chains of the world with other people's city edits, ONE memory for all cases:
    subject-chained retrieval hands each question its two facts and the trained prefixes compose them;
    the paper's top-N hands each question two facts led by the first hop's."""
    from instructedit_plugin.instructed.answering import instructed_answer_fn, instructed_token_accuracy_fn

    records = []
    # three chains whose people never occur in another case's edits (seed 5 of the distractors): in one
    # shared memory, a case's facts compete only with facts about other people
    for i, subject in enumerate(("Lionel Messi", "Mozart", "Danielle Darrieux")):
        chain = make_chain(subject)
        first, second = chain_rewrites(chain)
        records.append(mquake_record(i, chain, [first, second, *distractor_rewrites(chain, seed=5)]))
    path = tmp_path / "world.json"
    path.write_text(json.dumps(records))
    cases = load_mquake(path)
    lm, tok = world_lm(instructed_world)
    answer, score = instructed_answer_fn(lm, tok, max_new_tokens=4), instructed_token_accuracy_fn(lm, tok)
    chained = evaluate_multihop(cases, answer, lambda: InstructionMemory(encoder), shared_memory=True,
                                retrieval="subject_chain", hop_instructions="question", score_fn=score)
    for case, record in zip(cases, chained.records):
        facts = [edit_instruction(e) for e in case.edits[:2]]
        assert all(q.instructions == facts for q in record.questions), record.questions
    assert chained.summary["por"] == 100.0 and chained.summary["por_release"] > 50.0, chained.summary
    top_n = evaluate_multihop(cases, answer, lambda: InstructionMemory(encoder), shared_memory=True, retrieval="top_n",
                              single_hops=False)
    for case, record in zip(cases, top_n.records):
        assert all(len(q.instructions) == 2 and q.instructions[0] == edit_instruction(case.edits[0])
                   for q in record.questions), record.questions


def test_release_token_accuracy_on_the_tiny_model(instructed_world):
    """Teacher-forced token accuracy (the release's rule): the new city after its fact is all right with
    the trained prefixes; without any instruction the model does not know it."""
    from instructedit_plugin.instructed.answering import instructed_token_accuracy_fn

    chain = make_chain("Mozart")
    _, second = chain_rewrites(chain)
    fact = edit_instruction({"prompt": second["prompt"], "subject": second["subject"], "target_new": second["target_new"]})
    question = f"Where does {chain.friend} live?"
    lm, tok = world_lm(instructed_world)
    score = instructed_token_accuracy_fn(lm, tok)
    assert score(question, [fact], chain.city) == 1.0
    assert score(question, [], chain.city) < 1.0


# ---------------------------------------------------------------------------- run_mquake --merge
def _part(setting: str, name: str, **changes) -> dict:
    row = {"Por_Nhop": 50.0, "por_release": 40.0, "por": 100.0, "hop_acc": 25.0, "hop_acc_release": 30.0,
           "mean_facts_per_question": 2.0, "retrieval_recall": 100.0}
    ci = {"Por_Nhop": [10.0, 90.0], "Por_Nhop_release": None, "Por_any": None, "Hop-Acc": None}
    part = dict(editing_method="InstructEd", data="cases.json", n_cases=2, cases_by_hops={"2": 2}, model="m",
                model_name="m", archive="a", multihop_archive=None, multihop_training=None, hparams="h", dtype="float32",
                threads=1, settings=[setting], retrieval_gate=0.1, top_k=5, multihop_gate=None, question_aggregation="any",
                match_mode="contains", max_new_tokens=4, evaluation_config={setting: {"retrieval": setting}},
                results={setting: {name: row}}, ci95={setting: {name: ci}}, seconds={setting: {name: 1.0}},
                total_seconds=2.0, command=f"python examples/run_mquake.py --settings {setting} --methods {name}")
    part.update(changes)
    return part


def test_merge_combines_parallel_runs_of_the_same_cases(tmp_path):
    run = load_script("examples/run_mquake.py", "run_mquake_for_merge")
    parts = {"a": _part("shared_top_n", "instructed"), "b": _part("shared_top_n", "in_context"),
             "c": _part("shared_subject_chain", "instructed", multihop_archive="mh")}
    for stem, part in parts.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(part))
    files = [str(tmp_path / f"{stem}.json") for stem in parts]
    assert run.main(["--merge", *files, "--name", "all", "--metrics_save_dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "all.json").read_text())
    assert out["settings"] == ["shared_top_n", "shared_subject_chain"]
    assert list(out["results"]["shared_top_n"]) == ["instructed", "in_context"] and out["multihop_archive"] == "mh"
    assert out["command"] == parts["a"]["command"] and out["total_seconds"] == 6.0
    assert [(r["command"], r["keys"]) for r in out["merged_runs"]] == [
        (parts["b"]["command"], ["results.shared_top_n.in_context"]),
        (parts["c"]["command"], ["results.shared_subject_chain.instructed"])]
    md = (tmp_path / "all.md").read_text()
    assert md.count("| shared_top_n |") == 2 and "## Merged into this file" in md
    (tmp_path / "d.json").write_text(json.dumps(_part("oracle", "instructed", n_cases=3)))
    with pytest.raises(SystemExit, match="n_cases.*Fix:"):
        run.main(["--merge", files[0], str(tmp_path / "d.json"), "--name", "x", "--metrics_save_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="two parts"):
        run.main(["--merge", files[0], files[0], "--name", "x", "--metrics_save_dir", str(tmp_path)])


def test_merge_takes_the_shipped_prefixes_of_two_checkouts_as_the_same(tmp_path):
    """Parts run from two worktrees name the package's prefixes by two absolute paths: they merge; two
    different trained archives do not."""
    run = load_script("examples/run_mquake.py", "run_mquake_for_merge_paths")
    shipped = "instructedit_plugin/assets/instructed/gemma-3-270m"
    parts = {"a": _part("shared_top_n", "instructed", archive=f"/work/wt-one/{shipped}"),
             "b": _part("shared_iterative", "instructed", archive=f"/work/wt-two/{shipped}"),
             "c": _part("oracle", "instructed", archive="/root/.cache/other/results/best")}
    for stem, part in parts.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(part))
    assert run.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "ab",
                     "--metrics_save_dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "ab.json").read_text())["settings"] == ["shared_top_n", "shared_iterative"]
    with pytest.raises(SystemExit, match=r"differs from .* in archive\. Fix:"):
        run.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--name", "ac",
                  "--metrics_save_dir", str(tmp_path)])


def test_the_report_shows_shipped_prefixes_the_same_from_every_checkout():
    run = load_script("examples/run_mquake.py", "run_mquake_for_paths")
    for checkout in ("/work/main", "/tmp/some/clone", "/home/u/wt-branch"):
        assert run.shown_path(f"{checkout}/instructedit_plugin/assets/instructed/gemma-3-270m") == \
            "instructedit_plugin/assets/instructed/gemma-3-270m"
    cached = "/root/.cache/instructedit_plugin/instructed_recipes/242a1c1c757a9d5a/results/best"
    assert run.shown_path(cached) == cached  # a trained archive elsewhere keeps its full path
