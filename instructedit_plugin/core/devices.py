"""The one place that turns a ``device`` setting into a :class:`torch.device`.

Both methods' hparams, trainers, datasets and the example scripts accept EasyEdit's spellings of a
device: a CUDA index (``0`` or ``"0"``), ``"cuda"``, ``"cuda:N"``, ``"cpu"`` (any other device type
torch knows, e.g. ``"mps"``, passes through), and ``None``/``"auto"`` for "the first GPU if there is
one". Without CUDA every CUDA spelling lands on the CPU, so one YAML runs on a laptop and on a GPU
box. A value that is no device is a :class:`~instructedit_plugin.errors.HyperParamsError` naming the
field. (:mod:`instructedit_plugin.compat.devices` only rewrites the device *arguments* PyPI
EasyEdit builds inside its own code, and asks this module where they land.)
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import HyperParamsError

__all__ = ["AUTO", "resolve_device"]

#: The word that asks for the first GPU when there is one, else the CPU (as ``None`` does).
AUTO = "auto"


def _cuda(index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda") if index is None else torch.device("cuda", index)


def _bad(device: Any, field: str, source: str | None) -> HyperParamsError:
    return HyperParamsError(field, f"{device!r} is not a device",
                            "use 'cpu', a CUDA index like 0, 'cuda', 'cuda:0' or 'auto'", source)


def resolve_device(device: Any, field: str = "device", source: str | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; CUDA spellings become the CPU when CUDA is absent.

    Accepted: ``None``/``"auto"`` (``cuda:0`` when CUDA exists, else ``cpu``), a non-negative CUDA
    index as int or digits, ``"cuda"``, ``"cuda:N"``, ``"cpu"``, a :class:`torch.device`, or any
    other device string torch accepts. ``field`` and ``source`` name the setting in the error
    raised for anything else.
    """
    if isinstance(device, torch.device):
        return _cuda(device.index) if device.type == "cuda" else device
    if device is None:
        return _cuda(0)
    if isinstance(device, bool):  # a YAML `device: true` is no index
        raise _bad(device, field, source)
    if isinstance(device, int):
        if device < 0:
            raise _bad(device, field, source)
        return _cuda(device)
    if not isinstance(device, str):
        raise _bad(device, field, source)
    spec = device.strip().lower()
    if spec == AUTO:
        return _cuda(0)
    if spec.isdigit():
        return _cuda(int(spec))
    if spec == "cuda":
        return _cuda(None)
    if spec.startswith("cuda:"):
        if not spec[5:].isdigit():
            raise _bad(device, field, source)
        return _cuda(int(spec[5:]))
    try:
        resolved = torch.device(spec)
    except (RuntimeError, ValueError):
        raise _bad(device, field, source) from None
    return _cuda(resolved.index) if resolved.type == "cuda" else resolved
