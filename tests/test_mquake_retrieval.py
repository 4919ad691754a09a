"""``benchmarks/mquake_retrieval.py``: retrieval recall of run_mquake's multi-hop procedures (and the iterative
ones measured beside them) without a language model. Real sentence encoder (the packaged all-MiniLM-L6-v2);
hand-made cases from :mod:`tests.test_instructed_multihop_paper`."""
from __future__ import annotations

import json

import pytest

from instructedit_plugin.instructed.encoder import SentenceEncoder

from ._instructed_world import chain_rewrites, make_chain, mquake_record
from ._scripts import load_script
from .test_instructed_multihop import two_hop_case
from .test_instructed_multihop_paper import CITIZEN, SPOUSE, _case, _distractor_cases

DECOY = "The citizenship of the spouse of Vermeer's painter is Peru."


@pytest.fixture(scope="module")
def mr():
    from pathlib import Path

    return load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "mquake_retrieval.py")


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def _cases_with_decoy():
    """Alice Vermeer's spouse -> citizenship chain among other cases' facts, plus a decoy that repeats the
    question's words (citizenship, spouse, Vermeer) but is not about her spouse, Bruno Castellanos."""
    decoy = _case(6, [("The citizenship of the spouse of Vermeer's painter is", "Peru", "Vermeer's painter")], ["?"])
    return [two_hop_case(), *_distractor_cases(), decoy]


def test_bridge_term_follows_the_new_entity_where_the_question_text_leads_to_a_decoy(mr, encoder):
    """Every procedure takes her spouse fact first. The plain iterative query (question + that fact) then
    takes the decoy; with the bridge term the fact naming Bruno Castellanos (the spouse fact's new entity,
    absent from the question) wins: recall 100 vs 50 on her case."""
    cases = _cases_with_decoy()
    memory = mr.shared_memory(cases, encoder)
    questions = list(cases[0].questions)
    plain = mr.procedure_facts("iterative", memory, questions, [2] * 3)
    bridged = mr.procedure_facts("iterative_bridge", memory, questions, [2] * 3, weight=0.3)
    assert [c[0] for c in plain] == [SPOUSE] * 3 == [c[0] for c in bridged]
    assert [c[1] for c in plain] == [DECOY] * 3
    assert [c[1] for c in bridged] == [CITIZEN] * 3
    assert mr.case_recalls(cases[:1], memory, "iterative_bridge", 0.3) == [[1.0, 1.0, 1.0]]
    assert mr.case_recalls(cases[:1], memory, "iterative") == [[0.5, 0.5, 0.5]]
    # weight 0 is the plain iterative procedure
    assert mr.procedure_facts("iterative_bridge", memory, questions, [2] * 3, weight=0.0) == plain


def test_subject_chain_finds_the_chain_and_top_n_does_not(mr, encoder):
    """The procedures are run_mquake's: subject-chained recall 100 on her case, the paper's top-N below it."""
    cases = [two_hop_case(), *_distractor_cases()]
    memory = mr.shared_memory(cases, encoder)
    assert mr.case_recalls(cases[:1], memory, "subject_chain") == [[1.0, 1.0, 1.0]]
    top_n = mr.case_recalls(cases[:1], memory, "top_n")[0]
    assert all(r < 1.0 for r in top_n) and min(top_n) == 0.5


def test_recall_interval_resamples_cases(mr):
    assert mr.recall_with_interval([[1.0, 1.0], [1.0, 1.0]]) == (100.0, [100.0, 100.0])
    value, (low, high) = mr.recall_with_interval([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]] * 10)
    assert value == 50.0 and low < 50.0 < high and high - low > 10


def test_tuning_cases_must_come_after_the_evaluated_ones(mr):
    mr.check_args([25, 50], [100, 200], 429)
    with pytest.raises(mr.RetrievalError, match=r"--tune_cases: starts at case 40.*Fix: pass --tune_cases 50 150"):
        mr.check_args([25, 50], [40, 140], 429)
    with pytest.raises(mr.RetrievalError, match=r"--sizes: 500 cases asked, the file has 429\. Fix:"):
        mr.check_args([25, 500], [100, 200], 429)
    with pytest.raises(mr.RetrievalError, match=r"--tune_cases: \[300, 500\).*Fix:"):
        mr.check_args([25], [300, 500], 429)


def test_main_writes_the_json_and_its_render(mr, tmp_path):
    """On a 4-case MQuAKE file: evaluated on the first 2, weight tuned on the last 2; the markdown is the
    JSON's render, and --render rebuilds it byte for byte."""
    records = []
    for i, subject in enumerate(["Mozart", "Tiger Woods", "Leo Tolstoy", "Marie Curie"]):
        chain = make_chain(subject)
        records.append(mquake_record(i, chain, list(chain_rewrites(chain))))
    data = tmp_path / "mquake.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out_path = tmp_path / "mquake_retrieval.json"
    out = mr.main(["--sizes", "2", "--tune_cases", "2", "4", "--data_dir", str(data), "--out", str(out_path)])
    saved = json.loads(out_path.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(out))
    assert saved["results"]["2"]["questions"] == sum(len(r["questions"]) for r in records[:2])
    assert saved["results"]["2"]["procedures"]["subject_chain"]["recall"] == 100.0
    assert saved["tuning"]["cases"] == [2, 4] and saved["tuning"]["chosen"] in (0.0, 0.3, 0.6)
    md = (tmp_path / "mquake_retrieval.md").read_text(encoding="utf-8")
    assert md == mr.render_markdown(saved)
    (tmp_path / "mquake_retrieval.md").unlink()
    mr.main(["--render", "--out", str(out_path)])
    assert (tmp_path / "mquake_retrieval.md").read_text(encoding="utf-8") == md
