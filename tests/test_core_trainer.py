"""The shared training loop (:mod:`instructedit_plugin.core.trainer`) on a toy subclass.

The toy trains a linear regression with Adam; its batches depend only on the step (as both
methods' do), its checkpoints hold the weights, the optimizer state and the loop state (written
atomically through :mod:`instructedit_plugin.core.durable`). The tests assert what the loop
promises both methods: accumulation of N micro-batches is one step on their union, resuming from
``last`` is bit-identical to an uninterrupted run, early stopping after ``patience`` validations
without improvement, the time cap saving ``last`` without a validation, and validation and saving
on the main process only (the other process receives its decisions).
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from instructedit_plugin.core.distributed import LocalRuntime
from instructedit_plugin.core.durable import atomic_write_bytes, atomic_write_json
from instructedit_plugin.core.trainer import Trainer

N_ROWS = 64
TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


@dataclasses.dataclass
class ToyConfig:
    results_dir: str
    max_iters: int = 12
    batch_size: int = 8
    accumulate_bs: int = 1
    lr: float = 0.05
    val_interval: int = 3
    log_interval: int = 2
    early_stop_patience: int | None = None
    max_seconds: float | None = None
    grad_clip: float = 0.0
    resume: bool = False
    progress: bool = False


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_ROWS, 4, generator=gen)
    return x, x @ TRUE_W.T + 0.1 * torch.randn(N_ROWS, 1, generator=gen)


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        loss = ((self.linear(x) - y) ** 2).mean()
        return loss, {"loss": loss.item()}


class ToyTrainer(Trainer):
    """Linear regression: global batch ``batch_size * accumulate_bs`` rows, cut into micro-batches."""

    name = "toy"

    def __init__(self, config: ToyConfig, runtime: LocalRuntime | None = None, val_losses: list[float] | None = None):
        super().__init__(config)
        self.runtime = runtime or LocalRuntime(torch.device("cpu"), config.accumulate_bs)
        torch.manual_seed(0)
        self.model = _Regression()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.train_module, self.prepared_optimizer = self.runtime.prepare(self.model, self.optimizer)
        self.out_dir = Path(config.results_dir)
        self.x, self.y = _data()
        self.val_losses = list(val_losses) if val_losses is not None else None  # scripted validation values
        self.validations = 0
        self.steps_trained = 0
        self.saves: list[tuple[str, int]] = []

    def planned_steps(self) -> int:
        return self.config.max_iters

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        self.steps_trained += 1
        size = cfg.batch_size * cfg.accumulate_bs
        rows = [(self.step * size + i) % N_ROWS for i in range(size)]
        return [(self.x[rows[m * cfg.batch_size:(m + 1) * cfg.batch_size]], self.y[rows[m * cfg.batch_size:(m + 1) * cfg.batch_size]])
                for m in range(cfg.accumulate_bs)]

    def step_stats(self, micro_stats: list[dict[str, float]]) -> dict[str, float]:
        return {"loss": sum(s["loss"] for s in micro_stats) / len(micro_stats)}

    def validation_metrics(self) -> dict[str, float]:
        self.validations += 1
        if self.val_losses is not None:
            return {"loss": self.val_losses.pop(0)}
        with torch.no_grad():
            return {"loss": float(((self.model.linear(self.x[:16]) - self.y[:16]) ** 2).mean())}

    def monitored_value(self, metrics: dict[str, float]) -> float:
        return metrics["loss"]

    def save_checkpoint(self, which: str, record: dict[str, Any]) -> Path:
        folder = self.out_dir / which
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict() if which == "last" else None}, buffer)
        atomic_write_bytes(folder / "state.pt", buffer.getvalue())
        atomic_write_json(folder / "loop.json", {"step": self.step, "record": record, "best_value": self.best_value,
                                                "best_step": self.best_step, "bad_validations": self.bad_validations,
                                                "history": self.history})
        self.saves.append((which, self.step))
        return folder

    def load_last(self) -> None:
        folder = self.out_dir / "last"
        if not (folder / "loop.json").is_file():
            return
        state = torch.load(folder / "state.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        loop = json.loads((folder / "loop.json").read_text())
        self.step, self.best_value, self.best_step = loop["step"], loop["best_value"], loop["best_step"]
        self.bad_validations, self.history = loop["bad_validations"], loop["history"]


def _weights(trainer: ToyTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accumulated_micro_batches_are_one_step_on_their_union(tmp_path):
    one = ToyTrainer(ToyConfig(str(tmp_path / "one"), batch_size=16, accumulate_bs=1))
    accumulated = ToyTrainer(ToyConfig(str(tmp_path / "acc"), batch_size=4, accumulate_bs=4))
    smaller = ToyTrainer(ToyConfig(str(tmp_path / "small"), batch_size=4, accumulate_bs=1))
    initial = _weights(one)
    results = [t.run() for t in (one, accumulated, smaller)]
    assert all(r["step"] == 12 for r in results)
    a, b = _weights(one), _weights(accumulated)
    assert not _equal(a, initial)  # it trained
    for key in a:  # the same 12 steps, up to the order of floating-point sums
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # a quarter of the batch is another step: the comparison above can fail
    assert max(float((a[k] - _weights(smaller)[k]).abs().max()) for k in a) > 1e-3
    # the loss the loop reports for the step is the mean over the micro-batches
    assert results[1]["history"][-1]["loss"] == pytest.approx(results[0]["history"][-1]["loss"], abs=1e-6)


def test_resume_from_last_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = ToyTrainer(ToyConfig(str(tmp_path / "full"), max_iters=10))
    initial = _weights(full)
    full_result = full.run()
    assert not _equal(_weights(full), initial)  # it trained (else any two runs are "identical")
    first = ToyTrainer(ToyConfig(str(tmp_path / "split"), max_iters=4))  # validates at 3 and 4, `last` at 4
    assert first.run()["step"] == 4
    second = ToyTrainer(ToyConfig(str(tmp_path / "split"), max_iters=10, resume=True))
    result = second.run()
    assert result["step"] == 10 and second.steps_trained == 6
    assert _equal(_weights(second), _weights(full))  # Adam's state came back too: bit-identical
    # the split run validated at its end (step 4) too; every validation of the full run is the same
    assert [h["step"] for h in result["history"]] == [3, 4, 6, 9, 10]
    full_losses = {h["step"]: h["loss"] for h in full_result["history"]}
    assert {h["step"]: h["loss"] for h in result["history"] if h["step"] != 4} == full_losses
    assert result["best_value"] == full_result["best_value"] and result["best_step"] == full_result["best_step"]


def test_early_stop_after_patience_validations_without_improvement(tmp_path):
    scripted = [5.0, 4.0, 4.5, 4.2, 3.0, 9.0, 9.0]
    trainer = ToyTrainer(ToyConfig(str(tmp_path), max_iters=100, val_interval=2, early_stop_patience=2),
                         val_losses=scripted)
    result = trainer.run()
    # validations at 2, 4 (best), 6 and 8 (no improvement twice): stop at step 8
    assert result["stopped_early"] and result["step"] == 8
    assert [h["loss"] for h in result["history"]] == [5.0, 4.0, 4.5, 4.2]
    assert result["best_value"] == 4.0 and result["best_step"] == 4
    assert ("best", 4) in trainer.saves and ("best", 6) not in trainer.saves and ("last", 8) in trainer.saves
    # without patience it trains on
    trainer = ToyTrainer(ToyConfig(str(tmp_path / "on"), max_iters=14, val_interval=2), val_losses=scripted)
    assert trainer.run()["step"] == 14 and not trainer.stopped_early


def test_the_time_cap_saves_last_and_the_resumed_run_finishes_identically(tmp_path):
    reference = ToyTrainer(ToyConfig(str(tmp_path / "ref"), max_iters=9))
    initial = _weights(reference)
    ref_result = reference.run()
    assert not _equal(_weights(reference), initial)
    capped = ToyTrainer(ToyConfig(str(tmp_path / "capped"), max_iters=9, max_seconds=0.0))
    result = capped.run()
    # the cap stops after the first step: `last` holds that step, no validation ran, no `best`
    assert result["stopped_by_budget"] and result["step"] == 1 and result["history"] == []
    assert capped.saves == [("last", 1)] and capped.validations == 0
    loop = json.loads((tmp_path / "capped" / "last" / "loop.json").read_text())
    assert loop["step"] == 1 and loop["record"] == {"step": 1, "interrupted": True}
    assert not (tmp_path / "capped" / "best").exists()
    resumed = ToyTrainer(ToyConfig(str(tmp_path / "capped"), max_iters=9, resume=True))
    out = resumed.run()
    assert not out["stopped_by_budget"] and out["step"] == 9 and resumed.steps_trained == 8  # from step 1
    assert _equal(_weights(resumed), _weights(reference))
    assert out["history"] == ref_result["history"]


class _ReplayRuntime(LocalRuntime):
    """One process of a two-process group, in this test process: the main process records what it
    broadcasts; the other process replays those broadcasts as its own (what DDP's broadcast does)."""

    distributed = True
    num_processes = 2

    def __init__(self, is_main: bool, channel: list[Any]):
        super().__init__(torch.device("cpu"))
        self.is_main = is_main
        self.process_index = 0 if is_main else 1
        self.channel = channel

    def broadcast(self, obj: Any) -> Any:
        if self.is_main:
            self.channel.append(obj)
            return obj
        return self.channel.pop(0)


def test_validation_and_saving_run_on_the_main_process_only(tmp_path):
    channel: list[Any] = []
    scripted = [3.0, 2.0, 2.5, 2.6]
    cfg = dict(max_iters=20, val_interval=2, early_stop_patience=2)
    main = ToyTrainer(ToyConfig(str(tmp_path / "main"), **cfg), runtime=_ReplayRuntime(True, channel), val_losses=scripted)
    initial = _weights(main)
    main_result = main.run()
    assert not _equal(_weights(main), initial)
    other = ToyTrainer(ToyConfig(str(tmp_path / "other"), **cfg), runtime=_ReplayRuntime(False, channel), val_losses=[])
    other_result = other.run()
    assert main.validations == 4 and main_result["step"] == 8 and main_result["stopped_early"]
    # the other process neither validated nor wrote anything, and took the main process's decisions
    assert other.validations == 0 and other.saves == [] and not (tmp_path / "other").exists()
    assert other_result["step"] == 8 and other_result["stopped_early"]
    assert other_result["history"] == main_result["history"] and other_result["best_value"] == 2.0
    assert other_result["best_step"] == 4 and channel == []
    assert _equal(_weights(main), _weights(other))


def test_a_failure_during_validation_on_the_main_process_reaches_the_others(tmp_path):
    channel: list[Any] = []
    main = ToyTrainer(ToyConfig(str(tmp_path / "main"), max_iters=4, val_interval=2),
                      runtime=_ReplayRuntime(True, channel), val_losses=[])  # pop from an empty list
    with pytest.raises(IndexError):
        main.run()
    other = ToyTrainer(ToyConfig(str(tmp_path / "other"), max_iters=4, val_interval=2),
                       runtime=_ReplayRuntime(False, channel))
    with pytest.raises(Exception, match="the main process failed during validation: IndexError"):
        other.run()
