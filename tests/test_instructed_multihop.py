"""MQuAKE multi-hop evaluation: a real tiny model answering two-hop questions from its memory, and the
helpers (instructions, retrieval per hop, Por/Hop-Acc, answer matching).

The first tests run InstructEd for real: the session's world model (:mod:`tests._instructed_world`)
with the prefixes the plugin's trainer produced, real retrieval from an instruction memory, real
greedy answers. The helper tests further down use :func:`reader`, a fake answerer, because they are
about the retrieval and scoring plumbing, not about a model.
"""
from __future__ import annotations

import dataclasses
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructedit_plugin.data.common import make_request
from instructedit_plugin.data.mquake import Hop, MQuAKECase, load_mquake
from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructed.encoder import SentenceEncoder
from instructedit_plugin.instructed.memory import InstructionMemory
from instructedit_plugin.instructed.multihop import (
    MultiHopResult,
    answer_matches,
    edit_case_into_memory,
    edit_instruction,
    evaluate_multihop,
    normalize_answer,
    retrieve_facts_for_question,
)

from ._instructed_world import chain_rewrites, distractor_rewrites, make_chain, mquake_record, world_lm

SPOUSE = "The spouse of Alice Vermeer is Bruno Castellanos."
CITIZEN = "Bruno Castellanos is a citizen of Chile."
DISTRACTORS = ["The capital of Peru is Lima.", "The author of Dune is Frank Herbert.",
               "Frank Herbert is a citizen of Norway.", "Mount Kenya is located in Africa.",
               "The spouse of Marie Curie is Pierre Curie.", "The Eiffel Tower is located in Rome."]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def two_hop_case(single_hops: list[Hop] | None = None) -> MQuAKECase:
    edits = [
        make_request(prompt="The spouse of Alice Vermeer is", target_new="Bruno Castellanos",
                     ground_truth="Carl Jansen", subject="Alice Vermeer",
                     question="Who is Alice Vermeer married to?", case_id=1),
        make_request(prompt="Bruno Castellanos is a citizen of", target_new="Chile", ground_truth="Spain",
                     subject="Bruno Castellanos", question="What is the country of citizenship of Bruno Castellanos?",
                     case_id=1),
    ]
    hops = single_hops if single_hops is not None else [
        Hop("Who is the spouse of Alice Vermeer?", "The spouse of Alice Vermeer is", "Bruno Castellanos", ["Bruno"]),
        Hop("What is the country of citizenship of Bruno Castellanos?", "Bruno Castellanos is a citizen of",
            "Chile", ["Republic of Chile"]),
    ]
    return MQuAKECase(
        case_id=1, edits=edits,
        questions=["What is the country of citizenship of the spouse of Alice Vermeer?",
                   "Which country is Alice Vermeer's spouse a citizen of?",
                   "Alice Vermeer's husband holds the citizenship of which country?"],
        answer="Netherlands", answer_alias=[], new_answer="Chile", new_answer_alias=["CL", "Republic of Chile"],
        single_hops=[], new_single_hops=hops,
    )


def reader(question: str, instructions: list[str]) -> str:
    """A fake LM for the plumbing tests: answers with the object of the LAST instruction it was given,
    else the unedited answer."""
    if not instructions:
        return "Netherlands"
    last = instructions[-1].rstrip(".")
    for marker in (" is a citizen of ", " is "):
        if marker in last:
            return last.split(marker, 1)[1]
    return last


# ---------------------------------------------------------------------------- the real thing
#: people whose best friend and the new friend's city are edited (distinct chains of the world)
CHAIN_SUBJECTS = ("Mozart", "Tiger Woods", "Marie Curie", "Beethoven")


@pytest.fixture(scope="module")
def world_cases(tmp_path_factory):
    """Per chain: a case with both facts in memory and one with only the second fact (the new
    friend's city; without the first fact nobody says that person is X's friend), each with three
    other people's city edits as distractors, loaded through :func:`load_mquake`."""
    records = []
    for i, subject in enumerate(CHAIN_SUBJECTS):
        chain = make_chain(subject)
        first, second = chain_rewrites(chain)
        others = distractor_rewrites(chain)
        records += [mquake_record(2 * i, chain, [first, second, *others]), mquake_record(2 * i + 1, chain, [second, *others])]
    path = tmp_path_factory.mktemp("world-mquake") / "two_hop.json"
    path.write_text(json.dumps(records))
    cases = load_mquake(path)
    return cases[0::2], cases[1::2]


def test_tiny_model_composes_two_chained_facts_and_not_one(instructed_world, world_cases, encoder):
    """Two chained facts in memory ("The best friend of X is B.", "B lives in C.") give the composed
    answer C to "Where does the best friend of X live?" (both phrasings), retrieved hop by hop from the
    question; the second fact alone (B lives in C, but nobody says B is X's friend) does not: the model
    keeps the answer it knew. Not asserted: the first fact alone (its answer, B's city, needs a fact
    from the context composed with one from the weights, which the tiny world does not teach) and the
    first single hop, "Who is the best friend of X?" (the world's instruction-following data asks
    for cities, sports, languages and jobs, never for a person)."""
    from instructedit_plugin.instructed.answering import instructed_answer_fn

    both, second_only = world_cases
    lm, tok = world_lm(instructed_world)
    answer = instructed_answer_fn(lm, tok)
    full = evaluate_multihop(both, answer, lambda: InstructionMemory(encoder), question_aggregation="all")
    for case, record in zip(both, full.records):
        seen = [(q.question, q.instructions, q.prediction) for q in record.questions]
        assert record.questions[0].instructions == [edit_instruction(e) for e in case.edits[:2]], seen
        assert record.correct, (case.new_answer, seen)
        hop = record.single_hops[1]  # "Where does B live?" with "B lives in C." retrieved
        assert hop.correct and hop.instructions == [edit_instruction(case.edits[1])], hop
    assert full.summary["por"] == 100.0, full.summary
    one = evaluate_multihop(second_only, answer, lambda: InstructionMemory(encoder), single_hops=False)
    for case, record in zip(second_only, one.records):
        seen = [(q.question, q.instructions, q.prediction) for q in record.questions]
        assert not record.correct, seen
        assert all(answer_matches(q.prediction, [case.answer]) for q in record.questions), seen  # what it knew


def test_without_trained_prefixes_the_facts_are_not_used(instructed_world, world_cases, encoder):
    """The same retrieved facts in the same layout on the plain model (the in-context baseline): the
    base continues with "Output: ..." instead of answering, for every question and sub-question."""
    from instructedit_plugin.instructed.answering import instructed_answer_fn

    both, _ = world_cases
    lm, tok = world_lm(instructed_world, prefixes="none")
    result = evaluate_multihop(both, instructed_answer_fn(lm, tok), lambda: InstructionMemory(encoder),
                               match_mode="prefix")
    predictions = [q.prediction for r in result.records for q in r.questions + r.single_hops]
    assert all(p.startswith("Output:") for p in predictions), predictions
    assert result.summary["por"] == 0.0 and result.summary["hop_acc"] == 0.0, result.summary


# ---------------------------------------------------------------------------- plumbing (fake answerer)
def test_edit_instruction_text():
    case = two_hop_case()
    assert [edit_instruction(e) for e in case.edits] == [SPOUSE, CITIZEN]
    raw = {"prompt": "{} was performed by", "subject": "Hey Jude", "target_new": {"str": "Madonna"}}
    assert edit_instruction(raw) == "Hey Jude was performed by Madonna."
    with pytest.raises(PluginError):
        edit_instruction({"prompt": "x"})


def test_two_hop_case_por_and_hop_acc(encoder):
    """Scoring and retrieval plumbing (fake answerer): Por / Hop-Acc / recall of one hand-built case,
    alone and in a shared memory with distractors. A real model's answers: the tests above."""
    case = two_hop_case()
    result = evaluate_multihop([case], reader, lambda: InstructionMemory(encoder))
    record = result.records[0]
    assert record.edits == [SPOUSE, CITIZEN]
    assert record.questions[0].instructions == [SPOUSE, CITIZEN]  # hop 1 then hop 2
    assert record.correct and result.summary["por"] == 100.0 and result.summary["por_by_hops"] == {"2": 100.0}
    assert [h.instructions for h in record.single_hops] == [[SPOUSE], [CITIZEN]]
    assert [h.prediction for h in record.single_hops] == ["Bruno Castellanos", "Chile"]
    assert record.hop_acc == 1.0 and result.summary["hop_acc"] == 100.0
    assert result.summary["retrieval_recall"] == 100.0
    # the same answers without retrieval are the unedited ones: Por 0
    unedited = evaluate_multihop([case], lambda q, ins: reader(q, []), lambda: InstructionMemory(encoder))
    assert unedited.summary["por"] == 0.0 and unedited.summary["hop_acc"] == 0.0
    # a shared memory with distractors from other "cases" still retrieves the chain
    other = dataclasses.replace(case, case_id=2, edits=[make_request(
        prompt=d.rsplit(" ", 1)[0], target_new=d.rsplit(" ", 1)[1].rstrip("."), ground_truth="?", subject="?")
        for d in DISTRACTORS])
    shared = evaluate_multihop([case, other], reader, lambda: InstructionMemory(encoder), shared_memory=True,
                               single_hops=False)
    assert shared.records[0].questions[0].instructions == [SPOUSE, CITIZEN] and shared.records[0].correct


def test_retrieval_never_reads_the_gold_decomposition(encoder):
    """Multi-hop retrieval sees only the question: misleading sub-questions change nothing, and no
    sub-question text is ever sent to the encoder while answering the multi-hop questions."""
    misleading = [Hop("Who wrote Dune?", "The author of Dune is", "Frank Herbert", []),
                  Hop("What is the country of citizenship of Frank Herbert?", "Frank Herbert is a citizen of",
                      "Norway", [])]
    encoded: list[str] = []
    real = encoder.encode

    def factory():
        memory = InstructionMemory(encoder)
        memory.add(DISTRACTORS)

        def spy(texts):
            encoded.extend(texts)
            return real(texts)

        memory.encoder = type("Spy", (), {"encode": staticmethod(spy), "dim": encoder.dim,
                                          "identity": encoder.identity})()
        return memory

    honest = evaluate_multihop([two_hop_case()], reader, factory, single_hops=False)
    encoded_honest = list(encoded)
    encoded.clear()
    tricked = evaluate_multihop([two_hop_case(misleading)], reader, factory, single_hops=False)
    assert [q.instructions for q in honest.records[0].questions] == \
        [q.instructions for q in tricked.records[0].questions]
    assert honest.records[0].questions[0].instructions == [SPOUSE, CITIZEN] and tricked.records[0].correct
    for sub in misleading + two_hop_case().new_single_hops:
        assert not any(sub.question in text for text in encoded + encoded_honest), sub.question
    assert encoded == encoded_honest
    # the retrieval helper itself takes only the question
    memory = InstructionMemory(encoder)
    memory.add(DISTRACTORS + [SPOUSE, CITIZEN])
    facts = retrieve_facts_for_question(memory, two_hop_case().questions[0], hops=2)
    assert [f.text for f in facts] == [SPOUSE, CITIZEN]


def test_aggregation_and_json_round_trip(encoder, tmp_path):
    """Question aggregation and the result's JSON round trip (plumbing; fake answerer)."""
    case = two_hop_case()
    # answers only the first phrasing correctly
    def first_only(question, instructions):
        return reader(question, instructions) if question == case.questions[0] else "no idea"

    def factory():
        return InstructionMemory(encoder)

    assert evaluate_multihop([case], first_only, factory).summary["por"] == 100.0  # MQuAKE: any question
    assert evaluate_multihop([case], first_only, factory, question_aggregation="all").summary["por"] == 0.0
    result = evaluate_multihop([case], first_only, factory, question_aggregation="first")
    assert result.summary["por"] == 100.0 and result.summary["question_acc"] == pytest.approx(100 / 3, abs=1e-3)
    text = result.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(text)
    back = MultiHopResult.from_dict(json.loads(text))
    assert back.to_dict() == result.to_dict()
    with pytest.raises(PluginError):
        evaluate_multihop([case], first_only, factory, question_aggregation="most")


def test_real_mquake_hard_edits_retrieve_their_own_fact(encoder, shared_data_dir):
    cases = load_mquake(shared_data_dir / "mquake" / "MQuAKE-hard.json", limit=3)
    assert len(cases) == 3
    memory = InstructionMemory(encoder)
    texts = [t for case in cases for t in edit_case_into_memory(memory, case)]
    assert len(memory) == len(texts) == sum(len(c.edits) for c in cases)
    assert all(t.endswith(".") for t in texts)
    questions = [e["question"] for case in cases for e in case.edits]
    _, ids = memory.search(questions, k=5)
    for row, (question, text) in enumerate(zip(questions, texts)):
        assert memory.get(int(ids[row, 0]))[0] == text, (question, memory.get(int(ids[row, 0]))[0])
    hits = memory.select_many(questions)
    assert [h.text if h else None for h in hits] == texts  # and the gate lets every one through
    # adding a case again with skip_existing stores nothing new
    assert edit_case_into_memory(memory, cases[0], skip_existing=True) == texts[: len(cases[0].edits)]
    assert len(memory) == len(texts)


# ---------------------------------------------------------------------------- answer matching
@pytest.mark.parametrize(("pred", "answers", "mode", "expected"), [
    ("Arabic", ["Arabic"], "exact", True),
    ("It is Arabic.", ["Arabic"], "contains", True),
    ("It is Arabic.", ["Arabic"], "prefix", False),
    ("Arabic. Question: what else? English", ["Arabic"], "prefix", True),
    ("The United Kingdom", ["United Kingdom"], "exact", True),
    ("U.K.", ["UK"], "exact", True),
    ("Ukraine", ["UK"], "contains", False),
    ("the", ["the"], "contains", False),
    ("", ["Chile"], "contains", False),
    ("CHILE!", ["Republic of Chile", "Chile"], "exact", True),
    ("Saint-Denis", ["Saint Denis"], "exact", True),
    ("Chil", ["Chile"], "contains", False),
])
def test_answer_matches_examples(pred, answers, mode, expected):
    assert answer_matches(pred, answers, mode) is expected


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(), max_size=4), st.sampled_from(["contains", "prefix", "exact"]))
def test_answer_matches_never_crashes(pred, answers, mode):
    assert answer_matches(pred, answers, mode) in (True, False)
    assert isinstance(normalize_answer(pred), str)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_answer_matches_itself_when_not_empty(text):
    assert answer_matches(text, [text], "exact") is bool(normalize_answer(text))
    assert normalize_answer(normalize_answer(text)) == normalize_answer(text)


_WORD = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).filter(
    lambda w: w.lower() not in {"a", "an", "the"})


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORD, min_size=1, max_size=3), st.lists(_WORD, max_size=3), st.lists(_WORD, max_size=3))
def test_answer_matches_containment_and_case(answer_words, before, after):
    answer = " ".join(answer_words)
    pred = " ".join(before + [answer.upper() + "."] + after)
    assert answer_matches(pred, [answer], "contains")
    assert answer_matches(" ".join([answer.swapcase()] + after), [answer], "prefix")
