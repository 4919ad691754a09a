"""Read InstructEdit's task-descriptions file: an instruction library, not edit records.

``instructedit/easyedit_task_descriptions.json`` (shared data) holds the ``desc``
dictionary of EasyEdit's InstructEdit evaluation script as one JSON object::

    {"source": "...", "license": "...",
     "template": "Task: {}\\nDescription: {}\\nInput: {}",   # template.format(task, description, prompt)
     "placeholders": {"[LABEL]": "...", "[TOPIC]": "..."},  # convsent only
     "held_out_index": 9,                                  # never trained on (unseen-instruction test)
     "tasks": {"convsent": [10 descriptions], "counterfact": [...], "wikirecent": [...], "zsre": [...]}}

:func:`load_task_descriptions` checks that shape and returns ``{task: [description, ...]}``;
:func:`load_task_description_file` also keeps the template and the held-out index. A file
that does not match raises :class:`~instructedit_plugin.errors.DataSchemaError` naming the
file and the key (``tasks.zsre[3]``), with a message ending in ``Fix: ...``. Edit records
are read with :func:`~instructedit_plugin.data.load_requests` instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataSchemaError
from .reader import JSON_KEY, ROOT_KEY, DataFileNotFoundError

__all__ = ["TaskDescriptions", "is_task_descriptions_name", "load_task_description_file", "load_task_descriptions"]

#: The shape, as written in error messages.
SHAPE = '{"tasks": {"<task>": ["<description>", ...], ...}}'
#: The number of ``{}`` fields of a template: task, description, input.
TEMPLATE_FIELDS = 3


@dataclasses.dataclass(frozen=True)
class TaskDescriptions:
    """The checked content of a task-descriptions file."""

    path: str
    tasks: dict[str, list[str]]
    template: str | None = None  # ``template.format(task, description, prompt)``
    held_out_index: int | None = None  # the description of each task kept out of training
    placeholders: dict[str, str] = dataclasses.field(default_factory=dict)

    def seen(self, task: str) -> list[str]:
        """The descriptions of ``task`` used for training (all but the held-out one)."""
        return [d for i, d in enumerate(self.tasks[task]) if i != self.held_out_index]

    def unseen(self, task: str) -> list[str]:
        """The held-out description of ``task`` (empty when the file holds none out)."""
        return [] if self.held_out_index is None else [self.tasks[task][self.held_out_index]]


def is_task_descriptions_name(path: str | os.PathLike[str]) -> bool:
    """True for a file named like ``*task_descriptions.json`` (no I/O)."""
    return Path(path).name.lower().endswith("task_descriptions.json")


def _error(path: Path, key: str, problem: str, fix: str) -> DataSchemaError:
    return DataSchemaError(str(path), None, key, f"{problem}. Fix: {fix}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _read_object(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataFileNotFoundError(path) from None
    except UnicodeDecodeError as err:
        raise _error(path, ROOT_KEY, f"file is not UTF-8 text ({err.reason})", "convert it to UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _error(path, JSON_KEY, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
                     "repair the file (or copy it again from the shared data folder)") from None


def _check_tasks(path: Path, tasks: Any) -> dict[str, list[str]]:
    if not isinstance(tasks, dict) or not tasks:
        found = "an empty object" if isinstance(tasks, dict) else _type_name(tasks)
        raise _error(path, "tasks", f"expected an object of task name -> list of descriptions, got {found}",
                     f"write 'tasks' as {SHAPE} with at least one task")
    out: dict[str, list[str]] = {}
    for task, descriptions in tasks.items():
        key = f"tasks.{task}"
        if not task.strip():
            raise _error(path, key, "task name is empty", "give every task a name such as 'zsre'")
        if not isinstance(descriptions, list) or not descriptions:
            found = "an empty list" if isinstance(descriptions, list) else _type_name(descriptions)
            raise _error(path, key, f"expected a non-empty list of description strings, got {found}",
                         f"give '{task}' a list of descriptions, as in {SHAPE}")
        for i, text in enumerate(descriptions):
            if not isinstance(text, str) or not text.strip():
                found = "an empty string" if isinstance(text, str) else _type_name(text)
                raise _error(path, f"{key}[{i}]", f"expected a non-empty description string, got {found}",
                             f"write description {i} of '{task}' as one sentence of text")
        seen: set[str] = set()
        for i, text in enumerate(descriptions):
            if text in seen:
                raise _error(path, f"{key}[{i}]", f"duplicates an earlier description of '{task}'",
                             "remove the duplicate or reword it")
            seen.add(text)
        out[task] = list(descriptions)
    return out


def _check_held_out(path: Path, value: Any, tasks: dict[str, list[str]]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(path, "held_out_index", f"expected an integer or null, got {_type_name(value)}",
                     "give the 0-based index of the description kept out of training, or null for none")
    shortest = min(tasks, key=lambda t: len(tasks[t]))
    if not 0 <= value < len(tasks[shortest]):
        raise _error(path, "held_out_index",
                     f"{value} is out of range: task '{shortest}' has {len(tasks[shortest])} description(s)",
                     f"use an index from 0 to {len(tasks[shortest]) - 1}, or null for none")
    return value


def _check_template(path: Path, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _error(path, "template", f"expected a string, got {_type_name(value)}",
                     "write it like 'Task: {}\\nDescription: {}\\nInput: {}'")
    fields = value.count("{}")
    if fields != TEMPLATE_FIELDS:
        raise _error(path, "template", f"has {fields} '{{}}' field(s), needs {TEMPLATE_FIELDS} (task, description, input)",
                     "write it like 'Task: {}\\nDescription: {}\\nInput: {}'")
    return value


def _check_placeholders(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _error(path, "placeholders", f"expected an object of placeholder -> explanation strings, got "
                     f"{_type_name(value)}", "write it like {\"[TOPIC]\": \"the record's subject\"}, or drop it")
    return dict(value)


def load_task_description_file(path: str | os.PathLike[str]) -> TaskDescriptions:
    """Read and check a task-descriptions file (see the module docstring for its shape).

    Raises:
        DataFileNotFoundError: ``path`` does not exist.
        DataSchemaError: the file is not UTF-8 JSON, or a key has the wrong shape
            (``.path``, ``.key``; ``.index`` is None: the file is one object, not records).
    """
    path = Path(path)
    data = _read_object(path)
    if not isinstance(data, dict):
        raise _error(path, ROOT_KEY, f"expected a JSON object with a 'tasks' key, found {_type_name(data)}",
                     f"a task-descriptions file is one object {SHAPE}; edit records are read with load_requests")
    if "tasks" not in data:
        raise _error(path, "tasks", f"missing required key (keys: {sorted(data)})",
                     f"add the descriptions as {SHAPE}")
    tasks = _check_tasks(path, data["tasks"])
    return TaskDescriptions(
        path=str(path),
        tasks=tasks,
        template=_check_template(path, data.get("template")),
        held_out_index=_check_held_out(path, data.get("held_out_index"), tasks),
        placeholders=_check_placeholders(path, data.get("placeholders")),
    )


def load_task_descriptions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """``{task: [description, ...]}`` from a task-descriptions file, in the file's order.

    Raises the errors of :func:`load_task_description_file`.
    """
    return load_task_description_file(path).tasks
