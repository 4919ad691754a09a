"""``sim`` computed in a worker thread while the LM forward starts (``sim_overlap``; #15 item 3's query cost).

A gold query must encode its question with the sentence encoder before ``sim`` exists; the instructed
forward reads ``sim`` first in its first attention (Eq. 15 re-weights the instruction columns in every
layer, so from layer 0). :func:`defer_similarity` starts the computation in one worker thread and returns
a :class:`~.context.DeferredSim`; the work the forward does before its first attention -- attaching the
prefixes, laying out the cached instruction keys/values, the embeddings, the first layer's projections --
runs meanwhile, and the attention waits for ``sim`` where it first reads it
(:meth:`~.context.InstructionContext.sim_for`).

Exactness: the worker runs the very same call (same encoder, same texts, the caller's number of torch
threads, no gradient), so the outputs are bit-identical to computing ``sim`` first. The saving is in wall
clock only and needs a second core: the process's CPU time is not reduced (the encoder still runs), which
is why the benchmark reports both.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .context import DeferredSim

__all__ = ["defer_similarity"]

_EXECUTOR: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The one worker thread every ``sim_overlap`` query shares (created on first use)."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instructed-sim")
        return _EXECUTOR


def _run(compute: Callable[[], Any], threads: int) -> Any:
    if torch.get_num_threads() != threads:  # a new thread starts with the process default, not the caller's
        torch.set_num_threads(threads)
    with torch.no_grad():
        return compute()


def defer_similarity(compute: Callable[[], Any], size: int) -> DeferredSim:
    """Start ``compute()`` (returning the ``[size]`` similarities) in the worker thread, with the calling
    thread's number of torch threads; the :class:`~.context.DeferredSim` waits for it where it is read."""
    return DeferredSim(_executor().submit(_run, compute, torch.get_num_threads()), size)
