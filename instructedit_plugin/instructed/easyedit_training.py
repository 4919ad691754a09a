"""InstructEd under EasyEdit's ``EditTrainer``: ``ALG_TRAIN_DICT['INSTRUCTED']`` (:class:`InstructEdTrainModule`).

EasyEdit's trainer (both flavours) builds ``cls(model, config, model_constructor)`` and, every step,

1. ``base = module(**batch['loc'])`` -- the unedited model on the locality inputs (no grad);
2. ``edited, info = module.edit(batch['edit_inner'], batch['cond'])``;
3. ``edit_loss_fn(config, edited(**batch['edit_inner']), labels)['nll']`` and
   ``KL(base || edited(**batch['loc']))`` on the locality answer positions, weighted by ``cedit`` and
   ``cloc``; the gradient goes to ``outer_parameters()`` with EasyEdit's optimizer (``opt``, ``lr``).

That loop is InstructEd's objective when "editing" puts each request's instruction in front of the
frozen model's inputs and the only trainable parameters are the prefixes: :meth:`InstructEdTrainModule.edit`
recovers every row's instruction from EasyEdit's ``cond`` row (``"{ground_truth} >> {target_new} ||
{prompt}"``, the request's prompt and new target -> :func:`~.templates.instruction_of`, as
:func:`~.data.build_examples` does) and returns :class:`InstructedEditModel`, which runs each row --
the edit input, or row ``i``'s locality question -- through :class:`~.lm.InstructedLM` (the one
implementation of InstructEd's input layout, prefixes and re-weighting, shared with
:class:`~.trainer.InstructEdTrainer` and editing) with row ``i``'s instruction. The locality rows are
thus InstructEd's "instruction + unrelated question" examples, and their target is the unedited
model's output (EasyEdit's KL to ``base``; InstructEdTrainer uses the cross-entropy to the unedited
model's argmax, the same optimum). ``outer_parameters()`` is the prefix bank; the base model is
frozen and kept in eval mode (no dropout), as in InstructEdTrainer.

Saving: EasyEdit's ``save_state`` archives ``state_dict()`` (the prefix bank only); the plugin's
``save_state`` hook (:func:`~instructedit_plugin.compat.editor_patches` ``on_easyedit_save_state``)
then writes the same prefixes as an InstructEd checkpoint folder next to it,
``<save_path>.instructed`` (:func:`easyedit_export_dir`), which ``BaseEditor`` loads with
``alg_name: InstructEd`` and ``archive: <that folder>``.

The config is :class:`~.instructed_hparams.InstructEdTrainingHparams` (it carries EasyEdit's trainer
fields: ``model_class``, ``opt``, ``cedit``, ``cloc``, ``val_steps``, ``early_stop_key``, ...).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import num_layers_of
from ..errors import HyperParamsError, PluginError
from ..instructedit.editable import token_nll_metrics
from .checkpoint import save_checkpoint
from .data import question_answer_ids
from .lm import InstructedLM, encoder_identity, load_encoder
from .prefix import attach_instructed, default_prefix_layers
from .templates import instruction_of

LOG = logging.getLogger(__name__)

__all__ = ["InstructEdTrainModule", "InstructedEditModel", "easyedit_export_dir", "instructions_from_cond",
           "EASYEDIT_EXPORT_SUFFIX"]

#: Suffix of the InstructEd checkpoint folder written next to EasyEdit's trainer archive.
EASYEDIT_EXPORT_SUFFIX = ".instructed"


def easyedit_export_dir(save_path: str | os.PathLike) -> Path:
    """The InstructEd checkpoint folder written next to EasyEdit's trainer archive ``save_path``."""
    return Path(f"{os.fspath(save_path)}{EASYEDIT_EXPORT_SUFFIX}")


def instructions_from_cond(tokenizer: Any, cond: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Each row's instruction from EasyEdit's ``cond`` batch (rows ``"{ground_truth} >> {target_new} || {prompt}"``,
    as EasyEdit's ``ZsreDataset``/``CounterFactDataset`` build them): :func:`~.templates.instruction_of` of
    ``{"prompt": prompt, "target_new": target_new}``."""
    if not cond or "input_ids" not in cond:
        raise PluginError("InstructEd's EditTrainer module needs the batch's `cond` (EasyEdit's \"ground_truth >> "
                          "target_new || prompt\" rows) to know each edit's instruction. Fix: train with EasyEdit's "
                          "ZsreDataset or CounterFactDataset (their collate functions add `cond`)")
    ids, mask = cond["input_ids"], cond.get("attention_mask", torch.ones_like(cond["input_ids"]))
    out = []
    for row, keep in zip(ids, mask):
        text = tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
        left, sep, prompt = text.partition(" || ")
        _, sep2, target = left.partition(" >> ")
        if not sep or not sep2 or not prompt.strip():
            raise PluginError(f"cond row {text!r} is not \"ground_truth >> target_new || prompt\". Fix: train with "
                              "EasyEdit's ZsreDataset or CounterFactDataset, and a max_length that keeps the whole row")
        out.append(instruction_of({"prompt": prompt.strip(), "target_new": target.strip()}))
    return out


class InstructedEditModel(nn.Module):
    """What :meth:`InstructEdTrainModule.edit` returns: the frozen model with the prefixes, each input row
    ``i`` carrying instruction ``i`` (InstructEd's input layout, :class:`~.lm.InstructedLM`).

    ``forward(input_ids, attention_mask, ...)`` returns logits of the caller's shape (the instruction's
    positions are not returned), so EasyEdit's labels and locality masks line up with them.
    """

    def __init__(self, lm: InstructedLM, instructions: Sequence[str]):
        super().__init__()
        self.__dict__["lm"] = lm  # a plain reference: the base model is not a submodule of the edit
        self.instructions = list(instructions)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if input_ids.shape[0] != len(self.instructions):
            raise PluginError(f"the edited model holds {len(self.instructions)} instructions but got {input_ids.shape[0]} "
                              "input rows. Fix: run it on the rows of the batch it was edited with (edit_inner/loc)")
        self.lm.model.eval()  # EasyEdit's loop calls train() on the base model; it stays frozen, without dropout
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, instructions=self.instructions).logits


class InstructEdTrainModule(nn.Module):
    """``ALG_TRAIN_DICT['INSTRUCTED']``: InstructEd's prefixes trained by EasyEdit's ``EditTrainer``.

    Args:
        model: the base causal LM (EasyEdit's ``get_model(config)``); frozen here.
        config: :class:`~.instructed_hparams.InstructEdTrainingHparams` (or an object with its fields).
        model_constructor: EasyEdit's copy factory (kept as ``self.model_constructor``; unused).
    """

    def __init__(self, model: nn.Module, config: Any, model_constructor: Callable[[], nn.Module] | None = None):
        super().__init__()
        from transformers import AutoTokenizer

        if getattr(config, "train_base", False):
            raise PluginError("train_base: true would train the base model; InstructEd keeps it frozen. "
                              "Fix: set train_base: false")
        if getattr(config, "early_stop_patience", 0) is None:  # EasyEdit's EarlyStopper compares with it at every validation
            raise HyperParamsError("early_stop_patience", "is null, which EasyEdit's EditTrainer cannot compare with",
                                   "set it to a number of validations (a large one never stops early)",
                                   getattr(config, "_source", None))
        self.model = model.eval()
        self.config = config
        self.model_constructor = model_constructor
        tokenizer = AutoTokenizer.from_pretrained(getattr(config, "tokenizer_name", None) or config.model_name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        n_layers = num_layers_of(model.config)
        layers = config.prefix_layers if getattr(config, "prefix_layers", None) is not None else default_prefix_layers(n_layers)
        device = next(model.parameters()).device
        torch.manual_seed(int(getattr(config, "seed", 0)))  # the same initial bank as InstructEdTrainer's
        self.handle = attach_instructed(model, layers=list(layers), prefix_len=config.prefix_len, mode=config.reweight_mode,
                                        init_std=config.init_std, freeze=True)
        self.handle.prefix_enabled = False
        self.bank = self.handle.bank
        self.__dict__["encoder"] = load_encoder(getattr(config, "encoder", "default"), device)  # not a submodule: not saved
        self.__dict__["lm"] = InstructedLM(model, tokenizer, self.bank, encoder=self.encoder, template=config.template,
                                           instruction_max_length=config.instruction_max_length, mode=config.reweight_mode)
        self.__dict__["tokenizer"] = tokenizer
        self.edit_loss_fn = token_nll_metrics
        self.loc_loss_fn = token_nll_metrics

    # ----------------------------------------------------------------------------- EasyEdit API
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The unedited model (no instruction, no prefix): EasyEdit's locality reference."""
        self.model.eval()
        inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask") if k in kwargs}
        out = self.model(*args, **inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def outer_parameters(self) -> list[nn.Parameter]:
        """The prefix bank: the only parameters EasyEdit's optimizer trains."""
        return list(self.bank.parameters())

    def edit(self, batch: Mapping[str, torch.Tensor], condition: Mapping[str, torch.Tensor] | None = None,
             **_: Any) -> tuple[InstructedEditModel, dict[str, float]]:
        """The frozen model carrying each row's instruction (from ``condition``, EasyEdit's ``cond``)."""
        instructions = instructions_from_cond(self.tokenizer, condition)
        if len(instructions) != batch["input_ids"].shape[0]:
            raise PluginError(f"cond has {len(instructions)} rows but edit_inner {batch['input_ids'].shape[0]}. "
                              "Fix: build the batch with EasyEdit's dataset collate function")
        fixed = self.answer_labels(batch)
        batch["labels"] = fixed  # EasyEdit scores the edit with this dict's labels
        return InstructedEditModel(self.lm, instructions), {}

    def answer_labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``batch['labels']`` as the answer tokens appear in the input rows (right-aligned, ``-100`` elsewhere).

        EasyEdit's datasets tokenise the target on its own (``"Paris"``) while the input holds
        ``question + ' ' + target``; with a tokenizer without prefix space (GPT-2 style byte-level
        BPE) those ids differ (``" Paris"``), so the labels would ask for tokens the input never
        continues with. Each row's answer is re-tokenised as InstructEd's own examples are
        (:func:`~.data.question_answer_ids`); a row whose text does not end with its target keeps
        EasyEdit's labels.
        """
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        tok, template = self.tokenizer, self.lm.template
        answers: list[list[int]] = []
        for i in range(ids.shape[0]):
            old = [t for t in labels[i].tolist() if t != -100]
            row = template.strip_bos(ids[i][mask[i].bool()].tolist())
            text = tok.decode(row, skip_special_tokens=True)
            answer = tok.decode(old, skip_special_tokens=True).strip()
            if answer and text.endswith(answer):
                q_ids, full = question_answer_ids(template, text[: len(text) - len(answer)].rstrip(" "), answer)
                if full == row and len(full) > len(q_ids):
                    answers.append(full[len(q_ids):])
                    continue
            answers.append(old)
        width = max(len(a) for a in answers)
        out = labels.new_full((len(answers), width), -100)
        for i, a in enumerate(answers):
            if a:
                out[i, width - len(a):] = torch.tensor(a, dtype=labels.dtype)
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D401
        """The prefix bank only (``bank.*``): the frozen base model is not saved."""
        full = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in full if k.startswith(prefix + "model.")]:
            del full[key]
        return full

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        state = {k: v for k, v in state_dict.items() if not k.startswith("model.")}
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("model.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"InstructEd archive does not match: missing {missing}, unexpected {result.unexpected_keys}")
        return result

    def save_prefixes(self, folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
        """Write the prefixes as an InstructEd checkpoint folder (what ``BaseEditor``'s ``archive`` loads)."""
        to_dict = getattr(self.config, "to_dict", None)
        return save_checkpoint(folder, self.bank, reweight_mode=self.config.reweight_mode, template=self.config.template,
                               encoder=encoder_identity(self.encoder), model_config=self.model.config,
                               training=to_dict() if callable(to_dict) else None, info=info)

    @contextlib.contextmanager
    def on_easyedit_save_state(self, trainer: Any, stats: Mapping[str, Any] | None):
        """Wraps EasyEdit's ``BaseTrainer.save_state``: once its archive is written, the same prefixes
        are written as an InstructEd checkpoint folder, :func:`easyedit_export_dir` of the archive."""
        yield
        cfg = getattr(trainer, "config", self.config)
        save_path = getattr(trainer, "save_path", None)
        if save_path is None or (getattr(cfg, "debug", False) and not getattr(cfg, "save", True)) \
                or getattr(cfg, "eval_only", False):
            return
        info = {"step": getattr(trainer, "global_iter", None), "easyedit_archive": Path(save_path).name,
                **{str(k): float(v) for k, v in (stats or {}).items() if isinstance(v, (int, float))}}
        folder = self.save_prefixes(easyedit_export_dir(save_path), info)
        LOG.info("saved the InstructEd prefixes of %s as %s", save_path, folder)
