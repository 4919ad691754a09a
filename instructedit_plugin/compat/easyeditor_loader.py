"""Import EasyEdit, whichever flavour is present, and say which one it is.

Two flavours exist and both are supported:

* ``pypi``: ``easyeditor==0.0.1.dev0`` from PyPI (2023). Hard-codes ``cuda:``
  device strings, ``MENDHyperParams`` has an ``alg`` field, ``edit()`` takes
  ``keep_original_weight``, metrics carry a ``time`` key.
* ``main``: a clone of EasyEdit's GitHub main (2026) on ``sys.path`` (or named by
  the ``EASYEDIT_SRC`` environment variable). Has CPU support
  (``easyeditor.util.device``), ``edit(sequential_edit=...)``,
  ``metric_meta`` in metrics and a ``MultiTaskTrainer``.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from types import ModuleType

from ..errors import PluginError
from .missing_modules import placeholders_for_missing_modules
from .transformers_shims import install_modeling_utils_shims

LOG = logging.getLogger(__name__)

EASYEDIT_SRC_ENV = "EASYEDIT_SRC"


class EasyEditNotInstalledError(PluginError, ImportError):
    """Neither the PyPI easyeditor nor a clone of EasyEdit main can be imported."""


@dataclasses.dataclass(frozen=True)
class EasyEditInfo:
    """What was imported: the module, its flavour and where it lives."""

    module: ModuleType
    flavour: str  # "pypi" or "main"
    location: str
    stubbed_modules: frozenset[str]


_INFO: EasyEditInfo | None = None


def _add_source_dir_from_env() -> None:
    src = os.environ.get(EASYEDIT_SRC_ENV)
    if not src:
        return
    src = os.path.abspath(os.path.expanduser(src))
    if not os.path.isdir(os.path.join(src, "easyeditor")):
        raise EasyEditNotInstalledError(
            f"{EASYEDIT_SRC_ENV}={src} does not contain an 'easyeditor' package folder. "
            f"Fix: point {EASYEDIT_SRC_ENV} at the root of a clone of EasyEdit (the folder holding 'easyeditor/')."
        )
    if src not in sys.path:
        sys.path.insert(0, src)


def detect_flavour(module: ModuleType) -> str:
    """``main`` when the CPU-aware device helpers of EasyEdit main exist, else ``pypi``."""
    try:
        importlib.import_module(f"{module.__name__}.util.device")
        return "main"
    except ImportError:
        return "pypi"


def load_easyeditor() -> EasyEditInfo:
    """Import ``easyeditor`` once (with shims) and return :class:`EasyEditInfo`."""
    global _INFO
    if _INFO is not None:
        return _INFO
    _add_source_dir_from_env()
    added = install_modeling_utils_shims()
    if added:
        LOG.debug("added legacy names to transformers.modeling_utils: %s", added)
    with placeholders_for_missing_modules() as stubbed:
        try:
            module = importlib.import_module("easyeditor")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "easyeditor":
                raise EasyEditNotInstalledError(
                    "EasyEdit is not importable. Fix: `pip install --no-deps easyeditor==0.0.1.dev0` "
                    f"or put a clone of EasyEdit main on sys.path (or set {EASYEDIT_SRC_ENV})."
                ) from exc
            raise
    # EasyEdit's editor module configures the root logger at import; leave the user's choice intact.
    _INFO = EasyEditInfo(
        module=module,
        flavour=detect_flavour(module),
        location=os.path.dirname(getattr(module, "__file__", "") or ""),
        stubbed_modules=frozenset(stubbed),
    )
    if stubbed:
        LOG.debug("EasyEdit imported with placeholders for uninstalled optional modules: %s", sorted(stubbed))
    return _INFO


def easyeditor_available() -> bool:
    """True if EasyEdit can be imported (imports it as a side effect)."""
    try:
        load_easyeditor()
    except EasyEditNotInstalledError:
        return False
    return True
