"""The sentence encoder run by ONNX Runtime (``encoder_backend: onnx``; #15 item 3's query cost).

InstructEd encodes every question (Eq. 15's *sim*, and the memory search) with a small sentence encoder.
On a CPU, PyTorch spends most of a one-question encoding in per-operator dispatch, not arithmetic: the
paper's all-MiniLM-L6-v2 takes 13-15 ms per question with one thread, 0.12x of a Gemma-3-270M forward.
ONNX Runtime runs the *same float32 weights and the same function* (tokenizer, transformer, pooling) as one
fused graph in 5-6 ms (0.05x); the vectors agree with sentence-transformers' within ~1e-7 (float rounding, the same
size as the batch-padding difference the encoder already documents). So this is a runtime, not another
encoder: the paper's encoder, executed differently.

:class:`OnnxSentenceModel` exports a loaded ``SentenceTransformer``'s transformer and pooling with
``torch.onnx.export`` (the dynamo exporter, in memory: nothing is written to disk, nothing is downloaded) and
runs it in an ``onnxruntime.InferenceSession`` on the CPU with as many threads as torch uses when it is built.
Supported stacks: ``Transformer`` -> ``Pooling`` (``mean`` or ``cls``, prompt included) -> optional
``Normalize``, i.e. every plain sentence-transformers text encoder; anything else is refused naming the module.

Needs the ``onnx`` extra: ``pip install 'instructedit-plugin[onnx]'`` (onnxruntime, onnx, onnxscript).
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import HyperParamsError

__all__ = ["ONNX_EXTRA", "OnnxSentenceModel", "check_onnx_available"]

LOG = logging.getLogger(__name__)
#: How to install what this backend needs.
ONNX_EXTRA = "pip install 'instructedit-plugin[onnx]' (onnxruntime, onnx, onnxscript)"
_FIELD = "encoder_backend"
_TORCH_FIX = "set encoder_backend: torch"
#: The tokenizer outputs an exported encoder may take (the first two it must).
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Pooling modes exported (``Pooling.pooling_mode``).
_POOLING = ("mean", "cls")


def check_onnx_available() -> None:
    """Raise :class:`HyperParamsError` (field ``encoder_backend``) unless onnxruntime, onnx and onnxscript import."""
    missing = []
    for module in ("onnxruntime", "onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise HyperParamsError(_FIELD, f"'onnx' needs {', '.join(missing)}, which is not installed",
                               f"{ONNX_EXTRA}, or {_TORCH_FIX}")


def _structure(model: Any) -> tuple[Any, str, bool]:
    """``(transformer module, pooling mode, ends in Normalize)`` of a ``SentenceTransformer``, or an error."""
    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if len(modules) not in (2, 3) or names[0] != "Transformer" or names[1] != "Pooling" or (
            len(modules) == 3 and names[2] != "Normalize"):
        raise HyperParamsError(_FIELD, f"'onnx' exports Transformer -> Pooling [-> Normalize] encoders; this one is "
                                       f"{' -> '.join(names)}", _TORCH_FIX)
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None)
    if mode not in _POOLING or not getattr(pooling, "include_prompt", True):
        raise HyperParamsError(_FIELD, f"'onnx' exports {' or '.join(_POOLING)} pooling (prompt included); this "
                                       f"encoder pools with {mode!r}", _TORCH_FIX)
    transformer = getattr(modules[0], "auto_model", None)
    if not isinstance(transformer, torch.nn.Module):
        raise HyperParamsError(_FIELD, "the encoder's Transformer module has no torch auto_model to export", _TORCH_FIX)
    return transformer, mode, len(modules) == 3


class _Pooled(torch.nn.Module):
    """The exported graph: the transformer's last hidden state pooled over the attention mask (float32)."""

    def __init__(self, transformer: torch.nn.Module, mode: str):
        super().__init__()
        self.transformer = transformer
        self.mode = mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.mode == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class OnnxSentenceModel:
    """One ``SentenceTransformer`` (float32, CPU) exported to ONNX and run by ONNX Runtime.

    :meth:`embed` gives what ``SentenceTransformer.encode(normalize_embeddings=False)`` gives (its own
    ``Normalize`` module applied when the stack has one), as a float32 CPU tensor.

    Raises:
        HyperParamsError: (field ``encoder_backend``) the extra is not installed, the model is not float32, or its
            module stack cannot be exported.
    """

    def __init__(self, model: Any, threads: int | None = None):
        check_onnx_available()
        transformer, self.mode, self.normalize = _structure(model)
        if any(p.dtype != torch.float32 for p in transformer.parameters()):
            raise HyperParamsError(_FIELD, "'onnx' runs the float32 weights", "set encoder_dtype: float32")
        self.tokenizer = model.tokenizer
        self.max_length = int(getattr(model, "max_seq_length", None) or 512)
        accepted = set(_forward_arguments(transformer))
        probe = self.tokenizer(["an onnx export probe", "a probe"], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        self.input_names = [k for k in _INPUTS if k in probe and k in accepted]
        if self.input_names[:2] != list(_INPUTS[:2]) or set(probe) - set(_INPUTS):
            raise HyperParamsError(_FIELD, f"'onnx' exports encoders fed {', '.join(_INPUTS)}; this tokenizer gives "
                                           f"{', '.join(sorted(probe))}", _TORCH_FIX)
        self.threads = int(threads or torch.get_num_threads())
        self.session = self._build_session(transformer, probe)

    def _build_session(self, transformer: torch.nn.Module, probe: Any) -> Any:
        import onnxruntime
        from torch.export import Dim

        # a private copy with the matmul/softmax attention: its ONNX graph runs ~10% faster than SDPA's decomposition
        # (5.1 vs 5.7 ms per question, one thread); the shared model keeps its own attention
        private = copy.deepcopy(transformer)
        if callable(getattr(private, "set_attn_implementation", None)):
            private.set_attn_implementation("eager")
        wrapper = _Pooled(private, self.mode).eval()
        batch, length = Dim("batch"), Dim("length", max=self.max_length)
        kwargs = {k: probe[k] for k in self.input_names}
        LOG.info("exporting the sentence encoder to ONNX (%s pooling, inputs %s)", self.mode, ", ".join(kwargs))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
                program = torch.onnx.export(
                    wrapper, (), kwargs=kwargs, input_names=list(self.input_names), output_names=["pooled_sentence"],
                    dynamic_shapes={k: {0: batch, 1: length} for k in kwargs}, dynamo=True, optimize=True,
                    verbose=False)
        except Exception as exc:  # noqa: BLE001 - an exporter failure names the model, not a torch internals trace
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise HyperParamsError(_FIELD, f"exporting this encoder to ONNX failed ({type(exc).__name__}: {first})",
                                   _TORCH_FIX) from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])

    def embed(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """Float32 CPU ``[len(texts), dim]``: pooled (and normalised where the stack normalises), in order."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="np")
            feeds = {k: batch[k].astype("int64") for k in self.input_names}
            chunks.append(torch.from_numpy(self.session.run(None, feeds)[0]))
        out = torch.cat(chunks).to(torch.float32)
        return torch.nn.functional.normalize(out, p=2.0, dim=1) if self.normalize else out


def _forward_arguments(module: torch.nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)
