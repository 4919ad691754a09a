"""Fixtures for tiny test models and the embedded LM.

All fixtures are session-scoped and return :class:`pathlib.Path` objects to
ordinary Hugging Face folders (load them with ``AutoModelForCausalLM`` /
``AutoTokenizer``; everything is offline).

* ``models_cache_root``: where the tiny models are built: ``$INSTRUCTEDIT_CACHE``
  when set (so repeated runs reuse them), else a fresh per-session temp folder.
* ``tiny_gpt2_dir``, ``tiny_llama_dir``, ``tiny_gemma3_dir``, ``tiny_qwen2_dir``:
  tiny randomly initialised models (seed 0) with the plugin's BPE tokenizer.
  Folder names are neutral (``tiny-g2-*``, ``tiny-lm-*``, ...), never containing
  ``gpt`` or ``llama``.
* ``embedded_model_dir``: the converted Gemma 3 270M folder, cached in
  ``$INSTRUCTEDIT_CACHE`` or ``~/.cache/instructedit_plugin`` (first build ~1 min).
* ``single_torch_thread`` (module scope): one torch thread while a module's tests run, whatever
  ``INSTRUCTEDIT_TEST_THREADS`` says (tests that compare two computation paths to a tolerance:
  ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from instructedit_plugin.models import embedded as _embedded
from instructedit_plugin.models.cache import CACHE_ENV_VAR
from tests.support.tiny_models import build_tiny_model_dir

__all__ = [
    "models_cache_root",
    "tiny_gpt2_dir",
    "tiny_llama_dir",
    "tiny_gemma3_dir",
    "tiny_qwen2_dir",
    "embedded_model_dir",
    "single_torch_thread",
]


@pytest.fixture(scope="session")
def models_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        root = Path(env).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(models_cache_root: Path) -> Path:
    return build_tiny_model_dir("gpt2", root=models_cache_root)


@pytest.fixture(scope="session")
def tiny_llama_dir(models_cache_root: Path) -> Path:
    return build_tiny_model_dir("llama", root=models_cache_root)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(models_cache_root: Path) -> Path:
    return build_tiny_model_dir("gemma3", root=models_cache_root)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(models_cache_root: Path) -> Path:
    return build_tiny_model_dir("qwen2", root=models_cache_root)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return _embedded.embedded_model_dir()


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for the module (the tiny models gain nothing from intra-op threads), then the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
