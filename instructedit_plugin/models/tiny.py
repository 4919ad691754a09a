"""Tiny causal-LM configurations for tests.

The configs are small enough to train on two CPU cores in seconds while still
exercising each architecture's distinctive attention (GPT-2's fused c_attn,
LLaMA's grouped-query attention, Gemma 3's sliding-window/global layer mix and
query-key norms, Qwen2's biased q/k/v projections).
"""
from __future__ import annotations

from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config

TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "gemma3", "qwen2")


def tiny_config(arch: str, vocab_size: int = 512) -> PretrainedConfig:
    """Return a small randomly-initialisable config for ``arch`` (one of :data:`TINY_ARCHS`)."""
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")
