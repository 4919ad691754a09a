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
``mixed_precision: bf16`` trains under bf16 autocast.

Checkpoints go to ``<results_dir>/models/InstructEdit/<model folder name>/``:
``best/`` (best ``early_stop_key`` so far) and ``last/`` (with optimiser state).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.distributed import StandardizerSync, make_runtime, micro_batch_index, run_on_main
from ..models.loading import is_local_model_dir, load_causal_lm
from .checkpoint import load_editor, load_trainer_state, save_editor, trainer_state_files, verify_base_model
from ..core.devices import resolve_device as _torch_device
from .editable import InstructEditModel, edit_step_stats, kl_locality, token_nll_metrics

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


class InstructEditTrainer:
    """Meta-trains the InstructEdit editor; same constructor as EasyEdit's ``EditTrainer``."""

    def __init__(self, config: Any, train_set: Any, val_set: Any, model: Any = None):
        self.config = config
        self.train_set = train_set
        self.val_set = val_set
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
        self.step = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_stats: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        if getattr(config, "resume", False):
            self._resume()
        # What DDP wraps: the hypernetwork and edit lrs only (the frozen base model stays out of it).
        self.train_module, self._opt_step = self.runtime.prepare(_EditorTrainable(self), self.opt)
        self._norm_sync = None
        if self.runtime.num_processes > 1 and self.editor.hypernet.config.get("norm", True):
            self._norm_sync = StandardizerSync(self.editor.hypernet, self.runtime)

    # ------------------------------------------------------------------ losses
    def edit_step(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        self.editor.hypernet.train(training)
        loc = batch["loc"]
        with torch.no_grad():
            pre_loc = self.editor(**loc)
        edited, info = self.editor.edit(batch["edit_inner"])
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

    def _better(self, value: float) -> bool:
        if self.best_value is None or math.isnan(self.best_value):
            return not math.isnan(value)
        return value > self.best_value if "acc" in self.config.early_stop_key else value < self.best_value

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

    def _resume(self) -> None:
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

    # --------------------------------------------------------------------- run
    def _max_iters(self) -> int:
        cfg = self.config
        if cfg.eval_only:
            return 0
        iters = cfg.max_iters
        if cfg.max_epochs is not None:
            per_epoch = math.ceil(len(self.train_set) / (cfg.batch_size * cfg.accumulate_bs * self.runtime.num_processes))
            iters = min(iters, cfg.max_epochs * per_epoch) if iters is not None else cfg.max_epochs * per_epoch
        return int(iters)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``accumulate_bs`` micro-batches of ``batch_size`` edits (per process).

        Micro-batch ``micro`` of process ``r`` is drawn with the global index
        ``micro * num_processes + r``, so ``N`` processes take the step one process takes with
        ``N * accumulate_bs`` micro-batches.
        """
        cfg = self.config
        rt = self.runtime
        totals: dict[str, float] = defaultdict(float)
        for micro in range(cfg.accumulate_bs):
            index = micro_batch_index(micro, rt.process_index, rt.num_processes)
            rng = random.Random(f"{cfg.seed}:{self.step}:{index}")
            batch = self.train_set.sample_batch(cfg.batch_size, rng)
            replay = contextlib.nullcontext()
            if self._norm_sync is not None:
                self.editor.hypernet.train(True)
                with rt.autocast():
                    calls = self._norm_sync.record(lambda: self.editor.edit(batch["edit_inner"]))
                replay = self._norm_sync.replay(self._norm_sync.exchange(calls))
            with rt.micro_step(self.train_module, last=micro == cfg.accumulate_bs - 1):
                with replay, rt.autocast():
                    loss, stats = self.train_module(batch)
                rt.backward(loss)
            for k, v in stats.items():
                totals[k] += v / cfg.accumulate_bs
        if rt.num_processes > 1:  # statistics of the global batch (for logging; every process gets them)
            gathered = rt.gather(dict(totals))
            totals = defaultdict(float, {k: sum(g.get(k, 0.0) for g in gathered) / len(gathered) for k in gathered[0]})
        params = self.editor.outer_parameters()
        grad = rt.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(grad):
            self._opt_step.step()
        else:
            LOG.warning("step %d: non-finite gradient norm, update skipped", self.step)
        self._opt_step.zero_grad(set_to_none=True)
        totals["grad"] = float(grad)
        return dict(totals)

    def run(self) -> dict[str, Any]:
        cfg = self.config
        max_iters = self._max_iters()
        start = time.time()
        patience_start = self.best_step or self.step
        running: dict[str, list[float]] = defaultdict(list)
        main = self.runtime.is_main
        bar = tqdm(total=max_iters, initial=min(self.step, max_iters), disable=not cfg.progress or cfg.silent or not main,
                   desc="InstructEdit", dynamic_ncols=True)
        stopped_early = False
        try:
            while self.step < max_iters:
                stats = self.train_step()
                self.step += 1
                bar.update(1)
                for k, v in stats.items():
                    running[k].append(v)
                if self.step % cfg.log_interval == 0:
                    avg = {k: sum(v) / len(v) for k, v in running.items()}
                    running.clear()
                    shown = {"edit": f"{avg['loss/edit']:.3f}", "loc": f"{avg['loss/loc']:.4f}"}
                    if self.history and cfg.early_stop_key in self.history[-1]:
                        last = self.history[-1]
                        shown[f"val_{cfg.early_stop_key}"] = f"{last[cfg.early_stop_key]:.4f}@{last['step']}"
                    bar.set_postfix(shown)
                    if main:
                        LOG.info("step %d: %s", self.step, "; ".join(f"{k}: {v:.5f}" for k, v in sorted(avg.items())))
                if self.step % cfg.val_interval == 0 or self.step == max_iters:
                    if self._validate_and_save_on_main():
                        patience_start = self.step
                    if self.step - patience_start >= cfg.early_stop_patience:
                        LOG.info("no improvement of %s for %d steps: stopping", cfg.early_stop_key, cfg.early_stop_patience)
                        stopped_early = True
                        break
        finally:
            bar.close()
        train_time = time.time() - start
        if self.best_step is None or max_iters == 0:
            self._validate_and_save_on_main()
        result = {
            "steps": self.step, "train_time_s": train_time, "best_step": self.best_step,
            "best_value": self.best_value, "best_stats": self.best_stats, "stopped_early": stopped_early,
            "best_checkpoint": str(self.out_dir / "best"), "last_checkpoint": str(self.out_dir / "last"),
        }
        if main:
            LOG.info("training finished after %d steps in %.1fs; best %s = %s at step %s", self.step, train_time,
                     cfg.early_stop_key, self.best_value, self.best_step)
        return result

    def _validate_and_save_on_main(self) -> bool:
        """:meth:`_validate_and_save` on the main process; every process gets its outcome (and waits for the save)."""
        rt = self.runtime
        if not rt.distributed:
            return self._validate_and_save()

        def validate() -> tuple:
            improved = self._validate_and_save()
            return improved, self.best_value, self.best_step, self.best_stats, self.history

        improved, self.best_value, self.best_step, self.best_stats, self.history = run_on_main(rt, validate, "validation")
        rt.wait_for_everyone()
        return improved

    def _validate_and_save(self) -> bool:
        cfg = self.config
        val = self.validate(cfg.val_steps)
        LOG.info("validation at step %d: %s", self.step, "; ".join(f"{k}: {v:.5f}" for k, v in sorted(val.items())))
        self.history.append({"step": self.step, **val})
        if cfg.early_stop_key not in val:
            raise KeyError(f"early_stop_key '{cfg.early_stop_key}' is not a validation statistic; choose one of {sorted(val)}")
        improved = self._better(val[cfg.early_stop_key])
        if improved:
            self.best_value, self.best_step, self.best_stats = val[cfg.early_stop_key], self.step, val
            if cfg.save:
                self.save("best", val)
        if cfg.save:
            self.save("last", val)
        return improved


