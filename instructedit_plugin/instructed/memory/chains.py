"""Multi-hop retrieval from an instruction memory: one gated fact per hop, from the question alone.

Hop 1 queries the memory with the question; hop ``i`` queries with
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
from .gate import DEFAULT_GATE, DEFAULT_TOP_K
from .store import check_texts

if TYPE_CHECKING:
    from .store import InstructionMemory, SelectedInstruction

__all__ = ["all_facts_chain_query", "default_chain_query", "retrieve_chains"]


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
    limits = [hops] * len(questions) if isinstance(hops, int) else [int(h) for h in hops]
    if len(limits) != len(questions) or any(h < 0 for h in limits):
        raise RequestError("hops: expected a non-negative int or one per question")
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
