"""Training InstructEd's prefixes: ``InstructEdTrainer(config, train_set, val_set).run()``.

EasyEdit's ``EditTrainer`` trains InstructEd too (``ALG_TRAIN_DICT['INSTRUCTED']`` is
:class:`~.easyedit_training.InstructEdTrainModule`: its ``edit()`` puts each request's instruction in
front of the frozen model's inputs, its ``outer_parameters()`` are the prefixes); this trainer adds
what that loop lacks: portability and rephrase inputs, extra unrelated-question examples, the paper's
1:1 mix, warm-up and decay, ``accumulate_bs`` over processes, resume. Both run the inputs through
:class:`~.lm.InstructedLM`.

What ``run()`` does
-------------------
* The base model is loaded from ``config.model_name`` (or passed in), put in eval mode (no dropout)
  and frozen; prefixes are attached to ``config.prefix_layers`` (default: the middle third).
* Examples (:mod:`.data`): edit examples (rel/gen/por) and unmodified examples (instruction +
  unrelated question -> the unedited model's prediction, computed once before attaching), with
  ``sim`` computed once by the sentence encoder.
* Validation: ``val_set`` if given (must share no question with the training set), else
  ``val_fraction`` of the edits, split by edit with ``seed``. The validation loss is the mean of the
  edit-token loss and the unmodified-token loss; the best value keeps ``<results_dir>/best``.
* AdamW on the prefix embeddings only, linear warm-up, then linear decay (or constant), gradient
  clipping; ``max_iters`` (else ``epochs``); early stopping after ``early_stop_patience`` validations
  without improvement; ``max_seconds`` is a wall-clock safety cap that saves ``last`` and stops.
* ``<results_dir>/last`` holds prefixes + optimizer/scheduler state (safetensors + JSON, no pickle)
  at every validation; ``resume: true`` continues from it at the saved step with the same batches.
* The loop (steps, accumulation, validation and saving on the main process, resume, early stop,
  the time cap, progress bar) is :class:`instructedit_plugin.core.trainer.Trainer`'s; this module
  adds the batches, the loss, the validation metrics and the checkpoint contents.
* ``accumulate_bs`` micro-batches per step, and several processes under
  ``accelerate launch`` (DDP on the prefix bank only; :mod:`instructedit_plugin.core.distributed`): the
  epochs are cut into global batches of ``(batch_size + unmodified_batch_size) x micro-batches x
  processes`` examples, each process takes its slices, and the step's loss is the token mean over the
  whole global batch -- the same step as one process with the whole batch. ``mixed_precision: bf16``
  trains under bf16 autocast.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.distributed import make_runtime, micro_batch_index, shard
from ..core.trainer import Trainer
from ..errors import PluginError
from ..core.config import num_layers_of
from ..core.devices import resolve_device  # re-exported: callers import it from here
from .checkpoint import load_checkpoint, load_trainer_state, save_checkpoint, save_trainer_state
from .instructed_hparams import InstructEdTrainingHparams
from .easyedit_training import InstructEdTrainModule  # ALG_TRAIN_DICT["INSTRUCTED"]; re-exported
from .data import (
    MixedBatches,
    TrainBatch,
    collate,
    encode_example,
    fill_similarities,
    fill_unedited_predictions,
    normalise_requests,
    split_requests,
    build_examples,
)
from .lm import InstructedLM, encoder_identity, load_encoder
from .prefix import attach_instructed, default_prefix_layers
from .templates import InstructionTemplate, request_prompts

LOG = logging.getLogger(__name__)

__all__ = ["InstructEdTrainer", "InstructEdTrainModule", "resolve_device", "main"]


def _left_pad(batch: TrainBatch, width: int, pad_id: int) -> TrainBatch:
    """``batch`` left-padded to ``width`` columns (as :func:`~.data.collate` pads to the longest row)."""
    extra = width - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    rows = batch.input_ids.shape[0]
    return dataclasses.replace(
        batch,
        input_ids=torch.cat([batch.input_ids.new_full((rows, extra), pad_id), batch.input_ids], 1),
        attention_mask=torch.cat([batch.attention_mask.new_zeros((rows, extra)), batch.attention_mask], 1),
        labels=torch.cat([batch.labels.new_full((rows, extra), -100), batch.labels], 1),
        spans=[(a + extra, b + extra) for a, b in batch.spans],
    )


class _PrefixTrainable(nn.Module):
    """What DDP wraps: the prefix bank. ``forward(batch)``: ``(loss to backpropagate, {"sum": token-loss sum})``.

    With one micro-batch per step the loss is the batch's token mean; otherwise it is the
    micro-batch's token-loss sum scaled so that the step's gradients are those of the token mean
    over the whole global batch (:meth:`InstructEdTrainer.step_batches` sets the scale).
    """

    def __init__(self, trainer: "InstructEdTrainer"):
        super().__init__()
        self.bank = trainer.bank
        self._trainer = [trainer]  # a plain reference: the trainer (and its base model) is not a submodule

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        trainer = self._trainer[0]
        if batch is None:  # this process has no example in this micro-batch: a zero that still reaches DDP
            total = self.bank.embeddings.sum() * 0.0
        else:
            losses, mask, _ = trainer._token_losses(batch)
            if trainer._loss_scale is None:
                loss = losses[mask].mean()
                return loss, {"loss": loss.item()}
            total = losses[mask].sum()
        # backward divides by the accumulation steps and DDP averages over the processes
        return total * trainer._loss_scale, {"sum": float(total.detach())}


class InstructEdTrainer(Trainer):
    """Trains InstructEd prefixes; see the module docstring.

    Args:
        config: :class:`InstructEdTrainingHparams`.
        train_set: request dicts (the plugin's loaders) or an EasyEdit-style dataset of them.
        val_set: optional validation requests (disjoint from ``train_set``).
        model / tokenizer: an already loaded base model (default: loaded from ``config.model_name``).
        encoder: a sentence encoder object (default: ``config.encoder``).
    """

    name = "InstructEd"

    def __init__(self, config: InstructEdTrainingHparams, train_set: Any, val_set: Any = None, *,
                 model: nn.Module | None = None, tokenizer: Any = None, encoder: Any = None):
        super().__init__(config)
        requests = normalise_requests(train_set)
        if val_set is None:
            self.train_requests, self.val_requests = split_requests(requests, config.val_fraction, config.seed)
        else:
            self.train_requests, self.val_requests = requests, normalise_requests(val_set)
            overlap = set(p for r in self.train_requests for p in request_prompts(r, include_locality=False)) & set(
                p for r in self.val_requests for p in request_prompts(r, include_locality=False))
            if overlap:
                raise PluginError(f"val_set shares {len(overlap)} question(s) with train_set, e.g. {sorted(overlap)[0]!r}; "
                                  "use disjoint splits")
        if not self.train_requests:
            raise PluginError("no training requests (after the validation split)")

        #: one process, or DDP under ``accelerate launch`` (see :mod:`instructedit_plugin.core.distributed`)
        self.runtime = make_runtime(resolve_device(config.device), config.accumulate_bs,
                                    config.mixed_precision, config.dtype)
        self.device = self.runtime.device
        if model is None:
            from ..models.loading import load_causal_lm

            model, tokenizer = load_causal_lm(config.model_name, dtype=config.dtype)
        elif tokenizer is None:
            raise PluginError("pass the tokenizer together with the model")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        config.validate_layers(self.model.config)
        n_layers = num_layers_of(self.model.config)
        self.layers = list(config.prefix_layers) if config.prefix_layers is not None else default_prefix_layers(n_layers)
        self.encoder = load_encoder(encoder if encoder is not None else config.encoder, self.device)
        self.template = InstructionTemplate(tokenizer, config.template, config.instruction_max_length)

        t0 = time.perf_counter()
        train_examples = build_examples(self.train_requests, use_portability=config.use_portability,
                                        unrelated_locality=config.unrelated_locality, seed=config.seed)
        val_examples = build_examples(self.val_requests, use_portability=config.use_portability,
                                      unrelated_locality=config.unrelated_locality, seed=config.seed + 1)
        for examples in (train_examples, val_examples):
            fill_unedited_predictions(self.model, self.template, examples, max_length=config.max_length,
                                      gen_tokens=config.locality_gen_tokens,
                                      progress=bool(config.progress and self.runtime.is_main))
            fill_similarities(self.encoder, examples, mode=config.similarity)
        self.edit_examples = [encode_example(e, self.template) for e in train_examples if e.is_edit]
        self.unmod_examples = [encode_example(e, self.template) for e in train_examples if not e.is_edit]
        self.val_examples = [encode_example(e, self.template) for e in val_examples]
        LOG.info("InstructEd data: %d edit + %d unmodified training examples, %d validation examples (%.1fs)",
                 len(self.edit_examples), len(self.unmod_examples), len(self.val_examples), time.perf_counter() - t0)

        torch.manual_seed(config.seed)
        self.handle = attach_instructed(self.model, layers=self.layers, prefix_len=config.prefix_len,
                                        mode=config.reweight_mode, init_std=config.init_std, freeze=True)
        self.handle.prefix_enabled = False
        self.bank = self.handle.bank
        self.lm = InstructedLM(self.model, tokenizer, self.bank, encoder=self.encoder, template=config.template,
                               instruction_max_length=config.instruction_max_length, mode=config.reweight_mode,
                               similarity=config.similarity)
        # One optimizer step covers `micro_batches` micro-batches of batch_size + unmodified_batch_size
        # examples (gradient accumulation x processes); the epochs are cut into such global batches.
        self.micro_batches = self.runtime.num_processes * config.accumulate_bs
        self.batches = MixedBatches(len(self.edit_examples), len(self.unmod_examples),
                                    config.batch_size * self.micro_batches,
                                    config.unmodified_batch_size * self.micro_batches, config.seed)
        self.total_steps = config.max_iters or config.epochs * self.batches.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # What DDP wraps: the prefix bank only (the frozen base model stays out of it).
        self.train_module, self.prepared_optimizer = self.runtime.prepare(_PrefixTrainable(self), self.optimizer)
        self.results_dir = self.out_dir = Path(config.results_dir)
        self._epoch: tuple[int, list] | None = None  # (epoch, its batches): computed once per epoch
        self._loss_scale: float | None = None

    @property
    def best(self) -> float | None:
        """The best validation loss so far (:attr:`best_value`)."""
        return self.best_value

    # ------------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.config.lr_schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - warm)
        return max(0.0, 1.0 - (step - warm) / span)

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict a label, and those labels.

        Rows are left-padded, so every label lies in the last columns: only the positions from the
        first labelled column on go through the output layer (``logits_to_keep`` as an index
        tensor: a contiguous gather, then ``lm_head``). The output layer of a large-vocabulary
        model (Gemma: 262k tokens, most of the parameters) would otherwise dominate every step.
        """
        labels = batch.labels[:, 1:]
        width = labels.shape[1]
        labelled = (labels != -100).any(0).nonzero()
        first = int(labelled[0]) if labelled.numel() else max(0, width - 1)
        keep = torch.arange(first, width, device=batch.input_ids.device)
        out = self.lm.run(batch.input_ids, batch.attention_mask, batch.spans, batch.sim, True, logits_to_keep=keep)
        return out.logits, labels[:, first:]

    def _token_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, labels = self._forward(batch)
        logits = logits.float()
        losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="none").view(labels.shape)
        mask = labels != -100
        correct = (logits.argmax(-1) == labels) & mask
        return losses, mask, correct

    def _checkpoint_meta(self) -> dict[str, Any]:
        return dict(reweight_mode=self.config.reweight_mode, template=self.config.template,
                    encoder=encoder_identity(self.encoder), model_config=self.model.config,
                    training=self.config.to_dict())

    def save(self, which: str, info: dict[str, Any], with_state: bool) -> Path:
        state = None
        if with_state:
            state = save_trainer_state(self.optimizer, self.scheduler, {
                "step": self.step, "best": self.best_value, "bad_validations": self.bad_validations,
                "history": self.history[-50:]})
        return save_checkpoint(self.results_dir / which, self.bank, info=info, trainer_state=state,
                               **self._checkpoint_meta())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation losses and answer-token accuracies (edit / unmodified)."""
        sums = {"edit_loss": 0.0, "edit_tok": 0, "edit_ok": 0, "loc_loss": 0.0, "loc_tok": 0, "loc_ok": 0}
        examples = self.val_examples
        for start in range(0, len(examples), self.config.val_batch_size):
            batch = collate(examples[start:start + self.config.val_batch_size], self.lm.pad_id, self.device)
            with self.runtime.autocast():
                losses, mask, correct = self._token_losses(batch)
            edit = batch.is_edit.to(mask.device)[:, None] & mask
            loc = ~batch.is_edit.to(mask.device)[:, None] & mask
            sums["edit_loss"] += float(losses[edit].sum())
            sums["edit_tok"] += int(edit.sum())
            sums["edit_ok"] += int(correct[edit].sum())
            sums["loc_loss"] += float(losses[loc].sum())
            sums["loc_tok"] += int(loc.sum())
            sums["loc_ok"] += int(correct[loc].sum())
        out: dict[str, float] = {}
        parts = []
        for kind in ("edit", "loc"):
            if sums[f"{kind}_tok"]:
                out[f"{kind}_loss"] = sums[f"{kind}_loss"] / sums[f"{kind}_tok"]
                out[f"{kind}_acc"] = sums[f"{kind}_ok"] / sums[f"{kind}_tok"]
                parts.append(out[f"{kind}_loss"])
        out["loss"] = sum(parts) / len(parts) if parts else math.nan
        return out

    # ---------------------------------------------------------------------- the base loop's hooks
    def planned_steps(self) -> int:
        return self.total_steps

    def validation_metrics(self) -> dict[str, float]:
        """:meth:`validate` (the mean of the edit and unmodified token losses is ``loss``)."""
        return self.validate() if self.val_examples else {"loss": math.nan}

    def monitored_value(self, metrics: dict[str, float]) -> float:
        return metrics.get("loss", math.nan)

    def save_checkpoint(self, which: str, record: dict[str, Any]) -> Path:
        return self.save(which, record, with_state=which == "last")

    def load_last(self) -> None:
        last = self.results_dir / "last"
        if not (last / "manifest.json").is_file():
            LOG.warning("resume requested but %s holds no checkpoint; starting from scratch", last)
            return
        ckpt = load_checkpoint(last, device=self.bank.embeddings.device)
        if tuple(ckpt.bank.layers) != tuple(self.bank.layers) or ckpt.bank.prefix_len != self.bank.prefix_len:
            raise PluginError(f"{last}: prefix layers/length differ from the config; cannot resume")
        with torch.no_grad():
            self.bank.embeddings.copy_(ckpt.bank.embeddings)
        info = load_trainer_state(last, self.optimizer, self.scheduler)
        self.step = int(info["step"])
        self.best_value = info.get("best")
        self.bad_validations = int(info.get("bad_validations", 0))
        self.history = list(info.get("history", []))
        LOG.info("resumed InstructEd training from %s at step %d", last, self.step)

    def after_optimizer_step(self) -> None:
        self.scheduler.step()

    def log_extra(self) -> str:
        return f"; lr {self.scheduler.get_last_lr()[0]:.2e}"

    def step_batches(self) -> list[Any]:
        """This process's micro-batches of the step's global batch (edit + unmodified examples).

        The loss is the mean token loss of the whole global batch. With one process and no
        accumulation that is ``losses[mask].mean()`` of the batch; otherwise this process's
        micro-batches (its slices of the global batch) contribute their token-loss sums divided by
        the global batch's token count, so the summed gradients equal the one-batch gradient.
        """
        rt = self.runtime
        epoch, offset = divmod(self.step, self.batches.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.batches.epoch(epoch))
        edit_idx, unmod_idx = self._epoch[1][offset]
        if self.micro_batches == 1:
            self._loss_scale = None
            return [collate([self.edit_examples[i] for i in edit_idx] + [self.unmod_examples[i] for i in unmod_idx],
                            self.lm.pad_id, self.device)]
        # every row keeps the place it has in the one global batch: left-padded to its width (models
        # with absolute positions see a left-padded row at shifted positions)
        width = max(len(e.input_ids) for e in [self.edit_examples[i] for i in edit_idx] +
                    [self.unmod_examples[i] for i in unmod_idx])
        batches = []
        for micro in range(self.config.accumulate_bs):
            part = micro_batch_index(micro, rt.process_index, rt.num_processes)
            rows = [self.edit_examples[i] for i in shard(edit_idx, part, self.micro_batches)]
            rows += [self.unmod_examples[i] for i in shard(unmod_idx, part, self.micro_batches)]
            batches.append(_left_pad(collate(rows, self.lm.pad_id, self.device), width, self.lm.pad_id)
                           if rows else None)
        local_tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches if b is not None)
        self._step_tokens = max(rt.reduce_sum(local_tokens), 1.0)
        self._loss_scale = self.micro_batches / self._step_tokens
        return batches

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bank.parameters())

    def step_stats(self, micro_stats: list[dict[str, float]]) -> dict[str, float]:
        """The step's loss: the token mean over the whole global batch."""
        if self._loss_scale is None:
            return {"loss": micro_stats[0]["loss"]}
        return {"loss": self.runtime.reduce_sum(sum(s["sum"] for s in micro_stats)) / self._step_tokens}

    def result(self, total: int, train_seconds: float, seconds: float) -> dict[str, Any]:
        """The base result plus ``best_val_loss`` (the best validation loss)."""
        return {**super().result(total, train_seconds, seconds), "best_val_loss": self.best_value}

    def close(self) -> None:
        """Detach the prefixes (restores the base model's ``requires_grad`` and attention)."""
        self.handle.detach()


def main(argv: list[str] | None = None) -> int:
    """``python -m instructedit_plugin.instructed.trainer --hparams T.yaml --train data.json [--val v.json]``."""
    parser = argparse.ArgumentParser(description="Train InstructEd prefixes")
    parser.add_argument("--hparams", required=True)
    parser.add_argument("--train", required=True, help="dataset file (any format instructedit_plugin.data knows)")
    parser.add_argument("--val", default=None)
    parser.add_argument("--model-name", default=None)
    args = parser.parse_args(argv)
    from ..data import load_requests

    logging.basicConfig(level=logging.INFO)
    cfg = InstructEdTrainingHparams.from_hparams(args.hparams)
    if args.model_name:
        cfg.model_name = args.model_name
    trainer = InstructEdTrainer(cfg, load_requests(args.train), load_requests(args.val) if args.val else None)
    result = trainer.run()
    print(f"best checkpoint: {result['best_dir']} (val loss {result['best_val_loss']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
