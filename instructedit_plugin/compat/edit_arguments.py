"""Validation of the arguments users pass to ``BaseEditor.edit`` / ``batch_edit``.

EasyEdit checks these with bare ``assert`` statements (or not at all: a locality
list one item short silently misaligns every later edit). The plugin validates
them up front, for every algorithm, and raises :class:`RequestError` naming the
argument and the fix. It only *rejects*; accepted inputs reach EasyEdit unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import RequestError


def _as_list(name: str, value: Any, allow_none: bool = False) -> list[Any] | None:
    if value is None:
        if allow_none:
            return None
        raise RequestError(f"`{name}` is missing. Fix: pass a string or a list of strings.")
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise RequestError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}. "
                       f"Fix: pass `{name}` as a list with one string per edit.")


def _check_strings(name: str, values: list[Any], allow_empty: bool = False) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RequestError(f"`{name}[{i}]` must be a string, got {type(value).__name__} {value!r}. "
                               f"Fix: pass text for every item of `{name}`.")
        if not allow_empty and not value.strip():
            raise RequestError(f"`{name}[{i}]` is empty. Fix: give non-empty text (or drop that edit).")


def _check_length(name: str, values: list[Any], expected: int) -> None:
    if len(values) != expected:
        raise RequestError(f"`{name}` has {len(values)} item(s) but there are {expected} prompt(s). "
                           f"Fix: give exactly one `{name}` entry per prompt.")


def _check_grouped_inputs(name: str, groups: Any, n_prompts: int) -> None:
    """``locality_inputs`` / ``portability_inputs``: ``{key: {"prompt": ..., "ground_truth": ...}}``."""
    if groups is None:
        return
    if not isinstance(groups, Mapping):
        raise RequestError(f"`{name}` must be a dict, got {type(groups).__name__}. Fix: write it like "
                           "{'neighborhood': {'prompt': [...], 'ground_truth': [...]}} (one key per kind of question).")
    for key, group in groups.items():
        where = f"{name}[{key!r}]"
        if not isinstance(group, Mapping) or "prompt" not in group or "ground_truth" not in group:
            raise RequestError(f"`{where}` must be a dict with 'prompt' and 'ground_truth'. "
                               f"Fix: write {{'prompt': [...], 'ground_truth': [...]}} with one entry per edit.")
        prompts, answers = group["prompt"], group["ground_truth"]
        if isinstance(prompts, str) != isinstance(answers, str):
            raise RequestError(f"`{where}`: 'prompt' and 'ground_truth' must both be strings or both be lists. "
                               "Fix: give both as lists with one entry per edit.")
        if isinstance(prompts, str):
            if n_prompts != 1:
                raise RequestError(f"`{where}` gives one prompt for {n_prompts} edits. Fix: give a list with one entry per edit.")
            continue
        if not isinstance(prompts, Sequence) or not isinstance(answers, Sequence):
            raise RequestError(f"`{where}`: 'prompt' and 'ground_truth' must be lists, got "
                               f"{type(prompts).__name__} and {type(answers).__name__}. Fix: give both as lists with one "
                               "entry per edit.")
        if len(prompts) != len(answers):
            raise RequestError(f"`{where}` has {len(prompts)} prompt(s) but {len(answers)} ground_truth value(s). "
                               "Fix: give one answer per prompt.")
        _check_length(f"{where}['prompt']", list(prompts), n_prompts)
        for part, values in (("prompt", prompts), ("ground_truth", answers)):
            for i, value in enumerate(values):
                if not _is_text_or_texts(value):
                    raise RequestError(f"`{where}['{part}'][{i}]` must be a string (or a list of strings), got "
                                       f"{type(value).__name__} {value!r}. Fix: give text for every entry.")


def _is_text_or_texts(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def validate_edit_arguments(
    prompts: Any,
    target_new: Any,
    ground_truth: Any = None,
    rephrase_prompts: Any = None,
    locality_inputs: Any = None,
    portability_inputs: Any = None,
    subject: Any = None,
) -> int:
    """Raise :class:`RequestError` for malformed edit arguments; return the number of edits."""
    prompt_list = _as_list("prompts", prompts)
    if not prompt_list:
        raise RequestError("`prompts` is empty. Fix: pass at least one prompt to edit.")
    _check_strings("prompts", prompt_list)
    n = len(prompt_list)
    targets = _as_list("target_new", target_new)
    _check_length("target_new", targets, n)
    _check_strings("target_new", targets)
    for name, value in (("ground_truth", ground_truth), ("rephrase_prompts", rephrase_prompts), ("subject", subject)):
        values = _as_list(name, value, allow_none=True)
        if values is None:
            continue
        if name == "ground_truth" and isinstance(value, str):
            continue  # EasyEdit broadcasts a single ground truth
        _check_length(name, values, n)
        _check_strings(name, values, allow_empty=name == "ground_truth")  # an unknown old answer may be ""
    if subject is not None:
        for i, (prompt, subj) in enumerate(zip(prompt_list, _as_list("subject", subject))):
            if subj not in prompt:
                raise RequestError(f"`subject[{i}]` {subj!r} does not occur in `prompts[{i}]` {prompt!r}. "
                                   "Fix: give the subject exactly as it is written in the prompt.")
    _check_grouped_inputs("locality_inputs", locality_inputs, n)
    _check_grouped_inputs("portability_inputs", portability_inputs, n)
    return n


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _texts(item)]
    return []


def evaluated_prompts(prompts: Any = None, rephrase_prompts: Any = None, locality_inputs: Any = None,
                      portability_inputs: Any = None) -> list[tuple[str, str]]:
    """``(field, prompt)`` for every question EasyEdit's evaluation scores after an edit."""
    out: list[tuple[str, str]] = []
    for name, value in (("prompts", prompts), ("rephrase_prompts", rephrase_prompts)):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            out += [(f"{name}[{i}]", p) for i, p in enumerate(value) if isinstance(p, str)]
    for name, groups in (("locality_inputs", locality_inputs), ("portability_inputs", portability_inputs)):
        if not isinstance(groups, Mapping):
            continue
        for key, group in groups.items():
            value = group.get("prompt") if isinstance(group, Mapping) else None
            if isinstance(value, str):
                value = [value]
            if isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    out += [(f"{name}[{key!r}]['prompt'][{i}]", p) for p in _texts(item)]
    return out


def check_answer_room(tok: Any, max_length: Any, prompts: Any = None, rephrase_prompts: Any = None,
                      locality_inputs: Any = None, portability_inputs: Any = None) -> None:
    """Reject a question that leaves no token for its answer under ``max_length`` (EasyEdit PyPI).

    EasyEdit PyPI's ``test_prediction_acc`` tokenises ``prompt + ' ' + target`` and ``prompt`` alike
    with ``truncation=True, max_length=hparams.max_length`` and scores the positions after the
    prompt. A prompt of ``max_length`` tokens or more (special tokens included) is cut to the same
    length as prompt + target, so no answer position is left: ``answers[0]`` of an empty list
    raises ``IndexError`` for every method (a batch of prompts silently scores NaN instead).
    EasyEdit main widens ``max_length`` to fit; on PyPI such a question is rejected here, naming
    the field, before anything is edited.
    """
    if tok is None or isinstance(max_length, bool) or not isinstance(max_length, int) or not callable(tok):
        return
    for field, prompt in evaluated_prompts(prompts, rephrase_prompts, locality_inputs, portability_inputs):
        n_tokens = len(tok(prompt)["input_ids"])
        if n_tokens >= max_length:
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            raise RequestError(
                f"`{field}` {shown!r} is {n_tokens} tokens, but the hparams' max_length is {max_length}: EasyEdit "
                "(PyPI) truncates the question and its answer to max_length when scoring, which leaves no answer "
                "token and fails with IndexError in test_prediction_acc. Fix: set max_length in the hparams to at "
                f"least {n_tokens} plus the answer's tokens, or shorten this question (or drop the record)")
