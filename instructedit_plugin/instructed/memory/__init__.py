"""InstructEd's instruction memory: stored edit instructions, search, the retrieval gate and persistence.

One module per job:

* :mod:`.store` -- :class:`InstructionMemory` (texts, ids, metadata, embeddings; add/remove/search/select);
* :mod:`.gate` -- the std-of-top-k retrieval gate (:class:`StdGate`, :func:`gate_spread`, score/std/pad options);
* :mod:`.calibration` -- fitting the gate's threshold on held-out questions (``instructedit calibrate-gate``);
* :mod:`.index` -- exact torch / exact FAISS / approximate FAISS (IVF-SQ8) search, :func:`recall_at_1`;
* :mod:`.persistence` -- the saved folder (one manifest, ``durable.commit_folder``);
* :mod:`.chains` -- multi-hop retrieval (the paper's top-N facts, subject-chained, iterative, or one gated fact per hop).
"""
from __future__ import annotations

from .chains import (
    RETRIEVALS,
    all_facts_chain_query,
    default_chain_query,
    retrieve_chains,
    retrieve_iterative,
    retrieve_subject_chains,
    retrieve_top_n,
)
from .gate import DEFAULT_GATE, DEFAULT_TOP_K, StdGate, gate_spread
from .index import DEFAULT_FAISS_THRESHOLD, INDEX_KINDS, recall_at_1
from .persistence import MEMORY_FORMAT, MEMORY_FORMAT_VERSION, EncoderMismatchError, MemoryFormatError
from .store import EncodedQueries, InstructionMemory, SelectedInstruction, TextEncoder

__all__ = [
    "DEFAULT_FAISS_THRESHOLD",
    "DEFAULT_GATE",
    "DEFAULT_TOP_K",
    "EncodedQueries",
    "INDEX_KINDS",
    "RETRIEVALS",
    "MEMORY_FORMAT",
    "MEMORY_FORMAT_VERSION",
    "EncoderMismatchError",
    "InstructionMemory",
    "MemoryFormatError",
    "SelectedInstruction",
    "StdGate",
    "TextEncoder",
    "all_facts_chain_query",
    "default_chain_query",
    "gate_spread",
    "recall_at_1",
    "retrieve_chains",
    "retrieve_iterative",
    "retrieve_subject_chains",
    "retrieve_top_n",
]
