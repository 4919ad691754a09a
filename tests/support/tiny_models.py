"""Tiny causal-LM configurations and cached, saved tiny test models.

The configs are small enough to train on two CPU cores in seconds while still
exercising each architecture's distinctive attention (GPT-2's fused c_attn,
LLaMA's grouped-query attention, Gemma 3's sliding-window/global layer mix and
query-key norms, Qwen2's biased q/k/v projections).

:func:`build_tiny_model_dir` turns a config into an ordinary Hugging Face model
folder (``config.json`` + ``model.safetensors`` + tokenizer files) that
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``
load offline. Folder names are neutral (``tiny-g2-<key>``, ``tiny-lm-<key>``,
``tiny-gm3-<key>``, ``tiny-qw2-<key>``): they never contain ``gpt`` or ``llama``,
so nothing in EasyEdit can special-case them by sniffing the model name, and the
plugin has to work from the loaded model's structure alone.

Attention implementation: the models are built with ``attn_implementation="sdpa"``,
which loads cleanly for all four architectures and is what a plain
``from_pretrained(path)`` picks in transformers 5 (the choice is not stored in
``config.json``). Building with the same implementation the loader defaults to
makes a reloaded folder reproduce the in-memory model's logits bit for bit
(eager differs by ~1e-7). Pass ``attn_implementation="eager"`` to
``from_pretrained`` when ``output_attentions`` is needed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from instructedit_plugin.models.cache import atomic_dir, cache_dir, content_key, read_json, write_json
from tests.support.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TOKENIZER_VOCAB_SIZE,
    load_tokenizer,
    tokenizer_dir,
    tokenizer_key,
)

logger = logging.getLogger(__name__)

TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "gemma3", "qwen2")


def tiny_config(arch: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PretrainedConfig:
    """Return a small randomly-initialisable config for ``arch`` (one of :data:`TINY_ARCHS`).

    Special-token ids follow the plugin tokenizer (pad=0, eos=1, bos=2).
    """
    ids = dict(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, **ids,
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16, **ids,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, **ids,
        )
    raise ValueError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")


#: Short, neutral codes used in folder names (no 'gpt' / 'llama' substrings).
ARCH_CODES: dict[str, str] = {"gpt2": "g2", "llama": "lm", "gemma3": "gm3", "qwen2": "qw2"}
#: Attention implementation the tiny models are built and saved with (see module docstring).
TINY_ATTN_IMPLEMENTATION = "sdpa"
#: Bump when the build recipe changes (invalidates every cached tiny folder).
TINY_BUILD_VERSION = 2
#: Language-model steps on the built-in corpus after random init. A randomly initialised
#: model has nearly flat logits that norm-heavy architectures (Gemma 3's sandwich norms)
#: cannot be edited away from; a briefly trained one behaves like a (very small) real LM.
TINY_PRETRAIN_STEPS = 300
TINY_PRETRAIN_BATCH = 16
TINY_PRETRAIN_LR = 3e-3
BUILD_INFO_FILE = "instructedit_build.json"

#: Number of tiny models actually built (not served from cache) in this process.
BUILD_COUNT = 0


def _check_arch(arch: str) -> None:
    if arch not in ARCH_CODES:
        raise ValueError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")


def _model_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = "float32"
    return config


def _config_fingerprint(config: PretrainedConfig) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return data


def tiny_model_key(arch: str, seed: int = 0, vocab_size: int = TOKENIZER_VOCAB_SIZE, root: Path | None = None) -> str:
    """Content key of the tiny model folder: hash of config + seed + tokenizer + recipe version."""
    _check_arch(arch)
    tokenizer = load_tokenizer(root, vocab_size)
    return _tiny_key(arch, seed, _model_config(arch, tokenizer), vocab_size)


def _tiny_key(arch: str, seed: int, config: PretrainedConfig, vocab_size: int) -> str:
    return content_key(
        {
            "build_version": TINY_BUILD_VERSION,
            "arch": arch,
            "seed": int(seed),
            "config": _config_fingerprint(config),
            "tokenizer": tokenizer_key(vocab_size),
            "attn_implementation": TINY_ATTN_IMPLEMENTATION,
            "pretrain": [TINY_PRETRAIN_STEPS, TINY_PRETRAIN_BATCH, TINY_PRETRAIN_LR],
        }
    )


def build_tiny_model(
    arch: str, seed: int = 0, root: Path | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the tiny ``arch`` model in memory (float32, eval mode) with its tokenizer.

    Initialisation is deterministic: weights come from ``torch.manual_seed(seed)``
    inside :func:`torch.random.fork_rng`, so the caller's global RNG state is not
    disturbed and the same ``(arch, seed)`` always gives the same weights.
    ``root`` is where the tokenizer is cached (default :func:`cache_dir`).
    """
    _check_arch(arch)
    tokenizer = load_tokenizer(root, vocab_size)
    config = _model_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=TINY_ATTN_IMPLEMENTATION, dtype=torch.float32
        )
    _pretrain(model, tokenizer, seed)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )
    return model, tokenizer


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    """Train ``model`` briefly on :func:`tokenizer_corpus` (deterministic, single thread)."""
    from tests.support.tokenizer import tokenizer_corpus

    if TINY_PRETRAIN_STEPS <= 0:
        return
    corpus = tokenizer_corpus()
    enc = tokenizer(corpus, return_tensors="pt", padding=True, truncation=True, max_length=48)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            generator = torch.Generator().manual_seed(seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_PRETRAIN_LR, weight_decay=0.0)
            model.train()
            for _ in range(TINY_PRETRAIN_STEPS):
                idx = torch.randint(0, len(corpus), (TINY_PRETRAIN_BATCH,), generator=generator)
                loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                             labels=labels[idx]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            logger.info("pretrained tiny %s for %d steps, final loss %.3f",
                        model.config.model_type, TINY_PRETRAIN_STEPS, loss.item())
    finally:
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)


def build_tiny_model_dir(arch: str, root: Path | None = None, seed: int = 0) -> Path:
    """Return a saved Hugging Face folder for the tiny ``arch`` model, building it if needed.

    The folder ``<root>/tiny-<code>-<key>`` (``root`` defaults to :func:`cache_dir`)
    holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files and ``instructedit_build.json``. ``<key>`` hashes the config,
    the seed, the tokenizer (corpus version and digest) and the recipe version; a
    folder whose build record carries the same key is reused as is. Building
    publishes atomically (see :func:`~instructedit_plugin.models.cache.atomic_dir`).
    """
    global BUILD_COUNT
    _check_arch(arch)
    root = Path(root) if root is not None else cache_dir()
    tokenizer = load_tokenizer(root)
    config = _model_config(arch, tokenizer)
    key = _tiny_key(arch, seed, config, TOKENIZER_VOCAB_SIZE)
    target = root / f"tiny-{ARCH_CODES[arch]}-{key}"
    info = read_json(target / BUILD_INFO_FILE)
    if (
        info is not None
        and info.get("key") == key
        and (target / "config.json").is_file()
        and (target / "model.safetensors").is_file()
    ):
        logger.debug("reusing tiny %s model at %s", arch, target)
        return target

    logger.info("building tiny %s model (seed %d) into %s", arch, seed, target)
    model, tokenizer = build_tiny_model(arch, seed=seed, root=root)
    with atomic_dir(target) as tmp:
        _save_tiny_model(model, tokenizer, tmp)
        write_json(
            tmp / BUILD_INFO_FILE,
            {
                "key": key,
                "arch": arch,
                "seed": int(seed),
                "tokenizer_dir": tokenizer_dir(root).name,
                "build_version": TINY_BUILD_VERSION,
                "attn_implementation": TINY_ATTN_IMPLEMENTATION,
                "num_parameters": sum(p.numel() for p in model.parameters()),
            },
        )
    BUILD_COUNT += 1
    return target


def _save_tiny_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
