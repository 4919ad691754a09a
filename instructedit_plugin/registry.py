"""One registration mechanism for every algorithm the plugin ships.

An algorithm is described once by an :class:`AlgorithmSpec`. :func:`register`
imports EasyEdit (either flavour), applies the compatibility patches and pushes
each spec into EasyEdit's own tables, mutating them in place because
``easyeditor/editors/editor.py`` star-imports ``ALG_DICT``:

* ``ALG_DICT[name]`` -> the apply function ``BaseEditor`` calls,
* ``ALG_TRAIN_DICT[name.upper()]`` -> the editable-model class EasyEdit's trainer
  instantiates (it looks keys up with ``config.alg.upper()``),
* ``BatchEditor.is_batchable_method`` accepts batchable algorithms,
* hparams classes become attributes of the ``easyeditor`` module, so scripts
  written EasyEdit-style can ``from easyeditor import InstructEditHyperParams``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import PluginError

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """Everything EasyEdit needs to know about one plugin algorithm."""

    name: str
    hparams_class: type
    apply_fn: Callable[..., Any]
    training_hparams_class: type | None = None
    train_module: type | None = None
    batchable: bool = True
    exports: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def exported_names(self) -> dict[str, Any]:
        names = {self.hparams_class.__name__: self.hparams_class}
        if self.training_hparams_class is not None:
            names[self.training_hparams_class.__name__] = self.training_hparams_class
        names.update(self.exports)
        return names


_LOCK = threading.RLock()
_SPECS: dict[str, AlgorithmSpec] = {}
_PUSHED: set[str] = set()
_REGISTERED = False

#: Modules that define the plugin's own algorithms; each calls :func:`register_algorithm` on import.
BUILTIN_ALGORITHM_MODULES: tuple[str, ...] = ("instructedit_plugin.instructedit", "instructedit_plugin.instructed")


def registered_algorithms() -> Mapping[str, AlgorithmSpec]:
    """The plugin's algorithms by ``alg_name`` (read-only view)."""
    return MappingProxyType(_SPECS)


def _batchable_names() -> set[str]:
    return {name for name, spec in _SPECS.items() if spec.batchable}


def _easyeditor_tables() -> tuple[dict, dict]:
    alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    alg_train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
    return alg_dict, alg_train_dict


def _push(spec: AlgorithmSpec) -> None:
    alg_dict, alg_train_dict = _easyeditor_tables()
    alg_dict[spec.name] = spec.apply_fn
    if spec.train_module is not None:
        alg_train_dict[spec.name.upper()] = spec.train_module
    easyeditor = sys.modules["easyeditor"]
    for attr, value in spec.exported_names().items():
        setattr(easyeditor, attr, value)
    _PUSHED.add(spec.name)


def _pull(spec: AlgorithmSpec) -> None:
    alg_dict, alg_train_dict = _easyeditor_tables()
    if alg_dict.get(spec.name) is spec.apply_fn:
        del alg_dict[spec.name]
    if spec.train_module is not None and alg_train_dict.get(spec.name.upper()) is spec.train_module:
        del alg_train_dict[spec.name.upper()]
    easyeditor = sys.modules["easyeditor"]
    for attr, value in spec.exported_names().items():
        if getattr(easyeditor, attr, None) is value:
            delattr(easyeditor, attr)
    _PUSHED.discard(spec.name)


def register_algorithm(spec: AlgorithmSpec, replace: bool = False) -> None:
    """Add ``spec`` to the plugin registry (and to EasyEdit at once if already registered)."""
    with _LOCK:
        existing = _SPECS.get(spec.name)
        if existing is not None and existing != spec and not replace:
            raise PluginError(
                f"algorithm '{spec.name}' is already registered by {existing.apply_fn!r}. "
                "Fix: choose another alg_name, or pass replace=True to override it on purpose."
            )
        if existing is not None and existing != spec and spec.name in _PUSHED:
            _pull(existing)
        _SPECS[spec.name] = spec
        if _REGISTERED:
            _push(spec)


def unregister_algorithm(name: str) -> None:
    """Remove an algorithm from the plugin registry and from EasyEdit's tables."""
    with _LOCK:
        spec = _SPECS.pop(name, None)
        if spec is not None and name in _PUSHED:
            _pull(spec)


def register() -> Any:
    """Import EasyEdit, patch it once and register every plugin algorithm; idempotent.

    Returns the :class:`~instructedit_plugin.compat.easyeditor_loader.EasyEditInfo`.
    """
    global _REGISTERED
    import importlib

    from .compat.easyeditor_loader import load_easyeditor
    from .compat.editor_patches import install_editor_patches

    with _LOCK:
        info = load_easyeditor()
        for module in BUILTIN_ALGORITHM_MODULES:
            importlib.import_module(module)
        install_editor_patches(info.flavour, _batchable_names, _SPECS.keys)
        for spec in _SPECS.values():
            _push(spec)
        _REGISTERED = True
        return info


#: EasyEdit algorithm names whose hparams class is not ``<alg_name>HyperParams`` (EasyEdit main 14cea82)
_EASYEDIT_HPARAMS_NAMES = {"SERAC": "SERACHparams", "FT-Api": "FTApiHyperParams", "GRACE": "GraceHyperParams",
                           "MEMIT-FE": "MEMITFEHyperParams", "R-ROME": "R_ROMEHyperParams",
                           "ULTRAEDIT": "UltraEditHyperParams", "DeepEdit-Api": "DeepEditApiHyperParams",
                           "DEFER": "DeferHyperParams"}


def hparams_class_for(alg_name: str, training: bool = False) -> type:
    """The hparams class for ``alg_name``: a plugin algorithm's, else EasyEdit's own."""
    spec = _SPECS.get(alg_name)
    if spec is not None:
        cls = spec.training_hparams_class if training else spec.hparams_class
        if cls is None:
            raise PluginError(f"algorithm '{alg_name}' has no training hparams; it needs no training")
        return cls
    register()
    easyeditor = sys.modules["easyeditor"]
    name = f"{alg_name.upper()}TrainingHparams" if training else _EASYEDIT_HPARAMS_NAMES.get(alg_name, f"{alg_name}HyperParams")
    cls = getattr(easyeditor, name, None)
    if cls is None:
        known = sorted(set(_SPECS) | set(sys.modules["easyeditor.util.alg_dict"].ALG_DICT))
        raise PluginError(f"unknown alg_name '{alg_name}'. Fix: use one of: {', '.join(known)}")
    return cls


def load_hparams(path: str, training: bool = False, **overrides: Any) -> Any:
    """Load any hparams YAML with the class its ``alg_name`` (``alg`` for training files) names."""
    from .compat.hparams_bridge import load_easyedit_hparams
    from .core.config import PluginHyperParams, read_yaml
    from .errors import HyperParamsError

    data, path = read_yaml(path)
    key = "alg" if training else "alg_name"
    if key not in data:
        raise HyperParamsError(key, "missing", f"add `{key}: <algorithm>` to the YAML", source=path)
    cls = hparams_class_for(str(data[key]), training=training)
    if issubclass(cls, PluginHyperParams):
        data.update(overrides)
        return cls.from_dict(data, source=path)
    return load_easyedit_hparams(cls, path, **overrides)
