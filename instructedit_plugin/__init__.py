"""instructedit-plugin: InstructEdit and InstructEd for EasyEdit.

Importing the package registers the plugin's algorithms into EasyEdit when
EasyEdit is importable (set ``INSTRUCTEDIT_NO_AUTOREGISTER=1`` to skip that and
call :func:`register` yourself). Registration is idempotent.
"""
from __future__ import annotations

import logging
import os

from .errors import DataSchemaError, HyperParamsError, PluginError, RequestError
from .registry import AlgorithmSpec, register, register_algorithm, registered_algorithms, unregister_algorithm

__version__ = "0.1.0"

__all__ = [
    "AlgorithmSpec",
    "DataSchemaError",
    "HyperParamsError",
    "PluginError",
    "RequestError",
    "__version__",
    "register",
    "register_algorithm",
    "registered_algorithms",
    "unregister_algorithm",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public names that live in the method subpackages, imported on first access so that
#: ``import instructedit_plugin`` stays light for users of the loaders or the CLI.
_LAZY_EXPORTS = {
    "InstructEditHyperParams": "instructedit_plugin.instructedit",
    "InstructEditTrainingHparams": "instructedit_plugin.instructedit",
    "InstructEdHyperParams": "instructedit_plugin.instructed",
    "InstructEdTrainingHparams": "instructedit_plugin.instructed",
}


def __getattr__(name: str):
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'instructedit_plugin' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def _autoregister() -> None:
    if os.environ.get("INSTRUCTEDIT_NO_AUTOREGISTER", "").strip() not in ("", "0"):
        return
    from .compat.easyeditor_loader import EasyEditNotInstalledError

    try:
        register()
    except EasyEditNotInstalledError as exc:
        logging.getLogger(__name__).debug("EasyEdit not importable; algorithms not registered yet: %s", exc)


_autoregister()
