"""InstructEd prefixes as a PEFT method: ``get_peft_model(model, InstructEdConfig(...))``.

Importing this module registers the method with ``peft.utils.peft_types.register_peft_method``
(name ``instructed``, ``PeftType.INSTRUCTED``), after which PEFT's own API handles the prefixes::

    from peft import PeftModel, get_peft_model
    peft_model = get_peft_model(model, InstructEdConfig(prefix_layers=[4, 5, 6, 7], prefix_len=5))
    ...                                          # train peft_model.parameters() (the prefixes only)
    peft_model.save_pretrained(folder)           # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base_model, folder)

These are not PEFT's prefix tuning: the prefix embeddings go through each layer's *own frozen* K/V
projections and join the keys/values inside the plugin's attention function (:mod:`.attention`,
registered with transformers' ``AttentionInterface``), where the re-weighting by ``sim`` and the
instruction spans of :func:`~.context.instruction_context` apply. The tuner (:class:`InstructEdModel`)
owns one :class:`~.prefix.PrefixBank` per adapter (``instructed_prefixes.banks.<adapter>``) and attaches
the active one with :func:`~.prefix.attach_instructed` (which freezes the base model);
``with peft_model.disable_adapter():`` detaches it, so the model inside is then exactly the stock model. A forward
under ``instruction_context(spans=..., sim=...)`` is re-weighted as in :class:`~.lm.InstructedLM`.

The adapter folder is also what InstructEd checkpoints are made of (:mod:`.checkpoint` adds the
plugin's manifest to it), so one folder serves both ``archive:`` and ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from ..core.checkpoint import base_model_identity
from ..errors import HyperParamsError, PluginError
from .attention import REWEIGHT_MODES
from .instructed_hparams import DEFAULT_TEMPLATE
from .prefix import InstructedHandle, PrefixBank, attach_instructed

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "PEFT_METHOD",
    "InstructEdConfig",
    "InstructEdModel",
    "PrefixBanks",
    "adapter_config_bytes",
    "adapter_tensors",
    "adapter_tensors_of",
    "bank_from_adapter",
    "config_from_dict",
]

#: The name the method is registered under (``PeftType.INSTRUCTED``).
PEFT_METHOD = "instructed"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
#: Where the banks live on the tuner (a :class:`PrefixBanks`); a saved adapter's keys are
#: ``base_model.instructed_prefixes.banks.<tensor>``.
BANKS_ATTR = "instructed_prefixes"
_MARKER = f"{BANKS_ATTR}.banks."
_SAVED_KEY = f"base_model.{_MARKER}"


def _peft_type() -> PeftType:
    """``PeftType.INSTRUCTED``. ``register_peft_method`` accepts only names of ``PeftType`` members and
    the enum lists PEFT's own methods, so the member is added to it (once)."""
    name = PEFT_METHOD.upper()
    if name not in PeftType.__members__:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_names_.append(name)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        type.__setattr__(PeftType, name, member)
    return PeftType[name]


INSTRUCTED = _peft_type()


@dataclass
class InstructEdConfig(PeftConfig):
    """The prefix bank of an InstructEd adapter (what ``adapter_config.json`` holds).

    Args:
        prefix_layers: layer indices with prefixes (``None``: the middle third, see
            :func:`~.prefix.default_prefix_layers`; filled in when attached).
        prefix_len: prefix vectors per layer.
        hidden_size: size of a prefix vector (the K/V projections' input size; filled in when attached).
        reweight_mode: ``"paper"`` or ``"release"`` (see :mod:`.attention`).
        template: the instruction template the prefixes were trained with.
        encoder: identity of the sentence encoder that computed ``sim`` in training.
        init_std: standard deviation of a new bank's embeddings.
        base_model_fingerprint / base_model_type: the base model the prefixes are for (filled in when
            attached; see :func:`~instructedit_plugin.core.checkpoint.model_fingerprint`).
    """

    prefix_layers: list[int] | None = field(default=None, metadata={"help": "layers with prefixes"})
    prefix_len: int = field(default=5, metadata={"help": "prefix vectors per layer"})
    hidden_size: int | None = field(default=None, metadata={"help": "size of a prefix vector"})
    reweight_mode: str = field(default="paper", metadata={"help": "re-weighting: paper or release"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "instruction template"})
    encoder: Any | None = field(default=None, metadata={"help": "sentence encoder identity"})
    init_std: float = field(default=0.02, metadata={"help": "std of new prefix embeddings"})
    base_model_fingerprint: str | None = field(default=None, metadata={"help": "base model config sha256"})
    base_model_type: str | None = field(default=None, metadata={"help": "base model type"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = INSTRUCTED
        if isinstance(self.prefix_len, bool) or not isinstance(self.prefix_len, int) or self.prefix_len < 1:
            raise HyperParamsError("prefix_len", f"must be a positive integer, got {self.prefix_len!r}",
                                   "use e.g. 5 (the paper's default)")
        if self.reweight_mode not in REWEIGHT_MODES:
            raise HyperParamsError("reweight_mode", f"unknown re-weighting mode {self.reweight_mode!r}",
                                   f"use one of {', '.join(REWEIGHT_MODES)}")
        if self.prefix_layers is not None:
            self.prefix_layers = [int(i) for i in self.prefix_layers]


class PrefixBanks(nn.Module, BaseTunerLayer):
    """The adapters' :class:`~.prefix.PrefixBank` s (``banks.<adapter>``) as PEFT's one tuner layer, so that
    PEFT's status helpers and ``PeftModel.disable_adapter()`` see them. It computes nothing: the active
    bank joins the attention through its :class:`~.prefix.InstructedHandle`."""

    adapter_layer_names = ("banks",)

    def __init__(self) -> None:
        super().__init__()
        self.banks = nn.ModuleDict()
        self._active_adapter = "default"
        self._disable_adapters = False
        self.merged_adapters = []

    def enable_adapters(self, enabled: bool) -> None:  # the tuner attaches/detaches; this is the record
        self._disable_adapters = not enabled


class InstructEdModel(BaseTuner):
    """PEFT tuner of InstructEd: owns the prefix banks, attaches the active one (see the module docs)."""

    prefix: str = f"{PEFT_METHOD}_"
    uses_shared_state = True  # the banks live on the tuner, not in the model's modules
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # no module is targeted

    # -- injection -------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Build the adapter's bank (with the config's layers and length) and attach it."""
        config = self.peft_config[adapter_name]
        if BANKS_ATTR not in self._modules:
            setattr(self, BANKS_ATTR, PrefixBanks())
        self._detach()
        handle = attach_instructed(model, layers=config.prefix_layers, prefix_len=config.prefix_len,
                                   mode=config.reweight_mode, init_std=config.init_std, freeze=True)
        bank = handle.bank
        if config.hidden_size is not None and config.hidden_size != bank.hidden_size:
            handle.detach()
            raise HyperParamsError("hidden_size", f"the adapter's prefixes have size {config.hidden_size}, this model's "
                                   f"K/V projections take {bank.hidden_size}", "load the adapter onto the model it was "
                                   "trained for")
        identity = base_model_identity(model)
        if config.base_model_fingerprint not in (None, identity["fingerprint"]):
            handle.detach()
            raise HyperParamsError("base_model_fingerprint", f"the adapter was trained for another base model "
                                   f"(model_type {config.base_model_type!r}), not for this one "
                                   f"(model_type {identity['model_type']!r})", "load it onto the model it was trained for")
        config.prefix_layers = list(bank.layers)
        config.hidden_size = bank.hidden_size
        config.base_model_fingerprint = identity["fingerprint"]
        config.base_model_type = identity["model_type"]
        bank.requires_grad_(not config.inference_mode)  # PeftModel.from_pretrained(is_trainable=False): frozen
        self._banks()[adapter_name] = bank
        self.__dict__["_instructed_handle"] = handle
        self._layer()._active_adapter = adapter_name

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - no module is replaced
        raise NotImplementedError("InstructEd replaces no module; its prefixes join the attention")

    # -- the attached bank -----------------------------------------------------------------------
    def _layer(self) -> PrefixBanks:
        return self._modules[BANKS_ATTR]

    def _banks(self) -> nn.ModuleDict:
        return self._layer().banks

    @property
    def bank(self) -> PrefixBank:
        """The active adapter's prefix bank."""
        return self._banks()[self._active_name()]

    @property
    def handle(self) -> InstructedHandle | None:
        """The :class:`~.prefix.InstructedHandle` while the prefixes are attached (``None`` when disabled)."""
        return self.__dict__.get("_instructed_handle")

    def _active_name(self) -> str:
        active = self.active_adapter
        return active if isinstance(active, str) else active[0]

    def _detach(self) -> None:
        handle = self.__dict__.pop("_instructed_handle", None)
        if handle is not None:
            handle.detach()

    def _attach(self, adapter_name: str) -> None:
        self._detach()
        config = self.peft_config[adapter_name]
        self.__dict__["_instructed_handle"] = attach_instructed(self.model, bank=self._banks()[adapter_name],
                                                                mode=config.reweight_mode, freeze=True)
        self._layer()._active_adapter = adapter_name

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Enabled: the active bank attached; disabled: detached (the model inside is the stock model)."""
        if enabled:
            self._attach(self._active_name())
        else:
            self._detach()
        self._layer().enable_adapters(enabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1 or names[0] not in self._banks():
            raise PluginError(f"InstructEd activates one adapter at a time, one of {list(self._banks())}; "
                              f"got {adapter_name!r}")
        self.active_adapter = names[0]
        self._attach(names[0])
        self._banks()[names[0]].requires_grad_(not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        banks = self._banks()
        if adapter_name not in banks:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if adapter_name == self._active_name():
            self._detach()
        del banks[adapter_name]
        del self.peft_config[adapter_name]
        rest = list(banks)
        self.active_adapter = rest[0] if rest else []
        if rest:
            self._attach(rest[0])

    def unload(self) -> nn.Module:
        """Detach the prefixes and return the stock base model."""
        self._detach()
        return self.model

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise PluginError("InstructEd prefixes cannot be merged into the weights (they are extra keys/values whose "
                          "attention is re-weighted per input); use unload() for the stock model")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Prefix banks stay float32 (cast to each layer's dtype on the fly)."""

    # -- state dict keys: ...instructed_prefixes.banks.<adapter>.<tensor> <-> ...instructed_prefixes.banks.<tensor>
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state_dict.items() if f"{_MARKER}{adapter_name}." in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"{_MARKER}{adapter_name}.", _MARKER, 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            head, sep, tail = key.partition(_MARKER)
            out[f"{head}{_MARKER}{adapter_name}.{tail}" if sep else key] = value
        return out


if INSTRUCTED not in PEFT_TYPE_TO_TUNER_MAPPING:  # importing twice (e.g. a reload) registers once
    register_peft_method(name=PEFT_METHOD, config_cls=InstructEdConfig, model_cls=InstructEdModel)


# ----------------------------------------------------------------------------------------------
# The adapter files, for checkpoints written without a PeftModel (the trainer's)
# ----------------------------------------------------------------------------------------------
def adapter_tensors(bank: PrefixBank) -> dict[str, torch.Tensor]:
    """The bank's tensors under the keys ``PeftModel.save_pretrained`` writes."""
    return adapter_tensors_of(bank.state_dict())


def adapter_tensors_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`~.prefix.PrefixBank` state dict (``embeddings``, ``layer_ids``) under the adapter's keys."""
    return {_SAVED_KEY + k: v.detach().cpu().contiguous() for k, v in state.items()}


def bank_from_adapter(config: InstructEdConfig, tensors: Mapping[str, torch.Tensor],
                      device: str | torch.device = "cpu") -> PrefixBank:
    """A frozen :class:`~.prefix.PrefixBank` from an adapter's config and tensors.

    Raises:
        ValueError: the tensors do not fit the config (the caller words the error).
    """
    state = {k[len(_SAVED_KEY):]: v for k, v in tensors.items() if k.startswith(_SAVED_KEY)}
    emb, layer_ids = state.get("embeddings"), state.get("layer_ids")
    layers, prefix_len, hidden = config.prefix_layers, config.prefix_len, config.hidden_size
    if (not layers or hidden is None or emb is None or layer_ids is None or not emb.is_floating_point()
            or tuple(emb.shape) != (len(layers), prefix_len, hidden) or layer_ids.tolist() != list(layers)
            or set(state) != {"embeddings", "layer_ids"}):
        raise ValueError(f"tensors {sorted(tensors)} with embeddings of shape {None if emb is None else tuple(emb.shape)} "
                         f"for layers {None if layer_ids is None else layer_ids.tolist()} do not fit the config's "
                         f"{len(layers or [])} x {prefix_len} x {hidden} for layers {layers}")
    bank = PrefixBank(layers, prefix_len, hidden, device=device)
    bank.load_state_dict({k: v.to(device) for k, v in state.items()})
    bank.requires_grad_(False)
    return bank


def adapter_config_bytes(config: InstructEdConfig) -> bytes:
    """``adapter_config.json`` as ``PeftConfig.save_pretrained`` writes it."""
    data = config.to_dict()
    data = {k: (list(v) if isinstance(v, set) else v) for k, v in data.items()}
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def config_from_dict(data: Mapping[str, Any]) -> InstructEdConfig:
    """An :class:`InstructEdConfig` from ``adapter_config.json``'s contents (unknown keys are refused)."""
    known = {f.name for f in dataclasses.fields(InstructEdConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown}")
    return InstructEdConfig(**{k: v for k, v in data.items() if k != "peft_type"})
