"""Placeholders for EasyEdit's multimodal-only imports.

EasyEdit imports ``timm``, ``torchvision``, ``iopath``, ``fairscale`` and ``cv2`` at
package import time, although only its image-text editors use them. Here
torchvision cannot be installed next to the CPU torch build (its wheels link
CUDA), and an unpinned ``timm`` upgrades torch and pulls ~1 GB of CUDA wheels.
So, *while* ``easyeditor`` is imported and only for modules that are really not
installed, a meta-path finder serves placeholder modules. Any real use of a
placeholder (calling it, instantiating a subclass, reading an attribute of a
placeholder object) raises :class:`MissingDependencyError` naming the package.
Installed modules are never shadowed: the finder is consulted after a regular
``importlib.util.find_spec`` says the module does not exist.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator

from ..errors import MissingDependencyError

#: Import name -> (pip distribution, the EasyEdit feature that needs it). Only
#: modules off EasyEdit's text-editing path belong here.
OPTIONAL_EASYEDIT_MODULES: dict[str, tuple[str, str]] = {
    "timm": ("timm", "EasyEdit's multimodal (image-text) editing"),
    "torchvision": ("torchvision", "EasyEdit's multimodal (image-text) editing"),
    "iopath": ("iopath", "EasyEdit's multimodal (image-text) editing"),
    "fairscale": ("fairscale", "EasyEdit's multimodal (image-text) editing"),
    "cv2": ("opencv-python", "EasyEdit's multimodal (image-text) editing"),
    "av": ("av", "EasyEdit's video editing datasets"),
    "qwen_vl_utils": ("qwen-vl-utils", "EasyEdit's Qwen-VL multimodal editing"),
    "zhipuai": ("zhipuai", "EasyEdit's DeepEdit API method"),
}


def _raise_missing(package: str) -> None:
    pip_name, feature = OPTIONAL_EASYEDIT_MODULES[package]
    raise MissingDependencyError(package, feature, pip_name)


class _PlaceholderMeta(type):
    """Metaclass so that placeholder *classes* fail on use but can still be subclassed or decorated."""

    def __call__(cls, *args, **kwargs):
        _raise_missing(cls._missing_package)

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        _raise_missing(cls._missing_package)


def _placeholder(package: str, name: str) -> type:
    return _PlaceholderMeta(name, (), {"_missing_package": package, "__module__": package})


class PlaceholderModule(types.ModuleType):
    """A module object standing in for an uninstalled package."""

    def __init__(self, name: str, package: str):
        super().__init__(name)
        self.__path__: list[str] = []
        self.__file__ = None
        self._missing_package = package

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(self._missing_package, attr)


class _PlaceholderLoader(importlib.abc.Loader):
    def __init__(self, package: str, used: set[str]):
        self.package = package
        self.used = used

    def create_module(self, spec):
        self.used.add(self.package)
        return PlaceholderModule(spec.name, self.package)

    def exec_module(self, module) -> None:  # nothing to execute
        return None


def _imported_by_easyeditor() -> bool:
    """True when the import statement being resolved sits in an ``easyeditor`` module.

    Other libraries probing availability while EasyEdit imports (transformers'
    ``is_torchvision_available`` calls ``find_spec``) must keep seeing the truth.
    """
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen importlib") or "importlib" in filename.replace("\\", "/").split("/")[-2:-1]):
            return str(frame.f_globals.get("__name__", "")).startswith("easyeditor")
        frame = frame.f_back
    return False


class _MissingModuleFinder(importlib.abc.MetaPathFinder):
    def __init__(self, roots: frozenset[str]):
        self.roots = roots
        self.used: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        root = fullname.split(".")[0]
        if root not in self.roots or not _imported_by_easyeditor():
            return None
        return importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader(root, self.used), is_package=True)


def missing_optional_modules() -> frozenset[str]:
    """Names in :data:`OPTIONAL_EASYEDIT_MODULES` that are not importable here."""
    missing = set()
    for name in OPTIONAL_EASYEDIT_MODULES:
        if name in sys.modules and not isinstance(sys.modules[name], PlaceholderModule):
            continue
        try:
            if importlib.util.find_spec(name) is None:
                missing.add(name)
        except (ImportError, ValueError):
            missing.add(name)
    return frozenset(missing)


@contextlib.contextmanager
def placeholders_for_missing_modules() -> Iterator[set[str]]:
    """Serve placeholders for missing multimodal modules while the ``with`` block runs.

    Yields the set of top-level names a placeholder was actually served for
    (filled while the block runs).

    On exit the finder is removed and the placeholder entries are dropped from
    ``sys.modules`` (EasyEdit keeps its own references), so other libraries'
    availability checks (``find_spec``) still see the truth afterwards.
    """
    roots = missing_optional_modules()
    if not roots:
        yield set()
        return
    finder = _MissingModuleFinder(roots)
    sys.meta_path.append(finder)
    try:
        yield finder.used
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, PlaceholderModule)]:
            del sys.modules[name]
