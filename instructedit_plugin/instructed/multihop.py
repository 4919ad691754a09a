"""MQuAKE multi-hop evaluation with an instruction memory, independent of the language model.

InstructEd answers a multi-hop question after editing by retrieving, hop by
hop, the edit instructions relevant to the question and giving them to the
model. This module does everything except the model, which the caller supplies
as ``answer_fn(question, instructions) -> answer``::

    result = evaluate_multihop(
        load_mquake(path), answer_fn=my_model_answer,
        memory_factory=lambda: InstructionMemory(SentenceEncoder()),
    )
    print(result.summary["por"], result.summary["hop_acc"])
    result.to_json("mquake_result.json")

Instructions
------------
Every requested rewrite becomes one natural sentence stating the new fact: the
filled prompt, the new target and a full stop (``"Hey Jude was performed by
Madonna."``), see :func:`edit_instruction`.

Retrieval (``retrieval``, see :mod:`.memory.chains`)
----------------------------------------------------
``"top_n"`` (the paper's): one search with the question, its N best facts (N = the case's hop
count) as one instruction, no gate. ``"subject_chain"``: N facts, each next one about the previous
fact's new object. ``"iterative"``: N facts, ungated, hop i queried with the question
followed by every fact so far (the query of a trained retriever). ``"chain"`` (:func:`retrieve_facts_for_question`, the default of
:func:`evaluate_multihop`): one fact per hop, from the question alone -- never from the gold single-hop
decomposition (``new_single_hops``), whose questions name the intermediate
entities and would leak the answer path:

1. hop 1 queries the memory with the question;
2. hop ``i`` queries with the question followed by the fact retrieved at hop
   ``i - 1`` (``query_builder``, default :func:`~.memory.default_chain_query`;
   that fact names the next bridge entity, e.g. "... performed by Madonna."
   leads to "The director of Madonna is ..."), excluding facts already chosen.
   Appending *all* facts so far (:func:`~.memory.all_facts_chain_query`) drags
   the query back to entities already used: on MQuAKE-hard with per-case
   memories it retrieves 88% of the edited facts instead of 94%;
3. each hop goes through InstructEd's gate (std of the top-5 scores > ``gate``,
   see :mod:`.memory`); when it stays shut, nothing relevant is left and the
   chain stops early;
4. at most ``hops`` facts. :func:`evaluate_multihop` uses the case's hop count
   (``len(new_single_hops)``, as the public InstructEd evaluation does) unless
   ``max_hops`` is given: only that length is read from the gold chain, never its content.

Scores
------
``por_paper`` (Por_Nhop as the paper defines it, Eq. 20)
    accuracy over all multi-hop questions of the cases (every paraphrase counts): the greedy answer
    gives ``new_answer`` or an alias (:func:`answer_matches`).
``por_release`` (Por_Nhop as the InstructEd release computes it, ``score_fn`` given)
    the first question of each case only, scored by ``score_fn(question, instructions, new_answer)``:
    the release's teacher-forced token accuracy (fraction of the answer's tokens that are the argmax
    given the tokens before), averaged over the cases -- a partial answer earns partial credit.
``por`` (broken down by hop count in ``por_by_hops``)
    a case is correct when ANY of its (usually three) paraphrased multi-hop
    questions is answered with ``new_answer`` or one of its aliases -- the MQuAKE
    convention; ``question_aggregation="all"`` or ``"first"`` are stricter.
``hop_acc`` (Hop-Acc, Eq. 21) and ``hop_acc_release``
    accuracy on the case's ``new_single_hops`` sub-questions (generated answer; release: token
    accuracy), over all sub-questions (micro average, like the public code) and as the mean of the
    per-case accuracies (``hop_acc_macro``). ``hop_instructions="question"`` answers every
    sub-question with the instruction retrieved for the case's first multi-hop question (the
    release); ``"own"`` with the (gated) top-1 instruction retrieved for the sub-question itself.

All scores are percentages.
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.durable import atomic_write_text
from ..errors import PluginError, RequestError
from .memory import (
    DEFAULT_GATE,
    DEFAULT_TOP_K,
    RETRIEVALS,
    InstructionMemory,
    SelectedInstruction,
    default_chain_query,
    retrieve_iterative,
    retrieve_subject_chains,
    retrieve_top_n,
)

__all__ = [
    "MATCH_MODES",
    "QUESTION_AGGREGATIONS",
    "CaseRecord",
    "MultiHopResult",
    "QuestionRecord",
    "answer_matches",
    "edit_case_into_memory",
    "edit_instruction",
    "evaluate_multihop",
    "normalize_answer",
    "retrieve_facts_for_question",
    "summarize",
]

MATCH_MODES = ("contains", "prefix", "exact")
HOP_INSTRUCTIONS = ("own", "question")
QUESTION_AGGREGATIONS = ("any", "all", "first")
_ARTICLES = frozenset({"a", "an", "the"})
_END_PUNCT = (".", "!", "?")

AnswerFn = Callable[[str, list[str]], str]
#: ``score_fn(question, instructions, answer) -> token accuracy in [0, 1]`` (the release's rule)
ScoreFn = Callable[[str, list[str], str], float]


# ---------------------------------------------------------------------------- answers
def normalize_answer(text: str) -> str:
    """Normalise an answer for matching: NFKC, casefold, punctuation and articles removed.

    Dashes and slashes separate words ("Saint-Denis" -> "saint denis"); other
    punctuation is dropped ("U.K." -> "uk"); the English articles a/an/the are
    removed as words; whitespace is collapsed. Symbols and letters of every
    script are kept. Never raises on a ``str``.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    chars = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Pd" or ch in "/\\":
            chars.append(" ")
        elif cat.startswith("P"):
            continue
        elif cat.startswith("Z") or ch.isspace() or cat == "Cc":
            chars.append(" ")
        else:
            chars.append(ch)
    return " ".join(tok for tok in "".join(chars).split() if tok not in _ARTICLES)


def answer_matches(pred: str, answers: str | Iterable[str], mode: str = "contains") -> bool:
    """Whether the prediction ``pred`` gives one of ``answers`` (an answer and its aliases).

    Both sides are normalised with :func:`normalize_answer`, then compared word-wise:

    ``"contains"`` (default)
        the answer's words occur contiguously in the prediction ("It is Arabic."
        matches "Arabic"; "UK" does not match "Ukraine");
    ``"prefix"``
        the prediction starts with the answer's words (stricter; robust to models
        that keep generating after the answer);
    ``"exact"``
        equal after normalisation.

    An empty prediction never matches; answers that normalise to nothing
    (e.g. just "the") are ignored.
    """
    if mode not in MATCH_MODES:
        raise RequestError(f"mode: expected one of {MATCH_MODES}, got {mode!r}")
    if not isinstance(pred, str):
        return False
    if isinstance(answers, str):
        answers = [answers]
    pred_norm = normalize_answer(pred)
    if not pred_norm:
        return False
    padded = f" {pred_norm} "
    for answer in answers:
        if not isinstance(answer, str):
            continue
        gold = normalize_answer(answer)
        if not gold:
            continue
        if mode == "exact" and pred_norm == gold:
            return True
        if mode == "prefix" and (pred_norm == gold or pred_norm.startswith(gold + " ")):
            return True
        if mode == "contains" and f" {gold} " in padded:
            return True
    return False


# ---------------------------------------------------------------------------- edits -> memory
def edit_instruction(edit: Mapping[str, Any]) -> str:
    """The instruction sentence for one requested rewrite: ``"<filled prompt> <target_new>."``.

    Accepts a request dict from :func:`~instructedit_plugin.data.load_mquake`
    (``prompt`` already filled, ``target_new`` a string) or a raw MQuAKE
    ``requested_rewrite`` entry (``prompt`` with ``{}``, ``subject``,
    ``target_new: {"str": ...}``).
    """
    try:
        prompt = edit["prompt"]
        target = edit["target_new"]
    except (KeyError, TypeError) as exc:
        raise RequestError(f"edit: needs 'prompt' and 'target_new', got {edit!r}") from exc
    if isinstance(target, Mapping):
        target = target.get("str")
    if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
        raise RequestError(f"edit: 'prompt' and 'target_new' must be non-empty strings, got {edit!r}")
    if "{}" in prompt and isinstance(edit.get("subject"), str):
        prompt = prompt.replace("{}", edit["subject"])
    sentence = f"{prompt.strip()} {target.strip()}"
    return sentence if sentence.endswith(_END_PUNCT) else sentence + "."


def _case_instructions(case: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for index, edit in enumerate(case.edits):
        meta = {"case_id": getattr(case, "case_id", None), "edit_index": index}
        for key in ("subject", "question", "relation_id"):
            if isinstance(edit.get(key), str):
                meta[key] = edit[key]
        target = edit.get("target_new")
        meta["target_new"] = target.get("str") if isinstance(target, Mapping) else target
        out.append((edit_instruction(edit), meta))
    return out


def edit_case_into_memory(memory: InstructionMemory, case: Any, *, skip_existing: bool = False) -> list[str]:
    """Add one instruction per requested rewrite of ``case`` to ``memory`` (one batched add).

    Returns the instruction texts of all the case's edits, in edit order (also
    those skipped with ``skip_existing=True`` because the memory already holds
    the identical sentence, e.g. an edit shared by several MQuAKE cases).
    Metadata: ``case_id``, ``edit_index``, ``subject``, ``question``, ``relation_id``, ``target_new``.
    """
    pairs = _case_instructions(case)
    existing = set(memory.texts) if skip_existing else set()
    new, seen = [], set()
    for text, meta in pairs:
        if skip_existing and (text in existing or text in seen):
            continue
        seen.add(text)
        new.append((text, meta))
    if new:
        memory.add([t for t, _ in new], [m for _, m in new])
    return [t for t, _ in pairs]


def retrieve_facts_for_question(memory: InstructionMemory, question: str, hops: int,
                                gate: float | None = DEFAULT_GATE, top_k: int = DEFAULT_TOP_K, *,
                                query_builder: Callable[[str, Sequence[str]], str] = default_chain_query,
                                pad_score: float | None = 0.0) -> list[SelectedInstruction]:
    """Retrieve up to ``hops`` facts (one per hop) for a multi-hop ``question``.

    The procedure is described in the module docs; it only sees the question and
    the memory. Returns the selected instructions in hop order (``.text`` is the fact).
    """
    return memory.retrieve_chain(question, hops, gate, top_k, query_builder=query_builder, pad_score=pad_score)


# ---------------------------------------------------------------------------- evaluation
@dataclass
class QuestionRecord:
    """One question put to ``answer_fn``: what was retrieved, what came back, whether it was right."""

    question: str
    instructions: list[str]
    scores: list[float]
    prediction: str
    gold: list[str]
    correct: bool
    #: fraction of the case's own edit instructions among those retrieved (diagnostic only)
    retrieval_precision: float | None = None
    #: fraction of the case's own edit instructions that were retrieved (diagnostic only)
    retrieval_recall: float | None = None
    #: the release's teacher-forced token accuracy of the first gold answer (``score_fn``), if scored
    token_acc: float | None = None


@dataclass
class CaseRecord:
    """Per-case result: multi-hop questions, single-hop sub-questions and the case's scores."""

    case_id: Any
    hops: int
    edits: list[str]
    questions: list[QuestionRecord]
    single_hops: list[QuestionRecord]
    correct: bool
    hop_acc: float | None
    #: fraction of the case's multi-hop questions answered right (the paper's Por_Nhop averages these questions)
    question_acc: float | None = None
    #: the release's score of the case: token accuracy on its first multi-hop question
    release_acc: float | None = None


@dataclass
class MultiHopResult:
    """Per-case records plus a summary (percentages); JSON-serialisable."""

    records: list[CaseRecord]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what :meth:`to_json` writes)."""
        return {"summary": self.summary, "config": self.config, "records": [asdict(r) for r in self.records]}

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int | None = 2) -> str:
        """The result as JSON; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False, default=str)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiHopResult:
        """Inverse of :meth:`to_dict`."""
        records = []
        for raw in data.get("records", []):
            raw = dict(raw)
            raw["questions"] = [QuestionRecord(**q) for q in raw["questions"]]
            raw["single_hops"] = [QuestionRecord(**q) for q in raw["single_hops"]]
            records.append(CaseRecord(**raw))
        return cls(records=records, summary=dict(data.get("summary", {})), config=dict(data.get("config", {})))


def _pct(values: Sequence[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 4) if values else None


def _diagnostics(texts: list[str], case_edits: set[str]) -> tuple[float | None, float | None]:
    if not case_edits:
        return None, None
    hits = sum(1 for t in texts if t in case_edits)
    precision = hits / len(texts) if texts else None
    return precision, len(set(texts) & case_edits) / len(case_edits)


def _answer(answer_fn: AnswerFn, question: str, facts: list[SelectedInstruction], gold: list[str],
            match_mode: str, case_edits: set[str], score_fn: ScoreFn | None = None,
            cache: dict[tuple, Any] | None = None) -> QuestionRecord:
    texts = [f.text for f in facts]
    key = (question, tuple(texts))
    if cache is not None and ("answer", *key) in cache:
        prediction = cache[("answer", *key)]
    else:
        prediction = answer_fn(question, list(texts))
        if cache is not None:
            cache[("answer", *key)] = prediction
    if not isinstance(prediction, str):
        raise PluginError(f"answer_fn must return a str, got {type(prediction).__name__} for {question!r}")
    token_acc = None
    if score_fn is not None:
        if cache is not None and ("score", *key, gold[0]) in cache:
            token_acc = cache[("score", *key, gold[0])]
        else:
            token_acc = round(float(score_fn(question, list(texts), gold[0])), 6)
            if cache is not None:
                cache[("score", *key, gold[0])] = token_acc
    precision, recall = _diagnostics(texts, case_edits)
    return QuestionRecord(question=question, instructions=texts, scores=[round(f.score, 6) for f in facts],
                          prediction=prediction, gold=gold, correct=answer_matches(prediction, gold, match_mode),
                          retrieval_precision=precision, retrieval_recall=recall, token_acc=token_acc)


def _question_facts(memory: InstructionMemory, questions: list[str], hops: int, retrieval: str,
                    gate: float | None, top_k: int, multihop_gate: float | None,
                    query_builder: Callable[[str, Sequence[str]], str], pad_score: float | None
                    ) -> list[list[SelectedInstruction]]:
    if retrieval == "top_n":
        return retrieve_top_n(memory, questions, hops, multihop_gate, top_k)
    if retrieval == "subject_chain":
        return retrieve_subject_chains(memory, questions, hops)
    if retrieval == "iterative":
        return retrieve_iterative(memory, questions, hops)
    return memory.retrieve_chains(questions, hops, gate, top_k, query_builder=query_builder, pad_score=pad_score)


def evaluate_multihop(
    cases: Sequence[Any],
    answer_fn: AnswerFn,
    memory_factory: Callable[[], InstructionMemory],
    *,
    shared_memory: bool = False,
    gate: float | None = DEFAULT_GATE,
    top_k: int = DEFAULT_TOP_K,
    max_hops: int | None = None,
    question_aggregation: str = "any",
    match_mode: str = "contains",
    query_builder: Callable[[str, Sequence[str]], str] = default_chain_query,
    pad_score: float | None = 0.0,
    single_hops: bool = True,
    progress: bool = False,
    retrieval: str = "chain",
    multihop_gate: float | None = None,
    hop_instructions: str = "own",
    score_fn: ScoreFn | None = None,
    answer_cache: dict[tuple, Any] | None = None,
) -> MultiHopResult:
    """Evaluate multi-hop editing (Por_Nhop, Hop-Acc) on MQuAKE cases.

    Args:
        cases: :class:`~instructedit_plugin.data.mquake.MQuAKECase` objects (or
            anything with ``case_id``, ``edits``, ``questions``, ``new_answer``,
            ``new_answer_alias``, ``new_single_hops``).
        answer_fn: ``answer_fn(question, instructions) -> answer`` -- the edited
            model (InstructEd) or any baseline; ``instructions`` are the retrieved facts.
        memory_factory: returns an empty :class:`InstructionMemory`.
        shared_memory: False (default): a fresh memory per case holding only
            that case's edits; True: one memory with every case's edits (identical
            sentences stored once, all added in one batched call) -- harder, as
            other cases' facts compete at retrieval.
        gate, top_k, pad_score: the selection gate (see :mod:`.memory`) of ``retrieval="chain"`` and of
            the sub-questions' own retrieval (``hop_instructions="own"``).
        retrieval: ``"chain"`` (one gated fact per hop), ``"top_n"`` (the paper's: the N best facts for
            the question, N = hops), ``"subject_chain"`` or ``"iterative"``; see :mod:`.memory.chains`.
        multihop_gate: ``top_n`` only: None (paper, release) gives every question its N facts; a
            threshold gives none to a question whose std gate over its top-k scores stays shut.
        hop_instructions: ``"own"`` or ``"question"`` (Hop-Acc with the instruction retrieved for the
            case's first multi-hop question, as the release does).
        score_fn: ``score_fn(question, instructions, answer) -> [0, 1]``, the release's teacher-forced
            token accuracy; scores the first multi-hop question and the sub-questions (``por_release``).
        answer_cache: a dict shared between calls with the same ``answer_fn``/``score_fn``: an identical
            (question, instructions) pair is answered once.
        max_hops: cap on facts per multi-hop question; None uses the case's hop count.
        question_aggregation: "any" (MQuAKE convention), "all" or "first".
        match_mode: see :func:`answer_matches`.
        query_builder: query for hop i from (question, facts so far).
        single_hops: also score Hop-Acc on ``new_single_hops``.
        progress: show a tqdm progress bar.
    """
    if question_aggregation not in QUESTION_AGGREGATIONS:
        raise RequestError(f"question_aggregation: expected one of {QUESTION_AGGREGATIONS}, got {question_aggregation!r}")
    if match_mode not in MATCH_MODES:
        raise RequestError(f"match_mode: expected one of {MATCH_MODES}, got {match_mode!r}")
    if max_hops is not None and (isinstance(max_hops, bool) or not isinstance(max_hops, int) or max_hops < 1):
        raise RequestError(f"max_hops: expected None or a positive int, got {max_hops!r}")
    if retrieval not in RETRIEVALS:
        raise RequestError(f"retrieval: expected one of {RETRIEVALS}, got {retrieval!r}")
    if hop_instructions not in HOP_INSTRUCTIONS:
        raise RequestError(f"hop_instructions: expected one of {HOP_INSTRUCTIONS}, got {hop_instructions!r}")
    cases = list(cases)
    shared = None
    if shared_memory:
        shared = memory_factory()
        pairs: dict[str, dict[str, Any]] = {}
        for case in cases:
            for text, meta in _case_instructions(case):
                pairs.setdefault(text, meta)
        if pairs:
            shared.add(list(pairs), list(pairs.values()))

    iterator: Iterable[Any] = cases
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="MQuAKE", unit="case")
    records = []
    for case in iterator:
        if shared is None:
            memory = memory_factory()
            edit_texts = edit_case_into_memory(memory, case)
        else:
            memory = shared
            edit_texts = [text for text, _ in _case_instructions(case)]
        case_edits = set(edit_texts)
        n_hops = len(case.new_single_hops) or len(case.edits)
        limit = max_hops if max_hops is not None else n_hops
        gold = [case.new_answer, *case.new_answer_alias]
        chains = _question_facts(memory, list(case.questions), limit, retrieval, gate, top_k, multihop_gate,
                                 query_builder, pad_score)
        questions = [_answer(answer_fn, q, chain, gold, match_mode, case_edits,
                             score_fn if i == 0 else None, answer_cache)
                     for i, (q, chain) in enumerate(zip(case.questions, chains))]
        flags = [q.correct for q in questions]
        if question_aggregation == "any":
            correct = any(flags)
        elif question_aggregation == "all":
            correct = bool(flags) and all(flags)
        else:
            correct = bool(flags) and flags[0]
        hop_records: list[QuestionRecord] = []
        if single_hops and case.new_single_hops:
            if hop_instructions == "question":
                picks = [chains[0] if chains else []] * len(case.new_single_hops)
            else:
                picks = [[p] if p else [] for p in memory.select_many([h.question for h in case.new_single_hops], gate,
                                                                      top_k, pad_score=pad_score)]
            for hop, facts in zip(case.new_single_hops, picks):
                hop_records.append(_answer(answer_fn, hop.question, facts, [hop.answer, *hop.answer_alias],
                                           match_mode, case_edits, score_fn, answer_cache))
        hop_acc = sum(r.correct for r in hop_records) / len(hop_records) if hop_records else None
        records.append(CaseRecord(case_id=case.case_id, hops=n_hops, edits=edit_texts, questions=questions,
                                  single_hops=hop_records, correct=correct, hop_acc=hop_acc,
                                  question_acc=sum(flags) / len(flags) if flags else None,
                                  release_acc=questions[0].token_acc if questions else None))
    config = {"shared_memory": shared_memory, "gate": gate, "top_k": top_k, "max_hops": max_hops,
              "question_aggregation": question_aggregation, "match_mode": match_mode, "pad_score": pad_score,
              "query_builder": getattr(query_builder, "__name__", repr(query_builder)), "retrieval": retrieval,
              "multihop_gate": multihop_gate, "hop_instructions": hop_instructions}
    return MultiHopResult(records=records, summary=summarize(records), config=config)


def summarize(records: Sequence[CaseRecord]) -> dict[str, Any]:
    """Summary percentages of a list of :class:`CaseRecord`."""
    by_hops: dict[int, list[bool]] = {}
    paper_by_hops: dict[int, list[bool]] = {}
    for record in records:
        by_hops.setdefault(record.hops, []).append(record.correct)
        paper_by_hops.setdefault(record.hops, []).extend(q.correct for q in record.questions)
    all_hops = [h.correct for r in records for h in r.single_hops]
    macro = [r.hop_acc for r in records if r.hop_acc is not None]
    questions = [q for r in records for q in r.questions]
    precision = [q.retrieval_precision for q in questions if q.retrieval_precision is not None]
    recall = [q.retrieval_recall for q in questions if q.retrieval_recall is not None]
    release = [r.release_acc for r in records if r.release_acc is not None]
    hop_release = [h.token_acc for r in records for h in r.single_hops if h.token_acc is not None]
    return {
        "cases": len(records),
        "por_paper": _pct([q.correct for q in questions]),
        "por_release": _pct(release),
        "hop_acc_release": _pct(hop_release),
        "questions": len(questions),
        "questions_correct": sum(q.correct for q in questions),
        "cases_correct": sum(r.correct for r in records),
        "single_hops_correct": sum(all_hops),
        "por_paper_by_hops": {str(h): _pct(v) for h, v in sorted(paper_by_hops.items())},
        "por": _pct([r.correct for r in records]),
        "por_by_hops": {str(h): _pct(v) for h, v in sorted(by_hops.items())},
        "cases_by_hops": {str(h): len(v) for h, v in sorted(by_hops.items())},
        "question_acc": _pct([q.correct for q in questions]),
        "hop_acc": _pct(all_hops),
        "hop_acc_macro": _pct(macro),
        "single_hop_questions": len(all_hops),
        "mean_facts_per_question": round(sum(len(q.instructions) for q in questions) / len(questions), 4)
        if questions else None,
        "retrieval_precision": _pct(precision),
        "retrieval_recall": _pct(recall),
    }
