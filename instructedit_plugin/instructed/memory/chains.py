"""Multi-hop retrieval from an instruction memory: the facts an N-hop question gets, from the question alone.

Four procedures (``RETRIEVALS``), none of which reads the gold decomposition of the question:

* ``top_n`` (:func:`retrieve_top_n`, the InstructEd paper's, Sec. 4.2: "for an N-hop question, we
  retrieve N facts (the top N retrieved facts) as instructions"; the release does the same, without a
  gate): one search with the question, its N best facts. ``gate`` (optional, off by default) only
  decides whether the question gets any facts: the std gate on its top-k scores;
* ``subject_chain`` (:func:`retrieve_subject_chains`, this plugin's option): hop 1 is the question's
  best fact; hop ``i`` takes, among the facts whose ``subject`` metadata is the previous fact's
  ``target_new`` (the bridge entity), the one closest to the question (the best remaining fact when
  no stored fact has that subject). N facts, no gate;
* ``chain`` (:func:`retrieve_chains`, below): one gated fact per hop;
* ``iterative`` (:func:`retrieve_iterative`): N facts, no gate, hop ``i`` queried with the question
  followed by every fact retrieved so far (:func:`all_facts_chain_query`) -- the query a trained
  retriever (:mod:`..retriever_training`) is fine-tuned on.

``chain``: hop 1 queries the memory with the question; hop ``i`` queries with
``query_builder(question, facts_so_far)`` (default: the question followed by the
last fact retrieved, :func:`default_chain_query`), excluding facts already
chosen for that question. A question stops early when the gate stays shut
(nothing relevant is left) or after ``hops`` facts. ``InstructionMemory.retrieve_chain(s)``
call :func:`retrieve_chains`; :mod:`..multihop` evaluates MQuAKE with it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ...errors import RequestError
from .gate import DEFAULT_GATE, DEFAULT_TOP_K, StdGate
from .store import SelectedInstruction, check_texts

if TYPE_CHECKING:
    from .store import InstructionMemory

__all__ = ["RETRIEVALS", "all_facts_chain_query", "default_chain_query", "retrieve_chains", "retrieve_iterative",
           "retrieve_subject_chains", "retrieve_top_n"]

#: Multi-hop retrieval procedures (see the module docs).
RETRIEVALS = ("top_n", "subject_chain", "chain", "iterative")


def default_chain_query(question: str, facts: Sequence[str]) -> str:
    """Query for the next hop: the question followed by the most recently retrieved fact.

    The latest fact names the bridge entity of the next hop ("... performed by
    Madonna." -> "The director of Madonna is ..."); earlier facts are excluded
    from the candidates anyway and only pull the query back towards entities
    already used. On MQuAKE-hard (per-case memories, gate 0.1) this finds 94%
    of the edited facts against 88% for :func:`all_facts_chain_query`.
    """
    return f"{question} {facts[-1]}" if facts else question


def all_facts_chain_query(question: str, facts: Sequence[str]) -> str:
    """Alternative query for the next hop: the question followed by ALL facts retrieved so far."""
    return " ".join([question, *facts]) if facts else question


def retrieve_chains(memory: InstructionMemory, questions: Sequence[str], hops: int | Sequence[int],
                    gate: float | None = DEFAULT_GATE, top_k: int = DEFAULT_TOP_K, *,
                    query_builder: Callable[[str, Sequence[str]], str] = default_chain_query,
                    pad_score: float | None = 0.0, unbiased: bool = False) -> list[list[SelectedInstruction]]:
    """One fact per hop for each of ``questions`` (``hops``: an int, or one int per question).

    Each hop is one batched ``memory.select_many`` call (one encoder call) for all
    still-active questions; see the module docs.
    """
    questions = check_texts(questions, "questions")
    limits = _limits(questions, hops)
    chains: list[list[SelectedInstruction]] = [[] for _ in questions]
    active = [i for i, h in enumerate(limits) if h > 0]
    while active and len(memory):
        queries = [query_builder(questions[i], [s.text for s in chains[i]]) for i in active]
        found = memory.select_many(queries, gate, top_k, exclude=[[s.id for s in chains[i]] for i in active],
                                   pad_score=pad_score, unbiased=unbiased)
        still = []
        for i, hit in zip(active, found):
            if hit is None:
                continue
            chains[i].append(hit)
            if len(chains[i]) < limits[i]:
                still.append(i)
        active = still
    return chains


def retrieve_iterative(memory: InstructionMemory, questions: Sequence[str], hops: int | Sequence[int]
                       ) -> list[list[SelectedInstruction]]:
    """``hops`` facts per question, ungated: hop 1 the question's best fact, hop ``i`` the best fact not yet
    chosen for the question followed by every fact retrieved so far."""
    return retrieve_chains(memory, questions, hops, None, query_builder=all_facts_chain_query)


def _limits(questions: Sequence[str], hops: int | Sequence[int]) -> list[int]:
    limits = [hops] * len(questions) if isinstance(hops, int) else [int(h) for h in hops]
    if len(limits) != len(questions) or any(h < 0 for h in limits):
        raise RequestError("hops: expected a non-negative int or one per question")
    return limits


def _picked(memory: InstructionMemory, item_id: int, score: float) -> SelectedInstruction:
    text, meta = memory.get(item_id)
    return SelectedInstruction(id=item_id, text=text, score=float(score), spread=0.0, metadata=meta)


def retrieve_top_n(memory: InstructionMemory, questions: Sequence[str], hops: int | Sequence[int],
                   gate: float | None = None, top_k: int = DEFAULT_TOP_K) -> list[list[SelectedInstruction]]:
    """The paper's multi-hop retrieval: the ``hops`` best facts for each question, in score order (one search).

    ``gate`` (None: off, as in the paper and the release): a question whose std gate over its ``top_k``
    scores stays shut gets no facts at all; the gate never trims the N facts.
    """
    questions = check_texts(questions, "questions")
    limits = _limits(questions, hops)
    if not questions or not len(memory) or not max(limits, default=0):
        return [[] for _ in questions]
    scores, ids = memory.search(questions, max(max(limits), top_k))
    open_ = [True] * len(questions)
    if gate is not None:
        std_gate = StdGate(gate, top_k)
        open_ = [std_gate.opens(std_gate.spread(row[:top_k])) for row in scores]
    return [[_picked(memory, int(i), float(s)) for s, i in zip(scores[q, :n].tolist(), ids[q, :n].tolist())]
            if open_[q] else [] for q, n in enumerate(limits)]


def _entity(text: object) -> str:
    return " ".join(str(text).split()).casefold() if isinstance(text, str) else ""


def retrieve_subject_chains(memory: InstructionMemory, questions: Sequence[str], hops: int | Sequence[int]
                            ) -> list[list[SelectedInstruction]]:
    """Subject-chained multi-hop retrieval (an option beside the paper's :func:`retrieve_top_n`): hop 1 is the
    question's best fact; hop ``i`` the fact closest to the question among those whose ``subject`` metadata is
    the previous fact's ``target_new`` (else the best fact not yet chosen). ``hops`` facts per question."""
    questions = check_texts(questions, "questions")
    limits = _limits(questions, hops)
    if not questions or not len(memory) or not max(limits, default=0):
        return [[] for _ in questions]
    scores, ids = memory.search(questions, len(memory))  # every fact, ranked by cosine to the question
    by_subject: dict[str, set[int]] = {}
    targets: dict[int, str] = {}
    for item_id, meta in zip(memory.ids, memory.metadata):
        by_subject.setdefault(_entity(meta.get("subject")), set()).add(item_id)
        targets[item_id] = _entity(meta.get("target_new"))
    chains: list[list[SelectedInstruction]] = []
    for q, limit in enumerate(limits):
        ranked = list(zip(ids[q].tolist(), scores[q].tolist()))
        chain: list[SelectedInstruction] = []
        while len(chain) < min(limit, len(ranked)):
            used = {s.id for s in chain}
            bridge = by_subject.get(targets.get(chain[-1].id, ""), set()) if chain else set()
            pick = next(((i, s) for i, s in ranked if i in bridge and i not in used), None)
            if pick is None:
                pick = next((i, s) for i, s in ranked if i not in used)
            chain.append(_picked(memory, *pick))
        chains.append(chain)
    return chains
