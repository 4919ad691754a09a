"""The InstructEdit instruction library: one YAML file per task family.

InstructEdit prefixes every edit input with an instruction naming the task and
describing it in words::

    Task: {task}
    Description: {description}
    Input: {input}

Each family file (``counterfact.yaml``, ``recent.yaml``, ``convsent.yaml``,
``zsre.yaml`` ship with the plugin) holds::

    task: counterfact                 # the name used in requests and datasets
    aliases: [cf]                     # optional other names
    template: "Task: {task}\\nDescription: {description}\\nInput: {input}"
    held_out_index: 9                 # description never used for training (or null)
    placeholders: {LABEL: [label, sentiment], TOPIC: [topic, subject]}  # optional
    descriptions: [ ... ]             # the task descriptions (the shipped files have 10)

Users add families (or override shipped ones with the same ``task``) by putting
YAML files in a folder and passing it to :func:`load_instruction_library`
(``extra_dirs``) or naming it in the ``INSTRUCTEDIT_INSTRUCTIONS_DIR``
environment variable (several folders separated by ``os.pathsep``).

Descriptions may contain ``[NAME]`` placeholders. They are filled from the
record the instruction is built for: the keys listed under ``placeholders`` are
tried in order, then ``name.lower()``. ``[LABEL]`` falls back to the sentiment
implied by a ConvSent record (``negative`` when ``target_new`` is one of its
``neg`` responses, else ``positive``).

:func:`load_instructions` picks a library by name or path (the ``instructions:``
setting): ``plugin`` (the shipped families), ``easyedit`` (the paper's GPT-4
descriptions, EasyEdit's ``desc`` dictionary, read from
``<data dir>/instructedit/easyedit_task_descriptions.json``), a task-descriptions
JSON file, a folder of family YAML files or one family YAML file. Task names
have aliases (:data:`TASK_ALIASES`, :func:`canonical_task`): EasyEdit calls
Recent ``wikirecent``; a library resolves either name to the same family.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import PluginError, RequestError

LOG = logging.getLogger(__name__)

#: Environment variable naming extra instruction folders (``os.pathsep``-separated).
INSTRUCTIONS_DIR_ENV = "INSTRUCTEDIT_INSTRUCTIONS_DIR"
#: The template the paper uses; a family file may define its own.
DEFAULT_TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {input}"
BUILTIN_DIR = Path(__file__).resolve().parent

#: canonical task name -> the other names it goes by (EasyEdit calls Recent "wikirecent")
TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "recent": ("wikirecent", "wiki_recent", "wikidata_recent"),
    "counterfact": ("cf", "wiki_counterfact"),
    "zsre": ("zs_re", "zero_shot_re"),
    "convsent": ("conv_sent", "sentiment"),
}
_CANONICAL = {alias: task for task, aliases in TASK_ALIASES.items() for alias in aliases}
#: ``instructions:`` names: the shipped families, and the paper's descriptions (shared data file)
SHIPPED_NAMES = ("plugin", "shipped")
EASYEDIT_NAMES = ("easyedit", "paper")
#: where the paper's descriptions lie under the data folder
EASYEDIT_DESCRIPTIONS = Path("instructedit") / "easyedit_task_descriptions.json"
#: record keys that fill the paper's placeholders
_FILE_PLACEHOLDERS = {"LABEL": ("label", "sentiment"), "TOPIC": ("topic", "subject")}


def canonical_task(name: str) -> str:
    """The plugin's name for task ``name`` (``wikirecent`` -> ``recent``); unknown names unchanged."""
    key = str(name).strip()
    return _CANONICAL.get(key.lower(), key.lower() if key.lower() in TASK_ALIASES else key)


_PLACEHOLDER = re.compile(r"\[([A-Z][A-Z0-9_]*)\]")
_TEMPLATE_FIELDS = ("task", "description", "input")


class InstructionError(PluginError):
    """An instruction family file is malformed, or an unknown task was asked for."""


def _derive_label(record: Mapping[str, Any]) -> str | None:
    """ConvSent: the sentiment the edit moves towards, from the record's response lists."""
    target = record.get("target_new")
    if not isinstance(target, str):
        return None
    target = target.strip()
    neg = [str(x).strip() for x in record.get("neg") or ()]
    pos = [str(x).strip() for x in record.get("pos") or ()]
    if target in neg:
        return "negative"
    if target in pos or pos or neg:
        return "positive"
    return None


_DERIVED = {"LABEL": _derive_label}


@dataclasses.dataclass(frozen=True)
class InstructionFamily:
    """One task family: its name, descriptions, template and held-out description."""

    task: str
    descriptions: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    held_out_index: int | None = None
    aliases: tuple[str, ...] = ()
    placeholders: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    source: str | None = None

    # ----------------------------------------------------------- descriptions
    @property
    def training_indices(self) -> tuple[int, ...]:
        """Indices of the descriptions used for training (all but the held-out one)."""
        return tuple(i for i in range(len(self.descriptions)) if i != self.held_out_index)

    @property
    def held_out_description(self) -> str | None:
        return None if self.held_out_index is None else self.descriptions[self.held_out_index]

    def sample_index(self, rng: random.Random | Any) -> int:
        """A training description index drawn with ``rng`` (``random.Random`` or numpy Generator)."""
        indices = self.training_indices
        if hasattr(rng, "integers"):  # numpy Generator
            return indices[int(rng.integers(len(indices)))]
        return indices[rng.randrange(len(indices))]

    def description(self, index: int, record: Mapping[str, Any] | None = None) -> str:
        """Description ``index`` with its placeholders filled from ``record``."""
        if not -len(self.descriptions) <= index < len(self.descriptions):
            raise InstructionError(
                f"task '{self.task}' has {len(self.descriptions)} descriptions; index {index} is out of range"
            )
        return self.fill(self.descriptions[index], record)

    def fill(self, text: str, record: Mapping[str, Any] | None) -> str:
        """Replace every ``[NAME]`` in one pass, so a record value that itself contains ``[LABEL]``
        (e.g. the topic "the [LABEL] band") is inserted verbatim, never filled again."""
        names = _PLACEHOLDER.findall(text)
        if not names:
            return text
        record = record or {}
        values: dict[str, str] = {}
        for name in dict.fromkeys(names):
            keys = tuple(dict.fromkeys((*self.placeholders.get(name, ()), name.lower())))
            value = None
            for key in keys:
                candidate = record.get(key)
                if candidate is not None and str(candidate).strip():
                    value = str(candidate).strip()
                    break
            if value is None and name in _DERIVED:
                value = _DERIVED[name](record)
            if value is None:
                raise RequestError(
                    f"the '{self.task}' instruction needs [{name}], but the record has none of the keys "
                    f"{', '.join(repr(k) for k in keys)}. Fix: add one of them to the request (record keys: {sorted(record)})"
                )
            values[name] = value
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)

    # --------------------------------------------------------------- render
    def render(self, input_text: str, description: str) -> str:
        return self.template.format(task=self.task, description=description, input=input_text)

    def format(
        self,
        input_text: str,
        description: int | random.Random | Any | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> str:
        """The instruction-prefixed input; see :func:`format_instruction`."""
        if description is None:
            index = self.training_indices[0]
        elif isinstance(description, int) and not isinstance(description, bool):
            index = description
        else:
            index = self.sample_index(description)
        return self.render(input_text, self.description(index, record))


def _as_str_list(value: Any, key: str, path: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InstructionError(f"{path}: '{key}' must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def load_family(path: str | os.PathLike) -> InstructionFamily:
    """Read and validate one family YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InstructionError(f"{path}: cannot read instruction family ({exc})") from exc
    if not isinstance(data, dict):
        raise InstructionError(f"{path}: the top level must be a mapping with 'task' and 'descriptions'")
    known = {"task", "aliases", "template", "held_out_index", "placeholders", "descriptions"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InstructionError(f"{path}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(known))}")
    task = data.get("task")
    if not isinstance(task, str) or not task.strip():
        raise InstructionError(f"{path}: 'task' must be a non-empty string")
    if "descriptions" not in data:
        raise InstructionError(f"{path}: 'descriptions' is missing")
    descriptions = _as_str_list(data["descriptions"], "descriptions", path)
    if len(descriptions) < 2:
        raise InstructionError(f"{path}: give at least two descriptions (one is held out for testing)")
    template = data.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str):
        raise InstructionError(f"{path}: 'template' must be a string")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise InstructionError(f"{path}: 'template' is not a valid format string ({exc})") from exc
    if "input" not in fields or not fields <= set(_TEMPLATE_FIELDS):
        raise InstructionError(
            f"{path}: 'template' must contain {{input}} and may only use {{task}}, {{description}}, {{input}}; got {sorted(fields)}"
        )
    held_out = data.get("held_out_index", None)
    if held_out is not None:
        if not isinstance(held_out, int) or isinstance(held_out, bool) or not 0 <= held_out < len(descriptions):
            raise InstructionError(f"{path}: 'held_out_index' must be null or an integer from 0 to {len(descriptions) - 1}")
    placeholders = data.get("placeholders") or {}
    if not isinstance(placeholders, dict):
        raise InstructionError(f"{path}: 'placeholders' must map a placeholder name to a list of record keys")
    aliases = _as_str_list(data.get("aliases") or [], "aliases", path) if data.get("aliases") else ()
    return InstructionFamily(
        task=task.strip(),
        descriptions=descriptions,
        template=template,
        held_out_index=held_out,
        aliases=aliases,
        placeholders={str(k): _as_str_list(v, f"placeholders.{k}", path) for k, v in placeholders.items()},
        source=str(path),
    )


class InstructionLibrary:
    """All known instruction families, looked up by task name or alias."""

    def __init__(self, families: Iterable[InstructionFamily] = ()):
        self._families: dict[str, InstructionFamily] = {}
        self._aliases: dict[str, str] = {}
        for family in families:
            self.add(family)

    def add(self, family: InstructionFamily) -> None:
        """Add ``family``; a family with the same task replaces the earlier one."""
        if family.task in self._families:
            LOG.info("instruction family '%s' from %s replaces the one from %s",
                     family.task, family.source, self._families[family.task].source)
        self._families[family.task] = family
        self._aliases = {a.lower(): t for t, fam in self._families.items() for a in fam.aliases}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self._families))

    def __contains__(self, task: object) -> bool:
        return isinstance(task, str) and self._resolve(task) is not None

    def __len__(self) -> int:
        return len(self._families)

    def _resolve(self, task: str) -> str | None:
        if task in self._families:
            return task
        hit = self._aliases.get(task.lower()) or next((t for t in self._families if t.lower() == task.lower()), None)
        if hit is None:  # another name of the same task (TASK_ALIASES): wikirecent <-> recent
            canon = canonical_task(task)
            hit = next((t for t in self._families if canonical_task(t) == canon), None)
        return hit

    def get(self, task: str) -> InstructionFamily:
        """The family for ``task`` (name or alias); :class:`InstructionError` listing known tasks otherwise."""
        name = self._resolve(task) if isinstance(task, str) else None
        if name is None:
            raise InstructionError(
                f"unknown instruction task {task!r}; known tasks: {', '.join(self.tasks) or '(none)'}. "
                f"Fix: use one of them, or add a YAML family file to a folder passed as extra_dirs "
                f"or named in ${INSTRUCTIONS_DIR_ENV}"
            )
        return self._families[name]

    __getitem__ = get

    def format(
        self,
        task: str,
        input_text: str,
        description: int | random.Random | Any | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> str:
        return self.get(task).format(input_text, description, record)


def _env_dirs() -> list[Path]:
    raw = os.environ.get(INSTRUCTIONS_DIR_ENV, "").strip()
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()] if raw else []


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_instruction_library(extra_dirs: Sequence[str | os.PathLike] | str | os.PathLike | None = None) -> InstructionLibrary:
    """The shipped families, then those in ``$INSTRUCTEDIT_INSTRUCTIONS_DIR``, then ``extra_dirs``.

    Later folders override earlier ones family by family (same ``task``).
    """
    if isinstance(extra_dirs, (str, os.PathLike)):
        extra_dirs = [extra_dirs]
    folders = [BUILTIN_DIR, *_env_dirs(), *(Path(d).expanduser() for d in extra_dirs or ())]
    library = InstructionLibrary()
    for folder in folders:
        if not folder.is_dir():
            raise InstructionError(f"instruction folder {folder} does not exist")
        for path in _yaml_files(folder):
            library.add(load_family(path))
    return library


def _named_template(template: str | None, source: str) -> str:
    """``"Task: {}\\nDescription: {}\\nInput: {}"`` (positional, EasyEdit) -> the named fields of a family."""
    if template is None:
        return DEFAULT_TEMPLATE
    parts = [p.replace("{", "{{").replace("}", "}}") for p in template.split("{}")]
    if len(parts) != len(_TEMPLATE_FIELDS) + 1:
        raise InstructionError(f"{source}: 'template' needs exactly three '{{}}' fields (task, description, input). "
                               "Fix: write it like 'Task: {}\\nDescription: {}\\nInput: {}'")
    return parts[0] + "{task}" + parts[1] + "{description}" + parts[2] + "{input}" + parts[3]


def families_from_description_file(path: str | os.PathLike) -> list[InstructionFamily]:
    """The families of a task-descriptions JSON file (the paper's: 10 per task, the 10th held out).

    Each task keeps the file's name (``wikirecent`` renders as ``Task: wikirecent``, as in
    EasyEdit) and answers to its other names (:data:`TASK_ALIASES`).
    """
    from ..data.task_descriptions import load_task_description_file

    loaded = load_task_description_file(path)
    template = _named_template(loaded.template, str(path))
    families = []
    for task, descriptions in loaded.tasks.items():
        canon = canonical_task(task)
        names = (canon, *TASK_ALIASES.get(canon, ()))
        used = {n for n in _PLACEHOLDER.findall(" ".join(descriptions))}
        families.append(InstructionFamily(
            task=task, descriptions=tuple(descriptions), template=template, held_out_index=loaded.held_out_index,
            aliases=tuple(n for n in names if n != task),
            placeholders={k: v for k, v in _FILE_PLACEHOLDERS.items() if k in used}, source=str(path)))
    return families


def load_instructions(spec: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> InstructionLibrary:
    """The instruction library named by an ``instructions:`` setting.

    ``None``/``"plugin"``: the shipped families (plus ``$INSTRUCTEDIT_INSTRUCTIONS_DIR``);
    ``"easyedit"``/``"paper"``: the paper's descriptions,
    ``<data_dir or $INSTRUCTEDIT_DATA_DIR>/instructedit/easyedit_task_descriptions.json``; a ``.json``
    path: a task-descriptions file; a folder: its family YAML files over the shipped ones; a
    ``.yaml`` file: that family over the shipped ones.
    """
    if spec is None or str(spec).strip().lower() in SHIPPED_NAMES:
        return default_library()
    text = str(spec).strip()
    if text.lower() in EASYEDIT_NAMES:
        from ..data.paths import resolve_data_dir

        path = resolve_data_dir(data_dir) / EASYEDIT_DESCRIPTIONS
    else:
        path = Path(text).expanduser()
    if path.is_dir():
        return load_instruction_library([path])
    if not path.is_file():
        raise InstructionError(
            f"instructions: {text!r} is neither a library name ({', '.join(SHIPPED_NAMES + EASYEDIT_NAMES)}) nor an "
            f"existing file or folder (looked for {path}). Fix: name a library, or give the path of a "
            "task-descriptions .json file, a family .yaml file or a folder of family files")
    if path.suffix in (".yaml", ".yml"):
        library = load_instruction_library()
        library.add(load_family(path))
        return library
    return InstructionLibrary(families_from_description_file(path))


_DEFAULT: dict[tuple, InstructionLibrary] = {}


def default_library() -> InstructionLibrary:
    """The library for the current ``$INSTRUCTEDIT_INSTRUCTIONS_DIR`` (cached per value)."""
    key = tuple(str(p) for p in _env_dirs())
    if key not in _DEFAULT:
        _DEFAULT[key] = load_instruction_library()
    return _DEFAULT[key]


def format_instruction(
    task: str,
    input: str,  # noqa: A002 - the template's own field name
    description: int | random.Random | Any | None = None,
    record: Mapping[str, Any] | None = None,
    library: InstructionLibrary | None = None,
) -> str:
    """Prefix ``input`` with the instruction of ``task``.

    ``description`` is a description index (any index, the held-out one
    included), a random generator (``random.Random`` or numpy ``Generator``) to
    draw a *training* description, or None for the first training description.
    ``record`` fills ``[PLACEHOLDER]`` fields.
    """
    return (library or default_library()).format(task, input, description, record)


__all__ = [
    "BUILTIN_DIR",
    "DEFAULT_TEMPLATE",
    "INSTRUCTIONS_DIR_ENV",
    "InstructionError",
    "InstructionFamily",
    "InstructionLibrary",
    "TASK_ALIASES",
    "canonical_task",
    "default_library",
    "families_from_description_file",
    "load_instructions",
    "format_instruction",
    "load_family",
    "load_instruction_library",
]
