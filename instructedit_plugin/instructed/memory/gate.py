"""InstructEd's retrieval gate: use the top-1 instruction only when the top-k scores are spread out.

The gate follows the paper: take the ``top_k`` (5) highest cosine scores of the
query against the memory; when their standard deviation **exceeds** the
threshold (``retrieval_gate``, 0.1) the top-1 instruction is used, else none
(the model answers unedited). It is a threshold on the *spread* of the top-k
scores, not on any score itself: a relevant instruction stands out from its
neighbours (large spread); for an unrelated query the best scores are all
similarly low (small spread).

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
  when its score exceeds ``threshold * top_k / sqrt(top_k - 1)`` (0.25 for the
  defaults) instead of never (the spread of one score is 0). ``pad_score=None``
  uses only the available scores (and one stored item is then never selected).
* ``threshold=None`` disables gating (always the top-1).

Options (named as in the editing hparams ``gate_score`` / ``gate_std`` / ``gate_pad``;
the defaults are the behaviour above):

* ``score``: ``"cosine"`` (default) or ``"dot"``: the scores whose spread is
  measured. ``"dot"`` is the encoder's raw dot product (the public release's
  contriever scoring): cosine times the norms of the query's and the stored
  instruction's *unnormalised* embeddings (the memory keeps those norms). The
  candidates are re-ranked by dot product, so the top-1 can differ too. With an
  encoder that normalises its own output (the default all-MiniLM-L6-v2 ends in a
  ``Normalize`` module) every norm is 1 and ``"dot"`` equals ``"cosine"``.
* ``std``: ``"population"`` (default, ``unbiased=False``) or ``"sample"``.
* ``pad``: ``"zero"`` (default, ``pad_score=0.0``) or ``"none"`` (``pad_score=None``).

:class:`StdGate` holds these settings (:meth:`StdGate.from_options` builds one
from the option names); the memory's ``select`` / ``select_many`` take one (or
build one from their arguments). New options of the statistic belong here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import RequestError

__all__ = ["CALIBRATED", "DEFAULT_GATE", "DEFAULT_TOP_K", "GATE_PADS", "GATE_SCORES", "GATE_STDS", "StdGate", "gate_for_memory", "gate_spread"]

#: Default gate threshold (``retrieval_gate``): the std of the top-k scores must exceed it for the gate to open.
DEFAULT_GATE = 0.1
#: Default number of best scores whose std the gate measures.
DEFAULT_TOP_K = 5
#: Choices of the gate options (first = default).
GATE_SCORES = ("cosine", "dot")
GATE_STDS = ("population", "sample")
GATE_PADS = ("zero", "none")


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


@dataclass(frozen=True)
class StdGate:
    """The std-of-top-k gate: opens when :func:`gate_spread` of the top scores exceeds ``threshold``.

    ``threshold=None`` always opens. See the module docs for ``score``, ``pad_score`` and ``unbiased``.
    """

    threshold: float | None = DEFAULT_GATE
    top_k: int = DEFAULT_TOP_K
    pad_score: float | None = 0.0
    unbiased: bool = False
    score: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RequestError(f"top_k: expected a positive int, got {self.top_k!r}")
        if self.score not in GATE_SCORES:
            raise RequestError(f"gate_score: expected one of {list(GATE_SCORES)}, got {self.score!r}. "
                               "Fix: use 'cosine' (default) or 'dot'")

    @classmethod
    def from_options(cls, threshold: float | None = DEFAULT_GATE, top_k: int = DEFAULT_TOP_K, *,
                     score: str = "cosine", std: str = "population", pad: str = "zero") -> StdGate:
        """A gate from the option names used in hparams and manifests (see the module docs)."""
        if std not in GATE_STDS:
            raise RequestError(f"gate_std: expected one of {list(GATE_STDS)}, got {std!r}. "
                               "Fix: use 'population' (default) or 'sample' (the public release's torch.std)")
        if pad not in GATE_PADS:
            raise RequestError(f"gate_pad: expected one of {list(GATE_PADS)}, got {pad!r}. "
                               "Fix: use 'zero' (default: missing top-k entries score 0) or 'none'")
        return cls(threshold, top_k, 0.0 if pad == "zero" else None, std == "sample", score)

    @property
    def options(self) -> dict[str, object]:
        """``score`` / ``std`` / ``pad`` / ``top_k`` as option names (what a manifest records)."""
        pad = "zero" if self.pad_score == 0.0 else "none" if self.pad_score is None else float(self.pad_score)
        return {"score": self.score, "std": "sample" if self.unbiased else "population", "pad": pad,
                "top_k": self.top_k}

    def spread(self, top_scores: torch.Tensor) -> float:
        """The statistic for one query's best scores ``[m]`` (m <= ``top_k``, best first)."""
        return float(gate_spread(top_scores, self.top_k, self.pad_score, self.unbiased))

    def opens(self, spread: float) -> bool:
        """Whether a query with this ``spread`` gets its top-1 instruction."""
        return self.threshold is None or spread > self.threshold


#: ``retrieval_gate`` value that means "the threshold calibrated for the memory" (see :func:`gate_for_memory`).
CALIBRATED = "calibrated"


def gate_for_memory(memory: Any, threshold: float | str | None = DEFAULT_GATE, top_k: int = DEFAULT_TOP_K, *,
                    score: str = "cosine", std: str = "population", pad: str = "zero") -> StdGate:
    """The gate to use with ``memory``: these options, with ``threshold="calibrated"`` replaced by
    the threshold stored in the memory's ``gate_calibration`` (its manifest's ``gate``).

    Raises:
        RequestError: ``"calibrated"`` but the memory was never calibrated, or its calibration was made
            for different options (a threshold fitted to one statistic means nothing for another).
    """
    gate = StdGate.from_options(None if threshold == CALIBRATED else threshold, top_k, score=score, std=std, pad=pad)
    if threshold != CALIBRATED:
        return gate
    stored = getattr(memory, "gate_calibration", None)
    if not isinstance(stored, dict) or not isinstance(stored.get("threshold"), (int, float)):
        raise RequestError("retrieval_gate: 'calibrated', but the instruction memory has no calibrated threshold. "
                           "Fix: run `instructedit calibrate-gate <memory folder> ...` and load that memory "
                           "(load_memory), or give retrieval_gate a number such as 0.1")
    wanted = gate.options
    for key, value in wanted.items():
        if stored.get(key, value) != value:
            field = "top_k" if key == "top_k" else f"gate_{key}"
            raise RequestError(f"{field}: the memory's gate was calibrated with {key}={stored.get(key)!r}, but the "
                               f"hparams ask for {value!r}. Fix: set {field}: {stored.get(key)!r}, or calibrate "
                               "again with these settings")
    return dataclasses.replace(gate, threshold=float(stored["threshold"]))
