"""Calibrating the retrieval gate: the threshold that best tells "the edited fact is in the memory" from "it is not".

The gate (:mod:`.gate`) opens when the spread of a query's top-k scores exceeds a
threshold. Which threshold is right depends on the encoder, the score, the std
form, padding and on how crowded the memory is (same-relation facts crowd the
top-k and shrink the spread), so the paper's 0.1 is not portable. Calibration
measures the spread for held-out *positive* queries (questions about facts that
ARE in the memory: their prompts and rephrases) and *negative* queries (questions
about facts that are NOT: locality prompts, or requests held out of the memory)
and picks the threshold maximising F1 of "gate open" vs "fact in memory"::

    result = calibrate_memory(memory, positives, negatives, StdGate.from_options(score="cosine"))
    result.threshold, result.precision, result.recall, result.f1
    store_calibration("mem/", result)      # into the manifest's "gate", crash-safe

Candidate thresholds are every midpoint between consecutive distinct spreads
(plus one below the smallest), so the chosen one is the exact F1 maximum on the
given queries; among equal F1 the largest threshold (fewest false opens) wins.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import RequestError
from .gate import StdGate

__all__ = ["CalibrationResult", "GateMetrics", "best_threshold", "calibrate_memory", "gate_metrics",
           "queries_from_requests", "query_spreads", "read_queries", "store_calibration"]

LOG = logging.getLogger(__name__)
_FIX_QUERIES = ("Fix: give questions about facts that ARE in the memory (positives: their prompts/rephrases) and "
                "questions about facts that are NOT (negatives: locality prompts or held-out requests)")


@dataclass(frozen=True)
class GateMetrics:
    """How a threshold separates positives (fact in memory) from negatives: opens = predicted positive."""

    threshold: float
    precision: float
    recall: float
    f1: float
    true_pos: int
    false_pos: int
    false_neg: int
    true_neg: int


@dataclass(frozen=True)
class CalibrationResult:
    """The calibrated gate (``threshold`` and options), its figures and those of the threshold it replaces."""

    threshold: float
    score: str
    std: str
    pad: str | float
    top_k: int
    positives: int
    negatives: int
    metrics: GateMetrics
    baseline: GateMetrics | None = None

    @property
    def precision(self) -> float:
        return self.metrics.precision

    @property
    def recall(self) -> float:
        return self.metrics.recall

    @property
    def f1(self) -> float:
        return self.metrics.f1

    def to_manifest(self) -> dict[str, Any]:
        """What the memory's manifest stores under ``gate``."""
        out = {"threshold": self.threshold, "score": self.score, "std": self.std, "pad": self.pad,
               "top_k": self.top_k, "positives": self.positives, "negatives": self.negatives,
               "precision": self.metrics.precision, "recall": self.metrics.recall, "f1": self.metrics.f1}
        if self.baseline is not None:
            out["baseline"] = asdict(self.baseline)
        return out

    def table(self) -> str:
        """A markdown table: the baseline threshold (if any) and the calibrated one."""
        rows = [("given", self.baseline)] if self.baseline is not None else []
        rows.append(("calibrated", self.metrics))
        lines = ["| threshold | value | precision | recall | F1 | TP | FP | FN | TN |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in rows:
            lines.append(f"| {name} | {m.threshold:.4f} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | "
                         f"{m.true_pos} | {m.false_pos} | {m.false_neg} | {m.true_neg} |")
        return "\n".join(lines)


def _as_array(values: Sequence[float] | np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    arr = np.asarray(values.tolist() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise RequestError(f"{what}: contains NaN or infinite spreads. {_FIX_QUERIES}")
    return arr


def gate_metrics(positive_spreads: Sequence[float], negative_spreads: Sequence[float],
                 threshold: float) -> GateMetrics:
    """Precision/recall/F1 of "spread > threshold" as the prediction "fact in memory"."""
    pos, neg = _as_array(positive_spreads, "positives"), _as_array(negative_spreads, "negatives")
    tp, fp = int((pos > threshold).sum()), int((neg > threshold).sum())
    fn, tn = len(pos) - tp, len(neg) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return GateMetrics(float(threshold), precision, recall, f1, tp, fp, fn, tn)


def best_threshold(positive_spreads: Sequence[float], negative_spreads: Sequence[float]) -> GateMetrics:
    """The threshold with the highest F1 (ties: the largest threshold), with its figures.

    Raises:
        RequestError: no positives or no negatives.
    """
    pos, neg = _as_array(positive_spreads, "positives"), _as_array(negative_spreads, "negatives")
    if not len(pos):
        raise RequestError(f"positives: no queries; calibration needs facts that are in the memory. {_FIX_QUERIES}")
    if not len(neg):
        raise RequestError(f"negatives: no queries; calibration needs facts that are not in the memory. {_FIX_QUERIES}")
    values = np.unique(np.concatenate([pos, neg]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1]]])
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tp = len(pos) - np.searchsorted(pos_sorted, candidates, side="right")  # spread > threshold
    fp = len(neg) - np.searchsorted(neg_sorted, candidates, side="right")
    f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (len(pos) - tp)), 0.0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    return gate_metrics(pos, neg, float(candidates[best]))


def _queries(queries: Sequence[str] | torch.Tensor) -> list[str] | torch.Tensor:
    """Texts as a list, or query embeddings ``[q, dim]`` as they are."""
    return queries if isinstance(queries, torch.Tensor) else list(queries)


def query_spreads(memory: Any, queries: Sequence[str], gate: StdGate, batch_size: int = 256,
                  desc: str = "gate spreads") -> list[float]:
    """The gate statistic of ``gate`` for each query against ``memory`` (batched, tqdm progress)."""
    from tqdm.auto import tqdm

    queries = _queries(queries)
    out: list[float] = []
    with tqdm(total=len(queries), desc=desc, unit="query", disable=len(queries) <= batch_size, leave=False) as bar:
        for start in range(0, len(queries), batch_size):
            spreads, _ = memory.gate_spreads(queries[start:start + batch_size], gate)
            out.extend(spreads)
            bar.update(len(spreads))
    return out


def calibrate_memory(memory: Any, positives: Sequence[str], negatives: Sequence[str], gate: StdGate | None = None,
                     *, batch_size: int = 256) -> CalibrationResult:
    """Pick the F1-best threshold of ``gate``'s statistic (default options) for ``memory``.

    ``gate.threshold`` (if not None) is reported as the baseline the calibration replaces.

    Raises:
        RequestError: an empty memory, no positives or no negatives.
    """
    gate = gate or StdGate()
    if len(memory) == 0:
        raise RequestError("memory: is empty; there is nothing to calibrate the gate on. Fix: add the edits' "
                           "instructions to the memory (or point at the folder of a saved, non-empty memory)")
    positives, negatives = _queries(positives), _queries(negatives)
    if not len(positives) or not len(negatives):
        best_threshold([0.0] if positives else [], [0.0] if negatives else [])  # raises the clear error
    pos = query_spreads(memory, positives, gate, batch_size, "positives")
    neg = query_spreads(memory, negatives, gate, batch_size, "negatives")
    metrics = best_threshold(pos, neg)
    baseline = gate_metrics(pos, neg, gate.threshold) if gate.threshold is not None else None
    options = gate.options
    LOG.info("gate calibrated on %d positives / %d negatives: threshold %.4f (F1 %.3f)", len(pos), len(neg),
             metrics.threshold, metrics.f1)
    return CalibrationResult(threshold=metrics.threshold, score=options["score"], std=options["std"],
                             pad=options["pad"], top_k=options["top_k"], positives=len(pos), negatives=len(neg),
                             metrics=metrics, baseline=baseline)


def store_calibration(folder: str | os.PathLike[str], result: CalibrationResult, memory: Any = None) -> Path:
    """Write ``result`` into the saved memory at ``folder`` (manifest ``gate``), crash-safely.

    The folder is rewritten through the memory's own save (``core.durable.commit_folder``): killed at
    any moment it loads as before or with the new gate. ``memory`` (already loaded from ``folder``)
    avoids loading it again. Returns the manifest path.
    """
    from .store import InstructionMemory

    if memory is None:
        memory = InstructionMemory.load(folder)
    memory.gate_calibration = result.to_manifest()
    return memory.save(folder)


def read_queries(path: str | os.PathLike[str], what: str) -> list[str]:
    """Questions from a file: a JSON list of strings, JSON Lines of strings, or plain text (one per line).

    Raises:
        RequestError: a missing or unreadable file, or an item that is not a non-empty string (naming ``what``).
    """
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RequestError(f"{what}: cannot read {path} ({exc.strerror or exc}). Fix: give an existing file of "
                           "questions (a JSON list of strings, JSON Lines or one question per line)") from exc
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise RequestError(f"{what}: {path} is not valid JSON ({exc}). Fix: write a JSON list of strings") from exc
    elif path.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not all(isinstance(q, str) and q.strip() for q in items):
        raise RequestError(f"{what}: {path} must hold a list of non-empty strings. Fix: write one question per "
                           "item (use --requests for edit-request files)")
    return items


def queries_from_requests(requests: Sequence[dict[str, Any]], *, in_memory: bool) -> tuple[list[str], list[str]]:
    """``(positives, negatives)`` from edit requests.

    For requests whose facts ARE in the memory (``in_memory``): their prompts and rephrases are
    positives, their locality prompts negatives. For held-out requests (not in the memory): their
    prompts and rephrases are negatives.
    """
    from ..templates import request_prompts

    positives, negatives = [], []
    for request in requests:
        own = request_prompts({"prompt": request.get("prompt"), "rephrase_prompt": request.get("rephrase_prompt")})
        if in_memory:
            positives += own
            negatives += [p for p in request_prompts({"locality": request.get("locality")}) if p not in own]
        else:
            negatives += own
    return positives, negatives
