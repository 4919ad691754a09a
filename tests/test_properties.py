"""Property tests (hypothesis): bad input never crashes with a raw exception, good input never changes.

* request normalisation (:func:`instructedit_plugin.compat.edit_arguments.validate_edit_arguments`);
* instruction templating of both methods: InstructEd ``Instructions: {fact}\\nInput: {question}``
  (:mod:`instructedit_plugin.instructed.templates`) and InstructEdit
  ``Task: ...\\nDescription: ...\\nInput: ...`` (:mod:`instructedit_plugin.instructions`), with any
  unicode, empty strings and inputs longer than the token limit (truncated, with a warning);
* InstructEd's retrieval gate (std of the top-5 scores > threshold), top-k search, memories with
  fewer than 5 entries, ties;
* Score / H (:mod:`instructedit_plugin.evaluation.summary`): within 0..100, never NaN, independent
  of order, H <= Score.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from instructedit_plugin.errors import PluginError, RequestError
from instructedit_plugin.evaluation.summary import harmonic_mean, score, summarize_metrics
from instructedit_plugin.instructed.instructed_hparams import DEFAULT_TEMPLATE
from instructedit_plugin.instructed.memory import InstructionMemory, gate_spread
from instructedit_plugin.instructed.templates import InstructionTemplate, instruction_of, request_prompts
from instructedit_plugin.instructions import default_library, format_instruction
from tests.support.tokenizer import load_tokenizer
from instructedit_plugin.compat.edit_arguments import validate_edit_arguments

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any unicode (surrogates excluded: they cannot be encoded as UTF-8, so no tokenizer takes them).
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
nonblank = any_text.filter(lambda s: s.strip())
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


@contextmanager
def captured_warnings(name: str) -> Iterator[list[logging.LogRecord]]:
    """WARNING records of logger ``name`` (function-scoped fixtures such as caplog do not mix with @given)."""
    records: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    handler = Handler(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# Request normalisation
# ----------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.tuples(nonblank, nonblank, any_text), min_size=1, max_size=5), st.booleans())
def test_well_formed_requests_are_accepted_and_left_unchanged(triples, as_locality_lists):
    prompts, targets, truths = (list(x) for x in zip(*triples))
    locality = {"nq": {"prompt": [t + "?" for t in targets], "ground_truth": list(truths)}}
    if not as_locality_lists and len(prompts) == 1:
        locality = {"nq": {"prompt": prompts[0], "ground_truth": truths[0]}}
    kwargs = dict(prompts=prompts, target_new=targets, ground_truth=truths, rephrase_prompts=list(prompts),
                  locality_inputs=locality, portability_inputs=copy.deepcopy(locality))
    before = copy.deepcopy(kwargs)
    assert validate_edit_arguments(**kwargs) == len(prompts)
    assert kwargs == before  # validation only rejects; it never rewrites what it accepts
    if len(prompts) == 1:  # a single string is one edit, as in EasyEdit
        assert validate_edit_arguments(prompts[0], targets[0], ground_truth=truths[0]) == 1


@SETTINGS
@given(junk, junk, junk, junk, junk, junk)
def test_malformed_requests_raise_request_error_and_nothing_else(prompts, target_new, ground_truth, rephrase,
                                                                  locality, portability):
    try:
        n = validate_edit_arguments(prompts, target_new, ground_truth=ground_truth, rephrase_prompts=rephrase,
                                    locality_inputs=locality, portability_inputs=portability)
    except RequestError as exc:
        message = str(exc)
        assert message.startswith("`") and "`" in message[1:]  # names the argument
        return
    assert isinstance(n, int) and n >= 1


@SETTINGS
@given(st.lists(nonblank, min_size=1, max_size=4), st.integers(0, 3), st.sampled_from(["prompt", "ground_truth"]),
       junk.filter(lambda v: not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(x, str) for x in v))))
def test_locality_entries_must_be_text(prompts, index, part, bad):
    index %= len(prompts)
    group = {"prompt": list(prompts), "ground_truth": list(prompts)}
    group[part][index] = bad
    with pytest.raises(RequestError, match=rf"`locality_inputs\['nq'\]\['{part}'\]\[{index}\]` must be a string"):
        validate_edit_arguments(prompts, prompts, locality_inputs={"nq": group})


@SETTINGS
@given(st.dictionaries(st.sampled_from(["alg_name", "model_name", "archive", "prefix_len", "prefix_layers",
                                        "retrieval_gate", "top_k", "template", "device", "fp16"])
                       | st.none() | st.integers() | st.booleans() | any_text, junk, max_size=6))
def test_any_hparams_dict_loads_or_raises_hyperparams_error(data):
    from instructedit_plugin.errors import HyperParamsError
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    base = {"alg_name": "InstructEd", "model_name": "some/model", "archive": "run/best"}
    try:
        InstructEdHyperParams.from_dict({**base, **data})
    except HyperParamsError as exc:
        assert exc.field and "Fix:" in str(exc)


# ----------------------------------------------------------------------------------------------
# InstructEd templating
# ----------------------------------------------------------------------------------------------
class _BosTokenizer:
    """The tiny tokenizer, but adding a BOS token like LLaMA / Gemma tokenizers do."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token_id = tok.bos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + list(ids)}


@pytest.fixture(scope="module")
def tokenizers(models_cache_root):
    tok = load_tokenizer(models_cache_root)
    return {"plain": tok, "bos": _BosTokenizer(tok)}


@SETTINGS
@given(instruction=any_text | st.text(min_size=200, max_size=600), question=any_text, max_len=st.integers(1, 48),
       kind=st.sampled_from(["plain", "bos"]))
def test_instructed_template_any_text_truncates_with_a_warning(tokenizers, instruction, question, max_len, kind):
    tok = tokenizers[kind]
    template = InstructionTemplate(tok, DEFAULT_TEMPLATE, instruction_max_length=max_len)
    full_body = tok(instruction, add_special_tokens=False)["input_ids"]
    with captured_warnings("instructedit_plugin.instructed.templates") as warnings:
        encoded = template.encode_instruction(instruction)
        template.encode_instruction(instruction)  # warned once per instruction, not on every forward
    start, end = encoded.span
    body = encoded.ids[start:end]
    assert body == full_body[:max_len] and end - start <= max_len
    lead = [tok.bos_token_id] if kind == "bos" else []
    assert encoded.ids == lead + template.head_ids + body + template.tail_ids
    if len(full_body) > max_len:
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert f"instruction_max_length={max_len}" in message and f"{len(full_body)} tokens" in message
    else:
        assert not warnings
        text = tokenizers["plain"].decode(encoded.ids, skip_special_tokens=True)
        assert text == DEFAULT_TEMPLATE.format(instruction=instruction)  # "Instructions: {fact}\nInput: "
    # the question keeps its own ids; a BOS it starts with is dropped (the instructed sequence has one)
    q_ids = template.question_ids(question)
    stripped = template.strip_bos(q_ids)
    assert stripped == tok(question, add_special_tokens=False)["input_ids"]


@SETTINGS
@given(prompt=any_text, target=any_text, given_instruction=st.none() | any_text, as_list=st.booleans())
def test_instruction_of_any_request(prompt, target, given_instruction, as_list):
    request = {"prompt": [prompt] if as_list else prompt, "target_new": [target] if as_list else target}
    if given_instruction is not None:
        request["instruction"] = given_instruction
    if given_instruction is not None and given_instruction.strip():
        assert instruction_of(request) == given_instruction.strip()
        return
    if not prompt:
        with pytest.raises(RequestError, match="instruction"):
            instruction_of(request)
        return
    sentence = instruction_of(request)
    assert sentence.startswith(prompt.rstrip()) and target.strip() in sentence
    assert sentence.endswith((".", "!", "?"))


@SETTINGS
@given(st.dictionaries(st.sampled_from(["prompt", "rephrase_prompt", "locality", "portability", "x"]), junk, max_size=5))
def test_request_prompts_never_crash_on_junk(request):
    prompts = request_prompts(request)
    assert all(isinstance(p, str) and p for p in prompts) and len(prompts) == len(set(prompts))


# ----------------------------------------------------------------------------------------------
# InstructEdit templating
# ----------------------------------------------------------------------------------------------
RECORD = {"label": "positive", "topic": "the weather", "target_new": "I love it"}


@SETTINGS
@given(task=st.sampled_from(sorted(default_library().tasks)), text=any_text | st.text(min_size=300, max_size=2000),
       index=st.integers(0, 9))
def test_instructedit_template_any_input(task, text, index):
    family = default_library().get(task)
    index %= len(family.descriptions)
    out = format_instruction(task, text, description=index, record=RECORD)
    description = family.description(index, RECORD)
    assert out == family.template.format(task=family.task, description=description, input=text)
    assert out.startswith(f"Task: {family.task}\nDescription: ") and out.endswith(f"\nInput: {text}")
    assert "[" not in description  # every placeholder filled
    # a random generator only ever draws training descriptions (the held-out one stays unseen)
    drawn = format_instruction(task, text, description=random.Random(index), record=RECORD)
    assert drawn != family.render(text, family.held_out_description or "\0") or family.held_out_index is None


def test_instructedit_unknown_task_and_missing_placeholder_are_clear_errors():
    with pytest.raises(PluginError, match=r"unknown instruction task 'nope'.*Fix:"):
        format_instruction("nope", "x")
    with pytest.raises(RequestError, match=r"needs \[TOPIC\].*Fix: add one of them"):
        format_instruction("convsent", "x", description=0, record={"label": "positive"})


# ----------------------------------------------------------------------------------------------
# The retrieval gate and top-k search
# ----------------------------------------------------------------------------------------------
def _reference_spread(scores: list[float], top_k: int, pad: float | None, unbiased: bool = False) -> float:
    top = sorted(scores, reverse=True)[:top_k]
    if pad is not None:
        top += [pad] * (top_k - len(top))
    if not top or (unbiased and len(top) < 2):
        return 0.0
    return statistics.stdev(top) if unbiased else statistics.pstdev(top)


unit_scores = st.lists(st.floats(-1, 1, width=32), max_size=12)


@SETTINGS
@given(unit_scores, st.integers(1, 8), st.none() | st.floats(-1, 1), st.booleans(), st.randoms(use_true_random=False))
def test_gate_spread_is_the_std_of_the_top_k(scores, top_k, pad, unbiased, rnd):
    got = float(gate_spread(torch.tensor(scores, dtype=torch.float32), top_k, pad, unbiased))
    assert not math.isnan(got) and got >= 0.0
    assert got == pytest.approx(_reference_spread(scores, top_k, pad, unbiased), abs=1e-5)
    shuffled = list(scores)
    rnd.shuffle(shuffled)
    assert float(gate_spread(torch.tensor(shuffled, dtype=torch.float32), top_k, pad, unbiased)) == pytest.approx(got, abs=1e-6)


@st.composite
def memories(draw):
    """A memory of n (0..9) unit vectors in 6-d, with deliberate duplicates (ties), and a query."""
    n = draw(st.integers(0, 9))
    base = draw(st.lists(st.lists(st.integers(-3, 3), min_size=6, max_size=6).filter(any), min_size=max(n, 1), max_size=max(n, 1)))
    rows = [base[draw(st.integers(0, len(base) - 1))] if draw(st.booleans()) else base[i] for i in range(n)]
    query = draw(st.lists(st.integers(-3, 3), min_size=6, max_size=6).filter(any))
    return rows, query


@SETTINGS
@given(memories(), st.integers(1, 7), st.floats(0.0, 0.5), st.sets(st.integers(0, 9), max_size=3))
def test_select_and_search_match_a_brute_force_reference(mem, top_k, gate, exclude):
    rows, query = mem
    memory = InstructionMemory(None)
    q = torch.nn.functional.normalize(torch.tensor([query], dtype=torch.float32), dim=1)
    if rows:
        memory.add([f"fact {i}" for i in range(len(rows))], embeddings=torch.tensor(rows, dtype=torch.float32))
    else:
        memory.add(["seed"], embeddings=q)  # learn the dimension, then empty the memory
        memory.clear()
    exact = (memory.embeddings.float() @ q[0]).tolist() if rows else []
    # search: min(k, n) results, best first, the brute-force top-k scores
    if rows:
        scores, ids = memory.search(q, top_k)
        assert scores.shape == ids.shape == (1, min(top_k, len(rows)))
        assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
        assert scores[0].tolist() == pytest.approx(sorted(exact, reverse=True)[:top_k], abs=1e-5)
        for s, i in zip(scores[0].tolist(), ids[0].tolist()):
            assert s == pytest.approx(exact[i], abs=1e-5)
    # select: the gate opens iff the std of the top-k (padded with 0 for a small memory) exceeds it
    hit = memory.select(q, gate=gate, top_k=top_k, exclude=exclude)
    candidates = [s for i, s in enumerate(exact) if i not in exclude]
    if not candidates:
        assert hit is None
        return
    spread = _reference_spread(candidates, top_k, 0.0)
    assume(abs(spread - gate) > 1e-4)  # float32 vs float64 rounding right at the threshold
    if spread > gate:
        assert hit is not None and hit.id not in exclude
        assert hit.score == pytest.approx(max(candidates), abs=1e-5)  # with ties: one of the best
        assert exact[hit.id] == pytest.approx(max(candidates), abs=1e-5)
        assert hit.spread == pytest.approx(spread, abs=1e-5) and hit.text == f"fact {hit.id}"
    else:
        assert hit is None
    assert memory.select(q, gate=None, top_k=top_k, exclude=exclude) is not None  # no gate: always the top-1


def test_gate_with_fewer_than_five_entries_and_ties():
    e = torch.eye(4)
    memory = InstructionMemory(None)
    memory.add(["only fact"], embeddings=e[:1])
    # one stored fact: spread of [s, 0, 0, 0, 0] is 0.4 s, so it opens for s > 0.25
    assert memory.select(e[0], gate=0.1).text == "only fact"
    weak = torch.nn.functional.normalize(e[0] * 0.2 + e[1], dim=0)
    assert float(weak @ e[0]) < 0.25 and memory.select(weak, gate=0.1) is None
    assert memory.select(e[0], gate=0.1, pad_score=None) is None  # std of a single score is 0
    # exact ties among five identical facts: no spread, gate shut; without a gate, one of them
    tied = InstructionMemory(None)
    tied.add([f"same {i}" for i in range(5)], embeddings=e[0].repeat(5, 1))
    assert tied.select(e[0], gate=0.1) is None
    assert tied.select(e[0], gate=None).id in range(5)
    assert InstructionMemory(None).select(e[0]) is None  # empty memory: nothing to retrieve


# ----------------------------------------------------------------------------------------------
# Score / H
# ----------------------------------------------------------------------------------------------
rate = st.floats(0.0, 1.0) | st.just(float("nan")) | st.sampled_from([0.0, 1.0, True, False])
edit_metrics = st.fixed_dictionaries({}, optional={
    "rewrite_acc": st.lists(rate, max_size=3) | rate,
    "rephrase_acc": st.lists(rate, max_size=3),
    "locality": st.dictionaries(st.sampled_from(["nq_acc", "neighborhood_acc", "x_output"]), st.lists(rate, max_size=3), max_size=2),
    "portability": st.dictionaries(st.sampled_from(["one_hop_acc", "Reasoning_acc"]), st.lists(rate, max_size=3), max_size=2),
})


@SETTINGS
@given(st.lists(edit_metrics, max_size=6), st.randoms(use_true_random=False))
def test_summary_is_bounded_nan_free_and_order_invariant(posts, rnd):
    metrics = [{"case_id": i, "post": p} for i, p in enumerate(posts)]
    summary = summarize_metrics(metrics)
    for key in ("Rel", "Gen", "Loc", "Por", "Score", "H"):
        value = summary[key]
        assert value is None or (not math.isnan(value) and 0.0 <= value <= 100.0), (key, value)
    assert summary["H"] <= summary["Score"]
    shuffled = list(metrics)
    rnd.shuffle(shuffled)
    assert summarize_metrics(shuffled) == summary  # exactly equal, not approximately


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 100)


@SETTINGS
@given(st.lists(finite_or_not, max_size=8), st.randoms(use_true_random=False))
def test_score_and_h_never_nan_h_at_most_score_any_order(values, rnd):
    h, s = harmonic_mean(values), score(values)
    assert math.isfinite(h) and math.isfinite(s) and 0.0 <= h <= s
    finite = [max(0.0, v) for v in values if math.isfinite(v)]
    if finite:
        assert min(finite) * (1 - 1e-12) <= s <= max(finite) * (1 + 1e-12)
        assert h <= max(finite)
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert harmonic_mean(shuffled) == h and score(shuffled) == s
    if finite and all(0 <= v <= 100 for v in finite):
        assert 0.0 <= h <= s <= 100.0
