"""The instruction memory itself: texts, ids, metadata and unit embeddings (plus their raw norms), with search and selection.

InstructEd (Han et al. 2024) edits by *instruction*: every requested edit is
stored as a natural sentence ("The spouse of A is B."), and at inference time
the instruction closest to the input (cosine similarity of sentence embeddings)
is put in front of the input -- but only when the retrieval gate opens
(:mod:`.gate`); otherwise the model answers unedited::

    memory = InstructionMemory(SentenceEncoder())
    ids = memory.add(["The spouse of A is B.", "B is a citizen of C."])    # one encoder call
    scores, found = memory.search(["Who is A married to?"], k=5)          # batched
    hit = memory.select("Who is A married to?")                            # SelectedInstruction | None
    memory.save("mem/"); memory = InstructionMemory.load("mem/")           # verified, crash-safe

Search goes through an index (:mod:`.index`): ``index="auto"`` (default, exact:
a torch product for small memories, FAISS ``IndexFlatIP`` from
``faiss_threshold`` items on), ``"dense"``, ``"flat"`` or ``"ivf"``
(approximate, for large memories). Persistence is :mod:`.persistence`.

:meth:`add` returns stable integer ids (never reused by the same memory, kept
by save/load); search and selection report ids. Without removals, ids equal row
positions ``0..len-1``.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ...errors import PluginError, RequestError
from . import persistence
from .gate import DEFAULT_GATE, DEFAULT_TOP_K, StdGate
from .index import DEFAULT_FAISS_THRESHOLD, check_kind, faiss_module, make_index

__all__ = ["EncodedQueries", "InstructionMemory", "SelectedInstruction", "TextEncoder"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Constructor options that no longer exist, with what to do instead.
_REMOVED_OPTIONS = {
    "prefilter": "the int8 prefilter was removed. Fix: drop the argument (index='ivf' is the fast approximate "
                 "search for large memories)",
    "use_faiss": "the index is now chosen by name. Fix: pass index='flat' instead of use_faiss=True "
                 "(or leave index='auto')",
}


@dataclass(frozen=True, eq=False)
class EncodedQueries:
    """Query texts embedded once by a memory's encoder (:meth:`InstructionMemory.encode_queries`).

    Pass it to :meth:`~InstructionMemory.search` / :meth:`~InstructionMemory.select` /
    :meth:`~InstructionMemory.select_many` instead of the texts (the search is the same, bit for bit, as
    with the texts), and reuse :attr:`vectors` elsewhere -- InstructEd's ``sim`` takes the question's
    embedding from the search instead of encoding the question a second time.
    """

    vectors: torch.Tensor  # [q, dim]: the encoder's ``encode`` rows for the texts (unit rows for SentenceEncoder)
    norms: torch.Tensor | None  # [q]: norms before the encoder's own normalisation, when it reports them
    encoder: Any  # the encoder that made them

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def row(self, i: int) -> EncodedQueries:
        """The ``i``-th query alone."""
        return EncodedQueries(self.vectors[i : i + 1], None if self.norms is None else self.norms[i : i + 1],
                              self.encoder)


@runtime_checkable
class TextEncoder(Protocol):
    """What the memory needs from an encoder (:class:`~..encoder.SentenceEncoder` is one)."""

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...

    @property
    def dim(self) -> int: ...

    @property
    def identity(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SelectedInstruction:
    """The instruction chosen for a query.

    ``score`` is its cosine similarity to the query, ``spread`` the gate
    statistic (std of the top-k scores) that let it through and ``top_scores``
    those top-k scores (before padding).
    """

    id: int
    text: str
    score: float
    spread: float
    metadata: dict[str, Any] = field(default_factory=dict)
    top_scores: tuple[float, ...] = ()


def check_texts(instructions: Any, what: str = "instructions") -> list[str]:
    """``instructions`` as a list of non-empty strings, else a :class:`RequestError` naming ``what``."""
    if isinstance(instructions, str):
        raise RequestError(f"{what}: expected a list of strings, got a single string; wrap it in a list")
    try:
        texts = list(instructions)
    except TypeError as exc:
        raise RequestError(f"{what}: expected a list of strings, got {type(instructions).__name__}") from exc
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"{what}[{i}]: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise RequestError(f"{what}[{i}]: is empty; an instruction must state a fact")
    return texts


def _check_metadata(metadata: Any, count: int) -> list[dict[str, Any]]:
    if metadata is None:
        return [{} for _ in range(count)]
    metadata = list(metadata)
    if len(metadata) != count:
        raise RequestError(f"metadata: {len(metadata)} entries for {count} instructions; pass one dict per instruction")
    out = []
    for i, meta in enumerate(metadata):
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise RequestError(f"metadata[{i}]: expected a dict, got {type(meta).__name__}")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"metadata[{i}]: not JSON-serialisable ({exc}); it is saved as JSON") from exc
        out.append(copy.deepcopy(dict(meta)))
    return out


class InstructionMemory:
    """A growable store of instruction sentences and their unit-norm sentence embeddings.

    Args:
        encoder: anything with ``encode(texts) -> [n, d]``, ``dim`` and ``identity``
            (normally a :class:`~..encoder.SentenceEncoder`). May be None only for a
            memory that is fed pre-computed embeddings and tensor queries.
        dtype: storage dtype, ``torch.float32`` (default) or ``torch.float16``
            (half the RAM; scores are still computed in float32).
        index: ``"auto"`` (default), ``"dense"``, ``"flat"`` or ``"ivf"`` (see :mod:`.index`).
        faiss_threshold: item count from which ``"auto"`` uses FAISS ``IndexFlatIP``.
        ivf_nlist, ivf_nprobe: cells and cells searched per query of the ``"ivf"``
            index (None: chosen from the memory size).
    """

    def __init__(self, encoder: TextEncoder | None, *, dtype: torch.dtype | str = torch.float32,
                 index: str = "auto", faiss_threshold: int = DEFAULT_FAISS_THRESHOLD,
                 ivf_nlist: int | None = None, ivf_nprobe: int | None = None, **removed: Any):
        for name in removed:
            if name in _REMOVED_OPTIONS:
                raise RequestError(f"{name}: {_REMOVED_OPTIONS[name]}")
            raise TypeError(f"InstructionMemory() got an unexpected keyword argument {name!r}")
        self.encoder = encoder
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise PluginError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in (torch.float32, torch.float16):
            raise PluginError(f"dtype: expected torch.float32 or torch.float16, got {dtype}")
        for name, value in (("faiss_threshold", faiss_threshold), ("ivf_nlist", ivf_nlist), ("ivf_nprobe", ivf_nprobe)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError(f"{name}: expected a positive int, got {value!r}")
        self.dtype = dtype
        self.index_kind = check_kind(index)
        self.faiss_threshold = int(faiss_threshold)
        self.ivf_params = {"nlist": ivf_nlist, "nprobe": ivf_nprobe}
        if index in ("flat", "ivf"):
            faiss_module(f"InstructionMemory(index={index!r})")
        self._dim: int | None = int(encoder.dim) if encoder is not None else None
        self._emb = torch.zeros(0, self._dim or 0, dtype=dtype)
        # Norms of the unnormalised embeddings (float32, one per row; for the gate's ``score="dot"``).
        # None after loading a folder saved before they were kept.
        self._norms: torch.Tensor | None = torch.zeros(0)
        self._count = 0
        self._texts: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._ids: list[int] = []
        self._row: dict[int, int] = {}
        self._ids_tensor: torch.Tensor | None = None
        self._next_id = 0
        self._index: Any = None  # built on the first search
        #: JSON-serialisable notes saved in the manifest (e.g. the editing hparams); see :meth:`save`.
        self.info: dict[str, Any] = {}
        #: The gate calibrated for this memory (``threshold`` plus ``score``/``std``/``pad``/``top_k`` and the
        #: calibration's figures), saved in the manifest as ``gate``; None until ``calibrate-gate`` sets it.
        self.gate_calibration: dict[str, Any] | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"InstructionMemory(count={self._count}, dim={self._dim}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"index={self.index_kind!r})")

    @property
    def dim(self) -> int | None:
        """Embedding dimension (None until known)."""
        return self._dim

    @property
    def texts(self) -> list[str]:
        """The stored instructions, in row order (a copy)."""
        return list(self._texts)

    @property
    def ids(self) -> list[int]:
        """The ids of the stored instructions, in row order (a copy)."""
        return list(self._ids)

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """The metadata dicts, in row order (deep copies)."""
        return copy.deepcopy(self._meta)

    @property
    def next_id(self) -> int:
        """The id the next added instruction gets."""
        return self._next_id

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated for the embedding matrix (rows grow geometrically: at most
        ``max(256, 1.5 * len)`` rows of ``dim`` values in the storage dtype)."""
        return self._emb.numel() * self._emb.element_size()

    @property
    def index_bytes(self) -> int:
        """Bytes the search index holds besides the embedding matrix (0 for the torch product)."""
        return 0 if self._index is None else int(self._index.nbytes)

    @property
    def active_index(self) -> str:
        """The concrete index searches use now (``dense``, ``flat`` or ``ivf``)."""
        return self._search_index().kind

    @property
    def norms(self) -> torch.Tensor | None:
        """``[len]`` float32 norms of the unnormalised embeddings (None: not known, see :meth:`load`)."""
        return None if self._norms is None else self._norms[: self._count]

    @property
    def embeddings(self) -> torch.Tensor:
        """``[len, dim]`` stored embeddings in the storage dtype (a read-only view: do not modify)."""
        return self._emb[: self._count]

    def get(self, item_id: int) -> tuple[str, dict[str, Any]]:
        """``(text, metadata)`` of the instruction with id ``item_id``."""
        row = self._row.get(int(item_id))
        if row is None:
            raise KeyError(f"no instruction with id {item_id} in this memory")
        return self._texts[row], copy.deepcopy(self._meta[row])

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int) and item_id in self._row

    # ------------------------------------------------------------------ adding / removing
    def add(self, instructions: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None, *,
            embeddings: torch.Tensor | None = None) -> list[int]:
        """Store ``instructions`` (with optional JSON-serialisable ``metadata`` dicts); return their ids.

        All texts are embedded by ONE ``encoder.encode`` call (which batches the
        forward passes). ``embeddings`` ``[n, dim]`` skips the encoder (rows are
        L2-normalised); use it for vectors produced by the same encoder.
        """
        texts = check_texts(instructions)
        metas = _check_metadata(metadata, len(texts))
        if not texts:
            return []
        if embeddings is None:
            if self.encoder is None:
                raise PluginError("add(): this memory has no encoder; pass embeddings=... or give an encoder")
            embeddings, raw_norms = self._encode(texts)
        else:
            raw_norms = None
        vectors = self._as_vectors(embeddings, "embeddings")
        if raw_norms is None:
            raw_norms = embeddings.detach().to("cpu", torch.float32).reshape(vectors.shape).norm(dim=1)
        if vectors.shape[0] != len(texts):
            raise RequestError(f"embeddings: {vectors.shape[0]} rows for {len(texts)} instructions")
        if vectors.shape[0] == 0:
            return []
        stored = vectors.to(self.dtype)
        need = self._count + stored.shape[0]
        if need > self._emb.shape[0]:
            cap = max(need, int(self._emb.shape[0] * 1.5), 256)
            grown = torch.empty(cap, self._dim, dtype=self.dtype)
            grown[: self._count] = self._emb[: self._count]
            self._emb = grown
        self._emb[self._count:need] = stored
        if self._norms is not None:
            self._norms = torch.cat([self._norms[: self._count], raw_norms.reshape(-1).to(torch.float32)])
        new_ids = list(range(self._next_id, self._next_id + len(texts)))
        for offset, item_id in enumerate(new_ids):
            self._row[item_id] = self._count + offset
        self._next_id += len(texts)
        self._ids.extend(new_ids)
        self._texts.extend(texts)
        self._meta.extend(metas)
        self._count = need
        self._ids_tensor = None
        if self._index is not None:
            self._index.add(stored)
        return new_ids

    def remove(self, ids: Iterable[int]) -> int:
        """Remove the instructions with these ids; returns how many were removed.

        Raises:
            KeyError: an id is not in the memory (nothing is removed then).
        """
        drop = {int(i) for i in ids}
        missing = sorted(i for i in drop if i not in self._row)
        if missing:
            raise KeyError(f"no instruction with id(s) {missing[:10]} in this memory")
        if not drop:
            return 0
        keep_rows = [r for r, item_id in enumerate(self._ids) if item_id not in drop]
        index = torch.tensor(keep_rows, dtype=torch.long)
        self._emb = self._emb[: self._count].index_select(0, index).contiguous()
        if self._norms is not None:
            self._norms = self._norms[: self._count].index_select(0, index).contiguous()
        self._texts = [self._texts[r] for r in keep_rows]
        self._meta = [self._meta[r] for r in keep_rows]
        self._ids = [self._ids[r] for r in keep_rows]
        self._row = {item_id: r for r, item_id in enumerate(self._ids)}
        self._count = len(keep_rows)
        self._reset_index()
        return len(drop)

    def clear(self) -> None:
        """Remove every instruction (ids are still never reused by this object)."""
        self._emb = torch.zeros(0, self._dim or 0, dtype=self.dtype)
        self._norms = torch.zeros(0)
        self._texts, self._meta, self._ids, self._row = [], [], [], {}
        self._count = 0
        self._reset_index()

    def _reset_index(self) -> None:
        self._ids_tensor = None
        if self._index is not None:
            self._index.reset(self.embeddings)

    def _as_vectors(self, vectors: Any, what: str) -> torch.Tensor:
        if not isinstance(vectors, torch.Tensor):
            raise RequestError(f"{what}: expected a torch.Tensor, got {type(vectors).__name__}")
        vectors = vectors.detach().to("cpu", torch.float32)
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
        if vectors.dim() != 2:
            raise RequestError(f"{what}: expected shape [n, dim], got {tuple(vectors.shape)}")
        if self._dim is None:  # a memory without encoder learns its dimension from the first vectors
            self._dim = int(vectors.shape[1])
            self._emb = torch.zeros(0, self._dim, dtype=self.dtype)
        if vectors.shape[1] != self._dim:
            raise RequestError(f"{what}: dimension {vectors.shape[1]}, but this memory stores {self._dim}-d vectors")
        if not torch.isfinite(vectors).all():
            raise RequestError(f"{what}: contains NaN or infinite values")
        return torch.nn.functional.normalize(vectors, p=2.0, dim=1)

    # ------------------------------------------------------------------ search
    def _search_index(self) -> Any:
        kind = self.index_kind
        if kind == "auto":
            kind = "flat" if self._count >= self.faiss_threshold else "dense"
        if self._index is None or self._index.kind != kind:
            self._index = make_index(kind, self._dim or 0, **(self.ivf_params if kind == "ivf" else {}))
            self._index.reset(self.embeddings)
        return self._index

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's vectors for ``texts`` and, when it can tell, the norms before its own normalisation
        (an encoder whose model normalises its output has norms 1: its plain ``encode`` is used)."""
        with_norms = getattr(self.encoder, "encode_with_norms", None)
        if callable(with_norms) and not getattr(self.encoder, "normalizes_output", False):
            return with_norms(texts)
        return self.encoder.encode(texts), None

    def _queries(self, queries: Sequence[str] | str | torch.Tensor | EncodedQueries) -> torch.Tensor:
        return self._queries_with_norms(queries)[0]

    def encode_queries(self, queries: Sequence[str] | str) -> EncodedQueries:
        """``queries`` embedded by this memory's encoder in one call, for :meth:`search` / :meth:`select` and
        for reuse (see :class:`EncodedQueries`)."""
        if isinstance(queries, str):
            queries = [queries]
        texts = check_texts(queries, "queries")
        if self.encoder is None:
            raise PluginError("search(): this memory has no encoder; pass query embeddings as a tensor")
        if not texts:
            return EncodedQueries(torch.zeros(0, self._dim or 0), torch.zeros(0), self.encoder)
        vectors, norms = self._encode(texts)
        return EncodedQueries(vectors, norms, self.encoder)

    def _queries_with_norms(self, queries: Sequence[str] | str | torch.Tensor | EncodedQueries
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit query vectors ``[q, dim]`` and the norms ``[q]`` of the unnormalised ones."""
        if isinstance(queries, torch.Tensor):
            raw, norms = queries, None
        else:
            encoded = queries if isinstance(queries, EncodedQueries) else self.encode_queries(queries)
            if len(encoded) == 0:
                return torch.zeros(0, self._dim or 0), torch.zeros(0)
            raw, norms = encoded.vectors, encoded.norms
        unit = self._as_vectors(raw, "queries")
        if norms is None:
            norms = raw.detach().to("cpu", torch.float32).reshape(unit.shape).norm(dim=1)
        return unit, norms.reshape(-1).to(torch.float32)

    def _id_map(self) -> torch.Tensor:
        if self._ids_tensor is None:
            self._ids_tensor = torch.tensor(self._ids, dtype=torch.long)
        return self._ids_tensor

    def search(self, queries: Sequence[str] | str | torch.Tensor | EncodedQueries, k: int = DEFAULT_TOP_K
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` cosine search for a batch of queries (exact unless ``index="ivf"``).

        ``queries``: texts (embedded by one encoder call), the :class:`EncodedQueries` of
        :meth:`encode_queries` (not embedded again) or a tensor ``[q, dim]`` / ``[dim]``
        (L2-normalised here). Returns ``(scores, ids)``, float32 and
        int64, both ``[q, min(k, len(self))]``, best first.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RequestError(f"k: expected a positive int, got {k!r}")
        q = self._queries(queries)
        k = min(k, self._count)
        if k == 0 or q.shape[0] == 0:
            return torch.zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.long)
        scores, rows = self._search_index().search(q, k, self.embeddings)
        return scores, self._id_map()[rows]

    # ------------------------------------------------------------------ selection (the gate)
    def select(self, query: str | torch.Tensor | EncodedQueries, gate: float | None | StdGate = DEFAULT_GATE,
               top_k: int = DEFAULT_TOP_K, *, exclude: Iterable[int] = (), pad_score: float | None = 0.0,
               unbiased: bool = False, score: str = "cosine") -> SelectedInstruction | None:
        """The top-1 instruction for ``query`` if the gate opens, else None (answer unedited).

        The gate opens when the std of the ``top_k`` best scores exceeds ``gate``
        (see :mod:`.gate` for the std form, small memories and ``score``). ``gate``
        may be a :class:`~.gate.StdGate`, which then replaces ``top_k``,
        ``pad_score``, ``unbiased`` and ``score``. Ids in ``exclude`` are skipped
        as if they were not stored.
        """
        if isinstance(query, torch.Tensor) and query.dim() == 2 and query.shape[0] != 1:
            raise RequestError("select(): one query at a time; use select_many() for a batch")
        if isinstance(query, EncodedQueries) and len(query) != 1:
            raise RequestError(f"select(): one query at a time, got {len(query)} encoded queries. "
                               "Fix: use select_many() for a batch, or pass encoded.row(i)")
        return self.select_many([query] if isinstance(query, str) else query, gate, top_k,
                                exclude=[exclude], pad_score=pad_score, unbiased=unbiased, score=score)[0]

    def select_many(self, queries: Sequence[str] | torch.Tensor | EncodedQueries, gate: float | None | StdGate = DEFAULT_GATE,
                    top_k: int = DEFAULT_TOP_K, *, exclude: Sequence[Iterable[int]] | None = None,
                    pad_score: float | None = 0.0, unbiased: bool = False, score: str = "cosine"
                    ) -> list[SelectedInstruction | None]:
        """:meth:`select` for a batch: one encoder call and one search for all queries.

        ``exclude`` is None or one iterable of ids per query.
        """
        std_gate = gate if isinstance(gate, StdGate) else StdGate(gate, top_k, pad_score, unbiased, score)
        top_k = std_gate.top_k
        out: list[SelectedInstruction | None] = []
        for i, (item_id, top) in enumerate(self.candidates(queries, std_gate, exclude=exclude)):
            if item_id is None:
                out.append(None)
                continue
            spread = std_gate.spread(top)
            if not std_gate.opens(spread):
                out.append(None)
                continue
            row = self._row[item_id]
            out.append(SelectedInstruction(
                id=item_id, text=self._texts[row], score=float(top[0]), spread=spread,
                metadata=copy.deepcopy(self._meta[row]), top_scores=tuple(float(s) for s in top),
            ))
        return out

    def gate_spreads(self, queries: Sequence[str] | torch.Tensor | EncodedQueries, gate: StdGate) -> tuple[list[float], list[int | None]]:
        """The gate statistic of ``gate`` (its threshold unused) and the top-1 id for each query (one batch)."""
        spreads, top1 = [], []
        for item_id, top in self.candidates(queries, gate):
            spreads.append(gate.spread(top) if item_id is not None else 0.0)
            top1.append(item_id)
        return spreads, top1

    def candidates(self, queries: Sequence[str] | torch.Tensor | EncodedQueries, gate: StdGate, *,
                   exclude: Sequence[Iterable[int]] | None = None) -> list[tuple[int | None, torch.Tensor]]:
        """For each query: the top-1 id and the (at most ``gate.top_k``) best scores the gate measures, best first.

        The scores are cosine, or dot products for ``gate.score == "dot"`` (candidates re-ranked by dot
        product among the ``4 * top_k`` best by cosine). ``(None, empty)`` when nothing is left.
        """
        top_k = gate.top_k
        dot = gate.score == "dot"
        if dot and self._norms is None:
            raise RequestError("gate_score: 'dot' needs the norms of the stored embeddings, which this memory "
                               "(saved by an older version) does not have. Fix: rebuild the memory (add the "
                               "instructions again and save), or use gate_score: cosine")
        q, q_norms = self._queries_with_norms(queries)
        n_q = q.shape[0]
        excluded = [set() for _ in range(n_q)] if exclude is None else [{int(i) for i in e} for e in exclude]
        if len(excluded) != n_q:
            raise RequestError(f"exclude: {len(excluded)} entries for {n_q} queries")
        if self._count == 0 or n_q == 0:
            return [(None, torch.zeros(0))] * n_q
        k = min(self._count, (4 * top_k if dot else top_k) + max(len(e) for e in excluded))
        scores, ids = self.search(q, k)
        if dot:
            rows = torch.tensor([[self._row[int(i)] for i in line] for line in ids.tolist()], dtype=torch.long)
            scores = scores * q_norms[:, None] * self.norms[rows]
            order = scores.argsort(dim=1, descending=True, stable=True)
            scores, ids = scores.gather(1, order), ids.gather(1, order)
        out: list[tuple[int | None, torch.Tensor]] = []
        for i in range(n_q):
            keep = [j for j, item_id in enumerate(ids[i].tolist()) if item_id not in excluded[i]][:top_k]
            if not keep:
                out.append((None, torch.zeros(0)))
                continue
            out.append((int(ids[i, keep[0]]), scores[i, keep]))
        return out

    # ------------------------------------------------------------------ multi-hop (see ..chains)
    def retrieve_chain(self, question: str, hops: int, gate: float | None = DEFAULT_GATE,
                       top_k: int = DEFAULT_TOP_K, **kwargs: Any) -> list[SelectedInstruction]:
        """Up to ``hops`` facts for a multi-hop ``question``: :func:`.chains.retrieve_chains` for one question."""
        return self.retrieve_chains([question], hops, gate, top_k, **kwargs)[0]

    def retrieve_chains(self, questions: Sequence[str], hops: int | Sequence[int], gate: float | None = DEFAULT_GATE,
                        top_k: int = DEFAULT_TOP_K, *, query_builder: Callable[[str, Sequence[str]], str] | None = None,
                        pad_score: float | None = 0.0, unbiased: bool = False) -> list[list[SelectedInstruction]]:
        """One fact per hop for each question: :func:`.chains.retrieve_chains` on this memory."""
        from .chains import default_chain_query, retrieve_chains

        return retrieve_chains(self, questions, hops, gate, top_k, query_builder=query_builder or default_chain_query,
                               pad_score=pad_score, unbiased=unbiased)

    # ------------------------------------------------------------------ persistence (see .persistence)
    def save(self, folder: str | os.PathLike[str], *, info: Mapping[str, Any] | None = None) -> Path:
        """Write the memory to ``folder`` crash-safely (see :mod:`.persistence`); returns the manifest path.

        ``info`` (JSON-serialisable, e.g. the editing hparams and the base model's fingerprint) is
        recorded in the manifest as ``info`` and comes back as :attr:`info` after :meth:`load`;
        without it the memory's current :attr:`info` is written. With ``index="ivf"`` the trained
        index is saved too, so a load does not retrain it.
        """
        identity = dict(self.encoder.identity) if self.encoder is not None else None
        if identity is not None and self._dim is not None and identity.get("dim") not in (None, self._dim):
            raise persistence.MemoryFormatError(f"encoder dim {identity.get('dim')} differs from stored dim {self._dim}")
        if info is not None:
            if not isinstance(info, Mapping):
                raise RequestError(f"info: expected a dict, got {type(info).__name__}")
            try:
                self.info = json.loads(json.dumps(dict(info), allow_nan=False, sort_keys=True))
            except (TypeError, ValueError) as exc:
                raise RequestError(f"info: not JSON-serialisable ({exc}); it is saved in the manifest") from exc
        index_bytes = None
        if self.index_kind == "ivf" and self._count and self._search_index().ready(self.embeddings):
            index_bytes = self._index.to_bytes()
        saved = persistence.SavedMemory(
            dtype="float16" if self.dtype == torch.float16 else "float32", dim=self._dim,
            embeddings=self.embeddings.contiguous().clone(), ids=list(self._ids), texts=list(self._texts),
            metadata=self._meta, next_id=self._next_id, encoder=identity, info=self.info,
            index={"kind": self.index_kind, "faiss_threshold": self.faiss_threshold,
                   "ivf_nlist": self.ivf_params["nlist"], "ivf_nprobe": self.ivf_params["nprobe"]},
            index_bytes=index_bytes, norms=None if self._norms is None else self.norms.contiguous().clone(),
            gate=copy.deepcopy(self.gate_calibration),
        )
        return persistence.write_folder(folder, saved)

    @staticmethod
    def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of a saved memory folder, checked for format and version (files not read)."""
        return persistence.read_manifest(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], encoder: TextEncoder | None = None, *,
             index: str | None = None, check_encoder: bool = True, **removed: Any) -> InstructionMemory:
        """Load a memory written by :meth:`save` (this or an earlier version), verifying every file and the encoder.

        With ``encoder=None`` the encoder named in the manifest is created
        (:class:`~..encoder.SentenceEncoder`); either way its identity (dim,
        weights and config hashes) must match the saved one. ``index`` (None: as
        saved) picks the search index. Nothing is unpickled.

        Raises:
            MemoryFormatError: missing/unknown manifest, a missing file, a sha256
                mismatch (modified or corrupted file) or inconsistent contents.
            EncoderMismatchError: the encoder differs from the one that built the memory.
        """
        for name in removed:
            if name in _REMOVED_OPTIONS:
                raise RequestError(f"{name}: {_REMOVED_OPTIONS[name]}")
            raise TypeError(f"InstructionMemory.load() got an unexpected keyword argument {name!r}")
        saved = persistence.read_folder(folder)
        encoder = persistence.resolve_encoder(folder, saved.encoder, encoder, check_encoder)
        settings = saved.index or {}
        kind = index if index is not None else settings.get("kind", "auto")
        memory = cls(encoder, dtype=_DTYPES[saved.dtype], index=kind,
                     faiss_threshold=settings.get("faiss_threshold") or DEFAULT_FAISS_THRESHOLD,
                     ivf_nlist=settings.get("ivf_nlist"), ivf_nprobe=settings.get("ivf_nprobe"))
        memory._dim = int(saved.dim) if saved.dim is not None else memory._dim
        memory._emb = saved.embeddings.contiguous()
        memory._count = len(saved.ids)
        memory._texts = saved.texts
        memory._meta = saved.metadata
        memory._ids = saved.ids
        memory._row = {item_id: r for r, item_id in enumerate(memory._ids)}
        memory._next_id = max(saved.next_id, max(memory._ids, default=-1) + 1)
        memory.info = dict(saved.info or {})
        memory._norms = None if saved.norms is None else saved.norms.to(torch.float32).contiguous()
        memory.gate_calibration = copy.deepcopy(saved.gate)
        if kind == "ivf" and saved.index_bytes is not None:
            memory._index = make_index("ivf", memory._dim, **memory.ivf_params)
            try:
                memory._index.load_bytes(saved.index_bytes, memory._count)
            except (RuntimeError, ValueError) as exc:
                raise persistence.MemoryFormatError(
                    f"{folder}: the saved IVF index does not fit the memory ({exc})." + persistence.REBUILD) from exc
        return memory
