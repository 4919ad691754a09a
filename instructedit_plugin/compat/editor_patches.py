"""Small, idempotent adjustments to EasyEdit classes so plugin algorithms run through them.

* ``BaseEditor.__init__``: a local Hugging Face folder is loaded with the Auto
  classes (EasyEdit sniffs names and refuses e.g. Gemma or Qwen2 folders on
  PyPI), then handed to EasyEdit as its ``(model, tokenizer)`` pair; afterwards
  ``model_name`` is the path again, as EasyEdit's metrics expect a string. A ``model_name``
  that is no loadable model (a placeholder path) is a ``HyperParamsError`` naming the field
  before EasyEdit runs.
* PyPI flavour only: the editing and training entry points run inside
  :func:`~instructedit_plugin.compat.devices.cuda_strings_to_cpu`.
* ``edit``/``batch_edit`` arguments are validated first (clear ``RequestError``
  instead of EasyEdit's bare asserts), in both flavours.
* PyPI ``batch_edit`` hands its ``locality_prompts``/``locality_ground_truth``
  positionally to ``_prepare_requests``, whose slots there are ``locality_inputs``/
  ``portability_inputs``: strings lists crash and ``locality_inputs=`` collides.
  The wrapper accepts both forms (lists of strings, or EasyEdit's
  ``locality_inputs``/``portability_inputs`` dicts as in ``edit``) and passes dicts
  to the right slots.
* ``BatchEditor.is_batchable_method`` (a closed enum in both flavours) also
  accepts the plugin's batchable algorithms.
* ``BaseTrainer.save_state`` (both flavours) runs inside the trained module's
  ``on_easyedit_save_state(trainer, stats)`` context if it has one (InstructEdit
  adds its manifest to the archive and writes a safetensors checkpoint folder next to it).
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..models.loading import is_local_model_dir, load_causal_lm
from ..errors import RequestError
from ..core.config import check_model_name
from .edit_arguments import validate_edit_arguments
from .devices import cuda_strings_to_cpu, needs_cpu_redirect

LOG = logging.getLogger(__name__)

_MARK = "__instructedit_plugin_wrapped__"

#: BaseEditor methods that run editing/evaluation code (present ones are wrapped).
EDITOR_ENTRY_POINTS = ("edit", "batch_edit", "edit_requests", "edit_dataset", "normal_edit", "generate_edit", "deep_edit")
TRAINER_ENTRY_POINTS = ("__init__", "run", "validate")


def _wrap(owner: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = owner.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return
    wrapped = make(original)
    setattr(wrapped, _MARK, True)
    wrapped.__wrapped_original__ = original
    setattr(owner, name, wrapped)


def _device_of(obj: Any) -> Any:
    hparams = getattr(obj, "hparams", None) or getattr(obj, "config", None)
    return getattr(hparams, "device", None)


def _redirecting(flavour: str, device_from: Callable[..., Any]) -> Callable[[Callable], Callable]:
    def make(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with cuda_strings_to_cpu(needs_cpu_redirect(flavour, device_from(self, *args, **kwargs))):
                return method(self, *args, **kwargs)

        return wrapper

    return make


#: Entry points whose user arguments are validated before EasyEdit sees them.
VALIDATED_ENTRY_POINTS = ("edit", "batch_edit")
_VALIDATED_ARGS = ("prompts", "target_new", "ground_truth", "rephrase_prompts", "locality_inputs", "portability_inputs")


def _pypi_batch_edit_arguments(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """Positional/keyword arguments for PyPI's ``batch_edit`` with locality and portability as dicts
    in the slots its ``_prepare_requests`` reads them from (see the module docstring)."""
    args = dict(bound.arguments)
    extra = dict(args.pop("kwargs", {}) or {})
    loc_prompts, loc_truth = args.pop("locality_prompts", None), args.pop("locality_ground_truth", None)
    loc_inputs, port_inputs = extra.pop("locality_inputs", None), extra.pop("portability_inputs", None)
    if isinstance(loc_prompts, dict):  # EasyEdit's own positional quirk: a locality_inputs dict
        loc_inputs, loc_prompts = loc_inputs or loc_prompts, None
        if isinstance(loc_truth, dict):
            port_inputs, loc_truth = port_inputs or loc_truth, None
    if loc_prompts is not None:
        if loc_inputs is not None:
            raise RequestError("both `locality_prompts` and `locality_inputs` are given. "
                               "Fix: pass the locality questions one way only.")
        prompts = [loc_prompts] if isinstance(loc_prompts, str) else list(loc_prompts)
        if loc_truth is None:
            raise RequestError("`locality_prompts` is given without `locality_ground_truth`. "
                               "Fix: pass one expected answer per locality prompt.")
        truths = [loc_truth] if isinstance(loc_truth, str) else list(loc_truth)
        loc_inputs = {"neighborhood": {"prompt": prompts, "ground_truth": truths}}
    elif loc_truth is not None:
        raise RequestError("`locality_ground_truth` is given without `locality_prompts`. "
                           "Fix: pass the locality prompts too (or use `locality_inputs`).")
    self_ = args.pop("self")
    positional = (self_, args.pop("prompts"), args.pop("target_new"), args.pop("ground_truth", None),
                  args.pop("rephrase_prompts", None), loc_inputs, port_inputs)
    return positional, {**args, **extra}


def _validating(flavour: str, name: str = "edit") -> Callable[[Callable], Callable]:
    """Validate ``edit``/``batch_edit`` arguments (both flavours), then run with the PyPI redirect."""

    def make(method: Callable) -> Callable:
        signature = inspect.signature(method)
        fix_pypi_batch = flavour == "pypi" and name == "batch_edit" and "locality_prompts" in signature.parameters

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            bound = signature.bind_partial(self, *args, **kwargs)
            if fix_pypi_batch:
                call_args, call_kwargs = _pypi_batch_edit_arguments(bound)
                _, prompts, target_new, ground_truth, rephrase, loc, port = call_args
                named = dict(prompts=prompts, target_new=target_new, ground_truth=ground_truth,
                             rephrase_prompts=rephrase, locality_inputs=loc, portability_inputs=port)
                subject = call_kwargs.get("subject")
            else:
                call_args, call_kwargs = (self, *args), kwargs
                named = {k: v for k, v in bound.arguments.items() if k in _VALIDATED_ARGS}
                subject = bound.arguments.get("kwargs", {}).get("subject")
            if "requests" not in bound.arguments.get("kwargs", {}):
                validate_edit_arguments(subject=subject, **named)
            with cuda_strings_to_cpu(needs_cpu_redirect(flavour, _device_of(self))):
                return method(*call_args, **call_kwargs)

        return wrapper

    return make


def _editor_init(flavour: str) -> Callable[[Callable], Callable]:
    def make(original_init: Callable) -> Callable:
        @functools.wraps(original_init)
        def __init__(self, hparams, *args, **kwargs):
            name = getattr(hparams, "model_name", None)
            check_model_name(name, getattr(hparams, "_source", None))  # not EasyEdit's NotImplementedError
            check_ready = getattr(hparams, "check_ready", None)
            if callable(check_ready):
                check_ready()  # e.g. a missing trained archive fails before the model loads
            redirect = needs_cpu_redirect(flavour, getattr(hparams, "device", None))
            with cuda_strings_to_cpu(redirect):
                if not is_local_model_dir(name):
                    return original_init(self, hparams, *args, **kwargs)
                dtype = "float16" if getattr(hparams, "fp16", False) else getattr(hparams, "dtype", None)
                pair = load_causal_lm(name, dtype=dtype, alg_name=getattr(hparams, "alg_name", None))
                hparams.model_name = pair
                try:
                    original_init(self, hparams, *args, **kwargs)
                finally:
                    hparams.model_name = name
                self.model_name = name

        return __init__

    return make


#: Method of a trained module (``ALG_TRAIN_DICT`` class) that wraps EasyEdit's ``BaseTrainer.save_state``:
#: ``with hook(trainer, stats): save_state(...)`` (e.g. to write a safetensors checkpoint next to the archive).
TRAINER_SAVE_HOOK = "on_easyedit_save_state"


def _around_save_state(method: Callable) -> Callable:
    @functools.wraps(method)
    def save_state(self, stats, *args, **kwargs):
        hook = getattr(getattr(self, "model", None), TRAINER_SAVE_HOOK, None)
        if not callable(hook):
            return method(self, stats, *args, **kwargs)
        with hook(self, stats):
            return method(self, stats, *args, **kwargs)

    return save_state


def _batchable(original: Callable, extra: Callable[[], set[str]]) -> staticmethod:
    func = original.__func__ if isinstance(original, staticmethod) else original

    @functools.wraps(func)
    def is_batchable_method(alg_name: str) -> bool:
        return alg_name in extra() or func(alg_name)

    setattr(is_batchable_method, _MARK, True)
    return staticmethod(is_batchable_method)


def install_editor_patches(flavour: str, batchable_names: Callable[[], set[str]]) -> None:
    """Apply every adjustment once; calling again is a no-op."""
    editor_mod = sys.modules["easyeditor.editors.editor"]
    base_editor = editor_mod.BaseEditor
    _wrap(base_editor, "__init__", _editor_init(flavour))
    for name in VALIDATED_ENTRY_POINTS:
        _wrap(base_editor, name, _validating(flavour, name))
    if flavour == "pypi":
        for name in EDITOR_ENTRY_POINTS:
            _wrap(base_editor, name, _redirecting(flavour, lambda self, *a, **k: _device_of(self)))
        trainer_mod = sys.modules.get("easyeditor.trainer.BaseTrainer")
        edit_trainer_mod = sys.modules.get("easyeditor.trainer.EditTrainer")
        for cls in (getattr(trainer_mod, "BaseTrainer", None), getattr(edit_trainer_mod, "EditTrainer", None)):
            if cls is None:
                continue
            for name in TRAINER_ENTRY_POINTS:
                if name == "__init__":
                    _wrap(cls, name, _redirecting(flavour, lambda self, config, *a, **k: getattr(config, "device", None)))
                else:
                    _wrap(cls, name, _redirecting(flavour, lambda self, *a, **k: _device_of(self)))
    base_trainer = getattr(sys.modules.get("easyeditor.trainer.BaseTrainer"), "BaseTrainer", None)
    if base_trainer is not None:  # both flavours: plugin modules may add files to the trainer's saves
        _wrap(base_trainer, "save_state", _around_save_state)
    batch_editor = sys.modules["easyeditor.editors.batch_editor"].BatchEditor
    current = batch_editor.__dict__["is_batchable_method"]
    if not getattr(getattr(current, "__func__", current), _MARK, False):
        setattr(batch_editor, "is_batchable_method", _batchable(current, batchable_names))
