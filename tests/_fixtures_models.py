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
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
