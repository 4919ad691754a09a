"""Validated hyperparameter dataclasses loaded from YAML, EasyEdit-style.

EasyEdit's own hparams classes do ``cls(**yaml)``: a typo'd key raises a bare
``TypeError`` and a wrong type or a layer index past the model's depth is only
noticed mid-run (or never). Plugin hparams subclass :class:`PluginHyperParams`
and declare their constraints next to each field with :func:`hp_field`; loading
checks unknown and missing keys, types, ranges, choices and layer indices
against the model's config, and raises one :class:`HyperParamsError` that names
the field and the fix.

:func:`read_yaml` is the one YAML reader of every hparams loader (the plugin's, EasyEdit's own
classes through the bridge, the command line): ``.yaml`` is appended when the suffix is missing,
and a missing or unparsable file is a :class:`HyperParamsError` on ``<file>``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import HyperParamsError, fix_for

_MISSING = dataclasses.MISSING

#: ``model_name: embedded`` names the packaged Gemma-3-270M (converted once into a cached folder).
EMBEDDED_MODEL_NAME = "embedded"


def is_embedded_name(value: Any) -> bool:
    """True for the word ``embedded`` (the packaged Gemma-3-270M) as a ``model_name``."""
    return isinstance(value, str) and value.strip().lower() == EMBEDDED_MODEL_NAME


def resolve_named_values(data: dict[str, Any], *, shipped_archive: bool = False) -> dict[str, Any]:
    """A copy of ``data`` with the words the shipped YAMLs use replaced by folders.

    The one place where every hparams loader (:meth:`PluginHyperParams.from_dict`, hence
    ``from_hparams`` and :func:`~instructedit_plugin.registry.load_hparams`, and
    :func:`~instructedit_plugin.compat.hparams_bridge.load_easyedit_hparams` for EasyEdit's own
    classes) turns

    * ``model_name: embedded`` into :func:`~instructedit_plugin.models.embedded.embedded_model_dir`
      (built from the PyPI GGUF on first use, ~1 min; cached afterwards), and
    * ``archive: default`` (only where ``shipped_archive``: InstructEd editing) into
      :func:`~instructedit_plugin.instructed.shipped.shipped_prefixes_dir` -- the folder name even
      when the package lacks it, so that loading works and ``check_ready`` reports it by field.
    """
    out = dict(data)
    if is_embedded_name(out.get("model_name")):
        from ..models.embedded import embedded_model_dir

        out["model_name"] = str(embedded_model_dir())
    if shipped_archive and "archive" in out:
        from ..instructed.shipped import is_default_archive, shipped_prefixes_dir

        if is_default_archive(out["archive"]):
            out["archive"] = str(shipped_prefixes_dir(must_exist=False))
    return out


def training_yaml_hint(source: str | os.PathLike | None, alg: str) -> str:
    """``hparams/TRAINING/<alg>/<file>``: the training YAML that goes with the editing YAML ``source``."""
    name = "<model>.yaml"
    if source is not None:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") and path.parent.name == alg:
            name = path.name
    return f"hparams/TRAINING/{alg}/{name}"


#: Suffixes a hparams file may have; any other path gets ``.yaml`` appended, as in EasyEdit.
YAML_SUFFIXES = (".yaml", ".yml")


def yaml_path(path: str | os.PathLike) -> Path:
    """``path`` with ``.yaml`` appended unless it already ends in ``.yaml``/``.yml``."""
    path = Path(path)
    return path if path.suffix in YAML_SUFFIXES else path.with_name(path.name + ".yaml")


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The mapping in the YAML file ``path`` (``.yaml`` appended when missing) and the path read.

    The one YAML reader of every hparams loader (:meth:`PluginHyperParams.from_hparams`,
    :func:`~instructedit_plugin.registry.load_hparams`, the command line and
    :func:`~instructedit_plugin.compat.hparams_bridge.load_easyedit_hparams`). A missing file,
    invalid YAML or a top level that is not a mapping is a :class:`HyperParamsError` on ``<file>``.
    """
    file = yaml_path(path)
    where = str(file)
    if not file.is_file():
        raise HyperParamsError("<file>", f"no hparams file at {file}",
                               "check the path (relative paths are resolved from the current directory)", source=where)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise HyperParamsError("<file>", f"not valid YAML ({exc})", "fix the YAML syntax at the position shown",
                               source=where) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise HyperParamsError("<file>", f"unreadable ({exc})", "check the file's permissions and that it is UTF-8 text",
                               source=where) from exc
    if not isinstance(data, dict):
        raise HyperParamsError("<file>", f"top level is {type(data).__name__}, not a mapping",
                               "write one `key: value` per line", source=where)
    return data, where


def _is_cached_hub_name(name: str) -> bool:
    """A hub id (``org/name``) whose config.json is in the local Hugging Face cache (offline use)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def check_model_name(model_name: Any, source: str | None = None) -> None:
    """Raise :class:`HyperParamsError` for ``model_name`` unless it names a model that can be loaded offline.

    Accepted: a local Hugging Face folder (with ``config.json``), ``embedded`` (resolved when the
    YAML is loaded), a hub id already in the local Hugging Face cache, and anything that is not a
    path (a ``(model, tokenizer)`` pair, a model object). Called before EasyEdit or a trainer
    touches the model, so a placeholder such as ``./hugging_cache/gemma-3-270m`` is one line naming
    the field instead of EasyEdit's ``NotImplementedError`` or a transformers ``OSError``.
    """
    if not isinstance(model_name, (str, os.PathLike)) or is_embedded_name(model_name):
        return
    path = Path(os.path.expanduser(str(model_name)))
    if (path / "config.json").is_file() or _is_cached_hub_name(str(model_name)):
        return
    if path.is_dir():
        problem = f"{str(model_name)!r} is a folder without config.json, not a Hugging Face model folder"
    else:
        problem = f"{str(model_name)!r} is neither 'embedded' nor an existing local Hugging Face model folder"
    raise HyperParamsError("model_name", problem, fix_for(
        "set `model_name: embedded` (the packaged Gemma-3-270M) or the path of a local model folder holding "
        "config.json and the weights",
        "pass --model_name embedded (the packaged Gemma-3-270M) or --model_name <folder holding config.json and "
        "the weights>, or set model_name: in the YAML"), source)


def hp_field(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    min: float | None = None,  # noqa: A002 - reads naturally at the call site
    max: float | None = None,  # noqa: A002
    choices: tuple[Any, ...] | None = None,
    layer_index: bool = False,
    help: str = "",  # noqa: A002
) -> Any:
    """A dataclass field carrying its validation rules in ``metadata``.

    ``layer_index=True`` marks an int or list of ints that must be valid layer
    indices of the model named by ``model_name``.
    """
    metadata = {"min": min, "max": max, "choices": choices, "layer_index": layer_index, "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError``/``ValueError``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ValueError(f"must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("expected null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):  # NaN would pass every range check
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    if isinstance(value, tp):
        return value
    raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__}")


def num_layers_of(config: Any) -> int:
    """Number of transformer blocks in a Hugging Face config (GPT-2 calls it ``n_layer``)."""
    text_config = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the number of layers of a {type(config).__name__}")


@dataclasses.dataclass(kw_only=True)
class PluginHyperParams:
    """Base class: YAML loading plus validation. Subclasses are dataclasses too."""

    #: The ``alg_name`` (or, for training configs, ``alg``) value this class accepts.
    ALG_NAME: ClassVar[str] = ""
    #: Which YAML key carries the algorithm name.
    ALG_KEY: ClassVar[str] = "alg_name"
    #: Whether ``archive: default`` names prefixes shipped inside the package (see :func:`resolve_named_values`).
    SHIPPED_ARCHIVE: ClassVar[bool] = False

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | os.PathLike) -> PluginHyperParams:
        """Load and validate a YAML file (``.yaml`` is appended when missing, as in EasyEdit)."""
        data, path = read_yaml(hparams_name_or_path)
        return cls.from_dict(data, source=path)

    @classmethod
    def from_json(cls, fpath: str | os.PathLike) -> PluginHyperParams:
        with open(fpath, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle), source=str(fpath))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> PluginHyperParams:
        """Validate ``data`` field by field and build the object."""
        if not isinstance(data, dict):
            raise HyperParamsError("<file>", f"top level is {type(data).__name__}, not a mapping",
                                   "write one `key: value` per line", source)
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise HyperParamsError(str(bad_keys[0]), f"the key {bad_keys[0]!r} is not text",
                                   "write field names as keys, e.g. `prefix_len: 5`", source)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            key = unknown[0]
            if not key.strip():
                raise HyperParamsError("<empty key>", f"the key {key!r} is blank", "write the field name, or remove the line",
                                       source)
            close = difflib.get_close_matches(key, fields, n=1)
            fix = f"did you mean '{close[0]}'?" if close else f"remove it; known fields are: {', '.join(sorted(fields))}"
            raise HyperParamsError(key, f"unknown field for {cls.__name__}", fix, source)
        data = resolve_named_values(data, shipped_archive=cls.SHIPPED_ARCHIVE)
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            if name not in data:
                if field.default is _MISSING and field.default_factory is _MISSING:
                    raise HyperParamsError(name, "required field is missing", f"add `{name}: <{_type_name(hints[name])}>`", source)
                continue
            try:
                kwargs[name] = _coerce(data[name], hints[name])
            except (TypeError, ValueError) as exc:
                raise HyperParamsError(name, str(exc), f"give a value of type {_type_name(hints[name])}", source) from None
        obj = cls(**kwargs)
        obj._source = source
        obj.validate()
        return obj

    # ------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        self._source: str | None = getattr(self, "_source", None)

    def _error(self, field: str, problem: str, fix: str) -> HyperParamsError:
        return HyperParamsError(field, problem, fix, getattr(self, "_source", None))

    def validate(self) -> None:
        """Check ranges, choices, the algorithm name, cross-field rules and layer indices."""
        if self.ALG_NAME:
            value = getattr(self, self.ALG_KEY, None)
            if value != self.ALG_NAME:
                raise self._error(self.ALG_KEY, f"{type(self).__name__} needs '{self.ALG_NAME}', got {value!r}",
                                  f"set `{self.ALG_KEY}: {self.ALG_NAME}` or load this file with the class for {value!r}")
        for field in dataclasses.fields(self):
            meta = field.metadata
            value = getattr(self, field.name)
            values = value if isinstance(value, list) else [value]
            for item in values:
                if not isinstance(item, (int, float)) or isinstance(item, bool):
                    continue
                if meta.get("min") is not None and item < meta["min"]:
                    raise self._error(field.name, f"{item} is below the minimum {meta['min']}", f"use a value >= {meta['min']}")
                if meta.get("max") is not None and item > meta["max"]:
                    raise self._error(field.name, f"{item} is above the maximum {meta['max']}", f"use a value <= {meta['max']}")
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise self._error(field.name, f"{value!r} is not a valid choice", f"use one of {', '.join(map(repr, meta['choices']))}")
        self.validate_fields()
        self.validate_layers()

    def validate_fields(self) -> None:
        """Hook for cross-field rules in subclasses."""

    def check_ready(self) -> None:
        """Hook: checks that need files on disk (e.g. a trained ``archive``).

        Kept out of :meth:`validate` so that shipped YAMLs load before their
        archives are trained; ``BaseEditor`` calls it before loading the model,
        so editing with a missing archive still fails at once, by field name.
        """

    def layer_fields(self) -> dict[str, list[int]]:
        """Fields marked ``layer_index`` with their values as lists."""
        out = {}
        for field in dataclasses.fields(self):
            if field.metadata.get("layer_index"):
                value = getattr(self, field.name)
                if value is not None:
                    out[field.name] = list(value) if isinstance(value, (list, tuple)) else [value]
        return out

    def validate_layers(self, model_config: Any | None = None) -> None:
        """Check layer indices against ``model_config`` or, if omitted, the local ``model_name`` folder."""
        layer_fields = self.layer_fields()
        if not layer_fields:
            return
        if model_config is None:
            model_name = getattr(self, "model_name", None)
            if not isinstance(model_name, (str, os.PathLike)) or not (Path(model_name) / "config.json").is_file():
                return  # a hub name or an in-memory model: checked when the model is loaded
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(str(model_name), local_files_only=True)
        n_layers = num_layers_of(model_config)
        for name, layers in layer_fields.items():
            for layer in layers:
                if not -n_layers <= layer < n_layers:
                    raise self._error(name, f"layer index {layer} is out of range for a model with {n_layers} layers",
                                      f"use indices from 0 to {n_layers - 1}")

    # ------------------------------------------------------------------ misc
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclasses.dataclass(kw_only=True)
class EditingHyperParams(PluginHyperParams):
    """Fields every editing hparams class shares; EasyEdit's ``BaseEditor`` reads them."""

    alg_name: str = hp_field(help="algorithm name as registered in EasyEdit's ALG_DICT")
    model_name: str = hp_field(help="local Hugging Face folder or hub name of the model to edit")
    device: Union[int, str] = hp_field(0, help="CUDA index (EasyEdit style) or 'cpu' / 'cuda:N'")
    model_parallel: bool = hp_field(False)
    batch_size: int = hp_field(1, min=1)
    max_length: int = hp_field(40, min=1, help="token limit EasyEdit's metrics truncate to")
    fp16: bool = hp_field(False)

    def validate_fields(self) -> None:
        super().validate_fields()
        if isinstance(self.device, str):
            spec = self.device.strip()
            if not (spec == "cpu" or spec.isdigit() or spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit())):
                raise self._error("device", f"{self.device!r} is not a device", "use 'cpu', a CUDA index like 0, or 'cuda:0'")

