"""The trained multi-hop retriever (:mod:`instructedit_plugin.instructed.retriever_training`): disjoint from the
evaluated cases, reloads to identical embeddings, queries from the question and the memory only, and training
moves recall on a small synthetic two-hop set (0 steps: the base encoder's recall).

Real sentence encoder (the packaged all-MiniLM-L6-v2), a few training steps on made-up people, songs and
cities: hop 2's query (question + "Blue Harbor was performed by Tavi Orlund.") drifts to a sibling fact
("Silver Lantern was performed by Tavi Orlund.") under the base encoder; training on other people's chains
teaches it to take the next relation ("The birthplace of Tavi Orlund is Lisbon.")."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from instructedit_plugin.data.mquake import mquake_case
from instructedit_plugin.errors import PluginError, RequestError
from instructedit_plugin.instructed.encoder import SentenceEncoder
from instructedit_plugin.instructed.memory import InstructionMemory, retrieve_iterative
from instructedit_plugin.instructed.multihop import edit_instruction, evaluate_multihop
from instructedit_plugin.instructed.retriever_training import (
    MANIFEST,
    RetrieverConfig,
    _base_location,
    _fit,
    case_facts,
    check_retriever_disjoint,
    retriever_info,
    train_retriever,
    training_pairs,
)

from ._scripts import load_script

SONGS = ["Blue Harbor", "Silver Lantern", "Paper Moonrise", "Quiet Thunder", "Velvet Road", "Glass Orchard",
         "Northern Ember", "Hollow Crown", "Amber Tide", "Crimson Meadow", "Winter Parade", "Golden Static",
         "Falling Lights", "Iron Lullaby", "Distant Choir", "Broken Compass", "Neon Harvest", "Salt River",
         "Midnight Ferry", "Copper Sky", "Wild Cartography", "Echo Garden", "Stone Ballad", "Lunar Mill"]
PEOPLE = ["Tavi Orlund", "Mirea Kostan", "Belo Tarquin", "Sanne Volder", "Rudo Feyra", "Ilka Marsden",
          "Odo Brenwick", "Cael Dunmore", "Yara Quell", "Fenn Halloway", "Lisso Andric", "Maro Pellin"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Tbilisi", "Dakar", "Perth", "Bergen", "Cusco", "Minsk"]
FAST = RetrieverConfig(steps=30, batch_size=4)


def _rewrite(prompt: str, subject: str, new: str, question: str, relation: str) -> dict:
    return {"prompt": prompt, "relation_id": relation, "subject": subject, "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": "Nobody", "id": "Q2"}, "question": question}


def _case(case_id: int, song: str, person: str, city: str):
    rewrites = [_rewrite("{} was performed by", song, person, f"Who performed {song}?", "P175"),
                _rewrite("The birthplace of {} is", person, city, f"Where was {person} born?", "P19")]
    hops = [{"question": r["question"], "cloze": "", "answer": r["target_new"]["str"], "answer_alias": []}
            for r in rewrites]
    return mquake_case({
        "case_id": case_id, "requested_rewrite": rewrites,
        "questions": [f"In which city was the performer of {song} born?", f"Where was the singer of {song} born?"],
        "answer": "Nowhere", "answer_alias": [], "new_answer": city, "new_answer_alias": [],
        "single_hops": hops, "new_single_hops": hops})


def synthetic_cases(n: int, offset: int = 0) -> tuple[list, list[str]]:
    """``n`` two-hop cases (song -> performer -> birthplace) with people ``offset..offset+n-1``, and the memory's
    distractors: a sibling song of each performer and the performer's spouse."""
    cases, distractors = [], []
    for i in range(offset, offset + n):
        cases.append(_case(1000 + i, SONGS[2 * i], PEOPLE[i], CITIES[i]))
        distractors += [f"{SONGS[2 * i + 1]} was performed by {PEOPLE[i]}.",
                        f"The spouse of {PEOPLE[i]} is {PEOPLE[(i + 5) % len(PEOPLE)]}."]
    return cases, distractors


EVALUATED, DISTRACTORS = synthetic_cases(6, 0)
TRAINING, _ = synthetic_cases(6, 6)


def iterative_recall(encoder: SentenceEncoder, cases=EVALUATED) -> tuple[float, list[list[str]]]:
    """Recall of the cases' facts among the 2 facts iterative retrieval gives each question (one memory of the
    cases' facts and the distractors), and the facts themselves."""
    memory = InstructionMemory(encoder)
    texts = list(dict.fromkeys([edit_instruction(e) for c in cases for e in c.edits] + DISTRACTORS))
    memory.add(texts, [{} for _ in texts])
    questions = [q for c in cases for q in c.questions]
    got = [[s.text for s in chain] for chain in retrieve_iterative(memory, questions, 2)]
    gold = [{edit_instruction(e) for e in c.edits} for c in cases for _ in c.questions]
    return sum(len(set(g) & facts) / len(facts) for g, facts in zip(got, gold)) / len(questions), got


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrievers")


@pytest.fixture(scope="module")
def trained(cache) -> Path:
    return train_retriever(TRAINING, EVALUATED, FAST, cache_dir=cache, progress=False)


def test_training_moves_recall_and_zero_steps_gives_the_base_recall(trained, cache):
    """Base encoder: hop 2 drifts to the sibling song for some questions (recall < 1); 30 steps on other
    people's chains: every fact found. Break-on-purpose: 0 steps is the base encoder, the same facts."""
    base_recall, base_facts = iterative_recall(SentenceEncoder())
    trained_recall, _ = iterative_recall(SentenceEncoder(str(trained)))
    assert base_recall <= 0.9
    assert trained_recall == 1.0
    untrained = train_retriever(TRAINING, EVALUATED, dataclasses.replace(FAST, steps=0), cache_dir=cache,
                                progress=False)
    assert untrained != trained
    assert iterative_recall(SentenceEncoder(str(untrained))) == (base_recall, base_facts)
    info = retriever_info(trained)
    assert info["loss"]["last"] < info["loss"]["first"] and len(info["loss"]["per_step"]) == FAST.steps


def test_the_archive_reloads_to_identical_embeddings_and_is_reused(trained, cache):
    """The saved encoder gives bit-identical embeddings to the model as trained (the same seed retrains the
    same weights); a second call returns the cached archive without training."""
    pairs = training_pairs(TRAINING, {edit_instruction(e) for c in EVALUATED for e in c.edits})
    model, _ = _fit(_base_location(None)[1], pairs, FAST, progress=False)
    texts = [q for c in EVALUATED for q in c.questions] + DISTRACTORS
    as_trained = torch.nn.functional.normalize(
        model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=False).float(), dim=1)
    reloaded = SentenceEncoder(str(trained)).encode(texts)
    assert torch.equal(as_trained, reloaded)
    assert not torch.allclose(reloaded, SentenceEncoder().encode(texts), atol=1e-3)  # training changed it
    stamp = (trained / MANIFEST).stat().st_mtime_ns
    assert train_retriever(TRAINING, EVALUATED, FAST, cache_dir=cache, progress=False) == trained
    assert (trained / MANIFEST).stat().st_mtime_ns == stamp
    assert (trained / "model.safetensors").is_file()
    assert retriever_info(trained)["training"]["case_ids"] == [c.case_id for c in TRAINING]


def test_an_evaluated_case_among_the_training_cases_is_refused(trained, cache):
    with pytest.raises(RequestError, match=r"train cases: 1 of the retriever's training cases are evaluated "
                                           r"\(case_id 1000\)\. Fix: train on cases after the evaluated ones"):
        train_retriever([*TRAINING, EVALUATED[0]], EVALUATED, FAST, cache_dir=cache, progress=False)
    renamed = dataclasses.replace(EVALUATED[1], case_id=99)  # another id, the same multi-hop questions
    with pytest.raises(RequestError, match=r"case_id 99\)"):
        train_retriever([*TRAINING, renamed], EVALUATED, FAST, cache_dir=cache, progress=False)
    assert check_retriever_disjoint(trained, EVALUATED)["key"] == retriever_info(trained)["key"]
    with pytest.raises(RequestError, match=r"retriever: .* was trained on 2 of the evaluated MQuAKE cases "
                                           r"\(case_id 1006, 1007\)\. Fix:"):
        check_retriever_disjoint(trained, TRAINING[:2])
    with pytest.raises(PluginError, match=r"has no retriever\.json .* Fix:"):
        retriever_info(cache)


def test_evaluated_facts_are_never_a_positive_unless_asked():
    """A training case sharing a fact with an evaluated case keeps its other hops; the shared fact is no
    positive (it may still be in a query, as the fact retrieved before)."""
    shared = _case(2000, SONGS[0], PEOPLE[0], "Perth")  # hop 1 is EVALUATED[0]'s first fact, hop 2 is not
    evaluated_facts = {edit_instruction(e) for c in EVALUATED for e in c.edits}
    strict = training_pairs([shared], evaluated_facts)
    assert [p.positive for p in strict] == ["The birthplace of Tavi Orlund is Perth."] * 2 == [case_facts(shared)[1]] * 2
    assert [p.anchor for p in strict] == [f"{q} Blue Harbor was performed by Tavi Orlund." for q in shared.questions]
    assert len(training_pairs([shared])) == 4
    broken = dataclasses.replace(TRAINING[0], edits=list(reversed(TRAINING[0].edits)))
    with pytest.raises(RequestError, match=r"MQuAKE case 1006: requested_rewrite is not a chain.*Fix: drop the case"):
        training_pairs([broken])


def test_retrieval_never_reads_the_gold_sub_questions(trained):
    """The trained retriever's facts for every question are the same when the cases' gold decomposition
    (``new_single_hops``) is scrambled or removed (the hop count then comes from the number of edits)."""
    encoder = SentenceEncoder(str(trained))

    def facts(cases):
        result = evaluate_multihop(cases, lambda q, facts: "", lambda: InstructionMemory(encoder), shared_memory=True,
                                   retrieval="iterative", single_hops=False)
        return [q.instructions for r in result.records for q in r.questions]

    scrambled = [dataclasses.replace(c, new_single_hops=[dataclasses.replace(h, question="Who is Tavi Orlund?",
                                                                             answer="Lisbon")
                                                         for h in c.new_single_hops]) for c in EVALUATED]
    removed = [dataclasses.replace(c, new_single_hops=[]) for c in EVALUATED]
    assert facts(EVALUATED) == facts(scrambled) == facts(removed)
    assert all(len(f) == 2 for f in facts(EVALUATED))


def test_the_benchmark_refuses_retriever_cases_that_overlap(tmp_path):
    mr = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "mquake_retrieval.py")
    mr.check_args([25, 50, 100], [100, 200], 429, [200, 429])
    with pytest.raises(mr.RetrievalError, match=r"--retriever_cases: \[150, 429\) overlaps .* tuning cases "
                                                r"\[100, 200\)\. Fix: pass --retriever_cases 200 429"):
        mr.check_args([25, 50, 100], [100, 200], 429, [150, 429])
    with pytest.raises(mr.RetrievalError, match=r"--retriever_cases: \[50, 90\) overlaps the evaluated cases \[0, 100\)"):
        mr.check_args([25, 50, 100], [100, 200], 429, [50, 90])


def test_the_benchmark_adds_the_trained_rows(tmp_path, trained):
    """--retriever FOLDER on a synthetic MQuAKE file: trained_iterative and trained_top_n beside the other
    procedures, the retriever and its validation recall in the JSON, the markdown its render."""
    mr = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "mquake_retrieval.py")
    records = []
    for case in EVALUATED[:4]:
        rewrites = [_rewrite(e["prompt"].replace(e["subject"], "{}"), e["subject"], e["target_new"], e["question"],
                             e["relation_id"]) for e in case.edits]
        hops = [dataclasses.asdict(h) for h in case.new_single_hops]
        records.append({"case_id": case.case_id, "requested_rewrite": rewrites, "questions": case.questions,
                        "answer": "Nowhere", "answer_alias": [], "new_answer": case.new_answer, "new_answer_alias": [],
                        "single_hops": hops, "new_single_hops": hops})
    data = tmp_path / "mquake.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out_path = tmp_path / "mquake_retrieval.json"
    mr.main(["--sizes", "2", "--tune_cases", "2", "4", "--data_dir", str(data), "--out", str(out_path),
             "--retriever", str(trained)])
    saved = json.loads(out_path.read_text(encoding="utf-8"))
    assert saved["procedures"][-2:] == ["trained_top_n", "trained_iterative"]
    assert saved["results"]["2"]["procedures"]["trained_iterative"]["recall"] == 100.0
    assert saved["retriever"]["validation"]["trained_iterative"]["recall"] == 100.0
    assert saved["retriever"]["training_case_ids"] == [c.case_id for c in TRAINING]
    md = (tmp_path / "mquake_retrieval.md").read_text(encoding="utf-8")
    assert md == mr.render_markdown(saved) and "trained_iterative" in md


def test_wilson_interval_over_question_fact_pairs():
    mr = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "mquake_retrieval.py")
    found, asked, (low, high) = mr.wilson_over_facts([[1.0, 0.5], [0.25, 0.0]], [4, 4])
    assert (found, asked) == (7, 16) and low < 100 * 7 / 16 < high
    assert mr.wilson_over_facts([[1.0] * 3] * 25, [4] * 25)[2] == [98.7, 100.0]  # 300 of 300: Wilson, not [100, 100]
