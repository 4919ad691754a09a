"""Search indexes of the instruction memory: exact dense torch, exact FAISS and approximate FAISS.

An index answers "the ``k`` stored rows with the highest inner product with
each query" over the memory's unit vectors (cosine similarity). The memory owns
the embeddings; an index may keep its own copy or codes of them and is kept in
step by :meth:`add` (rows appended) and :meth:`reset` (after removals).

========  =====================================================  ==================
kind      what                                                   exact
========  =====================================================  ==================
dense     float32 matrix product over the stored tensor (torch)  yes
flat      FAISS ``IndexFlatIP`` (its own float32 copy)           yes
ivf       FAISS ``IndexIVFScalarQuantizer`` (8-bit codes),       no: recall@1 is
          then the best candidates re-scored exactly             measured, see below
auto      ``dense`` below ``faiss_threshold`` items, ``flat``    yes
          from there on (the default)
========  =====================================================  ==================

``ivf`` (inverted lists over ``nlist`` spherical k-means cells, ``nprobe``
cells searched per query, vectors stored as 8-bit scalar-quantised codes) is
the approximate index for large memories: a 100k-item memory is searched in a
fraction of a millisecond on one core, against ~15 ms for an exact scan. Its
``max(4 k, 32)`` best candidates are re-scored exactly against the stored
embeddings, so every *returned* score is exact (the gate sees true cosines) and
only the choice of candidates is approximate. :func:`recall_at_1` measures how
often its top-1 is the exact top-1; ``benchmarks/memory_scale.py`` reports it.
Below ``IVF_MIN_ITEMS`` items the ``ivf`` kind searches exactly (k-means needs
data to train on). Cells are trained on the memory's contents when the index is
first built and again whenever the memory has doubled since (added rows are
otherwise assigned to the existing cells).

HNSW was measured too and not kept: at 100k 384-d items it took ~60 s to build
on two cores (IVF-SQ8: ~10 s) for similar recall and speed.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ...errors import MissingDependencyError, RequestError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FAISS_THRESHOLD",
    "INDEX_KINDS",
    "IVF_MIN_ITEMS",
    "DenseIndex",
    "FlatIndex",
    "IVFIndex",
    "make_index",
    "recall_at_1",
]

#: Names accepted by ``InstructionMemory(index=...)``.
INDEX_KINDS = ("auto", "dense", "flat", "ivf")
#: ``auto`` switches from the torch product to FAISS ``IndexFlatIP`` at this many items.
DEFAULT_FAISS_THRESHOLD = 32768
#: Below this many items the ``ivf`` kind searches exactly.
IVF_MIN_ITEMS = 4096
#: Training points per IVF cell (FAISS warns below 39).
IVF_TRAIN_PER_CELL = 40
#: k-means iterations when training the IVF cells.
IVF_TRAIN_ITERATIONS = 10
_QUERY_CHUNK = 64


def faiss_module(what: str = "the instruction memory's FAISS index") -> Any:
    """The ``faiss`` module (a required dependency; a clear error if the install lacks it)."""
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError("faiss", what, "faiss-cpu") from exc
    return faiss


def check_kind(kind: Any) -> str:
    """``kind`` if it names an index, else a :class:`RequestError` listing the names."""
    if kind not in INDEX_KINDS:
        raise RequestError(f"index: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}. "
                           "Fix: pass index='auto' (exact; the default) or index='ivf' (approximate, for large memories)")
    return kind


def ivf_cells(count: int) -> int:
    """Default number of IVF cells for ``count`` items: the power of two nearest ``4 sqrt(count)``."""
    return 1 << max(4, round(math.log2(4 * math.sqrt(max(count, 1)))))


def ivf_probes(nlist: int) -> int:
    """Default number of cells searched per query: one cell in 32, at least 8 (32 of 1,024 cells, 128 of 4,096).

    A fixed fraction rather than ``sqrt(nlist)``: at a million entries (4,096 cells) the neighbours of a query
    spread over more cells, and ``sqrt(nlist) / 2`` = 32 probes found the exact top-1 for only 97.4% of queries
    (``benchmarks/memory_scale.py``); 128 probes reach 99.6% at under 2 ms per query on one thread.
    """
    return max(8, nlist // 32)


def dense_scores(q: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``[b, n]`` float32 inner products of ``q`` with ``embeddings`` (float32 or float16 rows)."""
    if embeddings.dtype == torch.float32:
        return q @ embeddings.T
    out = torch.empty(q.shape[0], embeddings.shape[0])
    step = 16384
    for start in range(0, embeddings.shape[0], step):
        out[:, start:start + step] = q @ embeddings[start:start + step].to(torch.float32).T
    return out


class DenseIndex:
    """Exact search by a float32 matrix product over the memory's own tensor (no copy)."""

    kind = "dense"

    def reset(self, embeddings: torch.Tensor) -> None:
        """Nothing to rebuild: the product reads the memory's tensor."""

    def add(self, rows: torch.Tensor) -> None:
        """Nothing to store: the product reads the memory's tensor."""

    @property
    def nbytes(self) -> int:
        return 0

    def search(self, q: torch.Tensor, k: int, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, rows)`` ``[b, k]``, best first; queries in chunks of 64."""
        scores, rows = [], []
        for start in range(0, q.shape[0], _QUERY_CHUNK):
            top = dense_scores(q[start:start + _QUERY_CHUNK], embeddings).topk(k, dim=1)
            scores.append(top.values)
            rows.append(top.indices)
        return torch.cat(scores), torch.cat(rows)


class FlatIndex:
    """Exact search with FAISS ``IndexFlatIP`` over a float32 copy of the embeddings."""

    kind = "flat"

    def __init__(self, dim: int):
        self.dim = dim
        self.index = faiss_module().IndexFlatIP(dim)

    def reset(self, embeddings: torch.Tensor) -> None:
        self.index.reset()
        self.add(embeddings)

    def add(self, rows: torch.Tensor) -> None:
        if rows.shape[0]:
            self.index.add(rows.to(torch.float32).contiguous().numpy())

    @property
    def nbytes(self) -> int:
        return int(self.index.ntotal) * self.dim * 4

    def search(self, q: torch.Tensor, k: int, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, rows = self.index.search(q.contiguous().numpy(), k)
        return torch.from_numpy(scores).to(torch.float32), torch.from_numpy(rows).to(torch.long)


class IVFIndex:
    """Approximate search: FAISS IVF with 8-bit scalar quantisation, candidates re-scored exactly.

    ``nlist`` (cells) and ``nprobe`` (cells searched per query) default to
    :func:`ivf_cells` of the item count when trained and :func:`ivf_probes`.
    """

    kind = "ivf"

    def __init__(self, dim: int, nlist: int | None = None, nprobe: int | None = None):
        self.dim = dim
        self.nlist_setting, self.nprobe_setting = nlist, nprobe
        self.index: Any = None  # None: not trained (small memory, or stale after growth)
        self.trained_on = 0
        self._pending = 0  # rows added since the index was last (re)built, when it is None

    # -- building
    def _train(self, embeddings: torch.Tensor) -> None:
        faiss = faiss_module()
        count = embeddings.shape[0]
        nlist = self.nlist_setting or ivf_cells(count)
        nlist = max(1, min(nlist, count // IVF_TRAIN_PER_CELL))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.cp.spherical = True
        sample = min(count, nlist * IVF_TRAIN_PER_CELL)
        rows = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:sample].sort().values
        logger.info("training the IVF index: %d cells on %d of %d items", nlist, sample, count)
        index.train(embeddings.index_select(0, rows).to(torch.float32).contiguous().numpy())
        self.index = index
        self.trained_on = count
        self.add(embeddings)
        index.nprobe = self.nprobe_setting or ivf_probes(nlist)

    def reset(self, embeddings: torch.Tensor) -> None:
        """Retrain from ``embeddings`` on the next search (after removals)."""
        self.index, self.trained_on = None, 0

    def add(self, rows: torch.Tensor) -> None:
        if self.index is not None and rows.shape[0]:
            step = 65536
            for start in range(0, rows.shape[0], step):
                self.index.add(rows[start:start + step].to(torch.float32).contiguous().numpy())

    def ready(self, embeddings: torch.Tensor) -> bool:
        """Build (or rebuild, after the memory doubled) the index when the memory is large enough."""
        count = embeddings.shape[0]
        if count < IVF_MIN_ITEMS:
            self.index, self.trained_on = None, 0
            return False
        if self.index is None or count > 2 * self.trained_on or int(self.index.ntotal) != count:
            self._train(embeddings)
        return True

    @property
    def nlist(self) -> int | None:
        return None if self.index is None else int(self.index.nlist)

    @property
    def nprobe(self) -> int | None:
        return None if self.index is None else int(self.index.nprobe)

    @property
    def nbytes(self) -> int:
        if self.index is None:
            return 0
        return int(self.index.ntotal) * (self.index.code_size + 8) + int(self.index.nlist) * self.dim * 4

    # -- search
    def search(self, q: torch.Tensor, k: int, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ready(embeddings):
            return DenseIndex().search(q, k, embeddings)
        count = embeddings.shape[0]
        candidates = min(count, max(4 * k, 32))
        _, rows = self.index.search(q.contiguous().numpy(), candidates)
        rows = torch.from_numpy(rows).to(torch.long)
        missing = rows < 0  # fewer candidates than asked in the probed cells
        safe = rows.clamp(min=0)
        exact = torch.einsum("bd,bcd->bc", q, embeddings[safe].to(torch.float32))
        exact = exact.masked_fill(missing, float("-inf"))
        top = exact.topk(k, dim=1)
        return top.values, safe.gather(1, top.indices)

    # -- persistence
    def to_bytes(self) -> bytes | None:
        """The trained FAISS index (``faiss.serialize_index``), None when not built."""
        if self.index is None:
            return None
        return faiss_module().serialize_index(self.index).tobytes()

    def load_bytes(self, data: bytes, count: int) -> None:
        """Restore :meth:`to_bytes` output for a memory of ``count`` items (``ValueError`` if it does not fit)."""
        import numpy as np

        index = faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if int(index.ntotal) != count or int(index.d) != self.dim:
            raise ValueError(f"the saved IVF index holds {int(index.ntotal)} {int(index.d)}-d vectors, "
                             f"the memory {count} {self.dim}-d ones")
        self.index = index
        self.trained_on = count


def make_index(kind: str, dim: int, **params: Any) -> DenseIndex | FlatIndex | IVFIndex:
    """A new, empty index of ``kind`` (``dense``, ``flat`` or ``ivf``; ``params`` for ``ivf``)."""
    if kind == "dense":
        return DenseIndex()
    if kind == "flat":
        return FlatIndex(dim)
    if kind == "ivf":
        return IVFIndex(dim, **params)
    raise RequestError(f"index: no concrete index named {kind!r}; expected dense, flat or ivf")


def recall_at_1(index: DenseIndex | FlatIndex | IVFIndex, queries: torch.Tensor, embeddings: torch.Tensor,
                exact_rows: torch.Tensor | None = None) -> float:
    """Fraction of ``queries`` whose top-1 from ``index`` is the exact top-1 (ties count as found).

    ``exact_rows`` ``[q]``: the exact top-1 rows when already known (else computed by a dense product).
    A returned row counts as correct when its exact score equals the exact best score.
    """
    queries = torch.nn.functional.normalize(queries.to(torch.float32), dim=1)
    if exact_rows is None:
        exact_rows = DenseIndex().search(queries, 1, embeddings)[1][:, 0]
    _, rows = index.search(queries, 1, embeddings)
    got = rows[:, 0]
    best = (queries * embeddings[exact_rows].to(torch.float32)).sum(1)
    found = (queries * embeddings[got].to(torch.float32)).sum(1)
    return float(((got == exact_rows) | (found >= best)).float().mean())
