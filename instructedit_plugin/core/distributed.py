"""Multi-process (DDP) training for both trainers through Hugging Face Accelerate.

Both :class:`~instructedit_plugin.instructed.trainer.InstructEdTrainer` and
:class:`~instructedit_plugin.instructedit.trainer.InstructEditTrainer` run unchanged in one
process, and under DDP when started by ``accelerate launch`` (or ``torchrun``), one process per GPU.
From the repository root, two GPUs::

    accelerate launch --multi_gpu --num_processes 2 -m instructedit_plugin.cli train \\
        --hparams hparams/TRAINING/InstructEd/gemma-3-270m.yaml --train counterfact/counterfact-train.json

    accelerate launch --multi_gpu --num_processes 2 -m instructedit_plugin.cli train \\
        --hparams hparams/TRAINING/InstructEdit/gemma-3-270m.yaml

(``--mixed_precision bf16`` turns on bf16 autocast when the YAML leaves ``mixed_precision`` null;
``--num_processes N`` for N GPUs; ``torchrun --nproc_per_node N -m instructedit_plugin.cli train ...``
works as well.) On a machine without GPUs, the same ``--multi_gpu`` command starts N CPU processes
that talk over gloo (``OMP_NUM_THREADS=1`` recommended); that is how the tests run it. A YAML with
``device: cpu`` keeps a multi-GPU launch on the CPU. The device index in the YAML is ignored under a
launcher: process ``i`` uses GPU ``LOCAL_RANK``.

What a multi-process run does
-----------------------------
* Batch sizes in the YAML are per process and per micro-batch. One optimizer step consumes
  ``num_processes * gradient_accumulation_steps`` micro-batches (InstructEdit: ``accumulate_bs``);
  micro-batch ``j`` of process ``r`` is global micro-batch ``j * num_processes + r``, so a run on
  ``N`` processes takes the same optimizer steps as one process with ``N`` times the accumulation
  (InstructEd: also as one process with ``N`` times the batch size).
* Only the trainable module goes to DDP -- InstructEd's prefix bank, InstructEdit's hypernetwork and
  edit learning rates; the frozen base model is neither broadcast nor all-reduced. Every process
  loads the base model itself.
* Losses are averaged over the global batch: InstructEd's token-mean loss is normalised by the
  token count of all micro-batches of the step (summed across processes); InstructEdit's per-edit
  losses are averaged over the micro-batches, as with ``accumulate_bs`` in one process.
* Sampling is deterministic (InstructEd: seeded epochs split into per-process slices; InstructEdit:
  each micro-batch drawn from ``Random(f"{seed}:{step}:{global_index}")``); the base model runs
  in eval mode (no dropout), and the editors have no dropout.
* InstructEdit's running input statistics (``norm: true``) are kept exactly as in one process:
  each process first records its micro-batch's statistics inputs (one extra no-grad edit pass),
  the processes exchange them, and every process applies all of them in the single-process order
  (:class:`StandardizerSync`).
* Only the main process validates, writes checkpoints, shows the progress bar and logs; the
  others wait for it and receive its decisions (best value, early stop, time budget).
* Checkpoints have the single-process format; ``resume: true`` reads ``last/`` on every process
  (a filesystem all processes see).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
from torch import nn

from ..errors import PluginError

LOG = logging.getLogger(__name__)

__all__ = [
    "MIXED_PRECISION_CHOICES",
    "AccelerateRuntime",
    "LocalRuntime",
    "StandardizerSync",
    "launched_world_size",
    "make_runtime",
    "micro_batch_index",
    "resolve_mixed_precision",
    "shard",
]

#: Values of the ``mixed_precision`` training field (null: the launcher's ``--mixed_precision``, else "no").
MIXED_PRECISION_CHOICES = (None, "no", "bf16")

#: Environment variables a distributed launcher sets to the number of processes (as Accelerate reads them).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE")


def launched_world_size() -> int:
    """Number of processes of the launch this process belongs to (1 when started plainly)."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return max(1, int(value))
    return 1


def resolve_mixed_precision(requested: str | None, device: torch.device, model_dtype: str | None = None) -> str:
    """``'bf16'`` or ``'no'``: what the hparams ask for (null: the launcher's setting), where the device allows.

    bf16 autocast needs a CUDA GPU with bf16 support, or the CPU; it is not combined with a base
    model loaded in float16 (mixing the two half formats gains nothing and loses range).
    """
    mode = requested if requested is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mode = str(mode).strip().lower() or "no"
    if mode not in ("no", "bf16"):
        raise PluginError(f"mixed_precision {mode!r} is not supported. Fix: use 'bf16' or 'no' "
                          "(in the YAML, or accelerate launch --mixed_precision bf16)")
    if mode == "no":
        return "no"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        LOG.warning("mixed_precision bf16 requested, but %s has no bf16 support: training in full precision", device)
        return "no"
    if device.type not in ("cuda", "cpu"):
        LOG.warning("mixed_precision bf16 is not set up for device %s: training in full precision", device)
        return "no"
    if model_dtype == "float16":
        LOG.warning("mixed_precision bf16 ignored: the base model is loaded in float16")
        return "no"
    return "bf16"


def shard(items: Sequence[Any], index: int, parts: int) -> list[Any]:
    """Part ``index`` of ``parts`` contiguous, balanced slices of ``items`` (sizes differ by at most one)."""
    n = len(items)
    return list(items[index * n // parts:(index + 1) * n // parts])


def micro_batch_index(micro: int, process_index: int, num_processes: int) -> int:
    """Global index of micro-batch ``micro`` of process ``process_index`` within one optimizer step."""
    return micro * num_processes + process_index


class LocalRuntime:
    """One process: the trainers' own loop, exactly as without a launcher (no Accelerate objects)."""

    num_processes = 1
    process_index = 0
    is_main = True
    distributed = False

    def __init__(self, device: torch.device, gradient_accumulation_steps: int = 1, mixed_precision: str = "no"):
        self.device = device
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.mixed_precision = mixed_precision

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return module, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_step(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled by ``1 / gradient_accumulation_steps``."""
        steps = self.gradient_accumulation_steps
        (loss / steps if steps != 1 else loss).backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce_sum(self, value: float) -> float:
        return float(value)

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def wait_for_everyone(self) -> None:
        return None


class AccelerateRuntime(LocalRuntime):
    """Several processes under ``accelerate launch``/``torchrun``: DDP via :class:`accelerate.Accelerator`."""

    distributed = True

    def __init__(self, device: torch.device, gradient_accumulation_steps: int = 1, mixed_precision: str = "no"):
        from accelerate import Accelerator

        # DDP's defaults: it also broadcasts the wrapped module's buffers from process 0 before each
        # forward (the prefix bank's layer ids; InstructEdit's running statistics, which
        # StandardizerSync keeps identical on all processes anyway) -- a few kilobytes.
        try:
            self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision,
                                           gradient_accumulation_steps=int(gradient_accumulation_steps))
        except (ValueError, RuntimeError) as exc:
            raise PluginError(f"could not set up Accelerate ({exc}). Fix: start training in a fresh process with one "
                              "mixed_precision setting per process") from exc
        acc = self.accelerator
        super().__init__(acc.device if device.type != "cpu" else torch.device("cpu"),
                         acc.gradient_accumulation_steps, acc.mixed_precision)
        self.num_processes = acc.num_processes
        self.process_index = acc.process_index
        self.is_main = acc.is_main_process

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """DDP-wrap ``module`` (which must own only the trainable parameters) and wrap ``optimizer``.

        Learning-rate schedulers are not prepared: Accelerate would step them once per process.
        """
        return tuple(self.accelerator.prepare(module, optimizer))

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def micro_step(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Forward + backward of one micro-batch; gradients are all-reduced on the step's last one only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return norm if torch.is_tensor(norm) else torch.tensor(float(norm))

    def reduce_sum(self, value: float) -> float:
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def gather(self, obj: Any) -> list[Any]:
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def broadcast(self, obj: Any) -> Any:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()


def make_runtime(device: torch.device, gradient_accumulation_steps: int = 1, mixed_precision: str | None = None,
                 model_dtype: str | None = None) -> LocalRuntime:
    """The runtime a trainer uses: :class:`AccelerateRuntime` when started by a multi-process launcher."""
    mode = resolve_mixed_precision(mixed_precision, device, model_dtype)
    if launched_world_size() > 1:
        runtime: LocalRuntime = AccelerateRuntime(device, gradient_accumulation_steps, mode)
        LOG.info("distributed training: process %d of %d on %s (mixed precision %s, %d micro-batch(es) per step)",
                 runtime.process_index, runtime.num_processes, runtime.device, runtime.mixed_precision,
                 runtime.gradient_accumulation_steps)
        return runtime
    return LocalRuntime(device, gradient_accumulation_steps, mode)


def run_on_main(runtime: LocalRuntime, fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on the main process; its result (or failure) reaches every process."""
    if not runtime.distributed:
        return fn()
    result, error = None, None
    if runtime.is_main:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
    shared = runtime.broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise PluginError(f"the main process failed during {what}: {shared[1]}")
    return shared[0]


class StandardizerSync:
    """Exact running statistics of InstructEdit's hypernetwork across processes.

    In one process, every training micro-batch updates each ``RunningStandardizer`` with its inputs
    before standardising them, micro-batch after micro-batch. Under DDP, process ``r``'s micro-batch
    ``j`` is global micro-batch ``j * N + r`` and must be standardised with the statistics of all
    earlier global micro-batches, some of which run on other processes at the same time. So, per
    micro-batch: :meth:`record` runs the edit without gradients and keeps each standardiser's
    inputs, the processes exchange them (:meth:`exchange`), and :meth:`replay` runs the real forward
    with every ``update`` replaced by applying the gathered inputs in global order up to the current
    one. After the replay each standardiser has seen all ``N`` micro-batches, in the same order and
    with the same arithmetic (its own ``update``) as in one process, on every process.
    """

    def __init__(self, module: nn.Module, runtime: LocalRuntime):
        from ..instructedit.hypernet import RunningStandardizer

        self.runtime = runtime
        self.standardizers = [m for m in module.modules() if isinstance(m, RunningStandardizer)]
        self._update = RunningStandardizer.update

    @contextlib.contextmanager
    def _patched(self, make: Callable[[int], Callable[[torch.Tensor], None]]) -> Iterator[None]:
        for i, std in enumerate(self.standardizers):
            std.update = make(i)  # instance attribute: shadows the class method for this object only
        try:
            yield
        finally:
            for std in self.standardizers:
                std.__dict__.pop("update", None)

    def record(self, run: Callable[[], Any]) -> list[list[torch.Tensor]]:
        """Call ``run()`` without gradients; return each standardiser's update inputs (on the CPU), in call order."""
        calls: list[list[torch.Tensor]] = [[] for _ in self.standardizers]

        def make(i: int) -> Callable[[torch.Tensor], None]:
            return lambda x: calls[i].append(x.detach().to("cpu", copy=True))

        with self._patched(make), torch.no_grad():
            run()
        return calls

    def exchange(self, calls: list[list[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
        """All processes' recorded inputs, indexed ``[process][standardiser][call]``."""
        return self.runtime.gather(calls)

    @contextlib.contextmanager
    def replay(self, gathered: list[list[list[torch.Tensor]]]) -> Iterator[None]:
        """Within the block, this process's updates apply the global sequence; all of it on exit."""
        me = self.runtime.process_index
        done = [0] * len(self.standardizers)  # entries of the global sequence applied so far
        mine = [0] * len(self.standardizers)  # own calls seen so far
        order = [[(r, c) for r in range(len(gathered)) for c in range(len(gathered[r][i]))]
                 for i in range(len(self.standardizers))]

        def apply_until(i: int, stop: int) -> None:
            std = self.standardizers[i]
            while done[i] < stop:
                r, c = order[i][done[i]]
                self._update(std, gathered[r][i][c].to(std.mean.device))
                done[i] += 1

        def make(i: int) -> Callable[[torch.Tensor], None]:
            def update(_x: torch.Tensor) -> None:
                c = mine[i]
                if c >= len(gathered[me][i]):
                    raise PluginError("InstructEdit's hypernetwork ran differently in the recording and the training pass")
                mine[i] += 1
                apply_until(i, order[i].index((me, c)) + 1)
            return update

        with self._patched(make):
            yield
        if mine != [len(gathered[me][i]) for i in range(len(self.standardizers))]:
            raise PluginError("InstructEdit's hypernetwork ran differently in the recording and the training pass")
        for i in range(len(self.standardizers)):
            apply_until(i, len(order[i]))
