"""Learnable InstructEd prefixes and attaching them to a (frozen) transformers model.

Usage::

    handle = attach_instructed(model, layers=[4, 5, 6, 7], prefix_len=5, mode="paper")
    optimizer = torch.optim.Adam(handle.parameters(), lr=1e-3)   # only the prefix embeddings
    with instruction_context(spans=spans, sim=sim):
        loss = model(input_ids, attention_mask=mask, labels=labels).loss
    ...
    handle.detach()          # or detach_instructed(model): stock model again

``attach_instructed`` registers the attention/mask functions (see ``attention.py``), switches the
model to them with ``model.set_attn_implementation``, freezes every model parameter
(``requires_grad=False``; restored on detach) and stores the handle on each attention module.
The :class:`PrefixBank` is *not* registered as a submodule of the model, so ``model.parameters()`` and
``model.state_dict()`` are unchanged; save/load it on its own (``handle.bank.state_dict()``). Prefix
embeddings are moved/cast to each layer's projection device/dtype on the fly.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import HyperParamsError, PluginError
from ..models.output_layer import keep_output_layer_dense
from .attention import (
    HANDLE_ATTR,
    INSTRUCTED_ATTENTION,
    REWEIGHT_MODES,
    prefix_input_dim,
    project_prefix_kv,
    register_instructed_attention,
    supports_prefix,
)

__all__ = [
    "PrefixBank",
    "InstructedHandle",
    "attach_instructed",
    "detach_instructed",
    "get_instructed_handle",
    "default_prefix_layers",
    "last_third_layers",
    "find_attention_modules",
]


def default_prefix_layers(num_layers: int) -> list[int]:
    """Default contiguous block of middle layers: ``max(1, L // 3)`` layers centred in the stack.

    E.g. 4 layers -> [1]; 12 -> [4, 5, 6, 7]; 32 -> [11, ..., 20].
    """
    if num_layers < 1:
        raise HyperParamsError("num_layers", f"must be >= 1, got {num_layers}", "pass the model's layer count")
    size = max(1, num_layers // 3)
    start = (num_layers - size) // 2
    return list(range(start, start + size))


def last_third_layers(num_layers: int) -> list[int]:
    """The last ``max(1, L // 3)`` layers (the paper's "L:20-30" ablation, Table 4), same size as
    :func:`default_prefix_layers`. E.g. 18 layers -> [12, ..., 17]."""
    if num_layers < 1:
        raise HyperParamsError("num_layers", f"must be >= 1, got {num_layers}", "pass the model's layer count")
    size = max(1, num_layers // 3)
    return list(range(num_layers - size, num_layers))


def _normalise_layers(layers: int | Sequence[int], field: str = "layers") -> tuple[int, ...]:
    if isinstance(layers, bool):
        raise HyperParamsError(field, f"expected an int or a list of layer indices, got {layers!r}", "pass e.g. [4, 5, 6, 7]")
    if isinstance(layers, int):
        if layers < 1:
            raise HyperParamsError(field, f"a layer count must be >= 1, got {layers}", "pass a positive number of layers")
        return tuple(range(layers))
    try:
        out = tuple(int(i) for i in layers)
    except (TypeError, ValueError) as exc:
        raise HyperParamsError(field, f"expected a list of layer indices, got {layers!r}", "pass e.g. [4, 5, 6, 7]") from exc
    if not out:
        raise HyperParamsError(field, "is empty", "list at least one layer index")
    if len(set(out)) != len(out):
        raise HyperParamsError(field, f"has duplicates: {list(out)}", "list each layer once")
    if min(out) < 0:
        raise HyperParamsError(field, f"has negative indices: {list(out)}", "use 0-based layer indices")
    return tuple(sorted(out))


class PrefixBank(nn.Module):
    """Learnable prefix embeddings ``P_l`` (``prefix_len`` hidden-size vectors) for each prefix layer ``l``.

    Args:
        layers: the prefix layer indices, or an int ``n`` meaning layers ``0 .. n-1``.
        prefix_len: number of prefix vectors per layer (paper default 5).
        hidden_size: size of each vector (the input size of the layer's K/V projection). Required.
        init_std: embeddings are initialised from ``N(0, init_std^2)`` (0.02, transformers' usual
            ``initializer_range``, which is what the release's freshly added ``nn.Embedding`` received
            when its checkpoint was loaded).
    """

    def __init__(
        self,
        layers: int | Sequence[int],
        prefix_len: int = 5,
        hidden_size: int | None = None,
        *,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if hidden_size is None or int(hidden_size) < 1:
            raise HyperParamsError("hidden_size", f"must be a positive int, got {hidden_size!r}", "pass the model's hidden size")
        if isinstance(prefix_len, bool) or int(prefix_len) < 1:
            raise HyperParamsError("prefix_len", f"must be a positive int, got {prefix_len!r}", "use e.g. 5 (the paper's default)")
        self.layers: tuple[int, ...] = _normalise_layers(layers)
        self.prefix_len = int(prefix_len)
        self.hidden_size = int(hidden_size)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.embeddings = nn.Parameter(
            torch.empty(len(self.layers), self.prefix_len, self.hidden_size, device=device, dtype=dtype).normal_(0.0, init_std)
        )
        self.register_buffer("layer_ids", torch.tensor(self.layers, dtype=torch.long, device=device), persistent=True)

    def __contains__(self, layer_idx: object) -> bool:
        return layer_idx in self._row

    def embedding(self, layer_idx: int) -> torch.Tensor:
        """``[prefix_len, hidden_size]`` embeddings of ``layer_idx`` (a view of the parameter, keeps the graph)."""
        try:
            return self.embeddings[self._row[layer_idx]]
        except KeyError:
            raise KeyError(f"layer {layer_idx} has no prefix; prefix layers are {list(self.layers)}") from None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "layer_ids"
        if key in state_dict and tuple(int(i) for i in state_dict[key].tolist()) != self.layers:
            error_msgs.append(
                f"PrefixBank layers differ: checkpoint has {state_dict[key].tolist()}, this bank {list(self.layers)}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, prefix_len={self.prefix_len}, hidden_size={self.hidden_size}"


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention modules of ``model`` keyed by ``layer_idx`` (modules with K/V projections InstructEd knows)."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not supports_prefix(module):
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        if layer_idx in found:
            raise PluginError(
                f"two attention modules claim layer_idx={layer_idx} (the second is '{name}'); "
                "attach InstructEd to the text decoder itself"
            )
        found[layer_idx] = module
    return found


class InstructedHandle:
    """What :func:`attach_instructed` installed; undo it with :meth:`detach` (also a context manager).

    Attributes:
        model: the attached model.
        bank: the :class:`PrefixBank` (its ``embeddings`` are the only trainable tensors).
        layers: prefix layer indices.
        mode: ``"paper"`` or ``"release"`` re-weighting (settable).
        prefix_enabled: default for ``instruction_context(use_prefix=None)`` and for calls outside any
            context (settable; ``True`` after attaching).
        base_implementation: the model's attention implementation before attaching (restored on detach).
        fused_attention: run InstructEd layers in torch's ``scaled_dot_product_attention`` where that equals the
            eager computation (settable; ``True`` by default; see "Fused kernel" in :mod:`.attention`).
    """

    def __init__(self, model: nn.Module, bank: PrefixBank, modules: dict[int, nn.Module], mode: str, base_implementation: str,
                 prefix_memo: dict | None = None):
        self.model = model
        self.bank = bank
        self.layers: tuple[int, ...] = bank.layers
        self.layer_set = frozenset(bank.layers)
        self.mode = mode
        self.prefix_enabled = True
        self.base_implementation = base_implementation
        self.fused_attention = True
        self.attached = False
        self._modules = modules
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._head_hook = None  # models.output_layer's pre-hook while the model is frozen by this handle
        self._kv_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {} if prefix_memo is None else prefix_memo

    # -- configuration ---------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in REWEIGHT_MODES:
            raise HyperParamsError("mode", f"unknown re-weighting mode {value!r}", f"use one of {', '.join(REWEIGHT_MODES)}")
        self._mode = value

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (the prefix embeddings)."""
        return self.bank.parameters()

    # -- prefix keys/values ----------------------------------------------------------------------
    def prefix_key_value(self, module: nn.Module, layer_idx: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[1, kv_heads, P, d]`` prefix keys and values of ``layer_idx`` from its frozen projections.

        While no gradient is being recorded (e.g. every step of ``generate()``), the result is memoised
        and reused as long as the prefix embeddings and the layer's parameters are unchanged (tracked
        through their version counters and storage pointers); otherwise it is recomputed each forward
        so that gradients reach the embeddings.
        """
        emb = self.bank.embedding(layer_idx)
        if torch.is_grad_enabled():
            return project_prefix_kv(module, emb, num_kv_heads)
        params = tuple(module.parameters())
        key = (
            num_kv_heads,
            torch.is_inference_mode_enabled(),
            self.bank.embeddings._version,
            self.bank.embeddings.data_ptr(),
            tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params),
        )
        hit = self._kv_cache.get(layer_idx)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        k, v = project_prefix_kv(module, emb, num_kv_heads)
        self._kv_cache[layer_idx] = (key, k, v)
        return k, v

    def clear_cache(self) -> None:
        """Drop memoised prefix K/V (needed only after changing weights through ``.data``, which
        bypasses the version counters the memo checks)."""
        self._kv_cache.clear()

    # -- lifecycle -------------------------------------------------------------------------------
    def detach(self) -> None:
        """Restore the model: previous attention implementation, ``requires_grad`` flags, no handle."""
        if not self.attached:
            return
        self.model.set_attn_implementation(self.base_implementation)
        for module in self._modules.values():
            if getattr(module, HANDLE_ATTR, None) is self:
                delattr(module, HANDLE_ATTR)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        for param, flag in self._frozen:
            param.requires_grad_(flag)
        self._frozen = []
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None
        self._kv_cache = {}  # a caller's prefix_memo keeps its entries for the next attachment
        self.attached = False

    def __enter__(self) -> "InstructedHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"InstructedHandle({state}, model={type(self.model).__name__}, layers={list(self.layers)}, "
            f"prefix_len={self.bank.prefix_len}, mode={self.mode!r}, base={self.base_implementation!r})"
        )


def get_instructed_handle(model: nn.Module) -> InstructedHandle | None:
    """The handle attached to ``model``, if any."""
    handle = getattr(model, HANDLE_ATTR, None)
    return handle if isinstance(handle, InstructedHandle) and handle.attached else None


def attach_instructed(
    model: nn.Module,
    layers: int | Sequence[int] | None = None,
    prefix_len: int = 5,
    mode: str = "paper",
    *,
    bank: PrefixBank | None = None,
    init_std: float = 0.02,
    freeze: bool = True,
    prefix_memo: dict | None = None,
    modules: dict[int, nn.Module] | None = None,
) -> InstructedHandle:
    """Install InstructEd attention on ``model`` and return its :class:`InstructedHandle`.

    Args:
        model: a transformers causal LM (GPT-2, LLaMA, Qwen2, Gemma 3 text, or any model whose attention
            modules have ``layer_idx`` and ``k_proj``/``v_proj`` or ``c_attn`` and use ``AttentionInterface``).
        layers: prefix layer indices (default: :func:`default_prefix_layers`), or an int ``n`` for layers
            ``0 .. n-1``. Ignored when ``bank`` is given (must then be ``None`` or equal to ``bank.layers``).
        prefix_len: prefixes per layer (ignored when ``bank`` is given).
        mode: ``"paper"`` or ``"release"`` re-weighting (see ``attention.py``).
        bank: an existing :class:`PrefixBank` (e.g. trained earlier) instead of a new one.
        init_std: initialisation std of a new bank.
        freeze: set ``requires_grad=False`` on every model parameter (restored on detach).
        prefix_memo: a dict, owned by the caller, in which the handle memoises the prefix keys/values
            (:meth:`InstructedHandle.prefix_key_value`); passing the same dict to every attachment of the same
            model and bank (as ``InstructedLM`` does per call) skips re-projecting the prefixes each time. Its
            entries are checked against the same version counters, so a changed bank or layer recomputes them.
        modules: ``model``'s :func:`find_attention_modules`, when the caller already has them (``InstructedLM``
            finds them once instead of walking the model at every call).
    """
    if get_instructed_handle(model) is not None:
        raise PluginError("InstructEd is already attached to this model; call detach() on its handle first")
    if mode not in REWEIGHT_MODES:
        raise HyperParamsError("mode", f"unknown re-weighting mode {mode!r}", f"use one of {', '.join(REWEIGHT_MODES)}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise PluginError(f"{type(model).__name__} is not a transformers PreTrainedModel")

    modules = find_attention_modules(model) if modules is None else modules
    if not modules:
        raise PluginError(f"{type(model).__name__}: found no attention module InstructEd can attach to")
    num_layers = max(modules) + 1

    if bank is not None:
        if layers is not None and _normalise_layers(layers) != bank.layers:
            raise HyperParamsError("layers", f"{layers!r} differs from the bank's layers {list(bank.layers)}", "omit layers when passing a bank")
        chosen = bank.layers
    else:
        chosen = default_prefix_layers(num_layers) if layers is None else _normalise_layers(layers)
    missing = [i for i in chosen if i not in modules]
    if missing:
        raise HyperParamsError(
            "layers", f"{missing} are not attention layers of this model (it has layers 0..{num_layers - 1})",
            "pick prefix layers inside the model",
        )
    dims = {prefix_input_dim(modules[i]) for i in chosen}
    if len(dims) != 1:
        raise PluginError(f"prefix layers {list(chosen)} have different hidden sizes {sorted(dims)}")
    hidden = dims.pop()
    if bank is None:
        device = next(iter(modules[chosen[0]].parameters())).device
        bank = PrefixBank(chosen, prefix_len, hidden, init_std=init_std, device=device)
    elif bank.hidden_size != hidden:
        raise HyperParamsError("bank", f"hidden_size {bank.hidden_size} != the model's {hidden}", "build the bank for this model")

    register_instructed_attention()
    base = model.config._attn_implementation or "sdpa"
    if base == INSTRUCTED_ATTENTION:
        base = "sdpa"
    handle = InstructedHandle(model, bank, modules, mode, base, prefix_memo)
    if freeze:
        handle._frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in handle._frozen:
            p.requires_grad_(False)
        # a frozen output layer fed generate()'s one-token slice takes torch's slow path (models.output_layer)
        handle._head_hook = keep_output_layer_dense(model)
    for module in modules.values():
        setattr(module, HANDLE_ATTR, handle)
    setattr(model, HANDLE_ATTR, handle)
    handle.attached = True
    try:
        model.set_attn_implementation(INSTRUCTED_ATTENTION)
        if model.config._attn_implementation != INSTRUCTED_ATTENTION:
            raise PluginError(
                f"{type(model).__name__} did not switch to the '{INSTRUCTED_ATTENTION}' attention implementation "
                "(its modeling code does not use transformers' AttentionInterface)"
            )
    except Exception:
        handle.detach()
        raise
    return handle


def detach_instructed(model_or_handle: nn.Module | InstructedHandle) -> None:
    """Undo :func:`attach_instructed` (no-op when nothing is attached)."""
    if isinstance(model_or_handle, InstructedHandle):
        model_or_handle.detach()
        return
    handle = get_instructed_handle(model_or_handle)
    if handle is not None:
        handle.detach()
