"""A tiny declarative schema checker for dataset records.

Each loader states the shape of its records once, as data (:class:`Fields`,
:class:`ListOf`, ...), and :func:`check_record` walks a record against it. A
mismatch raises :class:`~instructedit_plugin.errors.DataSchemaError` with the
file, the record index and a dotted key path such as
``requested_rewrite.target_new.str`` or ``locality.Forgetfulness[2].prompt``,
so a malformed record is found at load time, not halfway through an editing run.

Only what the loaders read is checked; unknown extra keys are allowed because
upstream files often carry bookkeeping fields.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from ..errors import DataSchemaError
from .reader import read_records

__all__ = [
    "AnyOf", "Fields", "ListOf", "MapOf", "Spec", "Template",
    "check_record", "find_problem", "load_checked",
]

#: Pseudo key used when a record is not a JSON object at all.
RECORD_KEY = "<record>"


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose items all match ``item``; at least ``min_len`` items."""

    item: "Spec"
    min_len: int = 0


@dataclass(frozen=True)
class MapOf:
    """A JSON object with arbitrary keys whose values all match ``value``."""

    value: "Spec"


@dataclass(frozen=True)
class AnyOf:
    """A value matching at least one of ``options``; ``label`` describes them in errors."""

    options: tuple["Spec", ...]
    label: str


@dataclass(frozen=True)
class Template:
    """A string with a ``{}`` placeholder for the subject (ROME/MQuAKE prompts)."""

    placeholder: str = "{}"


@dataclass(frozen=True)
class Fields:
    """A JSON object with ``required`` and ``optional`` keys.

    ``together`` lists groups of optional keys that must appear all or none
    (e.g. ``loc`` and ``loc_ans``).
    """

    required: Mapping[str, "Spec"]
    optional: Mapping[str, "Spec"] = field(default_factory=dict)
    together: tuple[tuple[str, ...], ...] = ()

    def extend(
        self,
        required: Mapping[str, "Spec"] | None = None,
        optional: Mapping[str, "Spec"] | None = None,
        together: tuple[tuple[str, ...], ...] = (),
    ) -> "Fields":
        """Return a copy with more keys; a key moved to ``required`` leaves ``optional``."""
        new_required = {**self.required, **(required or {})}
        new_optional = {k: v for k, v in {**self.optional, **(optional or {})}.items() if k not in new_required}
        return Fields(new_required, new_optional, self.together + together)


Spec = Union[type, ListOf, MapOf, AnyOf, Template, Fields]

Problem = tuple[str, str]  # (key path, what is wrong)


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "str", int: "int", float: "float", bool: "bool"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _describe(spec: Spec) -> str:
    if isinstance(spec, type):
        return {dict: "object", list: "list"}.get(spec, spec.__name__)
    if isinstance(spec, ListOf):
        return f"list of {_describe(spec.item)}"
    if isinstance(spec, MapOf):
        return f"object of {_describe(spec.value)}"
    if isinstance(spec, AnyOf):
        return spec.label
    if isinstance(spec, Template):
        return f"str containing {spec.placeholder!r}"
    return "object"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_type(value: Any, spec: type, key: str) -> Problem | None:
    if spec is int and isinstance(value, bool):
        return key, "expected int, got bool"
    if spec is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    if not isinstance(value, spec):
        return key, f"expected {_describe(spec)}, got {_type_name(value)}"
    return None


def _check_list(value: Any, spec: ListOf, key: str) -> Problem | None:
    if not isinstance(value, list):
        return key, f"expected {_describe(spec)}, got {_type_name(value)}"
    if len(value) < spec.min_len:
        return key, f"expected at least {spec.min_len} item(s), got {len(value)}"
    for i, item in enumerate(value):
        problem = find_problem(item, spec.item, f"{key}[{i}]")
        if problem:
            return problem
    return None


def _check_map(value: Any, spec: MapOf, key: str) -> Problem | None:
    if not isinstance(value, dict):
        return key, f"expected {_describe(spec)}, got {_type_name(value)}"
    for sub_key, item in value.items():
        problem = find_problem(item, spec.value, _join(key, str(sub_key)))
        if problem:
            return problem
    return None


def _check_any(value: Any, spec: AnyOf, key: str) -> Problem | None:
    if any(find_problem(value, option, key) is None for option in spec.options):
        return None
    return key, f"expected {spec.label}, got {_type_name(value)}"


def _check_template(value: Any, spec: Template, key: str) -> Problem | None:
    if not isinstance(value, str):
        return key, f"expected {_describe(spec)}, got {_type_name(value)}"
    if spec.placeholder not in value:
        return key, f"template {value!r} has no {spec.placeholder!r} placeholder for the subject"
    return None


def _check_fields(value: Any, spec: Fields, key: str) -> Problem | None:
    if not isinstance(value, dict):
        return key or RECORD_KEY, f"expected an object, got {_type_name(value)}"
    for name, sub_spec in spec.required.items():
        if name not in value:
            return _join(key, name), "missing required key"
        problem = find_problem(value[name], sub_spec, _join(key, name))
        if problem:
            return problem
    for name, sub_spec in spec.optional.items():
        if name in value:
            problem = find_problem(value[name], sub_spec, _join(key, name))
            if problem:
                return problem
    for group in spec.together:
        present = [name for name in group if name in value]
        if present and len(present) != len(group):
            missing = next(name for name in group if name not in value)
            return _join(key, missing), f"missing; it must come together with {present[0]!r}"
    return None


_CHECKERS: dict[type, Callable[[Any, Any, str], Problem | None]] = {
    ListOf: _check_list,
    MapOf: _check_map,
    AnyOf: _check_any,
    Template: _check_template,
    Fields: _check_fields,
}


def find_problem(value: Any, spec: Spec, key: str = "") -> Problem | None:
    """Return ``(key_path, problem)`` for the first mismatch of ``value`` against ``spec``, else None."""
    if isinstance(spec, type):
        return _check_type(value, spec, key or RECORD_KEY)
    return _CHECKERS[type(spec)](value, spec, key)


def check_record(record: Any, spec: Fields, path: str | os.PathLike[str], index: int) -> None:
    """Raise DataSchemaError naming ``path``, ``index`` and the key if ``record`` does not match."""
    problem = find_problem(record, spec)
    if problem:
        key, what = problem
        raise DataSchemaError(str(path), index, key, f"{what}. {_fix(key, what, index)}")


def _fix(key: str, what: str, index: int) -> str:
    """The 'Fix: ...' sentence of a schema error."""
    if key == RECORD_KEY:
        return f"Fix: record {index} must be a JSON object; the file may be a different dataset (pass fmt=)"
    if what.startswith("missing"):
        return (f"Fix: add '{key}' to record {index}, or pass fmt= if this file is another dataset format "
                "(the format is guessed from the file name)")
    return f"Fix: correct '{key}' in record {index}, or pass fmt= if this file is another dataset format"


T = TypeVar("T")


def load_checked(
    path: str | os.PathLike[str],
    spec: Fields,
    convert: Callable[[dict[str, Any]], T],
    limit: int | None = None,
) -> list[T]:
    """Read ``path`` (first ``limit`` records), check each against ``spec`` and convert it."""
    records = read_records(path, limit)
    return [_checked(record, spec, path, i, convert) for i, record in enumerate(records)]


def _checked(
    record: Any,
    spec: Fields,
    path: str | os.PathLike[str],
    index: int,
    convert: Callable[[dict[str, Any]], T],
) -> T:
    check_record(record, spec, Path(path), index)
    return convert(record)

