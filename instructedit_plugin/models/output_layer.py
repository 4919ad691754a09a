"""Keep a frozen model's output layer on torch's fast path when ``generate`` hands it a one-token slice.

When every parameter of a model is frozen (``requires_grad=False``: InstructEd's prefix training and PEFT
tuner, InstructEdit's editable model, EasyEdit's GRACE), torch 2.13 on CPU runs ``F.linear(x, W)`` for a
3-D ``x`` of the shape ``[1, 1, hidden]`` with a non-standard batch stride -- ``hidden_states[:, -1:, :]``,
the view ``generate`` passes the output layer at every step -- through ``bmm`` with a copy of the whole
weight. On Gemma-3-270M (a 262,144 x 640 output layer) that is about 3 s instead of 65 ms per generated
token (the cause of GRACE's slow scoring, ``benchmarks/notes/memory_editors_sequential.md``). The view's
values are fine; only its strides send torch down that path, and ``.contiguous()`` does not help (torch
already calls a tensor with size-1 dimensions contiguous).

:func:`keep_output_layer_dense` adds a forward pre-hook to the model's output embeddings that gives such
an input standard strides (a copy of the ``[batch, k, hidden]`` slice, not of the weight): the same
values, so the same logits, on the fast path.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["has_standard_strides", "keep_output_layer_dense"]

_HOOK_ATTR = "_instructedit_dense_input_hook"


def has_standard_strides(x: torch.Tensor) -> bool:
    """Whether ``x``'s strides are exactly the row-major ones of its shape (size-1 dimensions included)."""
    expected = 1
    for size, stride in zip(reversed(x.shape), reversed(x.stride())):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not has_standard_strides(x):
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def keep_output_layer_dense(model: nn.Module) -> RemovableHandle | None:
    """Install the pre-hook on ``model``'s output embeddings (once per layer); returns the hook's handle
    (``handle.remove()`` takes it off), or ``None`` when the model has no output embeddings or the hook
    is already there."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    existing = getattr(head, _HOOK_ATTR, None)
    if existing is not None and existing.id in head._forward_pre_hooks:
        return None
    handle = head.register_forward_pre_hook(_dense_input)
    setattr(head, _HOOK_ATTR, handle)
    return handle
