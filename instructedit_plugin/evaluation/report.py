"""Results as JSON, a readable markdown table, and a PNG bar chart.

Every file is written crash-safely through :mod:`instructedit_plugin.core.durable`, and
:func:`write_report` renders all of a report (table and chart) before it writes the first file, so
a failure while rendering leaves the previous report untouched, and an interrupted write leaves
each file either whole and old or whole and new.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.durable import atomic_write_bytes, dumps_json

TABLE_COLUMNS: tuple[str, ...] = ("Rel", "Gen", "Loc", "Por", "Score", "H")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS,
                   first: str = "method") -> str:
    """One row per key of ``rows`` (e.g. method name), one column per metric."""
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def bar_chart_png(rows: Mapping[str, Mapping[str, Any]], title: str = "",
                  columns: Sequence[str] = TABLE_COLUMNS) -> bytes:
    """Grouped bars: metrics on the x axis, one bar per row (method); the PNG's bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2, 4))
    for i, name in enumerate(names):
        values = [float(rows[name].get(c) or 0.0) for c in columns]
        ax.bar([x + i * width for x in range(len(columns))], values, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(columns))])
    ax.set_xticklabels(columns)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    if title:
        ax.set_title(title)
    # below the axes, so that no bar is hidden behind it
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(names), 4), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def bar_chart(rows: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = "",
              columns: Sequence[str] = TABLE_COLUMNS) -> Path:
    """:func:`bar_chart_png` written atomically to ``path``."""
    path = Path(path)
    atomic_write_bytes(path, bar_chart_png(rows, title=title, columns=columns))
    return path


def write_report(folder: str | os.PathLike, name: str, payload: Mapping[str, Any],
                 rows: Mapping[str, Mapping[str, Any]] | None = None, title: str = "") -> dict[str, Path]:
    """``<name>.json`` (payload), ``<name>.md`` and ``<name>.png`` (when ``rows`` is given)."""
    folder = Path(folder)
    contents = {"json": dumps_json(payload).encode("utf-8")}
    if rows:
        contents["md"] = ((f"# {title}\n\n" if title else "") + markdown_table(rows)).encode("utf-8")
        contents["png"] = bar_chart_png(rows, title=title)
    written = {}
    for kind, data in contents.items():
        written[kind] = folder / f"{name}.{kind}"
        atomic_write_bytes(written[kind], data)
    return written
