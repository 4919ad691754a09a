"""The small demo data set shipped inside the package, and where the demo finds its data.

``instructedit demo`` must run on a fresh clone with no dataset folder, so the package carries the
records it edits and evaluates and what its recipes train on (``instructedit_plugin/demo_data/``,
the same relative file names and formats as a full data folder, so every loader reads it):

==========================================  ==============================================  ========
packaged file                               cut from (``$INSTRUCTEDIT_DATA_DIR``/...)        records
==========================================  ==============================================  ========
``counterfact/counterfact-edit.json``       the same file (MEND-format CounterFact, MIT)    first 50
``zsre/ZsRE-test-all.json``                 the same file (KnowEdit ZsRE test, MIT)         first 50
``counterfact/counterfact-train.json``      the same file (MIT)                             200
``counterfact/train_cf.json``               the same file (KnowEdit WikiData-CF train, MIT) 200
==========================================  ==============================================  ========

Only files whose licence the data README states (MIT) are cut; the InstructEd release's
instruction files state none, so the demo builds its instructions from the facts
(:func:`~instructedit_plugin.instructed.templates.instruction_of`). The training records are the
first records of each training file, in file order, that share no case id, subject or question with
the first :data:`~instructedit_plugin.instructed.recipes.EVAL_LIMIT` records of the demo's evaluation
files, with at most :data:`MAX_GROUP_ITEMS` locality/portability items per category.
``SOURCES.md`` beside the files names the originals and their licences.

Regenerate (from a full data folder)::

    python -m instructedit_plugin.data.demo_set --source ../shared/data

Where the demo reads its data (:func:`locate_demo_data`): ``--data_dir``, then
``$INSTRUCTEDIT_DATA_DIR``, then the packaged set; the demo says which one it used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PluginError
from .paths import DATA_DIR_ENV

__all__ = ["DEMO_DATA_DIR", "DEMO_FILES", "DataLocation", "demo_data_dir", "locate_demo_data", "cut_demo_set"]

DEMO_DATA_DIR = Path(__file__).resolve().parents[1] / "demo_data"
#: Evaluation records kept per evaluation file.
N_EVAL = 50
#: Training candidates kept per training file.
N_TRAIN = 200
#: Locality / portability items kept per category in a training record.
MAX_GROUP_ITEMS = 2


@dataclasses.dataclass(frozen=True)
class DemoFile:
    source: str  # relative to a full data folder (the packaged copy has the same name)
    role: str  # "eval" or "train"
    records: int
    licence: str
    origin: str


DEMO_FILES: dict[str, DemoFile] = {
    "counterfact/counterfact-edit.json": DemoFile(
        "counterfact/counterfact-edit.json", "eval", N_EVAL, "MIT",
        "leonz-z/EasyEdit@5d49c47:dataset/edit_data/counterfact/counterfact-edit.json"),
    "zsre/ZsRE-test-all.json": DemoFile(
        "zsre/ZsRE-test-all.json", "eval", N_EVAL, "MIT (KnowEdit dataset card)",
        "leonz-z/EasyEdit@5d49c47:dataset/KnowEdit-ms/benchmark_ZsRE_ZsRE-test-all.json"),
    "counterfact/counterfact-train.json": DemoFile(
        "counterfact/counterfact-train.json", "train", N_TRAIN, "MIT",
        "leonz-z/EasyEdit@5d49c47:dataset/edit_data/counterfact/counterfact-train.json"),
    "counterfact/train_cf.json": DemoFile(
        "counterfact/train_cf.json", "train", N_TRAIN, "MIT (KnowEdit dataset card)",
        "leonz-z/EasyEdit@5d49c47:dataset/KnowEdit-ms/benchmark_wiki_counterfact_train_cf.json"),
}


def demo_data_dir() -> Path:
    """The packaged demo data folder."""
    if not DEMO_DATA_DIR.is_dir():
        raise PluginError(f"the packaged demo data set is missing ({DEMO_DATA_DIR}). Fix: reinstall the plugin, or "
                          f"pass --data_dir / set {DATA_DIR_ENV} to a full data folder")
    return DEMO_DATA_DIR


@dataclasses.dataclass(frozen=True)
class DataLocation:
    path: Path
    origin: str  # "--data_dir", "INSTRUCTEDIT_DATA_DIR" or "packaged demo data set"

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def locate_demo_data(data_dir: str | os.PathLike | None = None) -> DataLocation:
    """The demo's data folder: ``data_dir``, then ``$INSTRUCTEDIT_DATA_DIR``, then the packaged set."""
    if data_dir is not None and str(data_dir) != "":
        return DataLocation(Path(data_dir).expanduser(), "--data_dir")
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return DataLocation(Path(from_env).expanduser(), DATA_DIR_ENV)
    return DataLocation(demo_data_dir(), "packaged demo data set")


# ----------------------------------------------------------------------------------------------
# Cutting the set from a full data folder
# ----------------------------------------------------------------------------------------------
def _trim_groups(record: Mapping[str, Any], keep: int) -> dict[str, Any]:
    out = dict(record)
    for field in ("locality", "portability"):
        groups = record.get(field)
        if isinstance(groups, Mapping):
            out[field] = {k: (v[:keep] if isinstance(v, list) else v) for k, v in groups.items()}
    return out


def _raw_records(path: Path) -> list[dict[str, Any]]:
    from .reader import read_records

    return list(read_records(path))


def _dump(records: list[dict[str, Any]]) -> str:
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records) + "\n]\n"


def cut_demo_set(source: str | os.PathLike, target: str | os.PathLike = DEMO_DATA_DIR) -> dict[str, Any]:
    """Write the demo data set into ``target`` from the full data folder ``source``; returns a summary."""
    from ..core import durable
    from ..instructed.recipes import DEFAULT, EVAL_LIMIT, _excluded, evaluation_exclusions, evaluation_records
    from . import load_requests

    source, target = Path(source), Path(target)
    missing = [rel for rel in DEMO_FILES if not (source / rel).is_file()]
    if missing:
        raise PluginError(f"{source} lacks {', '.join(missing)}. Fix: pass --source a full data folder")
    excl = evaluation_exclusions(evaluation_records(source, limit=EVAL_LIMIT, evaluation=DEFAULT.evaluation))
    summary: dict[str, Any] = {}
    for rel, spec in DEMO_FILES.items():
        raw = _raw_records(source / spec.source)
        if spec.role == "eval":
            kept = raw[: spec.records]
        else:
            requests = load_requests(source / spec.source)
            name = "counterfact_train" if rel.endswith("counterfact-train.json") else "counterfact_knowedit"
            kept = []
            for rec, req in zip(raw, requests):
                if len(kept) >= spec.records:
                    break
                if not _excluded(name, req, excl):
                    kept.append(_trim_groups(rec, MAX_GROUP_ITEMS))
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write_bytes(path, _dump(kept).encode("utf-8"))
        summary[rel] = {"records": len(kept), "bytes": path.stat().st_size}
    durable.atomic_write_bytes(target / "SOURCES.md", _sources_md(summary).encode("utf-8"))
    return summary


def _sources_md(summary: Mapping[str, Mapping[str, int]]) -> str:
    lines = [
        "# The packaged demo data set",
        "",
        "Cut by `python -m instructedit_plugin.data.demo_set --source <full data folder>` (do not edit by hand).",
        "Every file keeps its original name, format and fields; only records are selected (and, in training",
        f"files, locality/portability lists cut to {MAX_GROUP_ITEMS} items per category). Only files whose",
        "licence is stated (MIT) are used; the demo builds its instructions from the facts.",
        "",
        "| file | role | records | bytes | original | licence |",
        "|---|---|---|---|---|---|",
    ]
    for rel, spec in DEMO_FILES.items():
        info = summary[rel]
        lines.append(f"| `{rel}` | {spec.role} | {info['records']} | {info['bytes']:,} | `{spec.origin}` | {spec.licence} |")
    lines += [
        "",
        "Evaluation files: their first records, in file order. Training files: the first records, in file order,",
        "sharing no case id, subject or question with the first 100 records of the evaluation files.",
        "MIT licence: the KnowEdit dataset card (`license: MIT License`) and the EasyEdit repository's LICENSE.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cut the packaged demo data set from a full data folder.")
    parser.add_argument("--source", required=True, help="a full data folder (e.g. ../shared/data)")
    parser.add_argument("--target", default=str(DEMO_DATA_DIR), help="where to write it (default: the package)")
    args = parser.parse_args(argv)
    for rel, info in cut_demo_set(args.source, args.target).items():
        print(f"{rel}: {info['records']} records, {info['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
