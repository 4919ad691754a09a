"""InstructEd's instruction memory: stored edit instructions, exact retrieval and the std gate.

InstructEd (Han et al. 2024) edits by *instruction*: every requested edit is
stored as a natural sentence ("The spouse of A is B."), and at inference time
the instruction closest to the input (cosine similarity of sentence embeddings)
is put in front of the input -- but only when the retrieval is confident;
otherwise the model answers unedited. This module is that memory::

    memory = InstructionMemory(SentenceEncoder())
    ids = memory.add(["The spouse of A is B.", "B is a citizen of C."])    # one encoder call
    scores, found = memory.search(["Who is A married to?"], k=5)          # exact, batched
    hit = memory.select("Who is A married to?")                            # SelectedInstruction | None
    memory.save("mem/"); memory = InstructionMemory.load("mem/")           # verified, atomic

The gate
--------
:meth:`InstructionMemory.select` follows the paper: take the ``top_k`` (5)
highest cosine scores of the query against the memory; when their standard
deviation **exceeds** ``gate`` (0.1) the top-1 instruction is used, else none
(``None`` = answer as the unedited model). A relevant instruction stands out
from its neighbours (large spread); for an unrelated query the best scores are
all similarly low (small spread).

* **Population** standard deviation (``unbiased=False``): the top-k scores are
  the whole set being described, not a sample from a larger population whose
  spread is estimated, and the population form is defined for any number of
  scores (the sample form is NaN for one score). The public InstructEd code
  calls ``torch.std`` (sample form), which is ``sqrt(k / (k - 1))`` = 1.118x the
  population value for k = 5, so its threshold 0.1 equals 0.0894 here; pass
  ``unbiased=True`` to reproduce its decisions exactly.
* **Fewer than ``top_k`` candidates** (a small memory, or most items excluded):
  the missing neighbours count as *unrelated*, with score ``pad_score``
  (default 0.0, the cosine of unrelated text), so the statistic always has
  ``top_k`` entries. A memory with a single instruction therefore selects it
  when its score exceeds ``gate * top_k / sqrt(top_k - 1)`` (0.25 for the
  defaults) instead of never (the spread of one score is 0). Without this, a
  per-case memory holding a case's 2-4 edits, all related to the question,
  would almost always keep the gate shut. ``pad_score=None`` uses only the
  available scores (and one stored item is then never selected).
  An empty memory selects nothing.
* ``gate=None`` disables gating (always the top-1).

Retrieval
---------
:meth:`InstructionMemory.search` is an exact maximum-inner-product search over
the stored unit vectors (cosine similarity), batched over queries: a matrix
product in float32. Large memories (``prefilter="auto"``, >= 32,768 items),
searched a few queries at a time, first score every item with an int8 copy of
the embeddings (4x fewer bytes to read: one query against 100k x 384 float32
vectors is memory-bandwidth bound, ~15-24 ms on one core of the 2-core EPYC dev
machine, the int8 pass ~3-5 ms), then re-score in float32 every item
that *could* be in the top k given a proven bound on the int8 error, so the
result is the same as the dense product (scores agree to float32 rounding).
That fast path uses a private torch kernel; it is only switched on after a
crash-safe probe in a subprocess and a numeric self-check, and when it is
faster than the dense product on this machine. ``use_faiss=True`` uses a FAISS
``IndexFlatIP`` instead (``pip install faiss-cpu``).

Identifiers
-----------
:meth:`add` returns stable integer ids (never reused by the same memory, kept
by save/load); search and selection report ids. Without removals, ids equal row
positions ``0..len-1``.

On disk
-------
``save(folder)`` writes ``embeddings-<hash>.safetensors`` (``embeddings``
``[n, d]`` in the storage dtype and ``ids`` int64), ``records-<hash>.jsonl``
(one ``{"id", "text", "metadata"}`` object per line) and ``manifest.json``
(format, format version, plugin version, count, dim, dtype, the encoder's
identity -- name, dim, sha256 of its weights and of its config --, the caller's
``info`` such as the editing hparams, and sha256 and size per file). Every
file is written to a temporary file in the same folder, flushed, fsynced and
moved into place with :func:`os.replace`; the manifest goes last. Data files
are named by content, so until the new manifest is in place the old manifest
still points at the old, intact files: a save interrupted at any point leaves
the previous memory loadable. Unreferenced data files are removed after a
successful save. Loading checks every sha256 and the encoder identity, and
never unpickles anything (safetensors + JSON only). Concurrent saves into the same folder are not supported.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..core import durable
from ..errors import MissingDependencyError, PluginError, RequestError
from ..models.cache import atomic_write_file  # noqa: F401 - re-exported: tests simulate a torn write with it

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GATE",
    "DEFAULT_TOP_K",
    "MEMORY_FORMAT",
    "MEMORY_FORMAT_VERSION",
    "EncoderMismatchError",
    "InstructionMemory",
    "MemoryFormatError",
    "SelectedInstruction",
    "TextEncoder",
    "all_facts_chain_query",
    "default_chain_query",
    "gate_spread",
]

MEMORY_FORMAT = "instructedit-plugin/instruction-memory"
MEMORY_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_GATE = 0.1
DEFAULT_TOP_K = 5
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_PREFILTER_MIN_ITEMS = 32768
_QUERY_CHUNK = 64
_INT8_MAX_BATCH = 8
_REBUILD = " Fix: restore the folder from a backup or rebuild the memory (add the instructions again and save)"


class MemoryFormatError(PluginError):
    """A saved memory folder is missing, corrupted, tampered with or of an unknown format."""


class EncoderMismatchError(MemoryFormatError):
    """A saved memory was built with a different sentence encoder than the one given."""


@runtime_checkable
class TextEncoder(Protocol):
    """What the memory needs from an encoder (:class:`~.encoder.SentenceEncoder` is one)."""

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


def gate_spread(scores: torch.Tensor, top_k: int = DEFAULT_TOP_K, pad_score: float | None = 0.0,
                unbiased: bool = False) -> torch.Tensor:
    """The gate statistic: standard deviation of the (at most ``top_k``) best scores.

    ``scores`` is ``[..., m]`` sorted or not; only its ``top_k`` largest entries
    count. When ``m < top_k`` and ``pad_score`` is not None the missing entries
    are filled with ``pad_score``. Population std unless ``unbiased``. An empty
    last dimension gives 0.
    """
    scores = scores.to(torch.float32)
    m = scores.shape[-1]
    if m > top_k:
        scores = scores.topk(top_k, dim=-1).values
    elif m < top_k and pad_score is not None:
        pad = scores.new_full((*scores.shape[:-1], top_k - m), float(pad_score))
        scores = torch.cat([scores, pad], dim=-1)
    if scores.shape[-1] == 0 or (unbiased and scores.shape[-1] < 2):
        return scores.new_zeros(scores.shape[:-1])
    return scores.std(dim=-1, unbiased=unbiased)


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


# ---------------------------------------------------------------------------- helpers
def _check_texts(instructions: Any, what: str = "instructions") -> list[str]:
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


def _write_bytes(final: Path, data: bytes) -> None:
    """Atomically create ``final`` with ``data`` (the shared crash-safe writer of :mod:`..durable`)."""
    durable.atomic_write_bytes(final, data)


def _plugin_version() -> str:
    from .. import __version__

    return __version__


def _identity_mismatch(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("dim", "weights_sha256", "config_sha256"):
        if key in saved and saved.get(key) != given.get(key):
            problems.append(f"{key}: saved {saved.get(key)!r}, given {given.get(key)!r}")
    return problems


# ---------------------------------------------------------------------------- int8 prefilter
_BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)
_PROBE_RESULTS: dict[tuple[int, str], bool] = {}
_PROBE_SCRIPT = """
import sys, torch
d = int(sys.argv[1])
for n, b in ((1, 1), (7, 3), (300, 1), (1031, 65)):
    e = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    s = e.abs().amax(1) / 127
    w = torch.round(e / s[:, None]).to(torch.int8)
    q = torch.nn.functional.normalize(torch.randn(b, d), dim=1).to(torch.bfloat16)
    out = torch._weight_int8pack_mm(q, w, s.to(torch.bfloat16))
    assert tuple(out.shape) == (b, n), out.shape
    assert float((out.float() - q.float() @ e.T).abs().max()) < 0.05
print("ok")
"""


def _int8_kernel_safe(dim: int) -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs correctly for ``dim`` here.

    The kernel is private and crashes the process for some shapes (seen: inner
    dimensions that are not a multiple of 16), so it is probed once per process
    in a subprocess, and only for dimensions that are multiples of 64.
    """
    if os.environ.get("INSTRUCTEDIT_INT8_PREFILTER", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if dim % 64 or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    key = (dim, torch.__version__)
    if key not in _PROBE_RESULTS:
        try:
            done = subprocess.run(
                [sys.executable, "-c", _PROBE_SCRIPT, str(dim)], capture_output=True, text=True, timeout=120, check=False,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            _PROBE_RESULTS[key] = done.returncode == 0 and done.stdout.strip().endswith("ok")
        except (OSError, subprocess.SubprocessError):
            _PROBE_RESULTS[key] = False
        if not _PROBE_RESULTS[key]:
            logger.info("int8 retrieval prefilter unavailable for dim %d; using the dense product", dim)
    return _PROBE_RESULTS[key]


class _Int8Index:
    """Row-wise symmetric int8 copy of the embeddings, grown in place, for the coarse pass."""

    def __init__(self, dim: int):
        self.dim = dim
        self.codes = torch.zeros(0, dim, dtype=torch.int8)
        self.scales = torch.zeros(0, dtype=torch.float32)
        self.count = 0
        self.max_scale = 0.0
        self.max_norm = 1.0
        self._scales_bf16: torch.Tensor | None = None

    def extend(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float32)
        n_new = rows.shape[0]
        if n_new == 0:
            return
        # Scales are bfloat16 values (what the kernel takes) rounded UP from max|e| / 127, so the
        # kernel uses them exactly and every code stays within [-127, 127].
        scales = rows.abs().amax(dim=1) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        scales = (scales * (1 + 2.0 ** -7)).to(torch.bfloat16).to(torch.float32)
        codes = torch.round(rows / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        need = self.count + n_new
        if need > self.codes.shape[0]:
            cap = max(need, int(1.5 * self.codes.shape[0]), 1024)
            grown = torch.zeros(cap, self.dim, dtype=torch.int8)
            grown[: self.count] = self.codes[: self.count]
            self.codes = grown
            grown_s = torch.zeros(cap, dtype=torch.float32)
            grown_s[: self.count] = self.scales[: self.count]
            self.scales = grown_s
        self.codes[self.count:need] = codes
        self.scales[self.count:need] = scales
        self.count = need
        self.max_scale = max(self.max_scale, float(scales.max()))
        self.max_norm = max(self.max_norm, float(rows.norm(dim=1).max()))
        self._scales_bf16 = None

    def coarse(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate scores ``[b, n]`` and a per-query bound on their absolute error ``[b]``."""
        if self._scales_bf16 is None or self._scales_bf16.shape[0] != self.count:
            self._scales_bf16 = self.scales[: self.count].to(torch.bfloat16)  # exact: already bf16 values
        q16 = queries.to(torch.bfloat16)
        approx = torch._weight_int8pack_mm(q16, self.codes[: self.count], self._scales_bf16).to(torch.float32)
        return approx, self.error_bound(queries, q16)

    def error_bound(self, queries: torch.Tensor, q16: torch.Tensor) -> torch.Tensor:
        """Bound on ``|q . e - approx|`` for every stored ``e`` (x1.25 safety margin).

        query rounding ``|(q - q16) . e| <= |q - q16| |e|``; int8 rounding
        ``|q16 . (e - s w)| <= s/2 |q16|_1``; the bfloat16 output ``<= u |score|``
        with ``|score| <= |q16| (|e| + s/2 sqrt(d))``; float32 accumulation.
        """
        q16f = q16.to(torch.float32)
        l1 = q16f.abs().sum(dim=1)
        qnorm = q16f.norm(dim=1)
        score_max = qnorm * (self.max_norm + self.max_scale / 2 * math.sqrt(self.dim))
        bound = ((queries.to(torch.float32) - q16f).norm(dim=1) * self.max_norm + self.max_scale / 2 * l1
                 + _BF16_U * score_max + self.dim * 2.0 ** -23 * 127 * self.max_scale * l1 + 1e-5)
        return 1.25 * bound


# ---------------------------------------------------------------------------- the memory
class InstructionMemory:
    """A growable store of instruction sentences and their unit-norm sentence embeddings.

    Args:
        encoder: anything with ``encode(texts) -> [n, d]``, ``dim`` and ``identity``
            (normally a :class:`~.encoder.SentenceEncoder`). May be None only for a
            memory that is fed pre-computed embeddings and tensor queries.
        dtype: storage dtype, ``torch.float32`` (default) or ``torch.float16``
            (half the RAM; scores are still computed in float32).
        use_faiss: search with a FAISS ``IndexFlatIP`` (exact; needs ``faiss-cpu``).
        prefilter: ``"auto"`` (default), ``True`` or ``False``: the exact int8
            prefilter for large memories (see the module docs). ``True`` skips the
            speed comparison but not the safety checks.
    """

    def __init__(self, encoder: TextEncoder | None, *, dtype: torch.dtype | str = torch.float32,
                 use_faiss: bool = False, prefilter: bool | str = "auto"):
        self.encoder = encoder
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise PluginError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in (torch.float32, torch.float16):
            raise PluginError(f"dtype: expected torch.float32 or torch.float16, got {dtype}")
        if prefilter not in ("auto", True, False):
            raise PluginError(f"prefilter: expected 'auto', True or False, got {prefilter!r}")
        self.dtype = dtype
        self.prefilter = prefilter
        self._dim: int | None = int(encoder.dim) if encoder is not None else None
        self._emb = torch.zeros(0, self._dim or 0, dtype=dtype)
        self._count = 0
        self._texts: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._ids: list[int] = []
        self._row: dict[int, int] = {}
        self._ids_tensor: torch.Tensor | None = None
        self._next_id = 0
        #: JSON-serialisable notes saved in the manifest (e.g. the editing hparams); see :meth:`save`.
        self.info: dict[str, Any] = {}
        self._int8: _Int8Index | None = None
        self._int8_state: str = "unknown"  # "unknown" | "on" | "off"
        self._faiss = None
        self.use_faiss = bool(use_faiss)
        if self.use_faiss:
            self._faiss_module()

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"InstructionMemory(count={self._count}, dim={self._dim}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"use_faiss={self.use_faiss})")

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
    def allocated_bytes(self) -> int:
        """Bytes allocated for the embedding matrix (rows grow geometrically: at most
        ``max(256, 1.5 * len)`` rows of ``dim`` values in the storage dtype)."""
        return self._emb.numel() * self._emb.element_size()

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
        texts = _check_texts(instructions)
        metas = _check_metadata(metadata, len(texts))
        if not texts:
            return []
        if embeddings is None:
            if self.encoder is None:
                raise PluginError("add(): this memory has no encoder; pass embeddings=... or give an encoder")
            embeddings = self.encoder.encode(texts)
        vectors = self._as_vectors(embeddings, "embeddings")
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
        new_ids = list(range(self._next_id, self._next_id + len(texts)))
        for offset, item_id in enumerate(new_ids):
            self._row[item_id] = self._count + offset
        self._next_id += len(texts)
        self._ids.extend(new_ids)
        self._texts.extend(texts)
        self._meta.extend(metas)
        self._count = need
        self._ids_tensor = None
        if self._int8 is not None:
            self._int8.extend(stored)
        if self._faiss is not None:
            self._faiss.add(stored.to(torch.float32).numpy())
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
        self._texts = [self._texts[r] for r in keep_rows]
        self._meta = [self._meta[r] for r in keep_rows]
        self._ids = [self._ids[r] for r in keep_rows]
        self._row = {item_id: r for r, item_id in enumerate(self._ids)}
        self._count = len(keep_rows)
        self._rebuild_indexes()
        return len(drop)

    def clear(self) -> None:
        """Remove every instruction (ids are still never reused by this object)."""
        self._emb = torch.zeros(0, self._dim or 0, dtype=self.dtype)
        self._texts, self._meta, self._ids, self._row = [], [], [], {}
        self._count = 0
        self._rebuild_indexes()

    def _rebuild_indexes(self) -> None:
        self._ids_tensor = None
        if self._int8 is not None:
            self._int8 = _Int8Index(self._dim)
            self._int8.extend(self.embeddings)
        if self._faiss is not None:
            self._faiss.reset()
            if self._count:
                self._faiss.add(self.embeddings.to(torch.float32).numpy())

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
    def _queries(self, queries: Sequence[str] | str | torch.Tensor) -> torch.Tensor:
        if isinstance(queries, torch.Tensor):
            return self._as_vectors(queries, "queries")
        if isinstance(queries, str):
            queries = [queries]
        texts = _check_texts(queries, "queries")
        if self.encoder is None:
            raise PluginError("search(): this memory has no encoder; pass query embeddings as a tensor")
        if not texts:
            return torch.zeros(0, self._dim or 0)
        return self._as_vectors(self.encoder.encode(texts), "queries")

    def _id_map(self) -> torch.Tensor:
        if self._ids_tensor is None:
            self._ids_tensor = torch.tensor(self._ids, dtype=torch.long)
        return self._ids_tensor

    def search(self, queries: Sequence[str] | str | torch.Tensor, k: int = DEFAULT_TOP_K
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` cosine search for a batch of queries.

        ``queries``: texts (embedded by one encoder call) or a tensor ``[q, dim]``
        / ``[dim]`` (L2-normalised here). Returns ``(scores, ids)``, float32 and
        int64, both ``[q, min(k, len(self))]``, best first.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RequestError(f"k: expected a positive int, got {k!r}")
        q = self._queries(queries)
        k = min(k, self._count)
        if k == 0 or q.shape[0] == 0:
            return torch.zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.long)
        if self.use_faiss:
            return self._search_faiss(q, k)
        scores, rows = [], []
        for start in range(0, q.shape[0], _QUERY_CHUNK):
            chunk = q[start:start + _QUERY_CHUNK]
            # The int8 pass pays off for a few queries at a time (memory-bandwidth bound); a large
            # batch is a compute-bound matrix product where the dense float32 GEMM is as fast.
            use_int8 = chunk.shape[0] <= _INT8_MAX_BATCH and self._int8_enabled()
            found = self._search_int8(chunk, k) if use_int8 else None
            if found is None:
                found = self._search_dense(chunk, k)
            scores.append(found[0])
            rows.append(found[1])
        rows_t = torch.cat(rows)
        return torch.cat(scores), self._id_map()[rows_t]

    def _dense_scores(self, q: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embeddings if rows is None else self._emb.index_select(0, rows)
        if emb.dtype == torch.float32:
            return q @ emb.T
        out = torch.empty(q.shape[0], emb.shape[0])
        step = 16384
        for start in range(0, emb.shape[0], step):
            out[:, start:start + step] = q @ emb[start:start + step].to(torch.float32).T
        return out

    def _search_dense(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = self._dense_scores(q).topk(k, dim=1)
        return top.values, top.indices

    def _int8_enabled(self) -> bool:
        if self.prefilter is False or self._count < (_PREFILTER_MIN_ITEMS if self.prefilter == "auto" else 1):
            return False
        if self._int8_state == "unknown":
            self._int8_state = "on" if self._init_int8() else "off"
        return self._int8_state == "on"

    def _init_int8(self) -> bool:
        if not _int8_kernel_safe(self._dim):
            return False
        index = _Int8Index(self._dim)
        index.extend(self.embeddings)
        # Numeric self-check against the proven bound (stored rows and random directions as queries).
        gen = torch.Generator().manual_seed(0)
        sample = torch.randperm(self._count, generator=gen)[:2048]
        probe_q = torch.cat([self._emb.index_select(0, sample[:32]).to(torch.float32),
                             torch.nn.functional.normalize(torch.randn(8, self._dim, generator=gen), dim=1)])
        sub = _Int8Index(self._dim)
        sub.extend(self._emb.index_select(0, sample))
        approx, bound = sub.coarse(probe_q)
        err = (approx - probe_q @ self._emb.index_select(0, sample).to(torch.float32).T).abs().amax(dim=1)
        if bool((err > bound / 1.25).any()):  # the analytic bound itself, without the safety margin
            logger.warning("int8 prefilter self-check failed (error %.4g above its bound); using the dense product",
                           float(err.max()))
            return False
        if self.prefilter == "auto":
            q1 = probe_q[:1]
            timings = {}
            for name, fn in (("dense", lambda: self._search_dense(q1, DEFAULT_TOP_K)),
                             ("int8", lambda: self._search_int8(q1, DEFAULT_TOP_K, index))):
                fn()
                runs = []
                for _ in range(5):  # best of 5: robust to other processes competing for the CPU
                    start = time.perf_counter()
                    fn()
                    runs.append(time.perf_counter() - start)
                timings[name] = min(runs) * 1000
            if timings["int8"] >= timings["dense"]:
                logger.info("int8 prefilter not faster here (%.2f vs %.2f ms); using the dense product",
                            timings["int8"], timings["dense"])
                return False
        self._int8 = index
        return True

    def _search_int8(self, q: torch.Tensor, k: int, index: _Int8Index | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        index = index or self._int8
        approx, bound = index.coarse(q)
        kth = approx.topk(k, dim=1).values[:, -1]
        # Every item whose exact score can reach the k-th best exact score has approx >= kth - 2 * bound.
        candidate = approx >= (kth - 2 * bound)[:, None]
        union = candidate.any(dim=0).nonzero().squeeze(1)
        if union.numel() > max(4096, self._count // 8):
            return None  # the bound is not selective here: the dense product is cheaper
        exact = self._dense_scores(q, union)
        exact = exact.masked_fill(~candidate[:, union], float("-inf"))
        top = exact.topk(k, dim=1)
        return top.values, union[top.indices]

    def _faiss_module(self) -> Any:
        try:
            import faiss
        except ImportError as exc:
            raise MissingDependencyError("faiss", "InstructionMemory(use_faiss=True)", "faiss-cpu") from exc
        return faiss

    def _search_faiss(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._faiss is None:
            faiss = self._faiss_module()
            self._faiss = faiss.IndexFlatIP(self._dim)
            self._faiss.add(self.embeddings.to(torch.float32).contiguous().numpy())
        scores, rows = self._faiss.search(q.contiguous().numpy(), k)
        rows_t = torch.from_numpy(rows).to(torch.long)
        return torch.from_numpy(scores).to(torch.float32), self._id_map()[rows_t]

    # ------------------------------------------------------------------ selection (the gate)
    def select(self, query: str | torch.Tensor, gate: float | None = DEFAULT_GATE, top_k: int = DEFAULT_TOP_K, *,
               exclude: Iterable[int] = (), pad_score: float | None = 0.0, unbiased: bool = False
               ) -> SelectedInstruction | None:
        """The top-1 instruction for ``query`` if the gate opens, else None (answer unedited).

        The gate opens when the std of the ``top_k`` best scores exceeds ``gate``
        (see the module docs for the std form and small memories). Ids in
        ``exclude`` are skipped as if they were not stored.
        """
        if isinstance(query, torch.Tensor) and query.dim() == 2 and query.shape[0] != 1:
            raise RequestError("select(): one query at a time; use select_many() for a batch")
        return self.select_many([query] if isinstance(query, str) else query, gate, top_k,
                                exclude=[exclude], pad_score=pad_score, unbiased=unbiased)[0]

    def select_many(self, queries: Sequence[str] | torch.Tensor, gate: float | None = DEFAULT_GATE,
                    top_k: int = DEFAULT_TOP_K, *, exclude: Sequence[Iterable[int]] | None = None,
                    pad_score: float | None = 0.0, unbiased: bool = False) -> list[SelectedInstruction | None]:
        """:meth:`select` for a batch: one encoder call and one search for all queries.

        ``exclude`` is None or one iterable of ids per query.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RequestError(f"top_k: expected a positive int, got {top_k!r}")
        q = self._queries(queries)
        n_q = q.shape[0]
        excluded = [set() for _ in range(n_q)] if exclude is None else [{int(i) for i in e} for e in exclude]
        if len(excluded) != n_q:
            raise RequestError(f"exclude: {len(excluded)} entries for {n_q} queries")
        if self._count == 0 or n_q == 0:
            return [None] * n_q
        k = min(self._count, top_k + max(len(e) for e in excluded))
        scores, ids = self.search(q, k)
        out: list[SelectedInstruction | None] = []
        for i in range(n_q):
            keep = [j for j, item_id in enumerate(ids[i].tolist()) if item_id not in excluded[i]][:top_k]
            if not keep:
                out.append(None)
                continue
            top = scores[i, keep]
            spread = float(gate_spread(top, top_k, pad_score, unbiased))
            if gate is not None and not spread > gate:
                out.append(None)
                continue
            item_id = int(ids[i, keep[0]])
            row = self._row[item_id]
            out.append(SelectedInstruction(
                id=item_id, text=self._texts[row], score=float(top[0]), spread=spread,
                metadata=copy.deepcopy(self._meta[row]), top_scores=tuple(float(s) for s in top),
            ))
        return out

    def retrieve_chain(self, question: str, hops: int, gate: float | None = DEFAULT_GATE,
                       top_k: int = DEFAULT_TOP_K, **kwargs: Any) -> list[SelectedInstruction]:
        """Up to ``hops`` facts for a multi-hop ``question``, one per hop (see :meth:`retrieve_chains`)."""
        return self.retrieve_chains([question], hops, gate, top_k, **kwargs)[0]

    def retrieve_chains(self, questions: Sequence[str], hops: int | Sequence[int], gate: float | None = DEFAULT_GATE,
                        top_k: int = DEFAULT_TOP_K, *,
                        query_builder: Callable[[str, Sequence[str]], str] = default_chain_query,
                        pad_score: float | None = 0.0, unbiased: bool = False) -> list[list[SelectedInstruction]]:
        """Retrieve one fact per hop for each question, from the question alone.

        Hop 1 queries with the question; hop ``i`` queries with
        ``query_builder(question, facts_so_far)`` (default: the question followed
        by the last fact retrieved, see :func:`default_chain_query`), excluding facts already chosen for that
        question. A question stops early when the gate stays shut (nothing
        relevant is left) or after ``hops`` facts (an int, or one int per
        question). Each hop is one batched encoder call for all still-active questions.
        """
        questions = _check_texts(questions, "questions")
        limits = [hops] * len(questions) if isinstance(hops, int) else [int(h) for h in hops]
        if len(limits) != len(questions) or any(h < 0 for h in limits):
            raise RequestError("hops: expected a non-negative int or one per question")
        chains: list[list[SelectedInstruction]] = [[] for _ in questions]
        active = [i for i, h in enumerate(limits) if h > 0]
        while active and self._count:
            queries = [query_builder(questions[i], [s.text for s in chains[i]]) for i in active]
            found = self.select_many(queries, gate, top_k, exclude=[[s.id for s in chains[i]] for i in active],
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

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike[str], *, info: Mapping[str, Any] | None = None) -> Path:
        """Write the memory to ``folder`` atomically (see the module docs); returns the manifest path.

        ``info`` (JSON-serialisable, e.g. the editing hparams and the base model's fingerprint) is
        recorded in the manifest as ``info`` and comes back as :attr:`info` after :meth:`load`;
        without it the memory's current :attr:`info` is written.
        """
        import safetensors.torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        identity = dict(self.encoder.identity) if self.encoder is not None else None
        if identity is not None and self._dim is not None and identity.get("dim") not in (None, self._dim):
            raise MemoryFormatError(f"encoder dim {identity.get('dim')} differs from stored dim {self._dim}")
        if info is not None:
            if not isinstance(info, Mapping):
                raise RequestError(f"info: expected a dict, got {type(info).__name__}")
            try:
                self.info = json.loads(json.dumps(dict(info), allow_nan=False, sort_keys=True))
            except (TypeError, ValueError) as exc:
                raise RequestError(f"info: not JSON-serialisable ({exc}); it is saved in the manifest") from exc
        dtype_name = "float16" if self.dtype == torch.float16 else "float32"
        tensors = {"embeddings": self.embeddings.contiguous().clone(),
                   "ids": torch.tensor(self._ids, dtype=torch.long)}
        emb_bytes = safetensors.torch.save(tensors, metadata={"format": MEMORY_FORMAT, "dtype": dtype_name})
        lines = io.StringIO()
        for item_id, text, meta in zip(self._ids, self._texts, self._meta):
            lines.write(json.dumps({"id": item_id, "text": text, "metadata": meta}, ensure_ascii=False,
                                   allow_nan=False, sort_keys=True))
            lines.write("\n")
        rec_bytes = lines.getvalue().encode("utf-8")
        files = {}
        for stem, ext, data in (("embeddings", "safetensors", emb_bytes), ("records", "jsonl", rec_bytes)):
            digest = hashlib.sha256(data).hexdigest()
            name = f"{stem}-{digest[:16]}.{ext}"
            _write_bytes(folder / name, data)
            files[name] = {"sha256": digest, "bytes": len(data), "role": stem}
        durable.fsync_dir(folder)
        manifest = {
            "format": MEMORY_FORMAT,
            "format_version": MEMORY_FORMAT_VERSION,
            "plugin_version": _plugin_version(),
            "count": self._count,
            "dim": self._dim,
            "dtype": dtype_name,
            "next_id": self._next_id,
            "encoder": identity,
            "info": self.info,
            "files": files,
        }
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        _write_bytes(folder / MANIFEST_NAME, manifest_bytes)
        durable.fsync_dir(folder)
        for entry in folder.iterdir():  # data files of earlier saves, now unreferenced
            if (entry.name.startswith(("embeddings-", "records-")) and entry.name not in files
                    and entry.suffix in (".safetensors", ".jsonl") and entry.is_file()):
                with contextlib.suppress(OSError):
                    entry.unlink()
            elif (entry.name.startswith((".embeddings-", ".records-", f".{MANIFEST_NAME}."))
                    and entry.name.endswith(".tmp") and entry.is_file()):  # left by a writer killed mid-write
                with contextlib.suppress(OSError):
                    entry.unlink()
        return folder / MANIFEST_NAME

    @staticmethod
    def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of a saved memory folder, checked for format and version (files not read)."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise MemoryFormatError(f"{folder}: no {MANIFEST_NAME}; not a saved InstructionMemory folder. "
                                    "Fix: point at the folder InstructionMemory.save() / save_memory() wrote") from exc
        except (OSError, ValueError) as exc:
            raise MemoryFormatError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})."
                                    + _REBUILD) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MEMORY_FORMAT:
            raise MemoryFormatError(f"{manifest_path}: not an instruction-memory manifest (format "
                                    f"{manifest.get('format') if isinstance(manifest, dict) else None!r}). "
                                    "Fix: point at the folder InstructionMemory.save() / save_memory() wrote")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > MEMORY_FORMAT_VERSION:
            raise MemoryFormatError(f"{manifest_path}: format_version {version!r} is not supported (this "
                                    f"plugin reads up to {MEMORY_FORMAT_VERSION}). Fix: upgrade instructedit-plugin")
        for key, kind in (("files", dict), ("count", int), ("encoder", (dict, type(None))), ("info", (dict, type(None)))):
            if key in manifest and not isinstance(manifest[key], kind):
                raise MemoryFormatError(f"{manifest_path}: field '{key}' has the wrong type "
                                        f"({type(manifest[key]).__name__}); the manifest was modified or corrupted." + _REBUILD)
        if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("count"), int):
            raise MemoryFormatError(f"{manifest_path}: field 'files' or 'count' is missing; "
                                    "the manifest was modified or corrupted." + _REBUILD)
        return manifest

    @classmethod
    def load(cls, folder: str | os.PathLike[str], encoder: TextEncoder | None = None, *,
             use_faiss: bool = False, prefilter: bool | str = "auto", check_encoder: bool = True
             ) -> InstructionMemory:
        """Load a memory written by :meth:`save`, verifying every file and the encoder.

        With ``encoder=None`` the encoder named in the manifest is created
        (:class:`~.encoder.SentenceEncoder`); either way its identity (dim,
        weights and config hashes) must match the saved one. Nothing is
        unpickled: the embeddings are safetensors, the texts JSON Lines.

        Raises:
            MemoryFormatError: missing/unknown manifest, a missing file, a sha256
                mismatch (modified or corrupted file) or inconsistent contents.
            EncoderMismatchError: the encoder differs from the one that built the memory.
        """
        import safetensors.torch

        folder = Path(folder)
        manifest_path = folder / MANIFEST_NAME
        manifest = cls.read_manifest(folder)
        dtype_name = manifest.get("dtype")
        if dtype_name not in _DTYPES:
            raise MemoryFormatError(f"{manifest_path}: unknown dtype {dtype_name!r}." + _REBUILD)
        blobs: dict[str, bytes] = {}
        for name, info in manifest["files"].items():
            if Path(name).name != name or not isinstance(info, dict):
                raise MemoryFormatError(f"{manifest_path}: file entry {name!r} is not a plain name with its sha256." + _REBUILD)
            try:
                data = (folder / name).read_bytes()
            except OSError as exc:
                raise MemoryFormatError(f"{folder / name}: listed in the manifest but unreadable ({exc}). "
                                        "Fix: restore the folder from a backup or rebuild the memory") from exc
            digest = hashlib.sha256(data).hexdigest()
            if digest != info.get("sha256"):
                raise MemoryFormatError(
                    f"{folder / name}: sha256 {digest[:16]}... does not match the manifest "
                    f"({str(info.get('sha256'))[:16]}...); the file was modified or corrupted. "
                    "Fix: restore it from a backup or rebuild the memory"
                )
            blobs[info.get("role")] = data
        if set(blobs) != {"embeddings", "records"} or len(manifest["files"]) != 2:
            raise MemoryFormatError(f"{manifest_path}: expected an embeddings and a records file, got {sorted(map(str, blobs))}." + _REBUILD)
        try:
            tensors = safetensors.torch.load(blobs["embeddings"])
        except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError)
            raise MemoryFormatError(f"{folder}: the embeddings file is not a safetensors file ({exc}); "
                                    "only safetensors is read (never pickle)." + _REBUILD) from exc
        try:
            records = [json.loads(line) for line in blobs["records"].decode("utf-8").splitlines() if line.strip()]
        except (ValueError, UnicodeDecodeError) as exc:
            raise MemoryFormatError(f"{folder}: the records file is not UTF-8 JSON Lines ({exc})." + _REBUILD) from exc
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("metadata", {}), (dict, type(None)))
                   for r in records):
            raise MemoryFormatError(f"{folder}: a record is not {{'id', 'text', 'metadata'}}." + _REBUILD)
        emb, ids = tensors.get("embeddings"), tensors.get("ids")
        count, dim = manifest.get("count"), manifest.get("dim")
        if (emb is None or ids is None or emb.dim() != 2 or emb.shape[0] != count or ids.shape != (count,)
                or (count and emb.shape[1] != dim) or emb.dtype != _DTYPES[dtype_name] or len(records) != count
                or ids.dtype != torch.long):
            raise MemoryFormatError(f"{folder}: data files disagree with the manifest (count/dim/dtype)." + _REBUILD)
        if [r.get("id") for r in records] != ids.tolist():
            raise MemoryFormatError(f"{folder}: records and embeddings list different ids." + _REBUILD)
        saved_identity = manifest.get("encoder")
        if encoder is None and saved_identity is not None:
            from .encoder import SentenceEncoder

            try:
                encoder = SentenceEncoder(saved_identity.get("name"))
            except PluginError as exc:
                raise EncoderMismatchError(
                    f"{folder}: the memory was built with encoder {saved_identity.get('name')!r}, which cannot be "
                    f"loaded here ({exc}). Fix: pass encoder=SentenceEncoder(<local folder of that model>)"
                ) from exc
        if check_encoder and saved_identity is not None and encoder is not None:
            problems = _identity_mismatch(saved_identity, encoder.identity)
            if problems:
                raise EncoderMismatchError(
                    f"{folder}: built with encoder {saved_identity.get('name')!r}, but the given encoder "
                    f"{encoder.identity.get('name')!r} differs ({'; '.join(problems)}). Its embeddings would not be "
                    "comparable. Fix: load with the original encoder, or rebuild the memory with this one"
                )
        memory = cls(encoder, dtype=_DTYPES[dtype_name], use_faiss=use_faiss, prefilter=prefilter)
        memory._dim = int(dim) if dim is not None else memory._dim
        memory._emb = emb.contiguous()
        memory._count = int(count)
        memory._texts = [str(r["text"]) for r in records]
        memory._meta = [dict(r.get("metadata") or {}) for r in records]
        memory._ids = ids.tolist()
        memory._row = {item_id: r for r, item_id in enumerate(memory._ids)}
        next_id = manifest.get("next_id", 0)
        memory._next_id = max(next_id if isinstance(next_id, int) else 0, max(memory._ids, default=-1) + 1)
        memory.info = dict(manifest.get("info") or {})
        memory._rebuild_indexes()
        return memory
