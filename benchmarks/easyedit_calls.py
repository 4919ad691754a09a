"""How the benchmark scripts call EasyEdit's ``BaseEditor.edit`` on one request at a time.

A request here is a dict of :func:`instructedit_plugin.data.load_requests` (``prompt``, ``target_new``,
``ground_truth``, ``rephrase_prompt``, ``subject``, ``locality`` / ``portability`` groups of
``{"prompt", "ground_truth"}``). :func:`edit_kwargs` turns it into ``BaseEditor.edit``'s keyword
arguments; :func:`run_edits` makes one edit call per request (EasyEdit restores the weights / memory
after each) and keeps going when a record fails, so one bad record does not sink a benchmark run.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Mapping, Sequence

#: EasyEdit needs a ground truth for every request; records without one get this placeholder (as EasyEdit's
#: own scripts do)
NO_GROUND_TRUTH = "<|endoftext|>"


def edit_kwargs(req: Mapping[str, Any], *, with_subject: bool = False, loc_prompt: str | None = None) -> dict:
    """``BaseEditor.edit`` keyword arguments for one request.

    ``with_subject``: pass the request's ``subject`` (ROME and KnowEdit's scripts need it); ``loc_prompt``
    (WISE): an unrelated sentence whose activations the side memory must leave alone."""
    kw: dict[str, Any] = dict(prompts=[req["prompt"]], target_new=[req["target_new"]],
                              ground_truth=[req.get("ground_truth") or NO_GROUND_TRUTH])
    if req.get("rephrase_prompt"):
        kw["rephrase_prompts"] = [req["rephrase_prompt"]]
    for section, arg in (("locality", "locality_inputs"), ("portability", "portability_inputs")):
        group = {k: {"prompt": [v["prompt"]], "ground_truth": [v["ground_truth"]]}
                 for k, v in (req.get(section) or {}).items()}
        if group:
            kw[arg] = group
    if with_subject:
        kw["subject"] = [req["subject"]]
    if loc_prompt:
        kw["loc_prompts"] = [loc_prompt]
    return kw


def run_edits(editor: Any, requests: Sequence[Mapping[str, Any]], name: str, *, with_subject: bool = False,
              log: logging.Logger | None = None) -> tuple[list[dict], Any, list[str]]:
    """One ``editor.edit(..., keep_original_weight=True)`` call per request: ``(metrics, last edited model,
    errors)``; ``metrics`` holds EasyEdit's per-edit dicts of the requests that ran, ``errors`` one line per
    failed record (``"record i: Type: message"``; the first two tracebacks are printed)."""
    log = log or logging.getLogger(__name__)
    metrics: list[dict] = []
    errors: list[str] = []
    edited = None
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        try:
            out, edited, _ = editor.edit(**edit_kwargs(req, with_subject=with_subject), keep_original_weight=True,
                                         verbose=False)
            metrics.extend(out)
        except Exception as exc:  # noqa: BLE001 - one failing record must not sink the benchmark
            errors.append(f"record {i}: {type(exc).__name__}: {exc}")
            log.warning("%s: record %d failed: %s", name, i, exc)
            if len(errors) <= 2:
                traceback.print_exc()
        if (i + 1) % 10 == 0 or i + 1 == len(requests):
            log.info("%s: %d/%d edits (%.0fs)", name, i + 1, len(requests), time.perf_counter() - t0)
    return metrics, edited, errors
