"""Run a list of ready-made request dicts through EasyEdit's ``BaseEditor``, either flavour.

``BaseEditor.edit(prompts=..., target_new=...)`` rebuilds requests from lists and
drops extra fields (an InstructEd ``instruction``, an InstructEdit ``task``).
Both flavours also have ``edit_requests(requests, ...)``, which keeps them, but
with different restore switches: PyPI takes ``keep_original_weight`` (True =
evaluate each edit alone), main takes ``sequential_edit`` (True = accumulate).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .easyeditor_loader import load_easyeditor

#: Keys EasyEdit's metrics read; everything else in a request is passed through untouched.
_EASYEDIT_DEFAULTS = {"portability": {}, "locality": {}}


def _complete(request: Mapping[str, Any]) -> dict[str, Any]:
    out = {**_EASYEDIT_DEFAULTS, **dict(request)}
    out.setdefault("ground_truth", "<|endoftext|>")
    return out


def run_edit_requests(editor: Any, requests: Sequence[Mapping[str, Any]], sequential: bool = False,
                      verbose: bool = False, **kwargs: Any) -> tuple[list[dict], Any, Any]:
    """Edit and evaluate ``requests`` with ``editor``; returns EasyEdit's ``(metrics, model, weights_copy)``."""
    from ..requests import validate_edit_arguments

    requests = [_complete(r) for r in requests]
    validate_edit_arguments([r.get("prompt") for r in requests], [r.get("target_new") for r in requests])
    if load_easyeditor().flavour == "pypi":
        return editor.edit_requests(requests, keep_original_weight=not sequential, verbose=verbose, **kwargs)
    return editor.edit_requests(requests, sequential_edit=sequential, verbose=verbose, **kwargs)
