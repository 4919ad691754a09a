"""The training loop both methods share: :class:`Trainer`, which a method extends with its batches and loss.

The loop (:meth:`Trainer.run`) counts optimizer steps up to :meth:`Trainer.planned_steps`; one
step (:meth:`Trainer.train_step`) runs this process's ``accumulate_bs`` micro-batches of
:meth:`Trainer.step_batches` through the trainable module (DDP-wrapped under ``accelerate
launch``, :mod:`instructedit_plugin.core.distributed`; gradients all-reduced on the last
micro-batch only), clips the gradients and steps the optimizer. Every ``val_interval`` steps and at
the end, the main process validates (:meth:`Trainer.validation_metrics`), keeps the best value
(``best`` checkpoint) and writes ``last`` (with the optimizer state) through
:meth:`Trainer.save_checkpoint`; the other processes wait and receive its decisions. ``resume:
true`` continues from ``last`` (:meth:`Trainer.load_last`) at the saved step, and the batches of
a step depend only on the step, so a resumed run is bit-identical to an uninterrupted one.

Settings (EasyEdit's ``TrainingHparams`` names): ``accumulate_bs``, ``val_interval``,
``log_interval``, ``early_stop_patience``, ``progress``, ``grad_clip`` and ``max_seconds``, a
wall-clock safety cap only: once spent, ``last`` is saved at the current step and training stops
(``stopped_by_budget``) without an unscheduled validation; the schedule never depends on the
clock, so calling again with ``resume: true`` finishes exactly the run an uncapped call trains.

A method provides: :meth:`planned_steps`, :meth:`step_batches`, the trainable module's
``forward(batch) -> (loss, stats)`` (:attr:`train_module`), :meth:`step_stats`,
:meth:`validation_metrics`, :meth:`monitored_value`, :meth:`save_checkpoint` and
:meth:`load_last`; optionally :meth:`forward_context`, :meth:`clip_gradients`,
:meth:`after_optimizer_step`, :meth:`is_better`, :meth:`should_stop_early` and :meth:`limit_steps`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .distributed import LocalRuntime, run_on_main

LOG = logging.getLogger(__name__)

__all__ = ["Trainer"]


class Trainer:
    """Base of the methods' trainers; see the module docstring.

    A subclass sets, in its constructor (after ``super().__init__(config)``): :attr:`runtime`
    (:func:`~instructedit_plugin.core.distributed.make_runtime`), :attr:`train_module` and
    :attr:`prepared_optimizer` (the pair ``runtime.prepare`` returns) and :attr:`out_dir` (where ``best``
    and ``last`` go).
    """

    #: progress-bar label and log prefix
    name = "training"
    #: skip the optimizer step (with a warning) when the gradient norm is not finite
    skip_non_finite = False
    #: step statistics shown on the progress bar (those present)
    bar_keys: tuple[str, ...] = ("loss",)

    runtime: LocalRuntime
    train_module: torch.nn.Module
    prepared_optimizer: Any
    out_dir: Path

    def __init__(self, config: Any):
        self.config = config
        self.step = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_stats: dict[str, Any] | None = None
        self.bad_validations = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_by_budget = False
        self.stopped_early = False
        self._resumed = False

    # ------------------------------------------------------------------ what a method provides
    def planned_steps(self) -> int:
        """Number of optimizer steps the run trains (the loop stops there)."""
        raise NotImplementedError

    def step_batches(self) -> list[Any]:
        """This process's micro-batches of step :attr:`step` (``accumulate_bs`` of them; None: no rows here)."""
        raise NotImplementedError

    def step_stats(self, micro_stats: list[dict[str, float]]) -> dict[str, float]:
        """The step's statistics from its micro-batches' (every process gets the same)."""
        raise NotImplementedError

    def validation_metrics(self) -> dict[str, float]:
        """Validation statistics (run on the main process only)."""
        raise NotImplementedError

    def monitored_value(self, metrics: dict[str, float]) -> float:
        """The validation statistic that chooses ``best``."""
        raise NotImplementedError

    def save_checkpoint(self, which: str, record: dict[str, Any]) -> Path | None:
        """Write ``best`` (weights) or ``last`` (weights + optimizer state + loop state); main process only."""
        raise NotImplementedError

    def load_last(self) -> None:
        """Restore weights, optimizer and loop state from ``last`` (or log and keep a fresh start)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks
    def forward_context(self, micro: int, batch: Any) -> contextlib.AbstractContextManager:
        """Context around micro-batch ``micro``'s forward (default: none)."""
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip the trainable gradients to ``grad_clip`` (0: no clipping); returns the norm before clipping."""
        clip = float(self.config.grad_clip)
        if clip <= 0:
            return None
        return self.runtime.clip_grad_norm_(self.trainable_parameters(), clip)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.train_module.parameters())

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. a learning-rate scheduler's step)."""

    def is_better(self, value: float) -> bool:
        """Whether ``value`` improves on :attr:`best_value` (lower is better; a NaN never is, unless nothing is kept)."""
        best = self.best_value
        return best is None or math.isnan(best) or (not math.isnan(value) and value < best)

    def should_stop_early(self) -> bool:
        """Early stop after ``early_stop_patience`` validations in a row without improvement (null: never)."""
        patience = self.config.early_stop_patience
        return patience is not None and self.bad_validations >= patience

    def needs_final_validation(self) -> bool:
        """After the loop: validate unless the last validation was at this step (or the cap stopped the run)."""
        return not self.stopped_by_budget and (not self.history or self.history[-1]["step"] != self.step)

    def show_progress(self) -> bool:
        return bool(self.config.progress) and self.runtime.is_main

    def limit_steps(self, steps: int) -> None:
        """Lower the planned steps to ``steps`` (:meth:`calibrate`)."""
        raise NotImplementedError(f"{type(self).__name__} trains a fixed number of steps")

    def log_extra(self) -> str:
        """Appended to the periodic training log line."""
        return ""

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over this process's micro-batches of step :attr:`step`; returns its statistics.

        Each micro-batch's loss goes through ``runtime.backward`` (which divides by the
        accumulation steps); under DDP the gradients are all-reduced on the last micro-batch only.
        """
        rt = self.runtime
        batches = self.step_batches()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        micro_stats = []
        last = len(batches) - 1
        for micro, batch in enumerate(batches):
            with rt.micro_step(self.train_module, last=micro == last):
                with self.forward_context(micro, batch), rt.autocast():
                    loss, stats = self.train_module(batch)
                rt.backward(loss)
            micro_stats.append(stats)
        stats = self.step_stats(micro_stats)
        grad = self.clip_gradients()
        if grad is not None and self.skip_non_finite and not torch.isfinite(grad):
            LOG.warning("step %d: non-finite gradient norm, update skipped", self.step)
        else:
            self.prepared_optimizer.step()
            self.after_optimizer_step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        if grad is not None:
            stats["grad"] = float(grad)
        return stats

    def calibrate(self, steps: int, budget_s: float | None = None) -> float:
        """Train ``steps`` steps (they count as training) and return the seconds per step.

        With ``budget_s``, the planned steps are lowered (:meth:`limit_steps`) to what fits the
        budget at that pace (at least ``steps``).
        """
        self.resume_once()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.train_step()
            self.step += 1
        per_step = (time.perf_counter() - t0) / max(steps, 1)
        if budget_s is not None:
            self.limit_steps(max(steps, int(budget_s / per_step)))
        return per_step

    # ------------------------------------------------------------------ the loop
    def resume_once(self) -> None:
        """With ``resume: true``, restore ``last`` (once per trainer)."""
        if self.config.resume and not self._resumed:
            self.load_last()
        self._resumed = True

    def run(self) -> dict[str, Any]:
        """Train to :meth:`planned_steps`; returns the result (see :meth:`result`)."""
        cfg = self.config
        self.resume_once()
        total = self.planned_steps()
        started = time.perf_counter()
        started_step = self.step
        main = self.runtime.is_main
        self.stopped_by_budget = self.stopped_early = False
        bar = None
        if self.show_progress():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=min(self.step, total), desc=self.name, dynamic_ncols=True)
        running: dict[str, list[float]] = defaultdict(list)
        try:
            while self.step < total:
                stats = self.train_step()
                self.step += 1
                for key, value in stats.items():
                    running[key].append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self._bar_postfix(stats), refresh=False)
                if self.step % cfg.log_interval == 0:
                    if main:
                        avg = {k: sum(v) / len(v) for k, v in running.items()}
                        LOG.info("%s step %d/%d: %s%s", self.name, self.step, total,
                                 "; ".join(f"{k}: {v:.5f}" for k, v in sorted(avg.items())), self.log_extra())
                    running.clear()
                if getattr(cfg, "max_seconds", None) is not None and self._out_of_time_on_main(started, started_step, total):
                    # the cap only interrupts: `last` keeps the exact state to resume from, and no
                    # unscheduled validation changes `best`, so a resumed run equals an uninterrupted one
                    self._save_on_main("last", {"step": self.step, "interrupted": True}, "the interrupted save")
                    break
                if self.step % cfg.val_interval == 0 or self.step >= total:
                    self._validate_on_main()
                    if self.should_stop_early():
                        self.stopped_early = True
                        if main:
                            LOG.info("%s: early stop at step %d (no improvement of the validation value)",
                                     self.name, self.step)
                        break
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - started
        if self.needs_final_validation():
            self._validate_on_main()
        if main:
            LOG.info("%s finished at step %d of %d in %.1fs; best %s at step %s", self.name, self.step, total,
                     train_seconds, self.best_value, self.best_step)
        return self.result(total, train_seconds, time.perf_counter() - started)

    def result(self, total: int, train_seconds: float, seconds: float) -> dict[str, Any]:
        """What :meth:`run` returns (both methods' historical key names).

        ``train_time_s``: the loop's seconds; ``seconds``: with the final validation.
        """
        best, last = str(self.out_dir / "best"), str(self.out_dir / "last")
        return {
            "step": self.step, "steps": self.step, "total_steps": total,
            "best_value": self.best_value, "best_step": self.best_step, "best_stats": self.best_stats,
            "best_dir": best, "best_checkpoint": best, "last_dir": last, "last_checkpoint": last,
            "history": self.history, "seconds": seconds, "train_time_s": train_seconds,
            "stopped_by_budget": self.stopped_by_budget, "stopped_early": self.stopped_early,
        }

    def _bar_postfix(self, stats: dict[str, float]) -> dict[str, str]:
        """The step's statistics and the latest validation (value@step)."""
        shown = {k: f"{stats[k]:.3f}" for k in self.bar_keys if k in stats}
        if self.history and self.best_value is not None:
            last = self.history[-1]
            try:
                shown["val"] = f"{self.monitored_value(last):.3f}@{last['step']}"
            except KeyError:
                pass
        return shown

    # ------------------------------------------------------------------ main-process work
    def _validate_and_save(self) -> bool:
        """Validate, record, keep ``best`` when improved, write ``last``; returns whether it improved."""
        metrics = self.validation_metrics()
        record = {"step": self.step, **metrics}
        self.history.append(record)
        value = self.monitored_value(metrics)
        improved = self.is_better(value)
        if improved:
            self.best_value, self.best_step, self.best_stats = value, self.step, metrics
            self.bad_validations = 0
            self.save_checkpoint("best", record)
        else:
            self.bad_validations += 1
        self.save_checkpoint("last", record)
        LOG.info("%s validation at step %d: %s%s", self.name, self.step,
                 "; ".join(f"{k}: {v:.5f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))),
                 " (best)" if improved else "")
        return improved

    def _loop_state(self) -> tuple:
        return self.best_value, self.best_step, self.best_stats, self.bad_validations, self.history

    def _validate_on_main(self) -> bool:
        """:meth:`_validate_and_save` on the main process; every process gets its outcome and waits for the save."""
        rt = self.runtime
        if not rt.distributed:
            return self._validate_and_save()

        def validate() -> tuple:
            return self._validate_and_save(), self._loop_state()

        improved, state = run_on_main(rt, validate, "validation")
        self.best_value, self.best_step, self.best_stats, self.bad_validations, self.history = state
        rt.wait_for_everyone()
        return improved

    def _save_on_main(self, which: str, record: dict[str, Any], what: str) -> None:
        rt = self.runtime

        def save() -> None:
            self.save_checkpoint(which, record)

        run_on_main(rt, save, what)
        if rt.distributed:
            rt.wait_for_everyone()

    def _out_of_time_on_main(self, started: float, started_step: int, total: int) -> bool:
        """``max_seconds`` spent, on the main process's clock; every process gets the decision."""

        def check() -> bool:
            if time.perf_counter() - started < self.config.max_seconds:
                return False
            LOG.warning("%s stopped by the %.0fs safety cap after %d steps (step %d of %d)", self.name,
                        self.config.max_seconds, self.step - started_step, self.step, total)
            return True

        self.stopped_by_budget = bool(run_on_main(self.runtime, check, "the time-budget check"))
        return self.stopped_by_budget
