"""Nothing saved is ever lost or silently wrong: SIGKILL during saves, and hostile files.

* A writer process saves an instruction memory, an InstructEd prefix checkpoint, an InstructEdit
  editor checkpoint with trainer state (what ``last/`` holds) and a ``durable.atomic_write_json``
  file over and over (each save a new, deterministic *generation*) and is killed with SIGKILL at
  random moments, many times. After every kill each artefact must load, and be bit-identical
  (tensors and trainer state) to either the last generation the writer reported as saved or the
  one it was writing -- never a mix and never an error. Both checkpoint kinds save through
  ``durable.commit_folder`` (staged files, one commit point); saves interrupted right before and
  right after that commit point are checked deterministically too.
* A pickle whose unpickling would create a marker file, put where a checkpoint or memory file is
  expected, is refused with a clear error and the marker is never created (the plugin reads
  safetensors and JSON only; a static check keeps every ``torch.load`` at ``weights_only=True``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from instructedit_plugin.core import durable
from instructedit_plugin.errors import HyperParamsError, PluginError
from instructedit_plugin.instructed import checkpoint as ckpt_mod
from instructedit_plugin.instructed.checkpoint import (
    BaseModelMismatchError,
    CheckpointError,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from instructedit_plugin.instructed.memory import InstructionMemory, MemoryFormatError
from instructedit_plugin.instructed.prefix import PrefixBank
from instructedit_plugin.instructedit import checkpoint as editor_ckpt

PACKAGE = Path(__file__).resolve().parents[1] / "instructedit_plugin"
DIM = 64
MODEL_CONFIG = {"model_type": "tiny-test", "hidden_size": 32, "num_hidden_layers": 4}
TEMPLATE = "Instructions: {instruction}\nInput: "
KILLS = 60
KINDS = ("memory", "checkpoint", "editor", "json")


# ----------------------------------------------------------------------------------------------
# Deterministic content of generation g
# ----------------------------------------------------------------------------------------------
def memory_content(g: int) -> tuple[list[str], torch.Tensor]:
    n = 40 + (g * 7) % 60  # sizes vary, so a mix of two generations could not even line up
    gen = torch.Generator().manual_seed(1000 + g)
    texts = [f"generation {g}: fact {i} \u2603 {'x' * ((g + i) % 13)}" for i in range(n)]
    return texts, torch.nn.functional.normalize(torch.randn(n, DIM, generator=gen), dim=1)


def make_memory(g: int) -> InstructionMemory:
    texts, emb = memory_content(g)
    memory = InstructionMemory(None)
    memory.add(texts, [{"generation": g, "i": i} for i in range(len(texts))], embeddings=emb)
    return memory


def make_bank(g: int) -> PrefixBank:
    torch.manual_seed(2000 + g)
    return PrefixBank([1, 2], 3 + g % 4, 32)


def save_memory_gen(folder: Path, g: int) -> None:
    make_memory(g).save(folder, info={"generation": g})


def save_checkpoint_gen(folder: Path, g: int) -> None:
    state = ({"optimizer.0.exp_avg": torch.full((g % 5 + 1, 8), float(g))}, {"step": g, "optimizer_class": "AdamW"})
    save_checkpoint(folder, make_bank(g), reweight_mode="paper", template=TEMPLATE, encoder="enc",
                    model_config=MODEL_CONFIG, training={"lr": 0.01, "generation": g}, info={"generation": g},
                    trainer_state=state if g % 2 else None)


def editor_content(g: int) -> tuple[dict, dict]:
    """An InstructEdit editor's tensors and an optimiser state dict (as ``last/`` saves them)."""
    gen = torch.Generator().manual_seed(3000 + g)
    state = {"hypernet.mlp.weight": torch.randn(8 + g % 9, 64, generator=gen),
             "hypernet.norm.u_mean": torch.randn(64, generator=gen), "edit_lrs": torch.full((2,), 1e-4 * (g + 1))}
    opt_state = {"state": {0: {"step": torch.tensor(float(g)), "exp_avg": torch.randn(g % 7 + 1, 64, generator=gen),
                               "exp_avg_sq": torch.rand(g % 7 + 1, 64, generator=gen)}},
                 "param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0], "generation": g}]}
    return state, opt_state


def save_editor_gen(folder: Path, g: int) -> None:
    """What ``InstructEditTrainer.save('last', ...)`` writes: the editor plus its trainer state."""
    state, opt_state = editor_content(g)
    extra = editor_ckpt.trainer_state_files(opt_state, {"step": g, "best_value": g / 7, "history": [{"step": g}]})
    meta = {"alg": "InstructEdit", "layers": [{"name": "h.0.mlp", "generation": g}], "hypernet": {"rank": 1 + g % 3},
            "base_model": {"fingerprint": "f" * 64, "model_type": "tiny-test", "name": "tiny"},
            "training_config": {"generation": g}, "step": g, "val_stats": {"loss_val": g / 3}}
    editor_ckpt.save_editor(folder, state, meta, extra_files=extra)


def json_content(g: int) -> dict:
    return {"generation": g, "payload": [g * 31 + i for i in range(50 + g % 200)], "text": "\u00e9\u4e2d" * (g % 50)}


#: where each kind lives under the writer's root (for counting interrupted saves)
FOLDERS = {"memory": "memory", "checkpoint": "checkpoint", "editor": "editor", "json": ".state.json"}

SAVERS = {
    "memory": lambda root, g: save_memory_gen(root / "memory", g),
    "checkpoint": lambda root, g: save_checkpoint_gen(root / "checkpoint", g),
    "editor": lambda root, g: save_editor_gen(root / "editor", g),
    "json": lambda root, g: durable.atomic_write_json(root / "state.json", json_content(g)),
}


def load_generation(root: Path, kind: str) -> int:
    """Load ``kind`` as a user would, check it is bit-identical to its generation; return that generation."""
    if kind == "memory":
        loaded = InstructionMemory.load(root / "memory")
        g = loaded.info["generation"]
        expected = make_memory(g)
        assert loaded.texts == expected.texts and loaded.ids == expected.ids and loaded.metadata == expected.metadata
        assert torch.equal(loaded.embeddings, expected.embeddings)
        return g
    if kind == "checkpoint":
        ckpt = load_checkpoint(root / "checkpoint")
        g = ckpt.config["info"]["generation"]
        assert ckpt.config["training"]["generation"] == g and ckpt.manifest["hparams"]["generation"] == g
        assert torch.equal(ckpt.bank.embeddings, make_bank(g).embeddings)
        has_state = "trainer_state.json" in ckpt.manifest["files"]
        assert has_state == bool(g % 2)
        if has_state:
            state = json.loads(ckpt_mod.core.read_file(ckpt.folder, ckpt.manifest, "trainer_state.json"))
            assert state["step"] == g
        return g
    if kind == "editor":
        tensors, meta = editor_ckpt.load_editor(root / "editor")
        g = meta["step"]
        state, opt_state = editor_content(g)
        assert meta["training_config"] == {"generation": g} and meta["layers"][0]["generation"] == g
        assert sorted(tensors) == sorted(state) and all(torch.equal(tensors[k], v) for k, v in state.items())
        loaded = editor_ckpt.load_trainer_state(root / "editor")  # what resuming from last/ reads
        assert loaded is not None
        opt, info = loaded
        assert info["step"] == g and info["best_value"] == g / 7 and info["history"] == [{"step": g}]
        assert opt["param_groups"] == opt_state["param_groups"]
        assert sorted(opt["state"]) == [0] and sorted(opt["state"][0]) == sorted(opt_state["state"][0])
        assert all(torch.equal(opt["state"][0][k], v) for k, v in opt_state["state"][0].items())
        return g
    data = json.loads((root / "state.json").read_text(encoding="utf-8"))
    assert data == json_content(data["generation"])
    return data["generation"]


def _writer(root: str, start: int, ack_path: str, first: int) -> None:
    """Child process: save generation after generation of every artefact (starting with kind number
    ``first``); report readiness, then each completed save, with one small O_APPEND write each
    (atomic, and in the file even when the process is killed right after)."""
    torch.set_num_threads(1)
    path = Path(root)
    kinds = KINDS[first:] + KINDS[:first]
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(ack, b"ready\n")
    g = start
    while True:
        for kind in kinds:
            SAVERS[kind](path, g)
            os.write(ack, f"{kind} {g}\n".encode())
        g += 1


def _wait_ready(ack_path: Path, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (ack_path.exists() and ack_path.stat().st_size):
        assert proc.is_alive(), f"the writer died while starting (exit code {proc.exitcode})"
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.001)


def _leftovers(root: Path) -> set[str]:
    """Traces of interrupted saves: temp files, staged files, a pending manifest."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith((".tmp", ".staged", ".next.json"))}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs POSIX fork and SIGKILL")
def test_sigkill_during_saves_never_loses_or_mixes_versions(tmp_path):
    for kind in KINDS:
        SAVERS[kind](tmp_path / "data", 0)
    acked = {kind: 0 for kind in KINDS}  # newest generation reported as completely saved
    loaded = {kind: 0 for kind in KINDS}
    rng = random.Random(1234)
    # Writers are forked from this process (torch already imported and warm: a start costs
    # milliseconds; a spawned interpreter would import torch again for every one of the kills).
    # They only touch single-threaded torch ops, safetensors and files, which are fork-safe; a
    # writer that never reports ready fails the test instead of hanging it.
    ctx = multiprocessing.get_context("fork")
    interrupted = 0
    half_done = {kind: 0 for kind in KINDS}  # kills that left this kind's save unfinished
    started = time.perf_counter()
    for round_ in range(KILLS):
        start = max(loaded.values()) + 1
        before = _leftovers(tmp_path / "data")
        ack_path = tmp_path / f"acks-{round_}.txt"
        proc = ctx.Process(target=_writer, args=(str(tmp_path / "data"), start, str(ack_path), round_ % len(KINDS)),
                           daemon=True)
        proc.start()
        _wait_ready(ack_path, proc)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL, f"the writer died on its own (exit code {proc.exitcode})"
        if ack_path.exists():
            for line in ack_path.read_text().splitlines()[1:]:  # after "ready"
                kind, g = line.split()
                acked[kind] = max(acked[kind], int(g))
        leftovers = _leftovers(tmp_path / "data")
        interrupted += bool(leftovers - before)
        for kind in KINDS:
            half_done[kind] += any(name.startswith(FOLDERS[kind]) for name in leftovers - before)
        for kind in KINDS:
            g = load_generation(tmp_path / "data", kind)
            # the last acknowledged save, or the one in flight (never older, never a mix)
            assert acked[kind] <= g <= max(acked[kind], loaded[kind], start - 1) + 1, (kind, g, acked, loaded)
            loaded[kind] = g
    elapsed = time.perf_counter() - started
    print(f"{KILLS} kills in {elapsed:.1f}s; generations reached {loaded}; {interrupted} kills left a save half-done "
          f"({half_done})")
    assert max(loaded.values()) > 0  # the writer did make progress
    assert interrupted > 0  # kills did land inside saves (temp/staged files, a pending manifest)
    assert half_done["checkpoint"] and half_done["editor"]  # ... of both multi-file checkpoint kinds
    # a later save completes an interrupted one and cleans up after it (a plain JSON file's stale
    # temp files are removed on request: another writer may be using its temp file)
    for kind in KINDS:
        SAVERS[kind](tmp_path / "data", 10_000)
        assert load_generation(tmp_path / "data", kind) == 10_000
    durable.remove_stale_temp_files(tmp_path / "data", "state.json")
    assert _leftovers(tmp_path / "data") == set()


PENDING = {"checkpoint": "manifest.next.json", "editor": "manifest.next.json"}


@pytest.mark.parametrize("kind", ["checkpoint", "editor"])
def test_committed_but_unfinished_save_loads_the_new_version(tmp_path, monkeypatch, kind):
    """Killed right after the commit point: the new version is complete and is what loads."""
    folder = tmp_path / kind
    SAVERS[kind](tmp_path, 1)
    real_finish = durable.finish_pending
    calls = {"n": 0}

    def crash_after_commit(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the call right after the pending manifest is written
            staged = sorted(Path(path).glob("*.staged"))
            os.replace(staged[0], Path(path) / staged[0].name[: -len(".staged")])  # one rename done
            raise KeyboardInterrupt("killed")
        return real_finish(path, *args, **kwargs)

    monkeypatch.setattr(durable, "finish_pending", crash_after_commit)
    with pytest.raises(KeyboardInterrupt):
        SAVERS[kind](tmp_path, 3)
    monkeypatch.setattr(durable, "finish_pending", real_finish)
    assert (folder / PENDING[kind]).is_file() and list(folder.glob("*.staged"))
    # the new version, trainer state included (read when resuming), bit-identical
    assert load_generation(tmp_path, kind) == 3
    SAVERS[kind](tmp_path, 4)  # finishes the pending renames first
    assert not (folder / PENDING[kind]).exists() and not list(folder.glob("*.staged"))
    assert load_generation(tmp_path, kind) == 4


@pytest.mark.parametrize("kind", ["checkpoint", "editor"])
def test_save_killed_before_the_commit_point_keeps_the_previous_version(tmp_path, monkeypatch, kind):
    folder = tmp_path / kind
    SAVERS[kind](tmp_path, 1)
    real = durable.atomic_write_bytes

    def die_on_commit(path, data):
        if Path(path).name == PENDING[kind]:
            raise KeyboardInterrupt("killed")
        return real(path, data)

    monkeypatch.setattr(durable, "atomic_write_bytes", die_on_commit)
    with pytest.raises(KeyboardInterrupt):
        SAVERS[kind](tmp_path, 5)
    monkeypatch.setattr(durable, "atomic_write_bytes", real)
    assert len(list(folder.glob("*.staged"))) >= 3  # new files written (trainer state too), not committed
    assert load_generation(tmp_path, kind) == 1
    SAVERS[kind](tmp_path, 6)  # the next save removes the uncommitted files
    assert load_generation(tmp_path, kind) == 6 and _leftovers(tmp_path) == set()


def test_a_pending_manifest_that_is_not_ours_is_set_aside(tmp_path):
    """A foreign ``*.next.json`` is never taken for a commit: a load refuses it, a save moves it aside."""
    SAVERS["editor"](tmp_path, 1)
    folder = tmp_path / "editor"
    (folder / PENDING["editor"]).write_text(json.dumps({"format": "something else", "format_version": 2, "files": {}}))
    with pytest.raises(HyperParamsError, match="not an InstructEdit editor"):
        editor_ckpt.load_editor(folder)  # a load reads the pending manifest and refuses it
    SAVERS["editor"](tmp_path, 2)
    assert (folder / (PENDING["editor"] + ".invalid")).is_file() and load_generation(tmp_path, "editor") == 2


def test_commit_folder_is_generic(tmp_path):
    """The helper on its own: hashes in the manifest, files it no longer lists removed, bad names refused."""
    folder = tmp_path / "f"
    hashes = durable.commit_folder(folder, {"a.bin": b"A", "b.txt": b"B"}, "index.json", {"kind": "test"})
    assert hashes == {"a.bin": durable.sha256_bytes(b"A"), "b.txt": durable.sha256_bytes(b"B")}
    manifest = json.loads(durable.manifest_path(folder, "index.json").read_text())
    assert manifest == {"kind": "test", "files": hashes}
    assert durable.read_verified(folder, "a.bin", hashes["a.bin"]) == b"A"
    durable.commit_folder(folder, {"a.bin": b"A2"}, "index.json", {"kind": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "index.json"]
    with pytest.raises(durable.DigestMismatchError):
        durable.read_verified(folder, "a.bin", hashes["a.bin"])
    with pytest.raises(FileNotFoundError):
        durable.read_verified(folder, "b.txt", hashes["b.txt"])
    for bad in ("../x", "index.json", "index.next.json", "x.staged", ".hidden"):
        with pytest.raises(ValueError):
            durable.commit_folder(folder, {bad: b""}, "index.json", {})
    assert durable.pending_manifest_name("editor_config.json") == "editor_config.next.json"


# ----------------------------------------------------------------------------------------------
# Hostile files: pickles are never loaded
# ----------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this creates ``path`` (what a malicious checkpoint would do with a shell command)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_bytes(marker: Path, kind: str, tmp_path: Path) -> bytes:
    if kind == "pickle":
        return pickle.dumps(_Evil(str(marker)))
    target = tmp_path / "evil.pt"
    torch.save({"embeddings": _Evil(str(marker))}, target)  # a torch zip file whose data.pkl runs code
    return target.read_bytes()


def _set_manifest_hash(manifest_path: Path, name: str, data: bytes) -> None:
    """What an attacker controlling the folder would do: make the manifest agree with the file."""
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    entry = files[name]
    if isinstance(entry, dict):
        entry["sha256"] = durable.sha256_bytes(data)
        entry["bytes"] = len(data)
    else:
        files[name] = durable.sha256_bytes(data)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_pickle_really_is_malicious(tmp_path):
    """Control: loading these bytes the unsafe way WOULD create the marker; torch's safe mode refuses them."""
    marker = tmp_path / "pwned"
    pickle.loads(_evil_bytes(marker, "pickle", tmp_path))
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_evil_bytes(marker, "torch", tmp_path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch"])
@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "adapter_config.json", "manifest.json",
                                    "trainer_state.safetensors"])
@pytest.mark.parametrize("forge_hash", [False, True])
def test_malicious_file_in_a_checkpoint_is_refused(tmp_path, kind, victim, forge_hash):
    folder = tmp_path / "ckpt"
    save_checkpoint_gen(folder, 1)  # odd generation: with trainer state
    marker = tmp_path / "pwned"
    data = _evil_bytes(marker, kind, tmp_path)
    (folder / victim).write_bytes(data)
    if forge_hash and victim != "manifest.json":
        _set_manifest_hash(folder / "manifest.json", victim, data)
    with pytest.raises(PluginError) as info:
        if victim == "trainer_state.safetensors":
            load_trainer_state(folder, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), None)
        else:
            load_checkpoint(folder)
    message = str(info.value)
    assert isinstance(info.value, CheckpointError), message
    assert victim in message or "manifest" in message, message
    assert "Fix:" in message or "re-save" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["prefixes.pt", "pytorch_model.bin", "model.pkl"])
def test_archive_pointing_at_a_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    evil = tmp_path / name
    evil.write_bytes(_evil_bytes(marker, "torch", tmp_path))
    for archive in (evil, tmp_path):  # the file itself, or a folder holding only it
        with pytest.raises(HyperParamsError, match=r"field 'archive'.*Fix: point it at the folder InstructEdTrainer wrote"):
            load_checkpoint(archive)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch"])
@pytest.mark.parametrize("victim", ["embeddings", "records", "manifest"])
@pytest.mark.parametrize("forge_hash", [False, True])
def test_malicious_file_in_a_memory_is_refused(tmp_path, kind, victim, forge_hash):
    folder = tmp_path / "mem"
    save_memory_gen(folder, 3)
    marker = tmp_path / "pwned"
    data = _evil_bytes(marker, kind, tmp_path)
    path = folder / "manifest.json" if victim == "manifest" else next(folder.glob(f"{victim}.*"))
    path.write_bytes(data)
    if forge_hash and victim != "manifest":
        _set_manifest_hash(folder / "manifest.json", path.name, data)
    with pytest.raises(MemoryFormatError) as info:
        InstructionMemory.load(folder)
    message = str(info.value)
    assert str(folder) in message and "Fix: restore" in message, message
    assert not marker.exists()


def test_prefixes_for_another_base_model_are_refused(tmp_path):
    folder = save_checkpoint(tmp_path, make_bank(1), reweight_mode="paper", template=TEMPLATE, encoder="enc",
                             model_config=MODEL_CONFIG)
    assert load_checkpoint(folder, model_config=dict(MODEL_CONFIG)).bank.prefix_len == make_bank(1).prefix_len
    other = dict(MODEL_CONFIG, model_type="other-model", hidden_size=48)
    with pytest.raises(BaseModelMismatchError) as info:
        load_checkpoint(folder, model_config=other)
    message = str(info.value)
    assert info.value.field == "archive" and "another base model" in message
    assert "'tiny-test'" in message and "'other-model'" in message and "Fix: set `model_name`" in message


def test_manifest_records_identity_hashes_and_hparams(tmp_path):
    from instructedit_plugin import __version__

    save_checkpoint_gen(tmp_path / "ckpt", 1)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["plugin_version"] == __version__
    assert manifest["base_model"] == {"fingerprint": ckpt_mod.model_fingerprint(MODEL_CONFIG), "model_type": "tiny-test",
                                      "name": None}
    assert manifest["hparams"] == {"lr": 0.01, "generation": 1}
    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "trainer_state.safetensors",
                                      "trainer_state.json"}
    for name, digest in manifest["files"].items():
        assert durable.sha256_bytes((tmp_path / "ckpt" / name).read_bytes()) == digest
    save_memory_gen(tmp_path / "mem", 2)
    mem_manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert mem_manifest["plugin_version"] == __version__ and mem_manifest["info"] == {"generation": 2}
    assert set(mem_manifest["files"]) == {"embeddings.safetensors", "records.jsonl"}
    for name, digest in mem_manifest["files"].items():
        assert durable.sha256_bytes((tmp_path / "mem" / name).read_bytes()) == digest


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True; nothing calls pickle.load(s) or uses dill/joblib."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(?<![\w.])torch\.load\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start():end]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(PACKAGE)}: {call[:80]}")
        for pattern in (r"\bpickle\.loads?\(", r"\bimport dill\b", r"\bjoblib\.load\(", r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"):
            offenders += [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / ".state.json.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".state.json.keep.me.tmp").write_bytes(b"other")  # not one of ours
    (tmp_path / "state.json").write_bytes(b"{}")
    assert durable.remove_stale_temp_files(tmp_path, "state.json") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.keep.me.tmp", "state.json"]
    shutil.rmtree(tmp_path / "nope", ignore_errors=True)
    assert durable.remove_stale_temp_files(tmp_path / "nope", "x") == 0
