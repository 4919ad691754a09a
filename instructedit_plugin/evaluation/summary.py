"""Reliability / Generalisation / Locality / Portability, plus Score and H, from EasyEdit metrics.

EasyEdit returns one dict per edit: ``{"pre": {...}, "post": {"rewrite_acc": [..],
"rephrase_acc": [..], "locality": {"<key>_acc": [..]}, "portability": {"<key>_acc": [..]}},
...}``. The flavours differ in extra keys (PyPI: ``time``; main: ``metric_meta``) and in
whether values are scalars, lists or numpy numbers; this module reads all of them.
InstructEd reports Score = mean(Rel, Gen, Loc, Por) and the harmonic mean H, which
punishes a method that buys one metric with another.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

METRIC_NAMES: tuple[str, ...] = ("Rel", "Gen", "Loc", "Por")


def _values(raw: Any) -> list[float]:
    """Flatten a metric value (scalar, list, nested list, numpy) to finite floats."""
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        return []
    if isinstance(raw, (list, tuple)):
        out: list[float] = []
        for item in raw:
            out.extend(_values(item))
        return out
    try:
        value = float(raw)
    except (TypeError, ValueError):
        if hasattr(raw, "tolist"):
            return _values(raw.tolist())
        return []
    return [value] if math.isfinite(value) else []


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_acc(group: Any) -> list[float]:
    """Mean accuracy of each ``*_acc`` entry in a locality/portability dict."""
    if not isinstance(group, Mapping):
        return []
    per_key = [_mean(_values(v)) for k, v in group.items() if str(k).endswith("_acc")]
    return [v for v in per_key if v is not None]


def edit_metrics(post: Mapping[str, Any]) -> dict[str, float | None]:
    """Rel/Gen/Loc/Por in [0, 1] for one edit's ``post`` dict (None where not measured)."""
    return {
        "Rel": _mean(_values(post.get("rewrite_acc"))),
        "Gen": _mean(_values(post.get("rephrase_acc"))),
        "Loc": _mean(_group_acc(post.get("locality"))),
        "Por": _mean(_group_acc(post.get("portability"))),
    }


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any is 0; NaN-free (empty -> 0)."""
    vals = [max(0.0, float(v)) for v in values]
    if not vals or any(v == 0.0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def score(values: Iterable[float]) -> float:
    """Arithmetic mean (InstructEd's Score); empty -> 0."""
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else 0.0


def summarize_metrics(all_metrics: Sequence[Mapping[str, Any]], phase: str = "post", percent: bool = True) -> dict[str, Any]:
    """Average Rel/Gen/Loc/Por over edits and add Score and H.

    Metrics that no edit measured are reported as ``None`` and left out of Score
    and H. ``percent`` scales to 0–100 as the papers report.
    """
    scale = 100.0 if percent else 1.0
    columns: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for record in all_metrics:
        for name, value in edit_metrics(record.get(phase, {}) or {}).items():
            if value is not None:
                columns[name].append(value)
    summary: dict[str, Any] = {name: (_mean(vals) * scale if vals else None) for name, vals in columns.items()}
    measured = [v for v in summary.values() if v is not None]
    summary["Score"] = score(measured)
    summary["H"] = harmonic_mean(measured)
    summary["n_edits"] = len(all_metrics)
    return summary
