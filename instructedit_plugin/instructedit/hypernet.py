"""The InstructEdit hypernetwork: gradient factors in, pseudo-gradient factors out.

For an edited weight ``W`` of a Linear/Conv1D layer, the gradient of the edit
loss is a sum over token positions of outer products of the layer input ``u``
and the gradient at the layer output ``delta``. The editor network maps each
pair ``(u, delta)`` to ``(u~, delta~)`` and the update is
``sum_t delta~_t u~_t^T`` (transposed for GPT-2's Conv1D), scaled by a learned
per-layer edit learning rate.

Network per weight (or per weight *shape* when ``shared``, with a learned
per-layer scale and shift on its input so layers of the same shape can be told
apart):

1. ``u`` and ``delta`` are standardised with running mean/variance collected
   during training (frozen afterwards; stored as buffers in the checkpoint),
2. concatenated and passed through ``n_blocks`` residual low-rank blocks
   ``z + B act(A z)``; ``B`` starts at zero, so an untrained editor returns the
   normalised gradient factors unchanged,
3. split back into ``u~`` and ``delta~``.

``key_whitening`` (an option, not in the paper; default off): the key ``u~`` is taken back to
the layer's input coordinates (undoing step 1) and right-multiplied by
``(C / (tr C / d) + ridge I)^-1``, ``C`` the running uncentred second moment of the layer's
inputs (edit rows, and while training the locality inputs the trainers pass through
:meth:`InstructEditHypernet.observe_inputs`), as ROME/MEMIT precondition their keys with ``C^-1``.
An update keyed on one input then moves inputs sharing its common direction less. ``C`` is
stored with the editor (buffers ``key_moments.*``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "id": nn.Identity}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """An edited weight: its parameter name, input/output sizes and storage layout."""

    name: str
    in_dim: int
    out_dim: int
    #: "linear": weight is (out, in) like ``nn.Linear``; "conv1d": (in, out) like GPT-2's ``Conv1D``.
    kind: str

    @property
    def shape_key(self) -> str:
        return f"{self.in_dim}x{self.out_dim}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class RunningStandardizer(nn.Module):
    """Feature-wise standardisation with running statistics (Chan et al. parallel update)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (n_a * n_b / total)
        self.count.fill_(total)

    def _std(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.m2 / (self.count - 1)).clamp_min(0).sqrt().to(dtype) + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        return (x - self.mean.to(x.dtype)) / self._std(x.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Back from standardised to input coordinates (the inverse of :meth:`forward`)."""
        if self.count < 2:
            return z
        return z * self._std(z.dtype) + self.mean.to(z.dtype)


class RunningSecondMoment(nn.Module):
    """Running uncentred second moment ``E[u u^T]`` of an edited layer's inputs, and the whitening
    matrix ``(C / (tr C / d) + ridge I)^-1`` made from it (cached until the statistic changes)."""

    def __init__(self, dim: int, ridge: float):
        super().__init__()
        self.ridge = float(ridge)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("moment", torch.zeros(dim, dim, dtype=torch.float64))
        self._cache: tuple[float, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach().to(torch.float64)
        self.moment += x.transpose(0, 1) @ x
        self.count += x.shape[0]

    def whitener(self) -> torch.Tensor | None:
        """``None`` until inputs were seen."""
        count = float(self.count)
        if count < 1:
            return None
        if self._cache is None or self._cache[0] != count or self._cache[1].device != self.moment.device:
            dim = self.moment.shape[0]
            second = self.moment / count
            second = second / (torch.diagonal(second).sum() / dim).clamp_min(1e-30)
            eye = torch.eye(dim, dtype=second.dtype, device=second.device)
            self._cache = (count, torch.linalg.inv(second + self.ridge * eye).float())
        return self._cache[1]


class LowRankResidual(nn.Module):
    """``z + up(act(down(z)))`` with a rank-``rank`` bottleneck; identity at initialisation."""

    def __init__(self, dim: int, rank: int, act: str):
        super().__init__()
        rank = min(rank, dim)
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.act = _ACTS[act]()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(self.act(self.down(z)))


class FactorNetwork(nn.Module):
    """Maps ``(u, delta)`` rows to pseudo factors for one weight shape."""

    def __init__(self, in_dim: int, out_dim: int, *, rank: int, n_blocks: int, act: str, norm: bool, n_modes: int = 1):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dim = in_dim + out_dim
        self.norm = norm
        self.u_norm = RunningStandardizer(in_dim)
        self.d_norm = RunningStandardizer(out_dim)
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.blocks = nn.Sequential(*(LowRankResidual(dim, rank, act) for _ in range(n_blocks)))

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        u = u.float()
        d = d.float()
        if self.norm:
            if self.training:
                self.u_norm.update(u)
                self.d_norm.update(d)
            u = self.u_norm(u)
            d = self.d_norm(d)
        z = torch.cat([u, d], dim=-1) * self.mode_scale[mode] + self.mode_shift[mode]
        z = self.blocks(z)
        return z[:, : self.in_dim], z[:, self.in_dim :]


class InstructEditHypernet(nn.Module):
    """All factor networks of one editor, addressed by the edited parameter's name."""

    def __init__(self, layers: Sequence[LayerSpec], *, rank: int = 1920, n_blocks: int = 1, act: str = "relu",
                 norm: bool = True, shared: bool = True, key_whitening: bool = False, whitening_ridge: float = 0.01):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unknown activation '{act}'; choose one of {sorted(_ACTS)}")
        self.layers = tuple(layers)
        self.config = {"rank": rank, "n_blocks": n_blocks, "act": act, "norm": norm, "shared": shared}
        if key_whitening:
            self.config.update(key_whitening=True, whitening_ridge=float(whitening_ridge))
            self.key_moments = nn.ModuleDict({s.name.replace(".", "__"): RunningSecondMoment(s.in_dim, whitening_ridge)
                                              for s in self.layers})
        self._route: dict[str, tuple[str, int]] = {}
        groups: dict[str, list[LayerSpec]] = {}
        for spec in self.layers:
            key = spec.shape_key if shared else spec.name.replace(".", "__")
            groups.setdefault(key, []).append(spec)
        self.nets = nn.ModuleDict()
        for key, specs in groups.items():
            self.nets[key] = FactorNetwork(specs[0].in_dim, specs[0].out_dim, rank=rank, n_blocks=n_blocks, act=act,
                                           norm=norm, n_modes=len(specs))
            for mode, spec in enumerate(specs):
                self._route[spec.name] = (key, mode)

    def forward(self, name: str, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key, mode = self._route[name]
        return self.nets[key](u, d, mode)

    @property
    def whitening(self) -> bool:
        return bool(self.config.get("key_whitening"))

    def observe_inputs(self, name: str, u: torch.Tensor) -> None:
        """Add rows of layer ``name``'s inputs (e.g. of the locality prompts) to its second moment."""
        if self.whitening and self.training:
            self.key_moments[name.replace(".", "__")].update(u)

    def pseudo_gradient(self, spec: LayerSpec, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The transformed gradient of ``spec``'s weight, in the weight's own layout."""
        u_t, d_t = self(spec.name, u, d)
        if self.config.get("key_whitening"):
            key, _ = self._route[spec.name]
            net = self.nets[key]
            if net.norm:  # the key back in the layer's input coordinates, where C was measured
                u_t = net.u_norm.inverse(u_t)
            moments = self.key_moments[spec.name.replace(".", "__")]
            if self.training:
                moments.update(u)
            whitener = moments.whitener()
            if whitener is not None:
                u_t = u_t @ whitener.to(u_t.device)
        if spec.kind == "conv1d":
            return u_t.transpose(0, 1) @ d_t  # (in, out)
        return d_t.transpose(0, 1) @ u_t  # (out, in)


def layer_specs_from_json(items: Sequence[Mapping]) -> list[LayerSpec]:
    return [LayerSpec(str(i["name"]), int(i["in_dim"]), int(i["out_dim"]), str(i["kind"])) for i in items]
