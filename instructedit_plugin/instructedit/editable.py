"""The editable-model wrapper: a base causal LM plus the InstructEdit hypernetwork.

:class:`InstructEditModel` is what EasyEdit's trainers instantiate from
``ALG_TRAIN_DICT['INSTRUCTEDIT']`` as ``cls(model, config, model_constructor)``
and what the plugin's own trainer uses. It offers the interface both EasyEdit
flavours call: ``forward(**batch)`` returning logits, ``edit(batch, condition)``
returning ``(edited_model, info)``, ``edit_loss_fn``/``loc_loss_fn``,
``outer_parameters()``, ``edit_lrs``, ``model``, ``model_constructor`` and a
``state_dict`` without the base model's weights.

The edit itself (:func:`compute_edited_weights`) runs the base model once with
``torch.func.functional_call`` on detached leaf copies of the edited weights,
captures each edited layer's input ``u`` with a forward hook and its output
gradient ``delta`` with ``torch.autograd.grad``, turns them into a pseudo
gradient with the hypernetwork and returns ``W - lr * pseudo_grad`` per weight.
The edited model is again a ``functional_call`` with that dict: no module
monkeypatching, so any architecture and attention implementation works, and
gradients of post-edit losses flow into the hypernetwork and the edit lrs.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import HyperParamsError
from ..models.output_layer import keep_output_layer_dense
from .checkpoint import (
    META_KEY,
    base_model_identity,
    decode_meta,
    easyedit_export_dir,
    encode_meta,
    plugin_version,
    save_editor,
    verify_base_model,
)
from .instructedit_hparams import config_dict
from .hypernet import InstructEditHypernet, LayerSpec

LOG = logging.getLogger(__name__)

#: Keys of a batch dict the HF model forward accepts; everything else (labels, masks for losses) is dropped.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------- losses
def _aligned(pred: torch.Tensor, targ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token logits with labels.

    ``targ`` as long as ``pred`` (Hugging Face style, -100 on prompt and padding) is
    shifted here; a shorter ``targ`` is taken as EasyEdit-style right-aligned
    labels of already-shifted positions.
    """
    if pred.dim() != 3:
        raise ValueError(f"expected logits of shape (batch, length, vocab), got {tuple(pred.shape)}")
    if targ.size(1) == pred.size(1):
        return pred[:, :-1], targ[:, 1:]
    return pred[:, :-1][:, -targ.size(1):], targ


def token_nll_metrics(config: Any, pred: torch.Tensor, targ: torch.Tensor, **_: Any) -> dict[str, Any]:
    """EasyEdit-compatible loss dict: ``nll``, ``acc``, ``log_prob``, ``prob``, ``n_tokens``."""
    pred, targ = _aligned(pred.float(), targ)
    mask = targ != -100
    safe = targ.masked_fill(~mask, 0)
    log_probs = pred.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    n_tokens = mask.sum().clamp_min(1)
    log_prob = (log_probs * mask).sum() / n_tokens
    correct = (pred.argmax(-1) == safe) & mask
    return {
        "nll": -log_prob,
        "log_prob": log_prob,
        "prob": (log_probs.exp() * mask).sum() / n_tokens,
        "acc": correct.sum() / n_tokens,
        "n_tokens": float(mask.sum().item()),
    }


def kl_locality(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked positions of KL(pre || post) of the next-token distributions."""
    pre_lp = pre.float().log_softmax(-1)
    post_lp = post.float().log_softmax(-1)
    kl = (pre_lp.exp() * (pre_lp - post_lp)).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def edit_step_stats(loss: torch.Tensor, outer: Mapping[str, torch.Tensor], l_loc: torch.Tensor,
                    inner: Mapping[str, torch.Tensor], loc_agree: torch.Tensor,
                    info: Mapping[str, float]) -> dict[str, float]:
    """The statistics of one training/validation edit step (shared by the trainers).

    ``outer``/``inner``: NLL metrics of the post-edit model on all edit-outer rows
    and on the edit rows only; ``loc_agree``: booleans, pre- and post-edit argmax
    agree at each scored locality position (an empty tensor counts as 1.0).
    """
    return {
        "loss/edit": outer["nll"].item(),
        "loss/loc": l_loc.item(),
        "loss/total_edit": loss.item(),
        "edit/acc": inner["acc"].item(),
        "outer/acc": outer["acc"].item(),
        "loc/acc": loc_agree.float().mean().item() if loc_agree.numel() else 1.0,
        **info,
    }


# --------------------------------------------------------------------- layer discovery
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def resolve_layer_specs(model: nn.Module, inner_params: Sequence[str], source: str | None = None) -> list[LayerSpec]:
    """Check ``inner_params`` against ``model`` and describe each edited weight."""
    params = dict(model.named_parameters())
    conv1d = _conv1d_type()
    specs = []
    for name in inner_params:
        if name not in params:
            close = difflib.get_close_matches(name, params, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "list weights from model.named_parameters()"
            raise HyperParamsError("inner_params", f"'{name}' is not a parameter of {type(model).__name__}", hint, source)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf != "weight":
            raise HyperParamsError("inner_params", f"'{name}' is not a weight", "edit '.weight' parameters only", source)
        weight = params[name]
        if conv1d is not None and isinstance(module, conv1d):
            specs.append(LayerSpec(name, weight.shape[0], weight.shape[1], "conv1d"))
        elif isinstance(module, nn.Linear):
            specs.append(LayerSpec(name, weight.shape[1], weight.shape[0], "linear"))
        else:
            raise HyperParamsError("inner_params", f"'{name}' belongs to a {type(module).__name__}",
                                   "edit weights of nn.Linear or GPT-2 Conv1D layers", source)
    if len(set(inner_params)) != len(inner_params):
        raise HyperParamsError("inner_params", "lists a weight twice", "remove the duplicate", source)
    return specs


# ---------------------------------------------------------------------------- editing
@contextlib.contextmanager
def _capture(model: nn.Module, specs: Sequence[LayerSpec]):
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {s.name: [] for s in specs}
    handles = []
    for spec in specs:
        module = model.get_submodule(spec.name.rpartition(".")[0])

        def hook(_mod, args, output, _name=spec.name):
            store[_name].append((args[0], output))

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def observed_inputs(model: nn.Module, hypernet: InstructEditHypernet, specs: Sequence[LayerSpec],
                    attention_mask: torch.Tensor | None):
    """While training with ``key_whitening``: the edited layers' inputs at the real tokens of the
    forward passes in the block go into the hypernetwork's second moments (the inputs an edit must
    leave alone, e.g. locality prompts, as ROME/MEMIT estimate ``C`` from ordinary text)."""
    if not (hypernet.whitening and hypernet.training):
        yield
        return
    with _capture(model, specs) as store:
        yield
    for spec in specs:
        for u, _ in store[spec.name]:
            u = u.detach()
            rows = u[attention_mask.bool()] if attention_mask is not None and attention_mask.shape == u.shape[:2] \
                else u.reshape(-1, u.shape[-1])
            hypernet.observe_inputs(spec.name, rows)


def left_pad(enc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded :func:`~.dataset.encode_pairs` rows turned left-padded, with explicit ``position_ids``.

    Answers then end at the last position of every row, so the union of answer
    positions is as short as the longest answer (cheap ``logits_to_keep``).
    """
    mask = enc["attention_mask"]
    width = mask.shape[1]
    lengths = mask.sum(1)
    out = {k: v.clone() for k, v in enc.items()}
    for r in range(mask.shape[0]):
        shift = int(width - lengths[r])
        if shift:
            for key in ("input_ids", "attention_mask", "labels"):
                out[key][r] = torch.roll(enc[key][r], shift)
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return out


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``p`` whose logits predict a labelled token (``labels[:, p + 1] != -100`` in some row)."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)


def answer_logits(model: nn.Module, weights: Mapping[str, torch.Tensor] | None,
                  batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only at the answer positions, and the labels they predict (no shift needed).

    Runs ``model`` (with ``weights`` swapped in by ``functional_call``) with
    ``logits_to_keep`` set to :func:`answer_positions`, so the output layer is
    applied to a few positions instead of the whole sequence (most of the cost
    for large vocabularies). Returns ``(logits (B, K, V), labels (B, K))``;
    ``labels`` is -100 where a row has no answer token at a kept position.
    """
    labels = batch["labels"]
    positions = answer_positions(labels)
    kwargs = model_inputs(batch)
    try:
        logits = _logits(functional_call(model, dict(weights or {}), args=(), kwargs={**kwargs, "logits_to_keep": positions}))
    except TypeError:  # a model without logits_to_keep: compute all logits and slice
        logits = _logits(functional_call(model, dict(weights or {}), args=(), kwargs=kwargs))
    if logits.shape[1] != positions.numel():
        logits = logits[:, positions]
    return logits, labels[:, positions + 1]


def kept_nll_metrics(pred: torch.Tensor, targ: torch.Tensor) -> dict[str, Any]:
    """:func:`token_nll_metrics` for logits already aligned with their labels (see :func:`answer_logits`)."""
    pad = torch.full_like(targ[:, :1], -100)
    return token_nll_metrics(None, torch.cat([pred, pred[:, :1]], 1), torch.cat([pad, targ], 1))


def compute_edited_weights(
    model: nn.Module,
    hypernet: InstructEditHypernet,
    edit_lrs: torch.Tensor,
    specs: Sequence[LayerSpec],
    batch: Mapping[str, torch.Tensor],
    loss_fn: Callable[..., dict] = token_nll_metrics,
    sparse_logits: bool = False,
    capture: dict[str, torch.Tensor] | None = None,
    prefix_cache: Any = None,
    prefix_len: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """New values of the edited weights for the edit examples in ``batch``.

    The returned tensors stay differentiable w.r.t. ``hypernet`` and
    ``edit_lrs`` (and are detached from the base weights).

    ``sparse_logits``: compute the edit loss from logits at the answer positions
    only (:func:`answer_logits`, the NLL of :func:`token_nll_metrics`; ``loss_fn``
    is not used). Same loss, far cheaper for large vocabularies.
    ``capture``: a dict that receives each layer's transformed gradient
    ``delta~ u~^T`` (detached, in the weight's layout), for gradient analysis.
    ``prefix_cache`` (a :class:`~.prefix_states.PrefixStateCache`) with ``prefix_len`` > 0: the first
    ``prefix_len`` tokens of the (single, unpadded) row are an instruction whose states below the first
    edited layer come from the cache; the same edit up to floating-point rounding, cheaper.
    """
    params = dict(model.named_parameters())
    leaves = {s.name: params[s.name].detach().requires_grad_(True) for s in specs}
    upper = contextlib.nullcontext()
    if prefix_cache is not None and prefix_len > 0:
        batch = prefix_cache.edit_batch(batch, prefix_len)
        upper = prefix_cache.upper_layers()
    with torch.enable_grad(), _capture(model, specs) as store, upper:
        if sparse_logits:
            loss = kept_nll_metrics(*answer_logits(model, leaves, batch))["nll"]
        else:
            logits = _logits(functional_call(model, leaves, args=(), kwargs=model_inputs(batch)))
            loss = loss_fn(None, logits, batch["labels"])["nll"]
        outputs = []
        for spec in specs:
            calls = store[spec.name]
            if len(calls) != 1:
                raise RuntimeError(f"edited layer {spec.name} ran {len(calls)} times in one forward pass; expected once")
            outputs.append(calls[0][1])
        deltas = torch.autograd.grad(loss, outputs, allow_unused=True)
    new_weights: dict[str, torch.Tensor] = {}
    norms = []
    for i, (spec, delta) in enumerate(zip(specs, deltas)):
        u = store[spec.name][0][0].detach()
        u = u.reshape(-1, u.shape[-1])
        if delta is None:
            delta = torch.zeros(u.shape[0], spec.out_dim, dtype=u.dtype, device=u.device)
        d = delta.detach().reshape(-1, delta.shape[-1])
        keep = (d != 0).any(-1)  # tokens that do not influence the loss carry no edit signal
        grad = hypernet.pseudo_gradient(spec, u[keep], d[keep])
        if capture is not None:
            capture[spec.name] = grad.detach()
        weight = params[spec.name]
        new = weight.detach().float() - edit_lrs[i].to(weight.device) * grad.to(weight.device)
        new_weights[spec.name] = new.to(weight.dtype)
        norms.append(grad.detach().norm().item())
    info = {"edit/loss_pre": float(loss.detach().item()), "edit/update_norm": float(sum(norms) / max(len(norms), 1))}
    return new_weights, info


class EditedModel(nn.Module):
    """The base model evaluated with edited weights (``functional_call``); returns logits."""

    def __init__(self, model: nn.Module, new_weights: Mapping[str, torch.Tensor]):
        super().__init__()
        self._model = [model]  # not a submodule: its parameters stay the base model's
        self.new_weights = dict(new_weights)

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and isinstance(args[0], Mapping):
            kwargs = {**args[0], **kwargs}
            args = ()
        return _logits(functional_call(self.model, self.new_weights, args=args, kwargs=model_inputs(kwargs)))


class InstructEditModel(nn.Module):
    """Base model + hypernetwork + per-layer edit lrs (EasyEdit's ``ALG_TRAIN_DICT['INSTRUCTEDIT']``)."""

    def __init__(self, model: nn.Module, config: Any, model_constructor: Callable[[], nn.Module] | None = None,
                 hypernet: InstructEditHypernet | None = None, edit_lrs: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.config = config
        self.model_constructor = model_constructor
        self.specs = resolve_layer_specs(model, list(config.inner_params), getattr(config, "_source", None))
        if hypernet is None:
            hypernet = InstructEditHypernet(
                self.specs,
                rank=int(getattr(config, "rank", 1920)),
                n_blocks=int(getattr(config, "n_blocks", 1)),
                act=str(getattr(config, "act", "relu")),
                norm=bool(getattr(config, "norm", True)),
                shared=bool(getattr(config, "shared", True)),
                key_whitening=bool(getattr(config, "key_whitening", False)),
                whitening_ridge=float(getattr(config, "whitening_ridge", 0.01)),
            )
        self.hypernet = hypernet
        if edit_lrs is None:
            edit_lrs = torch.full((len(self.specs),), float(getattr(config, "edit_lr", 1e-4)))
        self.edit_lrs = nn.Parameter(edit_lrs.detach().clone().float())
        if not getattr(config, "train_base", False):
            for p in self.model.parameters():
                p.requires_grad_(False)
            # a frozen output layer fed generate()'s one-token slice takes torch's slow path (models.output_layer)
            keep_output_layer_dense(self.model)
        device = next(self.model.parameters()).device
        self.hypernet.to(device)
        self.edit_lrs.data = self.edit_lrs.data.to(device)
        self.edit_loss_fn = token_nll_metrics
        self.loc_loss_fn = token_nll_metrics

    # ----------------------------------------------------------- EasyEdit API
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base model's logits; while training with ``key_whitening`` its inputs are observed
        (EasyEdit's trainers and the plugin's run the pre-edit locality batch through here)."""
        with observed_inputs(self.model, self.hypernet, self.specs, kwargs.get("attention_mask")):
            return _logits(self.model(*args, **model_inputs(kwargs)))

    def outer_parameters(self) -> list[nn.Parameter]:
        """Hypernetwork parameters and the edit lrs (EasyEdit's EditTrainer also gives ``edit_lrs`` to its lr optimiser)."""
        params = list(self.hypernet.parameters()) + [self.edit_lrs]
        if getattr(self.config, "train_base", False):
            params += [p for p in self.model.parameters() if p.requires_grad]
        return params

    def edit(self, batch: Mapping[str, torch.Tensor], condition: Any = None, detach_history: bool = False,
             **kwargs: Any) -> tuple[EditedModel, dict[str, float]]:
        new_weights, info = compute_edited_weights(self.model, self.hypernet, self.edit_lrs, self.specs, batch,
                                                   self.edit_loss_fn)
        if detach_history:
            new_weights = {k: v.detach() for k, v in new_weights.items()}
        return EditedModel(self.model, new_weights), info

    # ------------------------------------------------------------ checkpoints
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D401
        """Editor tensors only (``hypernet.*``, ``edit_lrs``): the base model is not saved.

        While EasyEdit's trainer saves (:meth:`on_easyedit_save_state`) it also holds the manifest
        (``instructedit_meta``, a uint8 tensor of JSON), which makes EasyEdit's archive
        self-describing for :func:`~.checkpoint.load_editor`.
        """
        full = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        drop = [k for k in full if k.startswith(prefix + "model.")]
        for key in drop:
            del full[key]
        if getattr(self, "_embed_meta", False):
            full[prefix + META_KEY] = encode_meta(self.editor_config())
        return full

    def archive_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with the manifest entry, as EasyEdit's trainer archives it."""
        return {**self.state_dict(), META_KEY: encode_meta(self.editor_config())}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        meta = decode_meta(state_dict.get(META_KEY))
        if meta is not None:
            verify_base_model(meta, self.model, "being loaded")
        state = {k: v for k, v in state_dict.items()
                 if not k.startswith("model.") and k not in ("model_config", META_KEY)}
        result = super().load_state_dict(state, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("model.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"editor checkpoint does not match: missing {missing}, unexpected {result.unexpected_keys}")
        return result

    def editor_config(self) -> dict[str, Any]:
        """The checkpoint manifest of this editor (without step, stats and file hashes)."""
        return {"alg": "InstructEdit", "plugin_version": plugin_version(), "base_model": base_model_identity(self.model),
                "layers": [s.to_json() for s in self.specs], "hypernet": dict(self.hypernet.config),
                "training_config": config_dict(self.config)}

    @contextlib.contextmanager
    def on_easyedit_save_state(self, trainer: Any, stats: Mapping[str, Any] | None):
        """Wraps EasyEdit's ``BaseTrainer.save_state`` (the plugin's patch enters it): the archive's
        state dict carries the manifest, and once it is saved the same editor is written as a
        safetensors checkpoint folder next to it (:func:`~.checkpoint.easyedit_export_dir`)."""
        self._embed_meta = True
        try:
            yield
        finally:
            self._embed_meta = False
        self._export_easyedit_save(trainer, stats)

    def _export_easyedit_save(self, trainer: Any, stats: Mapping[str, Any] | None) -> Path | None:
        cfg = getattr(trainer, "config", self.config)
        save_path = getattr(trainer, "save_path", None)
        if save_path is None or (getattr(cfg, "debug", False) and not getattr(cfg, "save", True)) \
                or getattr(cfg, "eval_only", False):
            return None
        folder = easyedit_export_dir(save_path)
        meta = {**self.editor_config(), "step": getattr(trainer, "global_iter", None),
                "val_stats": _plain_stats(stats), "easyedit_archive": Path(save_path).name}
        save_editor(folder, self.state_dict(), meta)
        LOG.info("saved the InstructEdit editor of %s as %s", save_path, folder)
        return folder


def _plain_stats(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, value in (stats or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            out[str(key)] = str(value)
    return out
