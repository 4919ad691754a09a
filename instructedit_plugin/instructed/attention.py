"""InstructEd attention for transformers 5.x, without patching transformers' files.

InstructEd (Han et al. 2024, "Soft-Instruction Tuning for Model Editing with
Hops") keeps the LLM frozen and

1. prepends ``P`` learnable prefix keys/values to the attention of a block of
   (middle) layers. The prefix keys/values are the layer's *own frozen* key and
   value projections applied to learnable hidden-size prefix embeddings, with
   no rotary position embedding (the prefixes have no position);
2. re-weights attention to the prefix and to the instruction tokens by a
   similarity scalar ``sim`` (Eq. 15).

How it plugs into transformers 5.23
-----------------------------------
* :func:`instructed_attention_forward` is registered with
  ``transformers.AttentionInterface.register(INSTRUCTED_ATTENTION, fn)``. Every
  attention module of LLaMA/Qwen2/Gemma 3/GPT-2 looks up
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` and
  calls ``fn(module, query, key, value, attention_mask, dropout=..., scaling=...,
  **kwargs)`` *after* rotary embedding and the KV-cache update, so ``key`` /
  ``value`` hold every cached position (``[batch, kv_heads, kv_len, head_dim]``)
  and ``module.layer_idx`` names the layer. Gemma 3 also passes
  ``sliding_window`` (already encoded in the mask) and, where configured,
  ``softcap``.
* :func:`instructed_attention_mask` is registered under the *same name* with
  ``transformers.masking_utils.AttentionMaskInterface.register``. This is
  required: ``masking_utils._preprocess_mask_arguments`` returns ``None`` (no
  causal mask at all!) for an implementation name that has no mask function. Ours
  delegates to ``masking_utils.sdpa_mask`` with ``allow_is_causal_skip=False``
  (so a boolean ``[batch, 1, q_len, kv_len]`` mask -- causal, padding and, for
  sliding layers, sliding-window -- is always materialised) and tags the tensor
  with the ``(q_offset, kv_offset)`` it was built for. The attention uses the tag
  to map query rows / key columns to absolute positions in the input, which is
  how instruction spans stay correct during cached decoding and in Gemma 3's
  sliding-window caches (whose key 0 is not position 0).
* A model is switched with ``model.set_attn_implementation(INSTRUCTED_ATTENTION)``
  (validated against ``ALL_ATTENTION_FUNCTIONS.valid_keys()`` and propagated to
  sub-configs; assigning ``model.config._attn_implementation`` also works but skips
  the checks). ``prefix.attach_instructed`` does it and restores the previous
  implementation on detach. The name must not contain "sdpa"/"flash"/"flex"
  nor a "/", which transformers would treat specially.

Layers that need nothing special in a given call (no active prefix, no
re-weighting) are delegated to transformers' own ``sdpa`` implementation (or an
eager computation when the model was on ``eager`` or uses logit soft-capping),
so an attached model without prefix and without instruction context is stock.
What the other layers share in one call -- the additive bias of a mask, the rows
that may attend to nothing and the re-weighting factors -- is built once per mask
and kept in the call's :class:`~.context.InstructionContext` (``_layout_for``),
not once per layer; the per-layer arithmetic is the same, so are the results.

Re-weighting semantics (``sim`` clamped to ``[0, 1]``; see ``context.py`` for spans)
-----------------------------------------------------------------------------------
``mode="paper"`` (default; Eq. 15): after the softmax, the attention *probabilities*
of the re-weighted key columns are multiplied by ``sim`` -- **without
renormalisation**, so ``sim < 1`` removes mass from those columns instead of moving
it to the others. Re-weighted columns are

* in prefix layers: the ``P`` prefix columns (for examples whose prefix is
  active, whenever a ``sim`` is given) **and** the instruction columns
  (keys whose absolute position lies in the example's ``[start, end)``);
* in every other layer: the instruction columns only.

Because the scaling is applied to probabilities, masked entries (padding, future,
outside the sliding window) have probability 0 before and after it: nothing can
be unmasked, whatever ``sim`` is (a negative ``sim`` acts as 0).

``mode="release"`` (behaviour of the public InstructED code, which overwrote
transformers 4.34's LLaMA/GPT-2 attention): the *pre-softmax scores of query
rows* are multiplied by ``sim`` -- a per-row temperature (``sim = 0`` gives
uniform attention over the visible keys). The release indexes
``attn_weights[i, :, :adapter_len + ins_len, :]``, i.e. the first
``P + ins_len`` *query rows* in prefix layers and the first ``ins_len`` rows
elsewhere (it meant to select key columns but indexes the query axis). Here the
rows are those whose absolute position lies in ``[start, end + P)`` in prefix
layers whose prefix is active for the example, ``[start, end)`` otherwise, only
for examples with a non-empty span. Unlike the release, the scaling is applied
to the raw scores *before* the mask is added (the release multiplies the masked
scores, which a ``sim <= 0`` would unmask), and rows are selected by absolute
position rather than by index in the current chunk (the release's rule scales
whichever single row a cached decoding step has), so cached generation matches a
full forward.

``mode="pre_softmax"`` (Eq. 11 and 15 read literally: ``S = QK^T / sqrt(C)`` is the *score*, and
Eq. 15 multiplies its prefix and instruction parts by ``sim``): the raw pre-softmax scores of the same
columns ``paper`` re-weights (prefix columns in prefix layers for examples whose prefix is active,
instruction columns in every layer) are multiplied by ``sim``, before the mask is added and before the
softmax, which then renormalises. ``sim = 0`` gives those columns a score of 0 (not ``-inf``): they keep
``exp(0)`` weight relative to the rest. Offered for the paper's ablation (#15); ``paper`` stays the default.

``mode="none"`` (the paper's Table 4 "w/o re-weight"): no re-weighting at all; the prefixes still join
keys/values, ``sim`` is ignored (a layer without an active prefix is stock attention).

``mode="question_rows"``: ``paper``'s re-weighting applied only to the query rows at or after the end of
the instruction (the template's tail, the question and the answer; every row of an example without an
instruction). The rows of the template's head and of the instruction itself attend as without ``sim``, so
their hidden states, keys and values depend on the instruction and the prefixes only, not on the question:
they can be computed once per instruction and reused (``InstructedLM(instruction_cache_size=...)``), which
makes a query cost its own tokens only. Not in the paper; offered for #15's query-cost target and
benchmarked beside ``paper``.

``mode="question_only"`` (**not in the paper**; a labelled option for #15's query cost): ``paper``'s
re-weighting applied only to the query rows at or after the example's *first question token*
(``instruction_context(question_starts=...)``, required for every example with an instruction); the
template's tail (``\nInput: ``) attends without ``sim`` too, so the whole template prefix -- head,
instruction and tail -- is cacheable per instruction and a query runs over the question's (and answer's)
tokens only, as many as the unedited model's forward. It changes outputs against ``question_rows`` (the tail
rows are no longer re-weighted).

Fused kernel
------------
Where the re-weighting factors do not depend on the query row -- ``paper``, ``none``, and ``question_rows`` /
``question_only`` when every row of the call lies after the instruction's end / the question's start (a query run
against cached instruction keys/values) --
a layer runs in torch's ``scaled_dot_product_attention`` instead of the eager matmul / softmax / multiply /
matmul: multiplying the probability of key column ``j`` by ``w_j`` (no renormalisation) and summing the values
is the same as summing the values scaled by ``w_j``, ``sum_j p_j w_j v_j = SDPA(q, k, w * v)``; the prefix
columns are prepended to a boolean mask, rows that may attend to nothing still give zeros. The result equals the
eager path's up to float rounding (the tests bound it), not bit for bit. The eager path stays for ``release``,
``pre_softmax``, row-dependent weights, logit soft-capping, attention dropout in training and
``output_attentions`` (the fused path returns no probabilities, like transformers' sdpa);
``InstructedHandle.fused_attention = False`` forces it.

Prefix details
--------------
* Prefix keys/values are computed from the frozen projections of the layer:
  ``k_proj``/``v_proj`` (LLaMA, Qwen2 -- including Qwen2's biases --, Gemma 3) or
  the key/value thirds of GPT-2's fused ``c_attn`` (with its bias). No rotary
  embedding is applied to them.
* Gemma 3 (and any module with a ``k_norm``/``v_norm``): the norm is applied to the
  prefix keys/values exactly as to ordinary keys/values. The frozen query-key
  geometry of such a layer only ever sees normalised keys, so an unnormalised
  prefix key would have an arbitrary scale relative to them (an effective
  temperature the prefix could only learn around); the release predates
  QK-norm models, so this is our decision.
* Prefix columns are visible to every query row (they are not positional: no
  causal or sliding-window restriction); for an example whose prefix is switched
  off they are masked (probability exactly 0). GQA: prefix keys/values have the
  layer's ``kv_heads`` heads and are repeated like the ordinary ones.
* Prefixes are never written to the KV cache: they are concatenated inside the
  attention at every step (their K/V are memoised while no gradient is needed,
  see ``prefix.InstructedHandle.prefix_key_value``).
* The probabilities returned as attention weights by the eager path have shape
  ``[batch, heads, q_len, P + kv_len]`` with the prefix columns first (the delegated
  sdpa path and the fused path return ``None``, like stock sdpa).
* A query row that may attend to nothing (a left-padding row outside prefix layers)
  gets all-zero probabilities, as torch's SDPA gives it.
* A 4D mask that did not come from :func:`instructed_attention_mask` (a user-built
  mask) carries no offsets: keys are then taken to start at position 0 and the
  queries to be the last ``q_len`` positions (true for a full-attention dynamic cache).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..errors import RequestError
from .context import InstructionContext, current_instruction_context

__all__ = [
    "INSTRUCTED_ATTENTION",
    "REWEIGHT_MODES",
    "instructed_attention_forward",
    "instructed_attention_mask",
    "register_instructed_attention",
    "project_prefix_kv",
    "supports_prefix",
]

#: Name under which the attention and mask functions are registered.
INSTRUCTED_ATTENTION = "instructed"
#: Supported re-weighting modes (see the module docstring).
REWEIGHT_MODES = ("paper", "release", "pre_softmax", "none", "question_rows", "question_only")
#: Modes whose layers run in the fused kernel (``scaled_dot_product_attention``) where its output equals the
#: eager computation's (see "Fused kernel" in the module docstring).
FUSED_MODES = ("paper", "question_rows", "question_only", "none")

_OFFSETS_ATTR = "_instructed_offsets"  # tag set on masks built by instructed_attention_mask
HANDLE_ATTR = "_instructed_handle"  # set on attention modules (and the model) by prefix.attach_instructed


# ----------------------------------------------------------------------------------------------
# Mask function
# ----------------------------------------------------------------------------------------------
def instructed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """``AttentionMaskInterface`` function: ``sdpa_mask`` without the causal skip, tagged with its offsets.

    Returns a boolean ``[batch, 1, q_length, kv_length]`` mask (``True`` = may attend), or ``None`` only
    where ``sdpa_mask`` itself allows skipping a bidirectional mask without padding.
    """
    kwargs.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )
    if mask is not None:
        setattr(mask, _OFFSETS_ATTR, (q_offset, kv_offset))
    return mask


def register_instructed_attention() -> str:
    """Register the attention *and* the mask function under :data:`INSTRUCTED_ATTENTION` (idempotent)."""
    AttentionInterface.register(INSTRUCTED_ATTENTION, instructed_attention_forward)
    AttentionMaskInterface.register(INSTRUCTED_ATTENTION, instructed_attention_mask)
    return INSTRUCTED_ATTENTION


# ----------------------------------------------------------------------------------------------
# Prefix projections
# ----------------------------------------------------------------------------------------------
def supports_prefix(module: nn.Module) -> bool:
    """Whether :func:`project_prefix_kv` knows how to project prefixes for this attention module."""
    has_kv = isinstance(getattr(module, "k_proj", None), nn.Module) and isinstance(getattr(module, "v_proj", None), nn.Module)
    return has_kv or isinstance(getattr(module, "c_attn", None), nn.Module)


def prefix_input_dim(module: nn.Module) -> int:
    """Hidden size the prefix embeddings of this attention module must have (input dim of its K/V projection)."""
    if isinstance(getattr(module, "k_proj", None), nn.Module):
        proj = module.k_proj
        if hasattr(proj, "in_features"):
            return int(proj.in_features)
        return int(proj.weight.shape[-1])
    if isinstance(getattr(module, "c_attn", None), nn.Module):
        return int(module.c_attn.weight.shape[0])  # GPT-2 Conv1D weight: [in, out]
    raise TypeError(f"{type(module).__name__} has neither k_proj/v_proj nor c_attn")


def _apply_head_norm(norm: nn.Module | None, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Apply a per-head (``[.., head_dim]``) or whole-projection (``[.., heads*head_dim]``) norm to ``[P, heads, d]``."""
    if norm is None:
        return x
    weight = getattr(norm, "weight", None)
    width = weight.shape[-1] if isinstance(weight, torch.Tensor) else x.shape[-1]
    if width == x.shape[-1]:
        return norm(x)
    return norm(x.reshape(x.shape[0], -1)).view(x.shape[0], num_heads, -1)


def project_prefix_kv(module: nn.Module, embeddings: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix keys/values of one layer from its frozen projections: ``[1, kv_heads, P, d]`` each, no RoPE.

    ``embeddings`` is ``[P, hidden]``; it is cast to the projection weight's dtype/device.
    """
    if isinstance(getattr(module, "k_proj", None), nn.Module):
        weight = module.k_proj.weight
        emb = embeddings.to(device=weight.device, dtype=weight.dtype)
        p = emb.shape[0]
        k = module.k_proj(emb).view(p, num_kv_heads, -1)
        v = module.v_proj(emb).view(p, num_kv_heads, -1)
        k = _apply_head_norm(getattr(module, "k_norm", None), k, num_kv_heads)
        v = _apply_head_norm(getattr(module, "v_norm", None), v, num_kv_heads)
    elif isinstance(getattr(module, "c_attn", None), nn.Module):
        weight = module.c_attn.weight
        emb = embeddings.to(device=weight.device, dtype=weight.dtype)
        p = emb.shape[0]
        split = getattr(module, "split_size", weight.shape[-1] // 3)
        _, k, v = module.c_attn(emb).split(split, dim=-1)
        k = k.reshape(p, num_kv_heads, -1)
        v = v.reshape(p, num_kv_heads, -1)
    else:
        raise TypeError(f"{type(module).__name__}: cannot compute prefix keys/values (no k_proj/v_proj or c_attn)")
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _positions(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device):
    """Absolute positions of the query rows and key columns (in the coordinates of the input ids)."""
    offsets = getattr(attention_mask, _OFFSETS_ATTR, None) if attention_mask is not None else None
    if offsets is None:
        # Mask not built by instructed_attention_mask (user-supplied 4D mask): assume the keys are the
        # whole sequence so far, starting at position 0, and the queries are its last q_len positions.
        q_offset, kv_offset = kv_len - q_len, 0
    else:
        q_offset, kv_offset = offsets
    q_pos = torch.arange(q_len, device=device) + (q_offset.to(device) if isinstance(q_offset, torch.Tensor) else q_offset)
    k_pos = torch.arange(kv_len, device=device) + (kv_offset.to(device) if isinstance(kv_offset, torch.Tensor) else kv_offset)
    return q_pos, k_pos


def _additive_bias(module, attention_mask, batch, q_len, kv_len, device) -> torch.Tensor:
    """Float32 additive bias (0 = visible, finfo.min = masked) of shape ``[batch, 1|heads, q_len, kv_len]``."""
    min_value = torch.finfo(torch.float32).min
    if attention_mask is None:
        if getattr(module, "is_causal", True) and q_len > 1:
            q_idx = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            visible = torch.arange(kv_len, device=device)[None, :] <= q_idx
            bias = torch.where(visible, 0.0, min_value)
        else:
            bias = torch.zeros(q_len, kv_len, device=device)
        return bias.view(1, 1, q_len, kv_len).expand(batch, 1, q_len, kv_len)
    mask = attention_mask
    if mask.shape[-1] != kv_len:  # e.g. a user mask sized for a static cache: keep the columns we have
        mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        bias = torch.where(mask, 0.0, min_value).to(device)
    else:  # additive float mask (eager style, any dtype): normalise its "masked" value to float32 min
        masked = mask <= torch.finfo(mask.dtype).min / 2
        bias = torch.where(masked, min_value, mask.float()).to(device)
    return bias.expand(batch, bias.shape[1], q_len, kv_len)


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, softcap):
    """Plain eager attention (mask added to the scores, float32 softmax) -- used when no InstructEd change applies."""
    return _instructed_core(module, query, key, value, attention_mask, dropout, scaling, softcap, plan=None)


def _stock_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, base, kwargs):
    if softcap is not None or base == "eager" or kwargs.get("output_attentions", False):
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


class _Plan:
    """What InstructEd changes in one layer for one call."""

    __slots__ = ("prefix_k", "prefix_v", "prefix_active", "spans", "sim", "mode", "reweight", "question_starts")

    def __init__(self, prefix_k, prefix_v, prefix_active, spans, sim, mode, reweight, question_starts=None):
        self.prefix_k = prefix_k  # [1, kv_heads, P, d] or None
        self.prefix_v = prefix_v
        self.prefix_active = prefix_active  # [batch] bool or None
        self.spans = spans  # [batch, 2] long
        self.sim = sim  # [batch] float32 in [0, 1]
        self.mode = mode
        self.reweight = reweight  # a sim was given
        self.question_starts = question_starts  # [batch] long (question_only) or None


class _Layout:
    """What every layer of one call with the same mask shares: the additive bias (prefix columns included), the
    rows that may attend to nothing, and the re-weighting factors of the call's mode. Computed once per mask and
    call (:func:`_layout_for`) instead of once per layer; the per-layer math is unchanged, so results are too."""

    __slots__ = ("bias", "fully_masked", "col_weight", "col_scale", "row_scale", "visible", "value_weight",
                 "any_fully_masked")

    def __init__(self, bias, fully_masked, col_weight, col_scale, row_scale, visible=None, value_weight=None,
                 any_fully_masked=False):
        self.bias = bias  # [batch, 1|heads, q_len, P + kv_len] float32
        self.fully_masked = fully_masked  # [batch, 1|heads, q_len, 1] bool
        self.col_weight = col_weight  # paper / question_rows: post-softmax factors, or None
        self.col_scale = col_scale  # pre_softmax: score factors in the scores' dtype, or None
        self.row_scale = row_scale  # release: score factors in the scores' dtype, or None
        # The fused (SDPA) kernel's inputs, set only when it computes this layout exactly (``_fused_layout``):
        self.visible = visible  # [batch, 1|heads, q_len, P + kv_len] bool (fully masked rows opened, see below)
        self.value_weight = value_weight  # [batch, 1, P + kv_len, 1] float32: col_weight moved onto the values
        self.any_fully_masked = any_fully_masked  # some row may attend to nothing: its output is zeroed

    @property
    def fused(self) -> bool:
        """Whether :func:`_fused_core` computes this layout (else :func:`_instructed_core`, eager)."""
        return self.visible is not None


def _layout(module, attention_mask, batch, q_len, kv_len, n_prefix, device, dtype, plan: _Plan | None,
            fused: bool = False) -> _Layout:
    bias = _additive_bias(module, attention_mask, batch, q_len, kv_len, device)
    if n_prefix:
        prefix_bias = torch.where(plan.prefix_active, 0.0, torch.finfo(torch.float32).min)
        prefix_bias = prefix_bias.view(batch, 1, 1, 1).expand(batch, bias.shape[1], q_len, n_prefix)
        bias = torch.cat([prefix_bias, bias], dim=-1)
    col_weight = col_scale = row_scale = None
    if plan is not None and plan.reweight:
        q_pos, k_pos = _positions(attention_mask, q_len, kv_len, device)
        start, end = plan.spans[:, 0:1], plan.spans[:, 1:2]  # [batch, 1]
        non_empty = end > start
        sim = plan.sim[:, None]  # [batch, 1]
        if plan.mode == "pre_softmax":
            inst_cols = non_empty & (k_pos[None, :] >= start) & (k_pos[None, :] < end)  # [batch, kv_len]
            col_scale = torch.where(inst_cols, sim, 1.0)
            if n_prefix:
                prefix_s = torch.where(plan.prefix_active[:, None], sim, 1.0).expand(batch, n_prefix)
                col_scale = torch.cat([prefix_s, col_scale], dim=-1)
            col_scale = col_scale[:, None, None, :].to(dtype)
        elif plan.mode == "release":
            extra = 0
            if n_prefix:
                extra = torch.where(plan.prefix_active[:, None], n_prefix, 0)
            rows = non_empty & (q_pos[None, :] >= start) & (q_pos[None, :] < end + extra)  # [batch, q_len]
            row_scale = torch.where(rows, sim, 1.0).to(dtype)[:, None, :, None]
        else:
            inst_cols = non_empty & (k_pos[None, :] >= start) & (k_pos[None, :] < end)  # [batch, kv_len]
            col_weight = torch.where(inst_cols, sim, 1.0)
            if n_prefix:
                prefix_w = torch.where(plan.prefix_active[:, None], sim, 1.0).expand(batch, n_prefix)
                col_weight = torch.cat([prefix_w, col_weight], dim=-1)
            col_weight = col_weight[:, None, None, :]  # [batch, 1, 1, P + kv_len]
            if plan.mode == "question_rows":  # rows before the instruction's end keep their probabilities
                after = q_pos[None, :] >= torch.where(non_empty, end, 0)  # [batch, q_len]
                col_weight = torch.where(after[:, None, :, None], col_weight, 1.0)
            elif plan.mode == "question_only":  # rows before the question's first token keep their probabilities
                first = torch.where(non_empty, plan.question_starts[:, None], 0)  # [batch, 1]
                after = q_pos[None, :] >= first
                col_weight = torch.where(after[:, None, :, None], col_weight, 1.0)
    # A query row that may attend to nothing (a left-padding row outside prefix layers) gets all-zero
    # probabilities, as torch's SDPA does, instead of a uniform average over masked keys (which would
    # make padded rows depend on future tokens).
    fully_masked = (bias <= torch.finfo(torch.float32).min / 2).all(dim=-1, keepdim=True)
    layout = _Layout(bias, fully_masked, col_weight, col_scale, row_scale)
    if fused and col_scale is None and row_scale is None:
        _fused_layout(layout)
    return layout


def _fused_layout(layout: _Layout) -> None:
    """Give ``layout`` the fused kernel's inputs when its re-weighting does not depend on the query row.

    ``paper`` (and ``question_rows`` where every row of the call lies after the instruction, as in a query run
    against cached instruction keys/values) multiplies the probability of key column ``j`` by ``w_j`` without
    renormalising, one ``w`` per example for all rows. Then ``sum_j (p_j w_j) v_j = sum_j p_j (w_j v_j)``: the
    same output as plain softmax attention over the same scores with the values of those columns scaled by
    ``w`` -- what torch's ``scaled_dot_product_attention`` computes in one kernel. Row-dependent weights
    (``question_rows`` over rows before the instruction's end) keep the eager path."""
    weight = layout.col_weight
    if weight is not None:
        if weight.shape[2] != 1 and not bool((weight == weight[:, :, :1]).all()):
            return  # the weights differ between rows
        weight = weight[:, :, :1].transpose(-1, -2)  # [batch, 1, P + kv_len, 1]
    visible = layout.bias > torch.finfo(torch.float32).min / 2
    any_fully = bool(layout.fully_masked.any())
    if any_fully:  # a row that may attend to nothing: open it (no NaN, in the forward or the backward), zero it after
        visible = visible | layout.fully_masked
    layout.visible, layout.value_weight, layout.any_fully_masked = visible, weight, any_fully


#: Layouts one call keeps (Gemma 3 has two masks per forward, full and sliding; generate() makes new ones per step).
_LAYOUTS_PER_CALL = 8


def _layout_for(ctx: InstructionContext | None, module, attention_mask, batch, q_len, kv_len, n_prefix, device,
                dtype, plan: _Plan | None, default_on: bool, fused: bool = False) -> _Layout:
    """:func:`_layout`, reused by every layer of the call that sees the same mask object (kept in ``ctx``'s memo,
    which holds the mask itself, so its identity cannot be reused by another tensor while the entry lives)."""
    memo = getattr(ctx, "layouts", None)
    if memo is None or attention_mask is None:
        return _layout(module, attention_mask, batch, q_len, kv_len, n_prefix, device, dtype, plan, fused)
    key = (id(attention_mask), batch, q_len, kv_len, n_prefix, str(device), dtype, plan.mode, plan.reweight,
           default_on, torch.is_grad_enabled(), fused)
    hit = memo.get(key)
    if hit is not None and hit[0] is attention_mask:
        return hit[1]
    if len(memo) >= _LAYOUTS_PER_CALL:
        memo.clear()
    layout = _layout(module, attention_mask, batch, q_len, kv_len, n_prefix, device, dtype, plan, fused)
    memo[key] = (attention_mask, layout)
    return layout


def _with_prefix(plan: _Plan, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` / ``value`` with the layer's prefix keys/values prepended (the same for every example of the batch)."""
    batch = key.shape[0]
    key = torch.cat([plan.prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([plan.prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    return key, value


def _instructed_core(module, query, key, value, attention_mask, dropout, scaling, softcap, plan: _Plan | None,
                     layout: _Layout | None = None):
    batch, num_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    if scaling is None:
        scaling = head_dim**-0.5
    n_rep = num_heads // key.shape[1]

    n_prefix = 0
    if plan is not None and plan.prefix_k is not None:
        n_prefix = plan.prefix_k.shape[2]
        key, value = _with_prefix(plan, key, value)
    if layout is None:
        layout = _layout(module, attention_mask, batch, q_len, kv_len, n_prefix, query.device, query.dtype, plan)

    key = _repeat_kv(key, n_rep)
    value = _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if layout.col_scale is not None:
        scores = scores * layout.col_scale
    elif layout.row_scale is not None:
        scores = scores * layout.row_scale

    probs = torch.softmax(scores.float() + layout.bias, dim=-1)
    probs = probs.masked_fill(layout.fully_masked, 0.0)
    if layout.col_weight is not None:
        probs = probs * layout.col_weight
    probs = probs.to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _fused_core(query, key, value, scaling, plan: _Plan, layout: _Layout):
    """The layer's InstructEd attention in torch's ``scaled_dot_product_attention``: the prefix keys/values
    prepended, the call's boolean mask (prefix columns first) and the re-weighting moved onto the values
    (:func:`_fused_layout`); rows that may attend to nothing give zeros. Returns ``(out [b, q, heads, d], None)``
    like transformers' sdpa path (no probabilities)."""
    _, num_heads, _, head_dim = query.shape
    if plan.prefix_k is not None:
        key, value = _with_prefix(plan, key, value)
    if layout.value_weight is not None:
        value = (value * layout.value_weight).to(query.dtype)
    n_rep = num_heads // key.shape[1]
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.visible, dropout_p=0.0,
        scale=head_dim**-0.5 if scaling is None else scaling, enable_gqa=n_rep > 1)
    if layout.any_fully_masked:
        out = out.masked_fill(layout.fully_masked, 0.0)
    return out.transpose(1, 2).contiguous(), None


def instructed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``AttentionInterface`` function implementing InstructEd prefixes and Eq. 15 re-weighting.

    Shapes follow transformers: ``query`` ``[b, heads, q, d]``, ``key``/``value`` ``[b, kv_heads, kv, d]``,
    ``attention_mask`` ``[b, 1, q, kv]`` (bool from :func:`instructed_attention_mask`, or an additive float
    mask); returns ``([b, q, heads, d], probs | None)``. ``sliding_window`` and other kwargs are accepted
    (the window is already in the mask).
    """
    handle = getattr(module, HANDLE_ATTR, None)
    ctx: InstructionContext | None = current_instruction_context()
    layer_idx = getattr(module, "layer_idx", None)
    batch = query.shape[0]
    device = query.device

    prefix_layer = handle is not None and handle.attached and layer_idx in handle.layer_set
    default_on = bool(handle.prefix_enabled) if handle is not None else False
    use_prefix = prefix_layer and (ctx.prefix_any(default_on) if ctx is not None else default_on)
    mode = handle.mode if handle is not None else "paper"
    reweight = mode != "none" and ctx is not None and ctx.sim is not None and (ctx.has_instruction or use_prefix)

    if not use_prefix and not reweight:
        base = handle.base_implementation if handle is not None else "sdpa"
        return _stock_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, base, kwargs)

    prefix_k = prefix_v = prefix_active = None
    if use_prefix:
        prefix_k, prefix_v = handle.prefix_key_value(module, layer_idx, num_kv_heads=key.shape[1])
        if ctx is not None:
            prefix_active = ctx.prefix_for(batch, default_on, device)
        else:
            prefix_active = torch.ones(batch, dtype=torch.bool, device=device)
    if ctx is not None:
        spans = ctx.spans_for(batch, device)
        sim = ctx.sim_for(batch, device)
    else:
        spans = torch.zeros(batch, 2, dtype=torch.long, device=device)
        sim = torch.ones(batch, dtype=torch.float32, device=device)
    question_starts = None
    if reweight and mode == "question_only":
        question_starts = ctx.question_starts_for(batch, device)
        if question_starts is None:
            raise RequestError("question_starts: reweight_mode question_only re-weights the rows from each example's "
                               "first question token, but the instruction context gives none. Fix: pass "
                               "instruction_context(..., question_starts=[...]) (InstructedLM does), or use "
                               "reweight_mode question_rows")
    plan = _Plan(prefix_k, prefix_v, prefix_active, spans, sim, mode, reweight, question_starts)
    n_prefix = 0 if prefix_k is None else prefix_k.shape[2]
    fused = getattr(handle, "fused_attention", True) and mode in FUSED_MODES and softcap is None \
        and not kwargs.get("output_attentions", False) and not (module.training and dropout > 0)
    layout = _layout_for(ctx, module, attention_mask, batch, query.shape[2], key.shape[2], n_prefix, device,
                         query.dtype, plan, default_on, fused)
    if layout.fused:
        return _fused_core(query, key, value, scaling, plan, layout)
    return _instructed_core(module, query, key, value, attention_mask, dropout, scaling, softcap, plan, layout)


register_instructed_attention()
