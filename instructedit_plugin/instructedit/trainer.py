"""The plugin's InstructEdit trainer (the documented training path).

``InstructEditTrainer(config, train_set, val_set).run()`` has the constructor of
EasyEdit's ``EditTrainer`` and adds what that trainer lacks: the post-edit loss
on rephrased (and raw) inputs, steps drawn by task proportions with a fresh
description per example, the best checkpoint chosen by validation, safetensors
checkpoints written atomically, and resuming from the last checkpoint.

Per step (``accumulate_bs`` micro-batches of ``batch_size`` edits each)::

    pre   = base model logits on the locality inputs        (no grad)
    edit  = editor.edit(batch["edit_inner"])                  (instruction-prefixed)
    l_edit = NLL of the targets on batch["edit_outer"] under the edited model
    l_loc  = KL(pre || post) on the locality inputs' real tokens
    loss  = cedit * l_edit + cloc * l_loc

Under ``accelerate launch`` each of N processes runs ``accumulate_bs`` micro-batches per step and DDP
averages the gradients of the hypernetwork and edit lrs (the base model is not synchronised): the
step of one process with ``N * accumulate_bs`` micro-batches (see :mod:`instructedit_plugin.core.distributed`).
``mixed_precision: bf16`` trains under bf16 autocast. ``answer_logits=True`` computes the same
losses from answer-position logits only (cheaper for large vocabularies; see the class).

The loop (steps, accumulation, validation and saving on the main process, resume, early stop --
EasyEdit's rule: ``early_stop_patience`` steps since the last improvement --, the ``max_seconds``
cap, progress bar) is :class:`instructedit_plugin.core.trainer.Trainer`'s; this module adds the
batches, the loss, the validation statistics and the checkpoint contents.

Checkpoints go to ``<results_dir>/models/InstructEdit/<model folder name>/``:
``best/`` (best ``early_stop_key`` so far) and ``last/`` (with optimiser state).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.distributed import StandardizerSync, make_runtime, micro_batch_index
from ..core.trainer import Trainer
from ..models.loading import is_local_model_dir, load_causal_lm
from .checkpoint import load_editor, load_trainer_state, save_editor, trainer_state_files, verify_base_model
from ..core.devices import resolve_device as _torch_device
from .editable import (
    InstructEditModel,
    answer_logits,
    compute_edited_weights,
    edit_step_stats,
    kept_nll_metrics,
    kl_locality,
    left_pad,
    observed_inputs,
    token_nll_metrics,
)

LOG = logging.getLogger(__name__)


def run_dir(config: Any) -> Path:
    name = str(config.model_name).rstrip("/").split("/")[-1] or "model"
    return Path(config.results_dir) / "models" / "InstructEdit" / name


class _EditorTrainable(nn.Module):
    """What DDP wraps: the hypernetwork and edit lrs (and, with ``train_base``, the trainable base weights).

    ``forward(batch)`` is one training micro-batch's ``(loss, stats)`` (:meth:`InstructEditTrainer.edit_step`).
    """

    def __init__(self, trainer: "InstructEditTrainer"):
        super().__init__()
        editor = trainer.editor
        self.hypernet = editor.hypernet
        self.edit_lrs = editor.edit_lrs
        own = {id(p) for p in self.parameters()}
        extra = [p for p in editor.outer_parameters() if id(p) not in own]
        self.base_params = nn.ParameterList(extra) if extra else None
        self._trainer = [trainer]  # a plain reference: the trainer (and its base model) is not a submodule

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._trainer[0].edit_step(batch, training=True)


class InstructEditTrainer(Trainer):
    """Meta-trains the InstructEdit editor; same constructor as EasyEdit's ``EditTrainer``.

    ``answer_logits=True`` computes the same losses from answer-position logits only:
    ``l_loc`` is then the KL at the locality *answer* positions (the default uses every locality
    position) and the output layer runs only at those positions, which makes meta-training
    large-vocabulary models (Gemma's 262k tokens) on CPU several times cheaper (what
    :func:`~instructedit_plugin.instructedit.evaluate.train_editor` uses).
    """

    name = "InstructEdit"
    skip_non_finite = True
    bar_keys = ("loss/edit", "loss/loc")

    def __init__(self, config: Any, train_set: Any, val_set: Any, model: Any = None, *, answer_logits: bool = False):
        super().__init__(config)
        self.train_set = train_set
        self.val_set = val_set
        self.answer_logits = bool(answer_logits)
        #: one process, or DDP under ``accelerate launch`` (see :mod:`instructedit_plugin.core.distributed`)
        self.runtime = make_runtime(torch.device(_torch_device(config.device)), int(config.accumulate_bs),
                                    getattr(config, "mixed_precision", None), getattr(config, "dtype", None))
        self.device = self.runtime.device
        if model is None:
            if not is_local_model_dir(config.model_name):
                raise FileNotFoundError(f"model_name {config.model_name!r} is not a local Hugging Face folder")
            model, _ = load_causal_lm(config.model_name, dtype=getattr(config, "dtype", None))
        model.to(self.device)
        model.eval()
        with torch.random.fork_rng(devices=[]):  # seeded editor initialisation, caller's RNG untouched
            torch.manual_seed(int(getattr(config, "seed", 0)))
            self.editor = InstructEditModel(model, config, None)
        self.editor.to(self.device)
        groups = [{"params": list(self.editor.hypernet.parameters()), "lr": config.lr},
                  {"params": [self.editor.edit_lrs], "lr": config.lr_lr}]
        self.opt = getattr(torch.optim, config.opt)(groups)
        self.out_dir = run_dir(config)
        self._patience_start = 0  # the step early stopping counts from (run() sets it)
        self.resume_once()  # before DDP wraps the editor
        # What DDP wraps: the hypernetwork and edit lrs only (the frozen base model stays out of it).
        self.train_module, self.prepared_optimizer = self.runtime.prepare(_EditorTrainable(self), self.opt)
        if self.runtime.num_processes > 1 and self.editor.hypernet.whitening:
            from ..errors import HyperParamsError

            raise HyperParamsError("key_whitening", f"is not synchronised across the {self.runtime.num_processes} "
                                   "processes of accelerate launch", "train with one process or set key_whitening: false",
                                   getattr(config, "_source", None))
        self._norm_sync = None
        if self.runtime.num_processes > 1 and self.editor.hypernet.config.get("norm", True):
            self._norm_sync = StandardizerSync(self.editor.hypernet, self.runtime)

    # ------------------------------------------------------------------ losses
    def _edit(self, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        """The edit of ``batch["edit_inner"]``: new weights (``answer_logits``) or an edited model."""
        if self.answer_logits:
            editor = self.editor
            return compute_edited_weights(editor.model, editor.hypernet, editor.edit_lrs, editor.specs,
                                          batch["edit_inner"], sparse_logits=True)
        return self.editor.edit(batch["edit_inner"])

    def edit_step(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """One edit step's loss ``cedit * l_edit + cloc * l_loc`` and its statistics (see the module docstring)."""
        cfg = self.config
        self.editor.hypernet.train(training)
        if self.answer_logits:
            loc, outer = left_pad(batch["loc"]), left_pad(batch["edit_outer"])
            editor = self.editor
            with torch.no_grad(), observed_inputs(editor.model, editor.hypernet, editor.specs, loc["attention_mask"]):
                pre_loc, loc_targ = answer_logits(self.editor.model, None, loc)
            new_weights, info = self._edit(batch)
            with torch.set_grad_enabled(training):
                post_outer, outer_targ = answer_logits(self.editor.model, new_weights, outer)
                edit_metrics = kept_nll_metrics(post_outer, outer_targ)
                post_loc, _ = answer_logits(self.editor.model, new_weights, loc)
                loc_mask = loc_targ != -100
                l_loc = kl_locality(pre_loc, post_loc, loc_mask)
                loss = cfg.cedit * edit_metrics["nll"] + cfg.cloc * l_loc
            n_edit = batch["edit_inner"]["input_ids"].shape[0]
            with torch.no_grad():
                inner = kept_nll_metrics(post_outer[:n_edit], outer_targ[:n_edit])
                agree = (pre_loc.argmax(-1) == post_loc.argmax(-1))[loc_mask]
                return loss, edit_step_stats(loss, edit_metrics, l_loc, inner, agree, info)
        loc = batch["loc"]
        with torch.no_grad():
            pre_loc = self.editor(**loc)
        edited, info = self._edit(batch)
        with torch.set_grad_enabled(training):
            post_outer = edited(**batch["edit_outer"])
            edit_metrics = token_nll_metrics(cfg, post_outer, batch["edit_outer"]["labels"])
            post_loc = edited(**loc)
            l_loc = kl_locality(pre_loc, post_loc, loc["attention_mask"][:, : post_loc.shape[1]])
            loss = cfg.cedit * edit_metrics["nll"] + cfg.cloc * l_loc
        with torch.no_grad():
            n_edit = batch["edit_inner"]["input_ids"].shape[0]
            inner = token_nll_metrics(cfg, post_outer[:n_edit], batch["edit_outer"]["labels"][:n_edit])
            agree = (pre_loc.argmax(-1) == post_loc.argmax(-1))[loc["attention_mask"].bool()]
            stats = edit_step_stats(loss, edit_metrics, l_loc, inner, agree, info)
            for key in ("edit_rephrase", "edit_raw"):
                if batch.get(key) is not None and not training:
                    stats[f"{key.split('_')[1]}/acc"] = token_nll_metrics(cfg, edited(**batch[key]), batch[key]["labels"])["acc"].item()
        return loss, stats

    # ---------------------------------------------------------------- validate
    def validate(self, steps: int | None = None) -> dict[str, float]:
        cfg = self.config
        n = len(self.val_set)
        steps = n if steps is None else min(steps * cfg.val_batch_size, n)
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for start in range(0, steps, cfg.val_batch_size):
            items = [self.val_set[i] for i in range(start, min(start + cfg.val_batch_size, steps))]
            batch = self.val_set.collate(items)
            with self.runtime.autocast():
                _, stats = self.edit_step(batch, training=False)
            for k, v in stats.items():
                sums[k] += v
            count += 1
        return {f"{k}_val": v / max(count, 1) for k, v in sums.items()}

    # ---------------------------------------------------------------- storage
    def _editor_meta(self, stats: dict[str, float] | None) -> dict[str, Any]:
        """The manifest: plugin version, base-model identity, layers, hypernetwork, hparams, step, stats."""
        return {**self.editor.editor_config(), "step": self.step, "val_stats": stats or {}}

    def save(self, which: str, stats: dict[str, float] | None) -> Path:
        folder = self.out_dir / which
        extra = None
        if which == "last":  # optimiser state, hashed in the manifest like the editor
            extra = trainer_state_files(self.opt.state_dict(), {
                "step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "best_stats": self.best_stats, "history": self.history[-100:]})
        save_editor(folder, self.editor.state_dict(), self._editor_meta(stats), extra_files=extra)
        LOG.info("saved %s checkpoint at step %d to %s", which, self.step, folder)
        return folder

    def load_last(self) -> None:
        """Continue from ``last/``: editor, optimiser, step, best value and history.

        No ``last/`` (or one where no save ever committed: no manifest, no data file) starts fresh;
        a ``last/`` that fails verification (modified, corrupted, unreadable, without trainer state)
        is a :class:`HyperParamsError` naming ``resume``, never a silent fresh start.
        """
        from ..errors import HyperParamsError
        from . import checkpoint as ck

        folder = self.out_dir / "last"
        names = (ck.EDITOR_FILE, ck.CONFIG_FILE, ck.PENDING_CONFIG_FILE, ck.TRAINER_FILE, ck.TRAINER_JSON)
        if not any((folder / name).exists() for name in names):
            LOG.info("resume requested but there is no checkpoint at %s; starting fresh", folder)
            return
        problem, cause = None, None
        try:
            tensors, editor_meta = load_editor(folder, field="resume")  # hash-checked
            loaded = load_trainer_state(folder, field="resume")  # hash-checked against the same manifest
            if loaded is None:  # cannot follow a successful load_editor (it needs the manifest)
                problem = f"{folder} has no {ck.CONFIG_FILE}"
        except HyperParamsError as exc:
            problem, cause = exc.problem, exc
        if problem is not None:
            raise HyperParamsError(
                "resume", f"cannot resume from {folder}: it exists but failed verification ({problem})",
                f"delete {folder} to start training from scratch, or restore it from a copy of a complete "
                "last/ checkpoint") from cause
        verify_base_model(editor_meta, self.editor.model, folder)  # refused if trained for another base model
        opt_state, meta = loaded
        self.editor.load_state_dict(tensors)
        self.opt.load_state_dict(opt_state)
        self.step = int(meta["step"])
        self.best_value, self.best_step = meta.get("best_value"), meta.get("best_step")
        self.best_stats = meta.get("best_stats")
        self.history = list(meta.get("history") or [])
        LOG.info("resumed from %s at step %d", folder, self.step)

    # ------------------------------------------------------ the base loop's hooks
    def planned_steps(self) -> int:
        """``max_iters``, or fewer with ``max_epochs``; 0 with ``eval_only``."""
        cfg = self.config
        if cfg.eval_only:
            return 0
        iters = cfg.max_iters
        if cfg.max_epochs is not None:
            per_epoch = math.ceil(len(self.train_set) / (cfg.batch_size * cfg.accumulate_bs * self.runtime.num_processes))
            iters = min(iters, cfg.max_epochs * per_epoch) if iters is not None else cfg.max_epochs * per_epoch
        return int(iters)

    def limit_steps(self, steps: int) -> None:
        """``max_iters`` lowered to ``steps`` (and ``val_interval`` to at most that)."""
        cfg = self.config
        cfg.max_iters = min(int(cfg.max_iters or steps), steps)
        cfg.val_interval = min(cfg.val_interval, cfg.max_iters)

    def step_batches(self) -> list[dict[str, Any]]:
        """``accumulate_bs`` micro-batches of ``batch_size`` edits (this process's).

        Micro-batch ``micro`` of process ``r`` is drawn with the global index
        ``micro * num_processes + r``, so ``N`` processes take the step one process takes with
        ``N * accumulate_bs`` micro-batches.
        """
        cfg, rt = self.config, self.runtime
        batches = []
        for micro in range(cfg.accumulate_bs):
            index = micro_batch_index(micro, rt.process_index, rt.num_processes)
            batches.append(self.train_set.sample_batch(cfg.batch_size, random.Random(f"{cfg.seed}:{self.step}:{index}")))
        return batches

    def forward_context(self, micro: int, batch: Any) -> contextlib.AbstractContextManager:
        """Under DDP with ``norm``: the running statistics of all processes' micro-batches, in global order."""
        if self._norm_sync is None:
            return contextlib.nullcontext()
        self.editor.hypernet.train(True)
        with self.runtime.autocast():
            calls = self._norm_sync.record(lambda: self._edit(batch))
        return self._norm_sync.replay(self._norm_sync.exchange(calls))

    def step_stats(self, micro_stats: list[dict[str, float]]) -> dict[str, float]:
        """Mean over the micro-batches (and, under DDP, over the processes: every process gets them)."""
        accum = self.config.accumulate_bs
        totals: dict[str, float] = defaultdict(float)
        for stats in micro_stats:
            for k, v in stats.items():
                totals[k] += v / accum
        if self.runtime.num_processes > 1:  # statistics of the global batch (for logging; every process gets them)
            gathered = self.runtime.gather(dict(totals))
            totals = defaultdict(float, {k: sum(g.get(k, 0.0) for g in gathered) / len(gathered) for k in gathered[0]})
        return dict(totals)

    def clip_gradients(self) -> torch.Tensor:
        """Clip the hypernetwork's (and edit lrs') gradients to ``grad_clip``; the norm before clipping."""
        return self.runtime.clip_grad_norm_(self.editor.outer_parameters(), self.config.grad_clip)

    def validation_metrics(self) -> dict[str, float]:
        return self.validate(self.config.val_steps)

    def monitored_value(self, metrics: dict[str, float]) -> float:
        key = self.config.early_stop_key
        if key not in metrics:
            raise KeyError(f"early_stop_key '{key}' is not a validation statistic; choose one of {sorted(metrics)}")
        return metrics[key]

    def is_better(self, value: float) -> bool:
        """NaN never improves; ``*acc*`` keys improve upwards, the others downwards."""
        if self.best_value is None or math.isnan(self.best_value):
            return not math.isnan(value)
        return value > self.best_value if "acc" in self.config.early_stop_key else value < self.best_value

    def save_checkpoint(self, which: str, record: dict[str, Any]) -> Path | None:
        if not self.config.save:
            return None
        return self.save(which, {k: v for k, v in record.items() if k != "step"})

    def should_stop_early(self) -> bool:
        """EasyEdit's rule: ``early_stop_patience`` steps since the last improvement (or since the run started)."""
        if self.best_step == self.step:  # this validation improved
            self._patience_start = self.step
        if self.step - self._patience_start >= self.config.early_stop_patience:
            LOG.info("no improvement of %s for %d steps: stopping", self.config.early_stop_key,
                     self.config.early_stop_patience)
            return True
        return False

    def needs_final_validation(self) -> bool:
        """Validate after the loop when nothing was kept yet (or with ``eval_only``), unless the cap stopped it."""
        return not self.stopped_by_budget and (self.best_step is None or self.planned_steps() == 0)

    def show_progress(self) -> bool:
        return bool(self.config.progress) and not self.config.silent and self.runtime.is_main

    def run(self) -> dict[str, Any]:
        """Train (the base loop) with the patience counted from the resumed best step, else from here."""
        self.resume_once()
        self._patience_start = self.best_step or self.step
        return super().run()
