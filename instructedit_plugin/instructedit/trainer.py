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

Checkpoints go to ``<results_dir>/models/InstructEdit/<model folder name>/``:
``best/`` (best ``early_stop_key`` so far) and ``last/`` (with optimiser state).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.loading import is_local_model_dir, load_causal_lm
from .checkpoint import load_editor, load_trainer_state, save_editor, save_trainer_state
from .dataset import _torch_device
from .editable import InstructEditModel, kl_locality, token_nll_metrics

LOG = logging.getLogger(__name__)


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def run_dir(config: Any) -> Path:
    name = str(config.model_name).rstrip("/").split("/")[-1] or "model"
    return Path(config.results_dir) / "models" / "InstructEdit" / name


class InstructEditTrainer:
    """Meta-trains the InstructEdit editor; same constructor as EasyEdit's ``EditTrainer``."""

    def __init__(self, config: Any, train_set: Any, val_set: Any, model: Any = None):
        self.config = config
        self.train_set = train_set
        self.val_set = val_set
        self.device = torch.device(_torch_device(config.device))
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
            stats = {
                "loss/edit": edit_metrics["nll"].item(),
                "loss/loc": l_loc.item(),
                "loss/total_edit": loss.item(),
                "edit/acc": inner["acc"].item(),
                "outer/acc": edit_metrics["acc"].item(),
                "loc/acc": (pre_loc.argmax(-1) == post_loc.argmax(-1))[loc["attention_mask"].bool()].float().mean().item(),
                **info,
            }
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
        return {"alg": "InstructEdit", **self.editor.editor_config(), "step": self.step,
                "val_stats": stats or {}, "training_config": _config_dict(self.config)}

    def save(self, which: str, stats: dict[str, float] | None) -> Path:
        folder = self.out_dir / which
        save_editor(folder, self.editor.state_dict(), self._editor_meta(stats))
        if which == "last":
            save_trainer_state(folder, self.opt.state_dict(), {
                "step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "best_stats": self.best_stats, "history": self.history[-100:]})
        LOG.info("saved %s checkpoint at step %d to %s", which, self.step, folder)
        return folder

    def _resume(self) -> None:
        folder = self.out_dir / "last"
        loaded = load_trainer_state(folder)
        if loaded is None:
            LOG.info("resume requested but no usable checkpoint at %s; starting fresh", folder)
            return
        opt_state, meta = loaded
        tensors, _ = load_editor(folder)
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
            per_epoch = math.ceil(len(self.train_set) / (cfg.batch_size * cfg.accumulate_bs))
            iters = min(iters, cfg.max_epochs * per_epoch) if iters is not None else cfg.max_epochs * per_epoch
        return int(iters)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        totals: dict[str, float] = defaultdict(float)
        for micro in range(cfg.accumulate_bs):
            rng = random.Random(f"{cfg.seed}:{self.step}:{micro}")
            batch = self.train_set.sample_batch(cfg.batch_size, rng)
            loss, stats = self.edit_step(batch, training=True)
            (loss / cfg.accumulate_bs).backward()
            for k, v in stats.items():
                totals[k] += v / cfg.accumulate_bs
        params = self.editor.outer_parameters()
        grad = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(grad):
            self.opt.step()
        else:
            LOG.warning("step %d: non-finite gradient norm, update skipped", self.step)
        self.opt.zero_grad(set_to_none=True)
        totals["grad"] = float(grad)
        return dict(totals)

    def run(self) -> dict[str, Any]:
        cfg = self.config
        max_iters = self._max_iters()
        start = time.time()
        patience_start = self.best_step or self.step
        running: dict[str, list[float]] = defaultdict(list)
        bar = tqdm(total=max_iters, initial=min(self.step, max_iters), disable=not cfg.progress or cfg.silent,
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
                    bar.set_postfix({"edit": f"{avg['loss/edit']:.3f}", "loc": f"{avg['loss/loc']:.4f}"})
                    LOG.info("step %d: %s", self.step, "; ".join(f"{k}: {v:.5f}" for k, v in sorted(avg.items())))
                if self.step % cfg.val_interval == 0 or self.step == max_iters:
                    if self._validate_and_save():
                        patience_start = self.step
                    if self.step - patience_start >= cfg.early_stop_patience:
                        LOG.info("no improvement of %s for %d steps: stopping", cfg.early_stop_key, cfg.early_stop_patience)
                        stopped_early = True
                        break
        finally:
            bar.close()
        train_time = time.time() - start
        if self.best_step is None or max_iters == 0:
            self._validate_and_save()
        result = {
            "steps": self.step, "train_time_s": train_time, "best_step": self.best_step,
            "best_value": self.best_value, "best_stats": self.best_stats, "stopped_early": stopped_early,
            "best_checkpoint": str(self.out_dir / "best"), "last_checkpoint": str(self.out_dir / "last"),
        }
        LOG.info("training finished after %d steps in %.1fs; best %s = %s at step %s", self.step, train_time,
                 cfg.early_stop_key, self.best_value, self.best_step)
        return result

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


