"""InstructEd's retrieval gate options (score / std / pad), its calibration and ``instructedit calibrate-gate``
(issue #14 item 3), and the up-front rejection of questions too long for EasyEdit PyPI's scoring (item 5)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from instructedit_plugin.errors import HyperParamsError, RequestError
from instructedit_plugin.instructed.memory import InstructionMemory
from instructedit_plugin.instructed.memory.calibration import (
    best_threshold,
    calibrate_memory,
    gate_metrics,
    store_calibration,
)
from instructedit_plugin.instructed.memory.gate import (
    StdGate,
    gate_for_memory,
    gate_spread,
)

DIM = 4


class RawEncoder:
    """Stub encoder returning fixed, *unnormalised* vectors (so dot products differ from cosine)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = {k: torch.tensor(v, dtype=torch.float32) for k, v in table.items()}

    dim = DIM
    identity = {"name": "raw-stub", "dim": DIM, "weights_sha256": "0", "config_sha256": "0"}

    def encode(self, texts):
        return torch.stack([self.table[t] for t in texts])


def _unit(*v: float) -> list[float]:
    t = torch.tensor(v, dtype=torch.float32)
    return (t / t.norm()).tolist()


# ---------------------------------------------------------------------------------------------- defaults
def test_default_options_are_the_previous_gate_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(12, DIM, generator=gen)
    queries = torch.randn(7, DIM, generator=gen)
    memory = InstructionMemory(None)
    memory.add([f"fact {i}" for i in range(12)], embeddings=emb)
    assert StdGate.from_options(0.1) == StdGate() == StdGate(0.1, 5, 0.0, False)
    middle = sorted(memory.gate_spreads(queries, StdGate())[0])[3]  # splits the batch
    legacy = memory.select_many(queries, middle, 5)  # plain arguments, as before the options existed
    named = memory.select_many(queries, StdGate.from_options(middle, score="cosine", std="population", pad="zero"))
    assert [None if s is None else (s.id, s.spread, s.top_scores) for s in legacy] == \
           [None if s is None else (s.id, s.spread, s.top_scores) for s in named]
    # the statistic itself: population std of the top-5 cosine scores, exactly as computed before
    unit_q = torch.nn.functional.normalize(queries, dim=1)
    unit_m = torch.nn.functional.normalize(emb, dim=1)
    expected = (unit_q @ unit_m.T).topk(5, dim=1).values.std(dim=1, unbiased=False)
    spreads, _ = memory.gate_spreads(queries, StdGate())
    assert spreads == pytest.approx(expected.tolist(), abs=1e-6)
    # bit for bit: what select_many computed before the options existed (unit queries searched, gate_spread)
    scores, _ = memory.search(unit_q, 5)
    assert spreads == [float(gate_spread(row)) for row in scores]
    assert sum(s is not None for s in legacy) not in (0, 7)  # the threshold splits this batch


# ---------------------------------------------------------------------------------------------- options
def test_score_dot_uses_the_raw_norms_and_changes_decisions():
    # two stored facts pointing the same way, one with a 3x longer raw vector
    table = {"short": [1.0, 0.1, 0.0, 0.0], "long": [0.0, 3.0, 0.3, 0.0],
             "q": [0.6, 0.6, 0.05, 0.0]}
    memory = InstructionMemory(RawEncoder(table))
    memory.add(["short", "long"])
    assert memory.norms.tolist() == pytest.approx([math.hypot(1, 0.1), math.hypot(3, 0.3)])
    cos = memory.select("q", StdGate.from_options(None, 2, pad="none"))
    dot = memory.select("q", StdGate.from_options(None, 2, score="dot", pad="none"))
    assert cos.text == "short" and dot.text == "long"  # re-ranked by dot product
    q_norm = torch.tensor(table["q"]).norm()
    assert dot.score == pytest.approx(float(torch.tensor(table["q"]) @ torch.tensor(table["long"])), rel=1e-5)
    assert dot.spread > 3 * cos.spread
    # a threshold between the two spreads: open for dot, shut for cosine
    middle = (dot.spread + cos.spread) / 2
    assert memory.select("q", StdGate.from_options(middle, 2, pad="none")) is None
    assert memory.select("q", StdGate.from_options(middle, 2, score="dot", pad="none")).text == "long"
    assert float(q_norm) > 0


def test_score_dot_equals_cosine_for_unit_vectors():
    table = {f"f{i}": _unit(*(torch.randn(DIM, generator=torch.Generator().manual_seed(i)).tolist()))
             for i in range(8)}
    table["q"] = _unit(1, 2, 3, 4)
    memory = InstructionMemory(RawEncoder(table))
    memory.add([f"f{i}" for i in range(8)])
    cos = memory.gate_spreads(["q"], StdGate())[0]
    dot = memory.gate_spreads(["q"], StdGate.from_options(score="dot"))[0]
    assert dot == pytest.approx(cos, abs=1e-6)


def test_sample_std_scales_by_sqrt_k_over_k_minus_1_and_flips_a_borderline_query():
    gen = torch.Generator().manual_seed(3)
    memory = InstructionMemory(None)
    memory.add([f"f{i}" for i in range(10)], embeddings=torch.randn(10, DIM, generator=gen))
    query = torch.randn(1, DIM, generator=gen)
    pop = memory.gate_spreads(query, StdGate())[0][0]
    sample = memory.gate_spreads(query, StdGate.from_options(std="sample"))[0][0]
    assert sample == pytest.approx(pop * math.sqrt(5 / 4), rel=1e-6)
    between = (pop + sample) / 2
    assert memory.select(query, StdGate.from_options(between)) is None
    assert memory.select(query, StdGate.from_options(between, std="sample")) is not None


def test_pad_none_changes_only_memories_smaller_than_top_k():
    memory = InstructionMemory(None)
    memory.add(["only"], embeddings=torch.tensor([[1.0, 0, 0, 0]]))
    query = torch.tensor([[0.8, 0.6, 0, 0]])  # cosine 0.8 > 0.25: the zero-padded gate opens
    assert memory.select(query, StdGate.from_options(0.1)).text == "only"
    assert memory.select(query, StdGate.from_options(0.1, pad="none")) is None
    big = InstructionMemory(None)
    big.add([f"f{i}" for i in range(9)], embeddings=torch.randn(9, DIM, generator=torch.Generator().manual_seed(1)))
    q = torch.randn(3, DIM, generator=torch.Generator().manual_seed(2))
    assert big.gate_spreads(q, StdGate())[0] == big.gate_spreads(q, StdGate.from_options(pad="none"))[0]


def test_bad_gate_options_name_the_field():
    with pytest.raises(RequestError, match=r"gate_score.*Fix:"):
        StdGate.from_options(score="euclid")
    with pytest.raises(RequestError, match=r"gate_std.*Fix:"):
        StdGate.from_options(std="unbiased")
    with pytest.raises(RequestError, match=r"gate_pad.*Fix:"):
        StdGate.from_options(pad="mean")


# ---------------------------------------------------------------------------------------------- calibration
def test_best_threshold_maximises_f1_on_a_known_case():
    pos, neg = [0.3, 0.25, 0.2, 0.05], [0.1, 0.04, 0.02]
    got = best_threshold(pos, neg)
    # opening above 0.045 catches every positive and one negative: F1 8/9, better than 0.15 (6/7) or 0.1's
    assert got.threshold == pytest.approx(0.045)
    assert (got.true_pos, got.false_pos, got.false_neg, got.true_neg) == (4, 1, 0, 2)
    assert got.f1 == pytest.approx(8 / 9)
    assert gate_metrics(pos, neg, 0.1).f1 == pytest.approx(6 / 7)
    # brute force over a fine grid never beats it
    grid = [i / 1000 for i in range(400)]
    assert max(gate_metrics(pos, neg, t).f1 for t in grid) <= got.f1 + 1e-12


def test_best_threshold_needs_positives_and_negatives():
    with pytest.raises(RequestError, match=r"positives: no queries.*Fix:"):
        best_threshold([], [0.1])
    with pytest.raises(RequestError, match=r"negatives: no queries.*Fix:"):
        best_threshold([0.1], [])


def test_calibrate_memory_separates_facts_in_and_out_of_the_memory():
    gen = torch.Generator().manual_seed(5)
    facts = torch.randn(30, DIM * 4, generator=gen)
    memory = InstructionMemory(None)
    memory.add([f"f{i}" for i in range(20)], embeddings=facts[:20])
    positives = facts[:20] + 0.3 * torch.randn(20, DIM * 4, generator=gen)  # near stored facts
    negatives = facts[20:] + 0.3 * torch.randn(10, DIM * 4, generator=gen)   # near facts NOT stored
    result = calibrate_memory(memory, positives, negatives, StdGate())
    pos_spreads, _ = memory.gate_spreads(positives, StdGate())
    neg_spreads, _ = memory.gate_spreads(negatives, StdGate())
    assert result.threshold == best_threshold(pos_spreads, neg_spreads).threshold
    assert result.f1 >= result.baseline.f1 and result.f1 > 0.8
    assert (result.positives, result.negatives) == (20, 10)


# ---------------------------------------------------------------------------------------------- manifest
def _saved_memory(tmp_path, table):
    memory = InstructionMemory(RawEncoder(table))
    memory.add([k for k in table if k.startswith("f")])
    folder = tmp_path / "mem"
    memory.save(folder)
    return memory, folder


def test_manifest_round_trips_the_calibration_and_the_norms(tmp_path):
    table = {"f1": [2.0, 0, 0, 0], "f2": [0, 0.5, 0, 0], "f3": [0, 0, 1.5, 0], "q": [1.0, 0.1, 0, 0]}
    memory, folder = _saved_memory(tmp_path, table)
    result = calibrate_memory(memory, ["q"], ["f2"], StdGate.from_options(score="dot", std="sample", pad="none"))
    store_calibration(folder, result, memory)
    manifest = InstructionMemory.read_manifest(folder)
    assert manifest["gate"] == result.to_manifest()
    assert manifest["gate"]["threshold"] == result.threshold and manifest["gate"]["score"] == "dot"
    loaded = InstructionMemory.load(folder, RawEncoder(table))
    assert loaded.gate_calibration == result.to_manifest()
    assert torch.equal(loaded.norms, memory.norms)
    gate = StdGate.from_options(None, score="dot", std="sample", pad="none")
    assert loaded.gate_spreads(["q"], gate) == memory.gate_spreads(["q"], gate)


def test_retrieval_gate_calibrated_uses_the_stored_threshold(tmp_path):
    table = {"f1": [1.0, 0, 0, 0], "f2": [0, 1.0, 0, 0], "f3": [0, 0, 1.0, 0], "q": [1.0, 0.2, 0, 0]}
    memory, _ = _saved_memory(tmp_path, table)
    with pytest.raises(RequestError, match=r"retrieval_gate.*no calibrated threshold.*Fix:"):
        gate_for_memory(memory, "calibrated")
    spread = memory.gate_spreads(["q"], StdGate())[0][0]
    from instructedit_plugin.instructed.lm import RetrievedInstructions

    for threshold, chosen in ((spread + 0.01, None), (spread - 0.01, "f1")):
        memory.gate_calibration = {"threshold": threshold, "score": "cosine", "std": "population", "pad": "zero",
                                   "top_k": 5}
        assert gate_for_memory(memory, "calibrated").threshold == threshold
        picked = RetrievedInstructions(memory, "calibrated").choose(["q"])[0]
        assert (picked.instruction if picked else None) == (table and chosen)
    with pytest.raises(RequestError, match=r"gate_std: .*calibrated with std='population'.*Fix:"):
        gate_for_memory(memory, "calibrated", std="sample")


def test_hparams_take_the_gate_options(tmp_path):
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    base = dict(alg_name="InstructEd", model_name="m", archive="a")
    hp = InstructEdHyperParams(**base, retrieval_gate="calibrated", gate_score="dot", gate_std="sample",
                               gate_pad="none")
    hp.validate()
    assert (hp.retrieval_gate, hp.gate_score, hp.gate_std, hp.gate_pad) == ("calibrated", "dot", "sample", "none")
    default = InstructEdHyperParams(**base)
    assert (default.retrieval_gate, default.gate_score, default.gate_std, default.gate_pad) == \
           (0.1, "cosine", "population", "zero")
    for field, value in (("gate_score", "euclid"), ("gate_std", "biased"), ("gate_pad", "mean")):
        with pytest.raises(HyperParamsError, match=rf"{field}.*Fix"):
            InstructEdHyperParams(**base, **{field: value}).validate()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_calibrate_gate_end_to_end(tmp_path, capsys):
    from instructedit_plugin.cli import main
    from instructedit_plugin.instructed.encoder import SentenceEncoder

    facts = ["The capital of Atlantis is Coral City.", "Mount Zork is located in Peru.",
             "The spouse of Ada Quill is Ben Stone.", "The mother tongue of Rea Vos is Danish.",
             "Lake Miro is in Norway.", "The CEO of Hexa Corp is Tim Lowe."]
    memory = InstructionMemory(SentenceEncoder())
    memory.add(facts)
    folder = tmp_path / "mem"
    memory.save(folder)
    positives = ["What is the capital of Atlantis?", "Where is Mount Zork?", "Who is Ada Quill married to?",
                 "Which language does Rea Vos speak natively?", "In which country is Lake Miro?"]
    negatives = ["Who composed the Moonlight Sonata?", "What is the boiling point of water?",
                 "Who wrote Hamlet?", "What colour is a ripe banana?"]
    (tmp_path / "pos.json").write_text(json.dumps(positives))
    (tmp_path / "neg.txt").write_text("\n".join(negatives))
    rc = main(["calibrate-gate", str(folder), "--positives", str(tmp_path / "pos.json"),
               "--negatives", str(tmp_path / "neg.txt"), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    pos, _ = memory.gate_spreads(positives, StdGate())
    neg, _ = memory.gate_spreads(negatives, StdGate())
    expected = best_threshold(pos, neg)
    stored = InstructionMemory.read_manifest(folder)["gate"]
    assert stored["threshold"] == pytest.approx(expected.threshold) == pytest.approx(printed["threshold"])
    assert stored["f1"] == pytest.approx(expected.f1) and stored["baseline"]["threshold"] == 0.1
    # the calibrated memory now serves retrieval_gate: calibrated
    assert gate_for_memory(InstructionMemory.load(folder), "calibrated").threshold == stored["threshold"]
    # errors: a missing folder, no negatives
    assert main(["calibrate-gate", str(tmp_path / "nope"), "--positives", str(tmp_path / "pos.json")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["calibrate-gate", str(folder), "--positives", str(tmp_path / "pos.json")]) == 1
    err = capsys.readouterr().err
    assert "negatives: no queries" in err and "Fix:" in err


# ---------------------------------------------------------------------------------------------- item 5
#: Record 781 (case_id 7952) of instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json, as the
#: plugin's loader turns it into an edit request (only the fields the check reads).
RECORD_781 = {
    "prompt": "P-700 Granit, which is named after",
    "target_new": "Oxford",
    "rephrase_prompt": ("Bridson\n Psydrax suborbicularis (C.T.White) S.T.Reynolds & R.J.F.Hend. "
                        "P-700 Granit is called after"),
    "portability": {"one_hop": {
        "prompt": ("Which prestigious educational institution shares its name with the inspiration for "
                   "P-700 Granit's codename?"),
        "ground_truth": "University of Oxford"}},
}


def _pypi_prediction_acc_answer_positions(tok, max_length, prompt, target):
    """How many answer positions EasyEdit PyPI's test_prediction_acc keeps for one prompt (its slicing)."""
    both = tok([prompt + " " + target], padding=True, truncation=True, max_length=max_length)["input_ids"][0]
    alone = tok([prompt], padding=True, truncation=True, max_length=max_length)["input_ids"][0]
    prompt_len = sum(t != tok.pad_token_id for t in alone) + sum(t == tok.pad_token_id for t in both)
    return len(list(range(len(both)))[prompt_len - 1:-1])


def test_record_781_is_rejected_up_front_naming_the_field():
    from instructedit_plugin.compat.edit_arguments import check_answer_room
    from tests.support.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rephrase = RECORD_781["rephrase_prompt"]
    n_tokens = len(tok(rephrase)["input_ids"])
    max_length = n_tokens  # the prompt fills max_length: PyPI's answer slice is empty (its IndexError)
    assert _pypi_prediction_acc_answer_positions(tok, max_length, rephrase, RECORD_781["target_new"]) == 0
    with pytest.raises(RequestError) as err:
        check_answer_room(tok, max_length, [RECORD_781["prompt"]], [rephrase], None,
                          {k: {"prompt": [v["prompt"]], "ground_truth": [v["ground_truth"]]}
                           for k, v in RECORD_781["portability"].items()})
    message = str(err.value)
    assert "`rephrase_prompts[0]`" in message and f"{n_tokens} tokens" in message and "Fix:" in message
    # one token more and the answer has a position: accepted, and PyPI's slice is not empty
    check_answer_room(tok, n_tokens + 1, [RECORD_781["prompt"]], [rephrase])
    assert _pypi_prediction_acc_answer_positions(tok, n_tokens + 1, rephrase, RECORD_781["target_new"]) >= 1
    # the portability question is checked too
    port = RECORD_781["portability"]["one_hop"]["prompt"]
    with pytest.raises(RequestError, match=r"portability_inputs\['one_hop'\]\['prompt'\]\[0\]"):
        check_answer_room(tok, len(tok(port)["input_ids"]), None, None, None,
                          {"one_hop": {"prompt": [port], "ground_truth": ["University of Oxford"]}})


@pytest.mark.parametrize("plugin_alg", [True, False])
def test_pypi_edit_wrapper_rejects_record_781_before_editing(plugin_alg):
    from types import SimpleNamespace

    from instructedit_plugin.compat.editor_patches import _validating
    from tests.support.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ran = []

    class Editor:
        alg_name = "InstructEd" if plugin_alg else "ROME"

        def __init__(self, max_length):
            self.tok, self.hparams = tok, SimpleNamespace(max_length=max_length, device="cpu")

        def edit(self, prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
                 portability_inputs=None, keep_original_weight=False, verbose=True, **kwargs):
            ran.append(prompts)
            return "edited"

    Editor.edit = _validating("pypi", "edit", lambda name: name == "InstructEd")(Editor.edit)
    n_tokens = len(tok(RECORD_781["rephrase_prompt"])["input_ids"])
    with pytest.raises(RequestError, match=r"`rephrase_prompts\[0\]`.*max_length is 40.*Fix:"):
        Editor(40).edit([RECORD_781["prompt"]], [RECORD_781["target_new"]],
                        rephrase_prompts=[RECORD_781["rephrase_prompt"]])
    assert ran == []  # nothing was edited
    assert Editor(n_tokens + 8).edit([RECORD_781["prompt"]], [RECORD_781["target_new"]],
                                     rephrase_prompts=[RECORD_781["rephrase_prompt"]]) == "edited"
    # EasyEdit main widens max_length itself: nothing is rejected there
    Editor.edit = _validating("main", "edit", lambda name: name == "InstructEd")(Editor.edit.__wrapped__)
    assert Editor(40).edit([RECORD_781["prompt"]], [RECORD_781["target_new"]],
                           rephrase_prompts=[RECORD_781["rephrase_prompt"]]) == "edited"
