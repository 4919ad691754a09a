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

:class:`StdGate` holds these settings; the memory's ``select`` / ``select_many``
build one from their arguments. New options of the statistic belong here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import RequestError

__all__ = ["DEFAULT_GATE", "DEFAULT_TOP_K", "StdGate", "gate_spread"]

#: Default gate threshold (``retrieval_gate``): the std of the top-k scores must exceed it for the gate to open.
DEFAULT_GATE = 0.1
#: Default number of best scores whose std the gate measures.
DEFAULT_TOP_K = 5


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

    ``threshold=None`` always opens. See the module docs for ``pad_score`` and ``unbiased``.
    """

    threshold: float | None = DEFAULT_GATE
    top_k: int = DEFAULT_TOP_K
    pad_score: float | None = 0.0
    unbiased: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RequestError(f"top_k: expected a positive int, got {self.top_k!r}")

    def spread(self, top_scores: torch.Tensor) -> float:
        """The statistic for one query's best scores ``[m]`` (m <= ``top_k``, best first)."""
        return float(gate_spread(top_scores, self.top_k, self.pad_score, self.unbiased))

    def opens(self, spread: float) -> bool:
        """Whether a query with this ``spread`` gets its top-1 instruction."""
        return self.threshold is None or spread > self.threshold
