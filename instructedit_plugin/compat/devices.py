"""Run PyPI EasyEdit's hard-coded ``cuda:`` code on the CPU.

``easyeditor==0.0.1.dev0`` formats every device as ``f"cuda:{hparams.device}"``,
so ``device: cpu`` in a YAML becomes the invalid string ``"cuda:cpu"``, and on a
machine without CUDA every ``cuda:N`` fails. :func:`cuda_strings_to_cpu` rewrites
such device arguments *only while an EasyEdit call is running*: it patches the
``.to``/``.cuda`` methods (the rewrite only touches arguments that would fail
anyway) and swaps the ``torch`` global of EasyEdit's own modules for a proxy
whose ``device``/tensor factories/``cuda`` memory stats are CPU-safe. Outside
the ``with`` block nothing is patched, and with CUDA present and an integer
device nothing is patched at all.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch

from ..core.devices import resolve_device

_LOCK = threading.RLock()
_DEPTH = 0
_SAVED: list[tuple[Any, str, Any]] = []

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "eye", "linspace",
)


def map_device(device: Any) -> Any:
    """Rewrite a device argument PyPI EasyEdit built that cannot work here; return anything else unchanged.

    ``"cuda:cpu"`` (PyPI's ``f"cuda:{hparams.device}"`` on ``device: cpu``) loses its bogus prefix;
    without CUDA, any CUDA argument goes where :func:`~instructedit_plugin.core.devices.resolve_device`
    puts it (the CPU). Nothing else is touched: this maps arguments, it does not resolve settings.
    """
    if isinstance(device, str):
        spec = device.strip()
        while spec.startswith("cuda:") and not spec[5:].isdigit():
            spec = spec[5:]  # "cuda:cpu" -> "cpu", "cuda:cuda:0" -> "cuda:0"
        device = spec
    if torch.cuda.is_available():
        return device
    is_cuda = (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, int) and not isinstance(device, bool)) or (
        isinstance(device, str) and (device.startswith("cuda") or device.isdigit()))
    return resolve_device(device) if is_cuda else device


def _map_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "device" in kwargs:
        kwargs = dict(kwargs, device=map_device(kwargs["device"]))
    if args and isinstance(args[0], (str, int, torch.device)) and not isinstance(args[0], bool):
        args = (map_device(args[0]),) + tuple(args[1:])
    return args, kwargs


def _wrap_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        args, kwargs = _map_args(args, kwargs)
        return original(self, *args, **kwargs)

    return to


def _wrap_cuda(original):
    @functools.wraps(original)
    def cuda(self, device=None, *args, **kwargs):
        if not torch.cuda.is_available():
            return self.to("cpu")
        return original(self, device, *args, **kwargs)

    return cuda


def _wrap_factory(original):
    @functools.wraps(original)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = map_device(kwargs["device"])
        return original(*args, **kwargs)

    return factory


class _DeviceMeta(type):
    def __call__(cls, *args, **kwargs):
        if args and isinstance(args[0], str):
            args = (map_device(args[0]),) + tuple(args[1:])
        device = torch.device(*args, **kwargs)
        return map_device(device)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, torch.device)


class _CpuSafeDevice(metaclass=_DeviceMeta):
    """Stands in for ``torch.device`` inside EasyEdit modules while redirecting."""


def _cuda_proxy() -> types.SimpleNamespace | Any:
    if torch.cuda.is_available():
        return torch.cuda

    class _CudaProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch.cuda, name)

    proxy = _CudaProxy("torch.cuda")
    proxy.max_memory_allocated = lambda *a, **k: 0
    proxy.max_memory_reserved = lambda *a, **k: 0
    proxy.memory_allocated = lambda *a, **k: 0
    proxy.reset_peak_memory_stats = lambda *a, **k: None
    proxy.empty_cache = lambda *a, **k: None
    proxy.synchronize = lambda *a, **k: None
    proxy.is_available = lambda: False
    proxy.device_count = lambda: 0
    return proxy


def _torch_proxy() -> types.ModuleType:
    class _TorchProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = _TorchProxy("torch")
    proxy.device = _CpuSafeDevice
    proxy.cuda = _cuda_proxy()
    for name in _FACTORIES:
        setattr(proxy, name, _wrap_factory(getattr(torch, name)))
    return proxy


_ABSENT = object()


def _patch(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name``, remembering what ``owner`` itself held (not what it inherited)."""
    _SAVED.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


def _install() -> None:
    from transformers.tokenization_utils_base import BatchEncoding

    _patch(torch.Tensor, "to", _wrap_to(torch.Tensor.to))
    _patch(torch.nn.Module, "to", _wrap_to(torch.nn.Module.to))
    _patch(BatchEncoding, "to", _wrap_to(BatchEncoding.to))
    _patch(torch.Tensor, "cuda", _wrap_cuda(torch.Tensor.cuda))
    _patch(torch.nn.Module, "cuda", _wrap_cuda(torch.nn.Module.cuda))
    proxy = _torch_proxy()
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "easyeditor" or name.startswith("easyeditor.")):
            if getattr(module, "torch", None) is torch:
                _patch(module, "torch", proxy)


def _uninstall() -> None:
    while _SAVED:
        owner, name, value = _SAVED.pop()
        if value is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


@contextlib.contextmanager
def cuda_strings_to_cpu(enabled: bool = True) -> Iterator[bool]:
    """Redirect impossible ``cuda`` device requests to the CPU inside the block (re-entrant)."""
    global _DEPTH
    if not enabled:
        yield False
        return
    with _LOCK:
        if _DEPTH == 0:
            _install()
        _DEPTH += 1
    try:
        yield True
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _uninstall()


def needs_cpu_redirect(flavour: str, device: Any) -> bool:
    """PyPI EasyEdit needs the redirect unless CUDA exists and the device is a CUDA index."""
    if flavour != "pypi":
        return False
    if not torch.cuda.is_available():
        return True
    return isinstance(device, str) and not device.strip().isdigit() and not device.strip().startswith("cuda")
