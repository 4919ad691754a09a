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
    from .edit_arguments import validate_edit_arguments

    requests = [_complete(r) for r in requests]
    validate_edit_arguments([r.get("prompt") for r in requests], [r.get("target_new") for r in requests])
    if load_easyeditor().flavour == "pypi":
        return editor.edit_requests(requests, keep_original_weight=not sequential, verbose=verbose, **kwargs)
    return editor.edit_requests(requests, sequential_edit=sequential, verbose=verbose, **kwargs)


def make_editor(hparams: Any, model: Any = None, tok: Any = None) -> Any:
    """``BaseEditor.from_hparams(hparams)``, optionally on an already loaded ``(model, tok)``.

    Several methods evaluated on one model (benchmarks, the demo) should not load
    it once per method. EasyEdit accepts a ``(model, tok)`` pair as ``model_name``
    but its metrics then need the name back as a string, which this restores.
    """
    from .easyeditor_loader import load_easyeditor

    load_easyeditor()
    from ..registry import register

    register()
    import easyeditor

    if model is None:
        return easyeditor.BaseEditor.from_hparams(hparams)
    if tok is None:
        raise ValueError("pass the tokenizer together with the model")
    name = hparams.model_name
    hparams.model_name = (model, tok)
    try:
        editor = easyeditor.BaseEditor.from_hparams(hparams)
    finally:
        hparams.model_name = name
    editor.model_name = name
    return editor
