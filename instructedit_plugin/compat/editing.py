"""Build EasyEdit editors for the plugin's entry points (:func:`make_editor`) and run ready-made
request dicts through them (:func:`run_edit_requests`), either flavour.

``BaseEditor.edit(prompts=..., target_new=...)`` rebuilds requests from lists and
drops extra fields (an InstructEd ``instruction``, an InstructEdit ``task``).
Both flavours also have ``edit_requests(requests, ...)``, which keeps them, but
with different restore switches: PyPI takes ``keep_original_weight`` (True =
evaluate each edit alone), main takes ``sequential_edit`` (True = accumulate).
"""
from __future__ import annotations

import contextlib
import sys
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
    """An EasyEdit ``BaseEditor`` for ``hparams``, any algorithm (the plugin's or EasyEdit's own).

    What the plugin's entry points (command line, demo, benchmarks, examples) use instead of
    ``BaseEditor.from_hparams``: a ``model_name`` that names no loadable model, or hparams that are
    not ready (``check_ready``), fail first with a ``HyperParamsError`` naming the field; a local
    Hugging Face folder is loaded with the Auto classes (EasyEdit sniffs model names and refuses
    e.g. Gemma, Qwen2 or neutrally named folders); and several methods evaluated on one model can
    share an already loaded ``(model, tok)``. Afterwards ``model_name`` is the name again, as
    EasyEdit's metrics expect a string.
    """
    from ..registry import register
    from .editor_patches import check_editor_hparams, init_on_pair, load_local_model

    register()
    import easyeditor

    if model is not None and tok is None:
        raise ValueError("pass the tokenizer together with the model")
    if model is None:
        check_editor_hparams(hparams)
        pair = load_local_model(hparams)
        if pair is None:
            with _easyedit_prints_to_stderr():
                return easyeditor.BaseEditor.from_hparams(hparams)
        model, tok = pair
    editor = easyeditor.BaseEditor.__new__(easyeditor.BaseEditor)
    with _easyedit_prints_to_stderr():
        init_on_pair(easyeditor.BaseEditor.__init__, editor, hparams, (model, tok))
    return editor


def _easyedit_prints_to_stderr() -> contextlib.AbstractContextManager:
    """``BaseEditor.__init__`` prints (e.g. "We are creating the logger files" when ``./logs`` is new);
    send that to stderr so a caller's stdout (the command line's results) holds only its own output."""
    return contextlib.redirect_stdout(sys.stderr)
