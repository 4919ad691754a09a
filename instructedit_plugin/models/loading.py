"""Load any local Hugging Face causal-LM folder the way the editors expect it.

EasyEdit picks model and tokenizer classes by sniffing the model *name* for
'gpt', 'llama', 'qwen'..., so a folder called ``gemma-3-270m`` or
``my-finetune`` is refused. The plugin loads local folders itself with the Auto
classes and hands EasyEdit the ready ``(model, tokenizer)`` pair.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

LOG = logging.getLogger(__name__)

#: EasyEdit algorithms that locate the subject token with right padding.
RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE", "PMET"})

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def is_local_model_dir(name_or_path: object) -> bool:
    """True for a folder holding a Hugging Face ``config.json``."""
    return isinstance(name_or_path, (str, os.PathLike)) and (Path(name_or_path) / "config.json").is_file()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(_DTYPES)}") from None


def prepare_tokenizer(tok: PreTrainedTokenizerBase, alg_name: str | None = None) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token and the padding side EasyEdit's metrics assume."""
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; add one before editing")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if alg_name in RIGHT_PADDING_ALGS else "left"
    return tok


def load_causal_lm(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    alg_name: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder (never from a hub)."""
    path = str(path)
    kwargs = {"local_files_only": True}
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    LOG.info("loading causal LM from %s", path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, prepare_tokenizer(tok, alg_name)
