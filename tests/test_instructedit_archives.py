"""InstructEdit archives: EasyEdit's trainer path, manifests, identity checks, safe loading.

* EasyEdit's ``EditTrainer`` (``ALG_TRAIN_DICT['INSTRUCTEDIT']``) saves a ``torch.save`` archive;
  the plugin also writes a safetensors checkpoint folder next to it, and ``load_editor`` converts
  the archive itself (read with ``weights_only=True`` only). Both give identical edits through
  ``BaseEditor``, on the PyPI flavour and on EasyEdit main (``EASYEDIT_SRC``), each in a subprocess.
* A crafted pickle given as ``archive`` is refused and its payload never runs.
* ``manifest.json`` holds the sha256 of every file, the plugin version, the base model's
  identity and the hparams; a tampered file or an editor of another base model is refused.
* Resuming (``resume: true``) from a ``last/`` folder that fails verification is an error naming
  the folder and the fix, never a silent fresh start; without a ``last/`` training starts fresh.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import instructedit_plugin
from instructedit_plugin.errors import HyperParamsError
from instructedit_plugin.instructedit import (
    InstructEditHyperParams,
    InstructEditModel,
    InstructEditTrainer,
    apply_to_model,
    load_editor,
    load_editor_for,
    make_datasets,
    save_editor,
)
from instructedit_plugin.instructedit.checkpoint import (
    CONFIG_FILE,
    EDITOR_FILE,
    META_KEY,
    easyedit_export_dir,
)
from instructedit_plugin.instructedit.editable import edit_step_stats
from instructedit_plugin.instructedit.trainer import run_dir
from instructedit_plugin.instructedit.instructedit_hparams import config_dict
from instructedit_plugin.models.loading import load_causal_lm

from .test_instructedit_editing import EDIT_YAML, synthetic_tasks, training_config

REPO = Path(__file__).resolve().parents[1]
EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")

pytestmark = pytest.mark.slow


def edit_hparams(model_dir: Path, archive) -> InstructEditHyperParams:
    hp = InstructEditHyperParams.from_hparams(EDIT_YAML)
    hp.model_name = str(model_dir)
    hp.archive = str(archive)
    return hp


# ------------------------------------------------------------------ EasyEdit's trainer path
def easyedit_round_trip(model_dir: str, results_dir: str) -> dict:
    """Train a few steps with EasyEdit's EditTrainer, then edit through BaseEditor with the
    archive and with the exported folder. Runs in a subprocess per flavour; returns JSON-able facts."""
    torch.set_num_threads(1)
    info = instructedit_plugin.register()
    from easyeditor import BaseEditor, EditTrainer

    model_dir, results_dir = Path(model_dir), Path(results_dir)
    _, tok = load_causal_lm(model_dir)
    cfg = training_config(model_dir, results_dir, max_iters=12, val_interval=5, val_steps=2, log_interval=5)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    trainer = EditTrainer(config=cfg, train_set=train_set, val_set=val_set)
    trainer.run()
    archive = Path(trainer.save_path)
    export = easyedit_export_dir(archive)
    out: dict = {"flavour": info.flavour, "archive_is_file": archive.is_file(),
                 "export_files": sorted(p.name for p in export.iterdir()) if export.is_dir() else []}

    raw = torch.load(archive, map_location="cpu", weights_only=True)  # EasyEdit's own torch.save archive
    out["archive_has_meta"] = META_KEY in raw["model"]
    t_archive, m_archive = load_editor(archive)
    t_export, m_export = load_editor(export)
    out["same_tensors"] = (sorted(t_archive) == sorted(t_export)
                           and all(torch.equal(t_archive[k], t_export[k]) for k in t_archive))
    out["step"] = [raw["step"], m_export["step"], m_archive["step"]]
    out["same_base_model"] = m_archive["base_model"] == m_export["base_model"]
    files = m_export["files"]
    out["hashes_ok"] = sorted(files) == [EDITOR_FILE] and all(
        hashlib.sha256((export / name).read_bytes()).hexdigest() == digest for name, digest in files.items())

    requests = synthetic_tasks()["counterfact"][:3]
    editor = BaseEditor.from_hparams(edit_hparams(model_dir, archive))
    kwargs = {"keep_original_weight": True} if info.flavour == "pypi" else {"sequential_edit": False}
    params = dict(editor.model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    results = {}
    for name, path in (("archive", archive), ("export", export)):
        editor.hparams.archive = str(path)
        metrics, _, _ = editor.edit(prompts=[r["prompt"] for r in requests],
                                    target_new=[r["target_new"] for r in requests],
                                    ground_truth=[r["ground_truth"] for r in requests],
                                    rephrase_prompts=[r["rephrase_prompt"] for r in requests], verbose=False, **kwargs)
        _, original = apply_to_model(editor.model, editor.tok, requests[:1], editor.hparams, return_orig_weights=True)
        new = {k: params[k].detach().clone() for k in original}
        with torch.no_grad():
            for k, v in original.items():
                params[k].copy_(v)
        results[name] = {"post": [m["post"]["rewrite_acc"] for m in metrics],
                         "rephrase": [m["post"].get("rephrase_acc") for m in metrics], "new": new}
    out["edited"] = sorted(results["archive"]["new"])
    out["weights_changed"] = all(not torch.equal(v, before[k]) for k, v in results["archive"]["new"].items())
    out["same_weights"] = all(torch.equal(v, results["export"]["new"][k]) for k, v in results["archive"]["new"].items())
    out["same_metrics"] = json.dumps([results["archive"]["post"], results["archive"]["rephrase"]], default=str) == \
        json.dumps([results["export"]["post"], results["export"]["rephrase"]], default=str)
    out["restored"] = all(torch.equal(v, before[k]) for k, v in params.items())
    return out


ROUND_TRIP = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    from tests.test_instructedit_archives import easyedit_round_trip
    print("RESULT " + json.dumps(easyedit_round_trip({model!r}, {results!r})))
    """
)


@pytest.mark.parametrize("flavour", ["pypi", pytest.param("main", marks=pytest.mark.easyedit_main)])
def test_easyedit_trainer_archive_and_its_export_give_identical_edits(flavour, tiny_gpt2_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EASYEDIT_SRC"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if flavour == "main":
        if not EASYEDIT_SRC:
            pytest.skip("EASYEDIT_SRC is not set: no clone of EasyEdit main to test against")
        env["EASYEDIT_SRC"] = EASYEDIT_SRC
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP.format(repo=str(REPO), model=str(tiny_gpt2_dir),
                                                                   results=str(tmp_path))],
                          capture_output=True, text=True, env=env, timeout=900, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["flavour"] == flavour
    assert out["archive_is_file"] and out["archive_has_meta"]
    assert {EDITOR_FILE, CONFIG_FILE} <= set(out["export_files"])
    assert out["same_tensors"] and out["same_base_model"] and out["hashes_ok"]
    assert out["step"][0] == out["step"][1] == out["step"][2]
    assert len(out["edited"]) == 4 and out["weights_changed"]
    assert out["same_weights"] and out["same_metrics"]
    assert out["restored"]


# ------------------------------------------------------------------------- unsafe archives
class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_given_as_archive_is_refused_and_never_runs(tiny_gpt2_dir, tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()  # the payload is live under ordinary unpickling

    marker = tmp_path / "marker"
    plain = tmp_path / "evil.pk"
    plain.write_bytes(pickle.dumps({"model": {META_KEY: _Payload(marker), "edit_lrs": torch.ones(2)}}))
    zipped = tmp_path / "evil-torch.pt"
    torch.save({"model": {META_KEY: _Payload(marker), "edit_lrs": torch.ones(2)}, "step": 1}, zipped)
    model, tok = load_causal_lm(tiny_gpt2_dir)
    request = synthetic_tasks()["counterfact"][0]
    for path in (plain, zipped):
        with pytest.raises(HyperParamsError, match="weights_only=True") as info:
            load_editor(path)
        assert info.value.field == "archive"
        assert "never unpickles" in str(info.value) and "Fix:" in str(info.value)
        hp = edit_hparams(tiny_gpt2_dir, path)
        hp.check_ready()  # the file exists; it is only refused when read
        with pytest.raises(HyperParamsError, match="weights_only=True"):
            apply_to_model(model, tok, [request], hp)
        assert not marker.exists()

    # a safe archive of something else (e.g. another algorithm's state dict) is refused clearly too
    other = tmp_path / "mend.pk"
    torch.save({"model": {"mend.w": torch.zeros(2)}, "opt": {}}, other)
    with pytest.raises(HyperParamsError, match="not an InstructEdit archive") as info:
        load_editor(other)
    assert info.value.field == "archive"


# --------------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def trained_tiny(tiny_gpt2_dir, tmp_path_factory):
    """Two steps of the plugin's trainer on the tiny GPT-2: best/ and last/ folders."""
    torch.set_num_threads(1)
    results = tmp_path_factory.mktemp("results")
    _, tok = load_causal_lm(tiny_gpt2_dir)
    cfg = training_config(tiny_gpt2_dir, results, max_iters=2, val_interval=2, val_steps=1, progress=False)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    result = InstructEditTrainer(cfg, train_set, val_set).run()
    return {"cfg": cfg, "best": Path(result["best_checkpoint"]), "last": Path(result["last_checkpoint"])}


def test_manifest_holds_file_hashes_plugin_version_base_model_and_hparams(trained_tiny, tiny_gpt2_dir):
    from transformers import AutoConfig

    from instructedit_plugin.instructed.checkpoint import model_fingerprint

    for which in ("best", "last"):
        folder = trained_tiny[which]
        meta = json.loads((folder / CONFIG_FILE).read_text())
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != CONFIG_FILE)
        assert sorted(meta["files"]) == on_disk
        if which == "last":
            assert {"trainer_state.safetensors", "trainer_state.json"} <= set(on_disk)
        for name, digest in meta["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        assert meta["format"] == "instructedit_plugin/InstructEdit-editor" and meta["format_version"] == 3
        assert meta["plugin_version"] == instructedit_plugin.__version__
        assert meta["base_model"]["fingerprint"] == model_fingerprint(AutoConfig.from_pretrained(tiny_gpt2_dir))
        assert meta["base_model"]["model_type"] == "gpt2"
        assert meta["hparams"] == config_dict(trained_tiny["cfg"])  # the core manifest's name for them
        assert meta["hparams"]["inner_params"] == list(trained_tiny["cfg"].inner_params)
        assert meta["step"] == 2 and meta["layers"] and meta["hypernet"]["rank"] == trained_tiny["cfg"].rank


def _other_gpt2(model_dir: Path):
    """The tiny GPT-2's architecture with twice the heads: every weight has the same shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.n_head = config.n_head * 2
    return AutoModelForCausalLM.from_config(config)


def test_an_editor_for_another_base_model_is_refused_naming_archive(trained_tiny, tiny_gpt2_dir, tiny_llama_dir):
    best = trained_tiny["best"]
    same_shapes = _other_gpt2(tiny_gpt2_dir)
    with pytest.raises(HyperParamsError, match="trained for another base model") as info:
        load_editor_for(same_shapes, best)
    assert info.value.field == "archive"
    assert "point archive at an editor trained for this model" in info.value.fix

    # through EasyEdit: a LLaMA-family folder (the GPT-2 layer names do not even exist there)
    instructedit_plugin.register()
    from easyeditor import BaseEditor

    editor = BaseEditor.from_hparams(edit_hparams(tiny_llama_dir, best))
    with pytest.raises(HyperParamsError, match="model_type 'gpt2'.*model_type 'llama'") as info:
        editor.edit(prompts=["The capital of France is"], target_new=["Rome"], ground_truth=["Paris"], verbose=False)
    assert info.value.field == "archive"

    # resuming EasyEdit-style from a state dict of another model is refused the same way
    cfg = trained_tiny["cfg"]
    wrapper = InstructEditModel(load_causal_lm(tiny_gpt2_dir)[0], cfg)
    state = wrapper.archive_state_dict()
    assert META_KEY not in wrapper.state_dict()  # only EasyEdit's archives carry the manifest entry
    with pytest.raises(HyperParamsError, match="another base model"):
        InstructEditModel(same_shapes, cfg).load_state_dict(state)


@pytest.mark.parametrize("damage", ["tensor_bytes", "manifest_base_model_removed", "manifest_hash_removed"])
def test_a_tampered_checkpoint_is_refused(trained_tiny, tiny_gpt2_dir, tmp_path, damage):
    folder = tmp_path / "ckpt"
    shutil.copytree(trained_tiny["best"], folder)
    load_editor(folder)  # intact
    if damage == "tensor_bytes":
        data = bytearray((folder / EDITOR_FILE).read_bytes())
        data[-5] ^= 0x01  # a tensor value changes; the file is still valid safetensors
        (folder / EDITOR_FILE).write_bytes(bytes(data))
        message = "does not match the sha256"
    else:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        if damage == "manifest_base_model_removed":
            del meta["base_model"]
            message = "base_model"
        else:
            del meta["files"][EDITOR_FILE]
            message = "no sha256"
        (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(HyperParamsError, match=message) as info:
        load_editor(folder)
    assert info.value.field == "archive"
    model, tok = load_causal_lm(tiny_gpt2_dir)
    with pytest.raises(HyperParamsError, match=message):
        apply_to_model(model, tok, [synthetic_tasks()["counterfact"][0]], edit_hparams(tiny_gpt2_dir, folder))


def test_resaving_a_loaded_checkpoint_keeps_edits_identical(trained_tiny, tiny_gpt2_dir, tmp_path):
    tensors, meta = load_editor(trained_tiny["best"])
    save_editor(tmp_path / "copy", tensors, meta)
    model, tok = load_causal_lm(tiny_gpt2_dir)
    request = synthetic_tasks()["recent"][0]
    new = []
    for folder in (trained_tiny["best"], tmp_path / "copy"):
        _, original = apply_to_model(model, tok, [request], edit_hparams(tiny_gpt2_dir, folder), return_orig_weights=True)
        params = dict(model.named_parameters())
        new.append({k: params[k].detach().clone() for k in original})
        with torch.no_grad():
            for k, v in original.items():
                params[k].copy_(v)
    assert all(torch.equal(v, new[1][k]) for k, v in new[0].items())


def test_format_1_checkpoints_still_load(trained_tiny, tiny_gpt2_dir, tmp_path, caplog):
    folder = tmp_path / "v1"
    folder.mkdir()
    blob = (trained_tiny["best"] / EDITOR_FILE).read_bytes()
    (folder / EDITOR_FILE).write_bytes(blob)
    meta = json.loads((trained_tiny["best"] / CONFIG_FILE).read_text())
    legacy = {"alg": "InstructEdit", "layers": meta["layers"], "hypernet": meta["hypernet"], "format_version": 1,
              "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / CONFIG_FILE).write_text(json.dumps(legacy))
    model, _ = load_causal_lm(tiny_gpt2_dir)
    with caplog.at_level("WARNING"):
        editor = load_editor_for(model, folder)
    assert "cannot be verified" in caplog.text
    assert [s.name for s in editor.specs] == [layer["name"] for layer in meta["layers"]]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # still a valid file of its kind, with other contents
    path.write_bytes(bytes(data))


def _damage_last(folder: Path, damage: str) -> str:
    """Damage a copy of a ``last/`` folder; returns what the refusal must say."""
    if damage in ("editor_bytes", "trainer_state_bytes"):
        _flip_last_byte(folder / (EDITOR_FILE if damage == "editor_bytes" else "trainer_state.safetensors"))
        return "does not match the sha256"
    if damage == "manifest_unreadable":
        (folder / CONFIG_FILE).write_text("{ truncated")
        return "not readable JSON"
    if damage == "manifest_missing":
        (folder / CONFIG_FILE).unlink()
        return "no InstructEdit checkpoint"
    if damage == "trainer_state_unlisted":
        meta = json.loads((folder / CONFIG_FILE).read_text())
        del meta["files"]["trainer_state.json"]
        (folder / CONFIG_FILE).write_text(json.dumps(meta))
        return "no trainer state"
    assert damage == "trainer_state_unreadable"
    (folder / "trainer_state.json").unlink()
    (folder / "trainer_state.json").mkdir()  # unreadable, even for root
    return "not readable"


@pytest.mark.parametrize("damage", ["editor_bytes", "trainer_state_bytes", "manifest_unreadable", "manifest_missing",
                                    "trainer_state_unlisted", "trainer_state_unreadable"])
def test_resume_from_a_last_checkpoint_that_fails_verification_is_refused(trained_tiny, tmp_path, damage):
    cfg = dataclasses.replace(trained_tiny["cfg"], results_dir=str(tmp_path), resume=True)
    last = run_dir(cfg) / "last"
    shutil.copytree(trained_tiny["last"], last)
    problem = _damage_last(last, damage)
    with pytest.raises(HyperParamsError) as info:
        InstructEditTrainer(cfg, None, None)
    error = info.value
    assert error.field == "resume", str(error)
    assert f"cannot resume from {last}" in error.problem and problem in error.problem, str(error)
    assert f"delete {last}" in error.fix and "restore it" in error.fix, str(error)
    # following the fix: without last/ training starts fresh
    shutil.rmtree(last)
    assert InstructEditTrainer(cfg, None, None).step == 0


def test_resume_uses_an_intact_last_checkpoint_and_starts_fresh_without_one(trained_tiny, tmp_path):
    cfg = dataclasses.replace(trained_tiny["cfg"], results_dir=str(tmp_path), resume=True)
    last = run_dir(cfg) / "last"
    assert InstructEditTrainer(cfg, None, None).step == 0  # no last/ at all
    last.mkdir(parents=True)
    (last / "editor.safetensors.staged").write_bytes(b"a first save killed before its commit point")
    assert InstructEditTrainer(cfg, None, None).step == 0  # nothing was ever committed there
    shutil.rmtree(last)
    shutil.copytree(trained_tiny["last"], last)
    resumed = InstructEditTrainer(cfg, None, None)
    tensors, _ = load_editor(trained_tiny["last"])
    assert resumed.step == 2 and resumed.opt.state_dict()["state"]
    assert all(torch.equal(resumed.editor.state_dict()[k], v) for k, v in tensors.items())


def test_edit_step_stats_helper():
    one = torch.tensor(1.0)
    stats = edit_step_stats(one * 3, {"nll": one, "acc": one / 2}, one / 10, {"acc": one / 4},
                            torch.zeros(0, dtype=torch.bool), {"edit/loss_pre": 7.0})
    assert stats == pytest.approx({"loss/edit": 1.0, "loss/loc": 0.1, "loss/total_edit": 3.0, "edit/acc": 0.25,
                                   "outer/acc": 0.5, "loc/acc": 1.0, "edit/loss_pre": 7.0})
    assert edit_step_stats(one, {"nll": one, "acc": one}, one, {"acc": one},
                           torch.tensor([True, False]), {})["loc/acc"] == 0.5


def test_the_time_cap_saves_last_and_a_resumed_run_equals_an_uncapped_one(tiny_gpt2_dir, tmp_path):
    """``max_seconds`` (the shared loop's safety cap) stops after the step it expires in and saves
    ``last`` there without validating; ``resume: true`` then finishes exactly the uncapped run."""
    torch.set_num_threads(1)
    _, tok = load_causal_lm(tiny_gpt2_dir)
    cfg = training_config(tiny_gpt2_dir, tmp_path / "full", max_iters=3, val_interval=3, val_steps=1, progress=False)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    full = InstructEditTrainer(cfg, train_set, val_set).run()
    capped_cfg = dataclasses.replace(cfg, results_dir=str(tmp_path / "capped"), max_seconds=0.0)
    capped = InstructEditTrainer(capped_cfg, train_set, val_set).run()
    assert capped["stopped_by_budget"] and capped["steps"] == 1 and capped["best_step"] is None
    assert not Path(capped["best_checkpoint"]).exists()
    assert load_editor(capped["last_checkpoint"])[1]["step"] == 1
    resumed = InstructEditTrainer(dataclasses.replace(capped_cfg, max_seconds=None, resume=True), train_set, val_set).run()
    assert resumed["steps"] == 3 and not resumed["stopped_by_budget"] and resumed["best_value"] == full["best_value"]
    a, b = load_editor(full["last_checkpoint"])[0], load_editor(resumed["last_checkpoint"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = InstructEditTrainer(dataclasses.replace(cfg, results_dir=str(tmp_path / "fresh")), None, None)
    assert any(not torch.equal(initial.editor.state_dict()[k], a[k]) for k in a)  # it trained
