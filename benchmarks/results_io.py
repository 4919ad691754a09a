"""What the benchmark scripts share about their committed results (``benchmarks/results/``).

Every ``benchmarks/results/<name>.json`` is the single source of its ``<name>.md``: the script that
runs the benchmark writes the JSON, and its ``render_markdown(out)`` builds the markdown from that
JSON alone (``--render`` rebuilds it without running anything). Prose about a run ("what these
numbers mean") lives in a committed notes file, ``benchmarks/notes/<name>.md``; ``--notes FILE``
copies its text into the JSON (``"notes"``), and the markdown shows it last. A later run that
replaces part of a result (e.g. ``instructed_cpu.py --latency_only``) appends an entry to
``"merged_runs"``: the command, the keys it replaced (dotted paths) and the date; the markdown
lists those entries. ``tests/test_benchmark_results.py`` re-renders every committed markdown and
compares it byte for byte, and checks that each JSON holds only keys its script writes
(``RESULT_KEYS`` of the script).

Nothing here imports torch or a model at import time: rendering is cheap. Files are written
through :mod:`instructedit_plugin.core.durable` (imported when writing), so an interrupted run leaves
the previous result in place.

Every interval in a result is a 95% percentile bootstrap over records (:func:`bootstrap_ci`,
:func:`mean_with_ci`, :func:`figures_with_ci`: records resampled with replacement, seeded, the 2.5th
and 97.5th percentiles of the resampled statistic) unless the script names another (Wilson).
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
NOTES_DIR = ROOT / "benchmarks" / "notes"
#: The editing figures of a quality row: EasyEdit's four per-edit metrics, their mean (Score) and harmonic mean (H).
EDIT_METRICS = ("Rel", "Gen", "Loc", "Por", "Score", "H")


def today() -> str:
    """The date a run finished, as the JSON records it (UTC, ``YYYY-MM-DD``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def command_line(script: str, argv: Iterable[str] | None = None) -> str:
    """``python <script> <arguments>`` as it was called (``argv`` of ``main``, else ``sys.argv``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", script, *args])


def read_notes(path: str | Path) -> str:
    """A notes file's markdown, stripped, with one final newline ('' for an empty file)."""
    text = Path(path).read_text(encoding="utf-8").strip()
    return text + "\n" if text else ""


def rendered_from(script: str, result_file: str, render_options: str = "") -> str:
    """How a markdown names the JSON it is built from and the command that rebuilds it:
    ``rendered from `<result_file>` (`python <script> --render<render_options>`)``."""
    return f"rendered from `{result_file}` (`python {script} --render{render_options}`)"


def produced_by(script: str, result_file: str) -> str:
    """A markdown's opening provenance sentence: ``Produced by `<script>`; rendered from ... (...).``"""
    return f"Produced by `{script}`; {rendered_from(script, result_file)}."


def notes_lines(out: Mapping[str, Any]) -> list[str]:
    """The run's notes (from ``--notes``), preceded by an empty line; none without notes."""
    notes = (out.get("notes") or "").strip()
    return ["", notes] if notes else []


def merged_paths(out: Mapping[str, Any]) -> list[str]:
    """Every dotted key path that a merged run replaced."""
    return [key for run in out.get("merged_runs") or [] for key in run.get("keys", [])]


def merged_into(out: Mapping[str, Any], prefix: str) -> bool:
    """Whether a merged run replaced ``prefix`` or a key below it."""
    return any(key == prefix or key.startswith(prefix + ".") or prefix.startswith(key + ".")
               for key in merged_paths(out))


def merged_runs_lines(out: Mapping[str, Any], bullet: str = "*") -> list[str]:
    """A '## Merged into this file' section for ``out["merged_runs"]`` (nothing without entries)."""
    runs = out.get("merged_runs") or []
    if not runs:
        return []
    lines = ["", "## Merged into this file", "",
             "These keys of the JSON come from somewhere else than the run of this script described above; each "
             "entry names the command that produced them:", ""]
    for run in runs:
        keys = ", ".join(f"`{k}`" for k in run.get("keys", []))
        lines.append(f"{bullet} `{run['command']}` ({run.get('date') or 'date not recorded'}): {keys}."
                     + (f" {run['note'].strip()}" if run.get("note") else ""))
    return lines


def merged_run(command: str, keys: Iterable[str], note: str | None = None, date: str | None = None) -> dict[str, Any]:
    """A ``merged_runs`` entry."""
    entry: dict[str, Any] = {"command": command, "keys": list(keys), "date": date or today()}
    if note:
        entry["note"] = note
    return entry


def unknown_keys(out: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """Top-level keys of ``out`` that its script never writes."""
    return sorted(set(out) - set(allowed))


def dump_json(out: Mapping[str, Any]) -> str:
    return json.dumps(out, indent=2, ensure_ascii=False, default=str) + "\n"


def write_results(out_path: str | Path, out: dict[str, Any], render: Callable[[Mapping[str, Any]], str],
                  allowed: Iterable[str], notes: str | None = None) -> Path:
    """Write ``<out>.json`` and, rendered from it, ``<out>.md`` (each crash-safely, through
    :mod:`instructedit_plugin.core.durable`); returns the markdown's path. Non-empty ``notes`` (the text
    of ``--notes``) become ``out["notes"]`` first."""
    if notes:
        out["notes"] = notes
    extra = unknown_keys(out, allowed)
    if extra:
        raise ValueError(f"{out_path}: keys this script does not write: {', '.join(extra)}")
    from instructedit_plugin.core.durable import atomic_write_text

    out_path = Path(out_path)
    text = dump_json(out)
    markdown = render(json.loads(text))  # rendered from the JSON text alone, before either file changes
    atomic_write_text(out_path, text)
    md_path = out_path.with_suffix(".md")
    atomic_write_text(md_path, markdown)
    return md_path


def render_saved(out_path: str | Path, render: Callable[[Mapping[str, Any]], str], allowed: Iterable[str],
                 notes: str | Path | None = None) -> Path:
    """``--render``: rebuild ``<out>.md`` from ``<out>.json`` alone; with ``notes``, first replace the
    JSON's notes with that file's text."""
    out_path = Path(out_path)
    out = json.loads(out_path.read_text(encoding="utf-8"))
    if notes is not None:
        out["notes"] = read_notes(notes)
        if not out["notes"]:
            out.pop("notes")
    return write_results(out_path, out, render, allowed)


def setup_logging() -> None:
    """INFO logging for a benchmark script, with EasyEdit's and the model libraries' chatter kept to warnings."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("easyeditor", "transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------
# 95% percentile-bootstrap intervals over records (the one definition every benchmark uses)
# ----------------------------------------------------------------------------------------------
#: the confidence level of every interval in ``benchmarks/results/``
CONFIDENCE = 0.95
#: resamples when a script does not say
DEFAULT_RESAMPLES = 2000


def _check_resamples(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of bootstrap resamples, got {n_boot!r}. "
                         f"Fix: pass e.g. n_boot={DEFAULT_RESAMPLES}")
    return n_boot


def bootstrap_resamples(n_records: int, n_boot: int, seed: int):
    """``n_boot`` resamples of ``n_records`` records with replacement: an ``(n_boot, n_records)`` index array
    drawn from ``numpy.random.default_rng(seed)`` (the same seed, the same resamples)."""
    import numpy as np

    if n_records < 1:
        raise ValueError("records: a bootstrap interval needs at least one record, got none. "
                         "Fix: leave the figure without an interval when nothing was measured")
    return np.random.default_rng(seed).integers(0, n_records, size=(_check_resamples(n_boot), n_records))


def percentile_interval(draws) -> tuple[float, float]:
    """The central ``CONFIDENCE`` interval of bootstrap draws: their 2.5th and 97.5th percentiles (numpy's
    default linear interpolation)."""
    import numpy as np

    alpha = (1.0 - CONFIDENCE) / 2.0
    lo, hi = np.quantile(np.asarray(draws, dtype=float), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _finite_values(values: Iterable[Any], name: str = "values") -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] is {v!r}, not a number. Fix: drop records whose figure was not "
                             "measured (None) before computing its interval") from None
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError(f"{name}[{i}] is {x}, not a finite number. Fix: drop or repair that record's value")
        out.append(x)
    if not out:
        raise ValueError(f"{name}: a bootstrap interval needs at least one value, got none. "
                         "Fix: leave the figure without an interval when nothing was measured")
    return out


def bootstrap_ci(values: Iterable[float], n_boot: int = DEFAULT_RESAMPLES, seed: int = 0,
                 statistic: Callable[[Any], float] | None = None) -> tuple[float, float]:
    """95% percentile-bootstrap interval ``(low, high)`` of the mean (or ``statistic``, a function of a 1-D
    numpy array) of ``values``, one value per record: ``n_boot`` resamples of the records with replacement
    (:func:`bootstrap_resamples`), the statistic of each, their 2.5th and 97.5th percentiles. Values that
    all agree give ``(value, value)``. Raises ``ValueError`` for no values, a None/NaN/non-number value
    or ``n_boot < 1``."""
    import numpy as np

    x = np.asarray(_finite_values(values), dtype=float)
    idx = bootstrap_resamples(len(x), n_boot, seed)
    if np.all(x == x[0]):
        point = float(x[0]) if statistic is None else float(statistic(x))
        return point, point
    if statistic is None:
        draws = x[idx].mean(axis=1)
    else:
        draws = [float(statistic(x[row])) for row in idx]
    return percentile_interval(draws)


def mean_with_ci(values: Iterable[float], n_boot: int = DEFAULT_RESAMPLES, seed: int = 0,
                 digits: int | None = None, scale: float = 1.0) -> list[float]:
    """``[mean, low, high]`` of per-record ``values`` times ``scale`` with its :func:`bootstrap_ci`
    (rounded to ``digits`` when given)."""
    vals = [scale * v for v in _finite_values(values)]
    mean = math.fsum(vals) / len(vals)
    lo, hi = bootstrap_ci(vals, n_boot, seed)
    out = [mean, lo, hi]
    return [round(v, digits) for v in out] if digits is not None else out


def figures_with_ci(records: Sequence[Any], figures: Callable[[Sequence[Any]], Mapping[str, float | None]],
                    n_boot: int = DEFAULT_RESAMPLES, seed: int = 0,
                    digits: int | None = None) -> dict[str, list[float] | None]:
    """``{name: [value, low, high]}``: each figure of ``figures(records)`` (a function of a list of records,
    e.g. metric means and their Score) with the 95% percentile interval of the same figure over
    :func:`bootstrap_resamples` of the records (every figure recomputed on the same resamples); a figure
    that is None on all records stays None. Same definition as :func:`bootstrap_ci` (which it equals for
    ``figures = mean``)."""
    records = list(records)
    point = dict(figures(records))
    draws: dict[str, list[float]] = {k: [] for k in point}
    for row in bootstrap_resamples(len(records), n_boot, seed):
        for k, v in figures([records[i] for i in row]).items():
            if v is not None and k in draws:
                draws[k].append(float(v))
    out: dict[str, list[float] | None] = {}
    for k, value in point.items():
        if value is None:
            out[k] = None
            continue
        d = draws[k]
        lo, hi = (value, value) if not d or all(x == d[0] for x in d) else percentile_interval(d)
        out[k] = [float(value), lo, hi] if digits is None else [round(float(value), digits), round(lo, digits),
                                                                round(hi, digits)]
    return out


# ----------------------------------------------------------------------------------------------
# Editing figures and query-cost ratios with their intervals (shared by the InstructEd benchmarks)
# ----------------------------------------------------------------------------------------------
def record_values(metrics: list[dict]) -> list[dict[str, float | None]]:
    """Rel/Gen/Loc/Por in [0, 1] of each edit (EasyEdit's per-edit metrics), None where not measured."""
    from instructedit_plugin.evaluation.summary import edit_metrics

    return [edit_metrics(m.get("post", {}) or {}, m.get("pre")) for m in metrics]


def edit_figures(rows: Sequence[Mapping[str, float | None]], summation: Callable[[list[float]], float] = sum,
                 required: Iterable[str] = (), scale: float = 100.0) -> dict[str, float | None]:
    """``{metric: value}`` of :data:`EDIT_METRICS` over per-record values in [0, 1] (:func:`record_values`): the mean
    of each measured metric times ``scale`` (100: percent; 1: as the records hold them), Score and H of those means.

    ``summation`` adds a metric's values: ``sum`` (left to right, what the InstructEd benchmarks' committed results
    were written with) or ``math.fsum`` (correctly rounded, ``benchmarks/memory_editors.py``'s); the two can differ
    in the last bit, which can move a figure rounded to two decimals at a rounding boundary. ``required``: metrics
    without whose mean Score and H are None (a bootstrap resample that misses a metric the records measure, e.g. a
    portability question asked on few records, would otherwise give Score and H of fewer metrics: another figure)."""
    from instructedit_plugin.evaluation.summary import harmonic_mean, score

    out: dict[str, float | None] = {}
    for k in EDIT_METRICS[:4]:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = scale * summation(vals) / len(vals) if vals else None
    measured = [out[k] for k in EDIT_METRICS[:4] if out[k] is not None]
    if any(out[k] is None for k in required):
        out["Score"] = out["H"] = None
    else:
        out["Score"], out["H"] = score(measured), harmonic_mean(measured)
    return out


def summarize_with_intervals(rows: Sequence[Mapping[str, float | None]], resamples: int, seed: int = 0,
                             summation: Callable[[list[float]], float] = sum) -> dict:
    """``{metric: [value, low, high]}`` in %: the mean over records and its 95% percentile-bootstrap interval
    (:func:`figures_with_ci`: Score and H recomputed on each resample; ``summation`` as in :func:`edit_figures`)."""
    figures = functools.partial(edit_figures, summation=summation)
    if not rows:
        point = figures(rows)
        return {k: None if point[k] is None else [round(point[k], 2)] * 3 for k in EDIT_METRICS}
    return figures_with_ci(rows, figures, resamples, seed, digits=2)


def ratio_interval(base: list[float], edited: list[float], resamples: int, seed: int = 0) -> list[float]:
    """``[median(edited) / median(base), low, high]``: the query-cost ratio and its 95% bootstrap interval
    (the timed inputs resampled in pairs, :func:`figures_with_ci`)."""
    def ratio(pairs):
        return {"ratio": statistics.median(e for _, e in pairs) / statistics.median(b for b, _ in pairs)}

    return figures_with_ci(list(zip(base, edited)), ratio, resamples, seed, digits=3)["ratio"]
