"""Per-call InstructEd information, passed to the attention function out of band.

``model.generate()`` rejects keyword arguments it does not know, and the
attention function registered with ``transformers.AttentionInterface`` only sees
what the modeling code forwards to it. The per-call pieces of InstructEd -- the
instruction span of every example, the similarity scalar ``sim`` of every
example and whether the learned prefixes are active -- therefore travel through a
:class:`contextvars.ContextVar`::

    with instruction_context(spans=[(0, 7), (3, 9)], sim=torch.tensor([0.9, 0.2])):
        logits = model(input_ids, attention_mask=mask).logits
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=8)

Conventions
-----------
``spans``
    One ``(start, end)`` pair per example: the half-open range of *token
    positions in the (possibly left-padded) input* that holds the instruction,
    i.e. column indices into the ``input_ids`` passed to ``forward``/``generate``.
    ``None`` or ``start == end`` means "no instruction" for that example. During
    cached decoding the same absolute positions refer to the cached keys, so the
    instruction columns keep being re-weighted at every decoding step.
``sim``
    The similarity scalar of every example (shape ``[batch]``), a Python float
    (broadcast) or ``None`` (no re-weighting at all). It is clamped to
    ``[0, 1]`` where it is used, so a negative similarity behaves like ``0``.
    A :class:`DeferredSim` (a future of that tensor, still being computed in
    another thread) is waited for where an attention first reads it, so the
    layers before need not wait (``InstructedLM(sim_overlap=True)``).
``question_starts``
    One int per example (or ``None``): the absolute position (same coordinates as ``spans``) of the example's
    first question token, after the template's tail. Read only by ``reweight_mode: question_only`` (not in the
    paper, see :mod:`.attention`), which re-weights the rows from there on and needs it for every example
    that has an instruction.
``use_prefix``
    ``None`` (use the handle's default, see ``InstructedHandle.prefix_enabled``),
    a bool for the whole batch, or a bool sequence/tensor of shape ``[batch]``
    that switches the prefixes on per example.

When the batch seen by the attention is a multiple of the context's batch (beam
search, ``num_return_sequences``), every per-example entry is repeated with
``repeat_interleave``, matching how ``generate()`` expands its inputs.

With gradient checkpointing, the recomputation in the backward pass reads the
context again: run ``backward()`` inside the same ``instruction_context``.
"""
from __future__ import annotations

import contextvars
import functools
import operator
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import RequestError

__all__ = [
    "DeferredSim",
    "InstructionContext",
    "instruction_context",
    "current_instruction_context",
]

SpanLike = Sequence[tuple[int, int] | Sequence[int] | None] | torch.Tensor | None
SimLike = float | int | Sequence[float] | torch.Tensor | None
PrefixSwitch = bool | Sequence[bool] | torch.Tensor | None


def _spans_to_tensor(spans: SpanLike) -> torch.Tensor | None:
    if spans is None:
        return None
    if isinstance(spans, torch.Tensor):
        if spans.ndim != 2 or spans.shape[-1] != 2:
            raise RequestError(f"spans: expected a [batch, 2] tensor of (start, end) pairs, got shape {tuple(spans.shape)}")
        if spans.dtype.is_floating_point or spans.dtype == torch.bool:
            raise RequestError(f"spans: expected an integer tensor, got {spans.dtype}")
        out = spans.detach().to(device="cpu", dtype=torch.long)
    else:
        rows: list[tuple[int, int]] = []
        for i, span in enumerate(spans):
            if span is None:
                rows.append((0, 0))
                continue
            try:
                start, end = span  # type: ignore[misc]
                start, end = int(start), int(end)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"spans[{i}]: expected a (start, end) pair of ints or None, got {span!r}") from exc
            rows.append((start, end))
        out = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    if out.shape[0] == 0:
        raise RequestError("spans: got an empty sequence; pass one (start, end) pair (or None) per example")
    bad = (out[:, 0] < 0) | (out[:, 1] < out[:, 0])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RequestError(
            f"spans[{i}]: ({int(out[i, 0])}, {int(out[i, 1])}) is not a valid half-open range; "
            "need 0 <= start <= end (use None or start == end for 'no instruction')"
        )
    return out


def _sim_to_tensor(sim: SimLike) -> torch.Tensor | None:
    if sim is None:
        return None
    if isinstance(sim, torch.Tensor):
        out = sim
        if out.dtype == torch.bool or out.is_complex():
            raise RequestError(f"sim: expected a real-valued tensor, got {out.dtype}")
        if not out.dtype.is_floating_point:
            out = out.float()
    else:
        try:
            out = torch.as_tensor(sim, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"sim: expected a float, a sequence of floats or a tensor, got {sim!r}") from exc
    if out.ndim > 1:
        raise RequestError(f"sim: expected a scalar or a [batch] tensor, got shape {tuple(out.shape)}")
    if out.ndim == 1 and out.shape[0] == 0:
        raise RequestError("sim: got an empty tensor; pass one value per example (or a float)")
    if not bool(torch.isfinite(out.detach()).all()):
        raise RequestError("sim: contains NaN or inf; similarity must be finite (it is clamped to [0, 1])")
    return out


class DeferredSim:
    """``sim`` of ``size`` examples that another thread is still computing (a :class:`concurrent.futures.Future`
    of what :func:`instruction_context` accepts as ``sim``). :meth:`value` waits for it once, validates it like
    an immediate ``sim`` and keeps the result; :attr:`waited` says whether anything asked for it yet."""

    def __init__(self, future: Future, size: int):
        self.future = future
        self.size = int(size)
        self.waited = False
        self._value: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        if self._value is None:
            self.waited = True
            sim = _sim_to_tensor(self.future.result())
            if sim is None or (sim.ndim == 1 and sim.shape[0] not in (1, self.size)):
                got = "None" if sim is None else f"shape {tuple(sim.shape)}"
                raise RequestError(f"sim: the deferred similarity gave {got} for {self.size} examples. "
                                   "Fix: return one value per example")
            self._value = sim
        return self._value


def _starts_to_tensor(starts: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
    if starts is None:
        return None
    try:
        out = torch.as_tensor(starts if isinstance(starts, torch.Tensor) else [operator.index(s) for s in starts],
                              dtype=None if isinstance(starts, torch.Tensor) else torch.long)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"question_starts: expected one int per example, got {starts!r}. "
                           "Fix: pass the position of each example's first question token") from exc
    if out.ndim != 1 or out.shape[0] == 0 or out.dtype.is_floating_point or out.dtype == torch.bool:
        raise RequestError(f"question_starts: expected a non-empty [batch] sequence of ints, got {starts!r}. "
                           "Fix: pass the position of each example's first question token")
    if bool((out < 0).any()):
        raise RequestError(f"question_starts: positions must be >= 0, got {out.tolist()}. "
                           "Fix: pass the position of each example's first question token")
    return out.detach().to(device="cpu", dtype=torch.long)


def _switch_to_tensor(use_prefix: PrefixSwitch) -> bool | torch.Tensor | None:
    if use_prefix is None or isinstance(use_prefix, bool):
        return use_prefix
    out = torch.as_tensor(use_prefix)
    if out.ndim == 0:
        return bool(out)
    if out.ndim != 1 or out.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise RequestError(f"use_prefix: expected None, a bool or a [batch] bool sequence, got {use_prefix!r}")
    return out.detach().to(device="cpu", dtype=torch.bool)


def _per_example(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Broadcast a per-example tensor (first dim = context batch) to the attention batch."""
    n = t.shape[0]
    if n == batch:
        return t
    if n == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % n == 0:
        return t.repeat_interleave(batch // n, dim=0)
    raise RequestError(
        f"{name}: the instruction context holds {n} examples but the model runs a batch of {batch}; "
        "pass one entry per example (a batch that is a multiple of it is expanded with repeat_interleave)"
    )


@dataclass(frozen=True)
class InstructionContext:
    """Validated per-call InstructEd information (see the module docstring).

    ``spans`` is a ``[n, 2]`` CPU long tensor (or ``None``), ``sim`` a scalar or
    ``[n]`` float tensor as given (not yet clamped; or ``None``), ``use_prefix``
    ``None``, a bool or a ``[n]`` CPU bool tensor.
    """

    spans: torch.Tensor | None = None
    sim: torch.Tensor | DeferredSim | None = None
    use_prefix: bool | torch.Tensor | None = None
    #: ``[n]`` CPU long tensor: each example's first question token (``question_only`` re-weighting), or ``None``
    question_starts: torch.Tensor | None = None
    #: the attention's per-call memo: what every layer with the same mask shares (``attention._layout_for``)
    layouts: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, spans: SpanLike = None, sim: SimLike | DeferredSim = None, use_prefix: PrefixSwitch = None,
              question_starts: Sequence[int] | torch.Tensor | None = None) -> "InstructionContext":
        spans_t = _spans_to_tensor(spans)
        sim_t = sim if isinstance(sim, DeferredSim) else _sim_to_tensor(sim)
        switch = _switch_to_tensor(use_prefix)
        starts_t = _starts_to_tensor(question_starts)
        sizes = {}
        if spans_t is not None:
            sizes["spans"] = spans_t.shape[0]
        if starts_t is not None and starts_t.shape[0] != 1:
            sizes["question_starts"] = starts_t.shape[0]
        if isinstance(sim_t, DeferredSim):
            sizes["sim"] = sim_t.size
        elif sim_t is not None and sim_t.ndim == 1 and sim_t.shape[0] != 1:
            sizes["sim"] = sim_t.shape[0]
        if isinstance(switch, torch.Tensor) and switch.shape[0] != 1:
            sizes["use_prefix"] = switch.shape[0]
        if len(set(sizes.values())) > 1:
            raise RequestError(
                "instruction context: per-example entries disagree on the batch size: "
                + ", ".join(f"{k}={v}" for k, v in sizes.items())
            )
        return cls(spans=spans_t, sim=sim_t, use_prefix=switch, question_starts=starts_t)

    # ---- accessors used by the attention function -------------------------------------------
    @functools.cached_property
    def has_instruction(self) -> bool:
        """True when at least one example has a non-empty instruction span (computed once per context: every
        layer of a call asks)."""
        return self.spans is not None and bool((self.spans[:, 1] > self.spans[:, 0]).any())

    @property
    def reweights(self) -> bool:
        """True when the re-weighting of Eq. 15 can change anything (a sim and a non-empty span are given)."""
        return self.sim is not None and self.has_instruction

    def spans_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch, 2]`` long tensor of (start, end); zeros (empty spans) when no spans were given."""
        if self.spans is None:
            return torch.zeros(batch, 2, dtype=torch.long, device=device)
        return _per_example(self.spans, batch, "spans").to(device)

    def question_starts_for(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """``[batch]`` long tensor of each example's first question token, or ``None`` when none were given."""
        if self.question_starts is None:
            return None
        return _per_example(self.question_starts, batch, "question_starts").to(device)

    def sim_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch]`` float32 similarity clamped to ``[0, 1]`` (ones when no sim was given)."""
        if self.sim is None:
            return torch.ones(batch, dtype=torch.float32, device=device)
        sim = self.sim.value() if isinstance(self.sim, DeferredSim) else self.sim  # waits for a deferred one here
        sim = sim.to(device=device, dtype=torch.float32)
        sim = sim.reshape(1) if sim.ndim == 0 else sim
        return _per_example(sim, batch, "sim").clamp(0.0, 1.0)

    def prefix_for(self, batch: int, default: bool, device: torch.device) -> torch.Tensor:
        """``[batch]`` bool tensor: whether the prefixes are active for each example."""
        if self.use_prefix is None or isinstance(self.use_prefix, bool):
            value = default if self.use_prefix is None else self.use_prefix
            return torch.full((batch,), bool(value), dtype=torch.bool, device=device)
        return _per_example(self.use_prefix, batch, "use_prefix").to(device)

    def prefix_any(self, default: bool) -> bool:
        """Whether the prefixes are active for at least one example."""
        if self.use_prefix is None:
            return default
        if isinstance(self.use_prefix, bool):
            return self.use_prefix
        return bool(self.use_prefix.any())


_CURRENT: contextvars.ContextVar[InstructionContext | None] = contextvars.ContextVar(
    "instructedit_plugin_instruction_context", default=None
)


def current_instruction_context() -> InstructionContext | None:
    """The innermost active :class:`InstructionContext`, or ``None`` outside any ``instruction_context``."""
    return _CURRENT.get()


@contextmanager
def instruction_context(
    spans: SpanLike = None, sim: SimLike | DeferredSim = None, use_prefix: PrefixSwitch = None,
    question_starts: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[InstructionContext]:
    """Make ``spans``/``sim``/``use_prefix`` (and ``question_starts``) visible to InstructEd attention for the calls
    inside the block.

    Contexts nest; the innermost one replaces (does not merge with) the outer one.
    """
    ctx = InstructionContext.build(spans=spans, sim=sim, use_prefix=use_prefix, question_starts=question_starts)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
