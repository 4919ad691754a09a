"""Write the multi-task file EasyEdit's ``MultiTaskDataset`` reads (``instructedit make-multitask``).

EasyEdit main's InstructEdit flow (``examples/InstructEdit.md``) trains with
``MultiTaskDataset(<file>, config=...)`` and ``MultiTaskTrainer``. The file is one JSON
array of records, each naming its task in ``type`` (EasyEdit's task names: ``counterfact``,
``wikirecent``, ``convsent``, ``zsre``); ``MultiTaskDataset`` prefixes each prompt with one of
that task's descriptions itself. Per record::

    {"type": "counterfact", "case_id": 0, "prompt": "...", "target_new": "...", "subject": "...",
     "ground_truth": "...", "rephrase_prompt": "...",
     "locality": {"<kind>": {"prompt": ["...", ...], "ground_truth": ["...", ...]}},
     "portability": {"<kind>": {"prompt": [...], "ground_truth": [...]}}}

Locality and portability are flattened to lists of strings (first alias of each answer), the
shape ``MultiTaskDataset`` concatenates. Every record needs locality (``MultiTaskDataset``'s batches
and ``MultiTaskTrainer``'s KL read it): a record without any (all of ConvSent) gets another record
of its task, its prompt with its ``target_new`` (the KL only needs the text, not the model's own
answer). An empty ``portability`` is left out.

ConvSent records are positive-sentiment edits (the loader's ``target_new`` is the first positive
reply). EasyEdit's ``MultiTaskDataset`` fills a ConvSent description's ``[LABEL]`` with
"positive" only when ``target_new`` contains "positively", so most of these records get
"negative" descriptions there; the plugin's own trainer (``instructedit train``) is not affected.

The sources are read with the plugin's loaders (:func:`~instructedit_plugin.data.load_requests`)
from the shared data folder: ``counterfact/counterfact-train.json``,
``recent/recent_train.json`` and ``convsent/blender_val.json`` by default.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PluginError

LOG = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOURCES", "EASYEDIT_TASK_NAMES", "build_multitask_records", "write_multitask_file"]

#: The plugin's task name -> the name EasyEdit's MultiTaskDataset knows it by.
EASYEDIT_TASK_NAMES = {"counterfact": "counterfact", "recent": "wikirecent", "convsent": "convsent", "zsre": "zsre"}
#: The default source file of each task, relative to the data folder.
DEFAULT_SOURCES = {
    "counterfact": "counterfact/counterfact-train.json",
    "recent": "recent/recent_train.json",
    "convsent": "convsent/blender_val.json",
}


def _strings(value: Any) -> list[str]:
    """A prompt/answer field as a flat list of strings (a nested alias list gives its first alias)."""
    if isinstance(value, str):
        return [value]
    out = []
    for item in value or []:
        while isinstance(item, (list, tuple)) and item:
            item = item[0]
        if isinstance(item, str):
            out.append(item)
    return out


def _flat_block(block: Mapping[str, Any] | None) -> dict[str, dict[str, list[str]]]:
    """``{kind: {"prompt": [...], "ground_truth": [...]}}`` with equal-length string lists."""
    out = {}
    for kind, entry in (block or {}).items():
        if not isinstance(entry, Mapping):
            continue
        prompts, answers = _strings(entry.get("prompt")), _strings(entry.get("ground_truth"))
        pairs = [(p, a) for p, a in zip(prompts, answers) if p and a]
        if pairs:
            out[str(kind)] = {"prompt": [p for p, _ in pairs], "ground_truth": [a for _, a in pairs]}
    return out


def _record(task: str, request: Mapping[str, Any]) -> dict[str, Any]:
    record = {
        "type": EASYEDIT_TASK_NAMES[task],
        "prompt": request["prompt"],
        "target_new": request["target_new"],
        "subject": request.get("subject") or "",
        "ground_truth": request.get("ground_truth") or "",
        "locality": _flat_block(request.get("locality")),
    }
    portability = _flat_block(request.get("portability"))
    if portability:
        record["portability"] = portability
    if request.get("rephrase_prompt"):
        record["rephrase_prompt"] = request["rephrase_prompt"]
    return record


def _fill_locality(task: str, records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Records without locality get another record's prompt -> target_new; a lone one is dropped."""
    rng = random.Random(f"{seed}:{task}")
    kept = []
    for i, record in enumerate(records):
        if not record["locality"]:
            others = [k for k in range(len(records)) if k != i]
            if not others:
                LOG.warning("task '%s': dropped a record without locality data (no other record to borrow from)", task)
                continue
            j = rng.choice(others)
            record["locality"] = {"other_record": {"prompt": [records[j]["prompt"]],
                                                   "ground_truth": [records[j]["target_new"]]}}
        kept.append(record)
    return kept


def build_multitask_records(tasks: Mapping[str, Sequence[Mapping[str, Any]]], seed: int = 0) -> list[dict[str, Any]]:
    """The records of a multi-task file from ``{task: [request, ...]}`` (plugin task names)."""
    unknown = sorted(set(tasks) - set(EASYEDIT_TASK_NAMES))
    if unknown:
        raise PluginError(f"task(s) {unknown} have no EasyEdit MultiTaskDataset name. "
                          f"Fix: use tasks among {sorted(EASYEDIT_TASK_NAMES)}")
    out: list[dict[str, Any]] = []
    for task, requests in tasks.items():
        records = [_record(task, r) for r in requests if isinstance(r.get("target_new"), str) and r["target_new"]]
        out += _fill_locality(task, records, seed)
    random.Random(seed).shuffle(out)
    for i, record in enumerate(out):
        record["case_id"] = i
    return out


def write_multitask_file(
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    n_per_task: int | None = None,
    sources: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Read each task's source file, write the multi-task file ``out`` atomically; returns records per type."""
    from ..core.durable import atomic_write_json
    from . import load_requests
    from .paths import resolve_data_dir

    root = resolve_data_dir(data_dir)
    tasks = {}
    for task, rel in (sources or DEFAULT_SOURCES).items():
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            raise PluginError(f"data file for task '{task}' not found: {path}. "
                              "Fix: pass --data_dir pointing at the shared data folder (with counterfact/, recent/, convsent/)")
        tasks[task] = load_requests(path, limit=n_per_task)
    records = build_multitask_records(tasks, seed)
    atomic_write_json(out, records)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["type"]] = counts.get(record["type"], 0) + 1
    LOG.info("wrote %d multi-task records to %s: %s", len(records), out, counts)
    return counts
