"""Small, idempotent adjustments to EasyEdit classes so plugin algorithms run through them.

Importing the plugin changes nothing it does not need to. The ``BaseEditor`` wrappers act only
when the editor's (or the hparams') ``alg_name`` is one of the plugin's registered algorithms
(:func:`~instructedit_plugin.registry.registered_algorithms`); for every other algorithm (FT,
ROME, ...) they call EasyEdit's own function with the caller's arguments untouched, except for
the PyPI-only changes listed last. For plugin algorithms:

* ``BaseEditor.__init__``: ``model_name`` must name a loadable model (else a ``HyperParamsError``
  naming the field, before EasyEdit runs) and ``check_ready()`` runs (e.g. a missing trained
  archive); a local Hugging Face folder is loaded with the Auto classes and handed to EasyEdit as
  its ``(model, tokenizer)`` pair; afterwards ``model_name`` is the path again, as EasyEdit's
  metrics expect a string.
* ``edit``/``batch_edit`` arguments are validated first (clear ``RequestError`` instead of
  EasyEdit's bare asserts).
* PyPI ``batch_edit`` hands its ``locality_prompts``/``locality_ground_truth`` positionally to
  ``_prepare_requests``, whose slots there are ``locality_inputs``/``portability_inputs``: strings
  lists crash and ``locality_inputs=`` collides. The wrapper accepts both forms (lists of strings,
  or EasyEdit's ``locality_inputs``/``portability_inputs`` dicts as in ``edit``) and passes dicts to
  the right slots.

Changes that apply to every algorithm, and why:

* ``BatchEditor.is_batchable_method`` (a closed enum in both flavours) also accepts the plugin's
  batchable algorithms; for any other name it returns EasyEdit's own answer.
* ``BaseTrainer.save_state`` (both flavours) runs inside the trained module's
  ``on_easyedit_save_state(trainer, stats)`` context if it has one (InstructEdit adds its manifest
  to the archive and writes a safetensors checkpoint folder next to it); modules without that
  method (EasyEdit's own) are saved by EasyEdit's function directly.
* PyPI flavour only, because ``easyeditor==0.0.1.dev0`` cannot run on a CPU otherwise: the editing
  and training entry points run inside
  :func:`~instructedit_plugin.compat.devices.cuda_strings_to_cpu` (its hard-coded ``cuda:``
  devices), and ``BaseEditor.__init__`` loads a local Hugging Face folder with the Auto classes
  (its name sniffing refuses Gemma or Qwen2 folders and loads any ``llama`` folder with the
  sentencepiece-only ``LlamaTokenizer``). On EasyEdit main neither is needed, and FT's metrics and
  edited weights are identical with and without the plugin imported (``tests/test_bridges.py``).
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Collection
from typing import Any

from ..models.loading import is_local_model_dir, load_causal_lm
from ..errors import RequestError
from ..core.config import check_model_name
from .edit_arguments import check_answer_room, validate_edit_arguments
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


def _validating(flavour: str, name: str, is_plugin_alg: Callable[[Any], bool]) -> Callable[[Callable], Callable]:
    """For plugin algorithms, validate ``edit``/``batch_edit`` arguments (both flavours); on PyPI, for
    every algorithm, reject questions too long for ``hparams.max_length`` (see
    :func:`.edit_arguments.check_answer_room`); every call runs with the PyPI redirect (a no-op on main)."""

    def make(method: Callable) -> Callable:
        signature = inspect.signature(method)
        fix_pypi_batch = flavour == "pypi" and name == "batch_edit" and "locality_prompts" in signature.parameters

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if not is_plugin_alg(getattr(self, "alg_name", None)):  # EasyEdit's own algorithms: as EasyEdit runs them
                if flavour == "pypi" and name == "edit":
                    try:
                        arguments = signature.bind_partial(self, *args, **kwargs).arguments
                    except TypeError:
                        arguments = {}
                    _check_room(self, {k: v for k, v in arguments.items() if k in _VALIDATED_ARGS})
                with cuda_strings_to_cpu(needs_cpu_redirect(flavour, _device_of(self))):
                    return method(self, *args, **kwargs)
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
                if flavour == "pypi":
                    _check_room(self, named)
            with cuda_strings_to_cpu(needs_cpu_redirect(flavour, _device_of(self))):
                return method(*call_args, **call_kwargs)

        return wrapper

    return make


def _check_room(editor: Any, named: dict[str, Any]) -> None:
    """:func:`.edit_arguments.check_answer_room` with the editor's tokenizer and ``hparams.max_length``."""
    check_answer_room(getattr(editor, "tok", None), getattr(getattr(editor, "hparams", None), "max_length", None),
                      named.get("prompts"), named.get("rephrase_prompts"), named.get("locality_inputs"),
                      named.get("portability_inputs"))


def check_editor_hparams(hparams: Any) -> None:
    """Checks that fail fast, by field, before EasyEdit loads anything: ``model_name`` names a loadable
    model (not EasyEdit's ``NotImplementedError``), and the hparams' own ``check_ready()`` (e.g. a
    missing trained archive)."""
    check_model_name(getattr(hparams, "model_name", None), getattr(hparams, "_source", None))
    check_ready = getattr(hparams, "check_ready", None)
    if callable(check_ready):
        check_ready()


def load_local_model(hparams: Any) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` loaded with the Auto classes when ``hparams.model_name`` is a local
    Hugging Face folder (EasyEdit sniffs model names and refuses e.g. Gemma, Qwen2 or neutrally named
    folders), else None."""
    name = getattr(hparams, "model_name", None)
    if not is_local_model_dir(name):
        return None
    dtype = "float16" if getattr(hparams, "fp16", False) else getattr(hparams, "dtype", None)
    return load_causal_lm(name, dtype=dtype, alg_name=getattr(hparams, "alg_name", None))


def init_on_pair(init: Callable, editor: Any, hparams: Any, pair: tuple[Any, Any], *args, **kwargs) -> None:
    """Run EasyEdit's ``BaseEditor.__init__`` on an already loaded ``(model, tokenizer)``; afterwards
    ``hparams.model_name`` and ``editor.model_name`` are the name again (EasyEdit's metrics expect a string)."""
    name = hparams.model_name
    hparams.model_name = pair
    try:
        init(editor, hparams, *args, **kwargs)
    finally:
        hparams.model_name = name
    editor.model_name = name


def _editor_init(flavour: str, is_plugin_alg: Callable[[Any], bool]) -> Callable[[Callable], Callable]:
    def make(original_init: Callable) -> Callable:
        @functools.wraps(original_init)
        def __init__(self, hparams, *args, **kwargs):
            with cuda_strings_to_cpu(needs_cpu_redirect(flavour, getattr(hparams, "device", None))):
                if not is_plugin_alg(getattr(hparams, "alg_name", None)):  # EasyEdit's own algorithms: untouched
                    return original_init(self, hparams, *args, **kwargs)
                check_editor_hparams(hparams)
                pair = load_local_model(hparams)
                if pair is None:
                    return original_init(self, hparams, *args, **kwargs)
                init_on_pair(original_init, self, hparams, pair, *args, **kwargs)

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


def install_editor_patches(flavour: str, batchable_names: Callable[[], set[str]],
                           plugin_names: Callable[[], Collection[str]]) -> None:
    """Apply every adjustment once; calling again is a no-op.

    ``plugin_names()`` gives the plugin's algorithm names at call time (algorithms registered
    later count too); the ``BaseEditor`` wrappers act on those only (see the module docstring).
    """

    def is_plugin_alg(alg_name: Any) -> bool:
        return isinstance(alg_name, str) and alg_name in plugin_names()

    editor_mod = sys.modules["easyeditor.editors.editor"]
    base_editor = editor_mod.BaseEditor
    _wrap(base_editor, "__init__", _editor_init(flavour, is_plugin_alg))
    for name in VALIDATED_ENTRY_POINTS:
        _wrap(base_editor, name, _validating(flavour, name, is_plugin_alg))
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
