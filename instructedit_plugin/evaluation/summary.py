"""Reliability / Generalisation / Locality / Portability, plus Score and H, from EasyEdit metrics.

EasyEdit returns one dict per edit: ``{"pre": {...}, "post": {"rewrite_acc": [..],
"rephrase_acc": [..], "locality": {"<key>_acc": [..]}, "portability": {"<key>_acc": [..]}},
...}``. The flavours differ in extra keys (PyPI: ``time``; main: ``metric_meta``) and in
whether values are scalars, lists or numpy numbers; this module reads all of them.
PyPI's ``batch_edit`` never turns locality into ``*_acc``: it leaves the token ids of
the post-edit answers in ``post["locality"]["<key>_output"]`` and those of the unedited
model in ``pre``; Loc is then their agreement, as ``edit`` computes it.
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


def _fmean(values: Sequence[float]) -> float:
    """Mean of a non-empty list, independent of its order (``math.fsum`` is correctly rounded), free
    of overflow (terms are divided first when their sum would overflow) and of underflow (otherwise the
    sum is divided, so a mean of subnormal values is not rounded to 0)."""
    n = len(values)
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if math.isfinite(total):
        return total / n
    return math.fsum(v / n for v in values)


def _mean(values: Sequence[float]) -> float | None:
    return _fmean(values) if values else None


def _group_acc(group: Any) -> list[float]:
    """Mean accuracy of each ``*_acc`` entry in a locality/portability dict."""
    if not isinstance(group, Mapping):
        return []
    per_key = [_mean(_values(v)) for k, v in group.items() if str(k).endswith("_acc")]
    return [v for v in per_key if v is not None]


def _locality_from_outputs(post: Any, pre: Any) -> list[float]:
    """Agreement of post- and pre-edit answer tokens per ``<key>_output`` present in both."""
    if not isinstance(post, Mapping) or not isinstance(pre, Mapping):
        return []
    out = []
    for key, after in post.items():
        if not str(key).endswith("_output") or key not in pre:
            continue
        a, b = _values(after), _values(pre[key])
        if a and len(a) == len(b):
            out.append(sum(x == y for x, y in zip(a, b)) / len(a))
    return out


def edit_metrics(post: Mapping[str, Any], pre: Mapping[str, Any] | None = None) -> dict[str, float | None]:
    """Rel/Gen/Loc/Por in [0, 1] for one edit's ``post`` dict (None where not measured); ``pre``
    is only read for locality given as answer tokens (PyPI ``batch_edit``)."""
    loc = _group_acc(post.get("locality")) or _locality_from_outputs(post.get("locality"), (pre or {}).get("locality"))
    return {
        "Rel": _mean(_values(post.get("rewrite_acc"))),
        "Gen": _mean(_values(post.get("rephrase_acc"))),
        "Loc": _mean(loc),
        "Por": _mean(_group_acc(post.get("portability"))),
    }


def _clean(values: Iterable[Any]) -> list[float]:
    """The values Score and H are computed over: finite numbers (NaN/inf/non-numbers = not
    measured), negatives counted as 0 (a metric is a rate)."""
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out.append(max(0.0, x))
    return out


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean (InstructEd's H) of the finite values, negatives as 0; 0 if any is 0; empty -> 0.

    Never NaN, independent of the order of ``values`` and never above :func:`score` of the same values.
    """
    vals = _clean(values)
    if not vals or any(v == 0.0 for v in vals):
        return 0.0
    top = max(vals)  # HM(v) = top * HM(v / top): keeps 1/v finite for tiny values
    try:
        reciprocal = math.fsum(top / v for v in vals)
    except (OverflowError, ZeroDivisionError):  # a value below ~1e-308 of the largest: H is ~0
        return 0.0
    if not math.isfinite(reciprocal):
        return 0.0
    # HM <= AM holds exactly; the min only removes a last-bit rounding difference.
    return min(top * (len(vals) / reciprocal), _fmean(vals))


def score(values: Iterable[float]) -> float:
    """Arithmetic mean (InstructEd's Score) of the finite values, negatives as 0; empty -> 0.

    Never NaN and independent of the order of ``values`` (correctly rounded sum).
    """
    vals = _clean(values)
    return _fmean(vals) if vals else 0.0


def summarize_metrics(all_metrics: Sequence[Mapping[str, Any]], phase: str = "post", percent: bool = True) -> dict[str, Any]:
    """Average Rel/Gen/Loc/Por over edits and add Score and H.

    Metrics that no edit measured are reported as ``None`` and left out of Score
    and H. ``percent`` scales to 0–100 as the papers report.
    """
    scale = 100.0 if percent else 1.0
    columns: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for record in all_metrics:
        pre = record.get("pre") if phase == "post" else None
        for name, value in edit_metrics(record.get(phase, {}) or {}, pre).items():
            if value is not None:
                columns[name].append(value)
    summary: dict[str, Any] = {name: (_mean(vals) * scale if vals else None) for name, vals in columns.items()}
    measured = [v for v in summary.values() if v is not None]
    summary["Score"] = score(measured)
    summary["H"] = harmonic_mean(measured)
    summary["n_edits"] = len(all_metrics)
    return summary
