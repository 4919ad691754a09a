"""One checkpoint format under both methods (``core/checkpoint.py``), and old checkpoints still load.

* Folders written by the code before the shared core (commit 56905b9, ``tests/fixtures/old_checkpoints``:
  InstructEd format 1 and InstructEdit format 2, each with trainer state in its own optimiser layout)
  load to tensors identical to what was saved, give model outputs identical to those of the saved
  tensors, and resume the optimiser exactly; re-saved with today's code they load to the same outputs.
* Both methods now write the same manifest (core fields) and the same trainer-state layout.
* One error type: a damaged checkpoint of either method is a ``CheckpointError``, which is a
  ``HyperParamsError`` naming the field (code catching either keeps working).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from instructedit_plugin.core import checkpoint as core
from instructedit_plugin.errors import HyperParamsError, PluginError
from instructedit_plugin.instructed import checkpoint as ied
from instructedit_plugin.instructedit import checkpoint as ie
from instructedit_plugin.models.loading import load_causal_lm

from .fixtures.make_old_checkpoints import instructed_content, instructedit_content

OLD = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"
CORE_KEYS = {"format", "format_version", "plugin_version", "base_model", "hparams", "files"}


class _Encoder:
    """A deterministic stand-in for the sentence encoder (``cosine`` is all InstructedLM calls)."""

    identity = "stub"

    def cosine(self, a, b):
        return torch.tensor([0.25 + 0.5 * (len(x) % 2) for x in a])


def _instructed_logits(model, tok, bank) -> torch.Tensor:
    from instructedit_plugin.instructed.lm import InstructedLM

    lm = InstructedLM(model, tok, bank, encoder=_Encoder())
    enc = tok(["Alice lives in", "The capital of Peru is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm(**enc, instructions=["Alice lives in Oslo.", "Lima is the capital of Peru."]).logits


def _same_optimizer_state(a: dict, b: dict) -> None:
    assert sorted(a["state"]) == sorted(b["state"])
    for idx, entry in a["state"].items():
        assert sorted(entry) == sorted(b["state"][idx])
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key])), (idx, key)
    assert json.loads(json.dumps(a["param_groups"])) == json.loads(json.dumps(b["param_groups"]))


# ----------------------------------------------------------------------------------------------
# InstructEd, format 1 (prefixes.safetensors + instructed_config.json, optimizer.<idx>.<key>)
# ----------------------------------------------------------------------------------------------
def test_old_instructed_checkpoint_loads_to_identical_prefixes_outputs_and_optimizer(tiny_gpt2_dir, tmp_path):
    model, tok = load_causal_lm(tiny_gpt2_dir)
    tok.padding_side = "left"
    bank, opt = instructed_content(model)
    ckpt = ied.load_checkpoint(OLD / "instructed_v1", model_config=model.config)  # base model verified too
    assert ckpt.manifest["format_version"] == 1 and ckpt.config["training"] == {"prefix_len": 3, "lr": 1e-3}
    assert ckpt.mode == "paper" and ckpt.config["encoder"] == "fixture-encoder"
    assert list(ckpt.bank.layers) == [1] and torch.equal(ckpt.bank.embeddings, bank.embeddings.detach())
    expected = _instructed_logits(model, tok, bank)
    assert torch.equal(_instructed_logits(model, tok, ckpt.bank), expected)
    # the prefixes matter: without them the outputs differ
    zero = ied.load_checkpoint(OLD / "instructed_v1").bank
    with torch.no_grad():
        zero.embeddings.zero_()
    assert not torch.equal(_instructed_logits(model, tok, zero), expected)
    # the old optimiser layout resumes exactly
    fresh = torch.nn.Parameter(torch.zeros_like(bank.embeddings))
    resumed = torch.optim.AdamW([fresh], lr=1e-3)
    info = ied.load_trainer_state(OLD / "instructed_v1", resumed, None)
    assert info["step"] == 7 and info["best"] == 1.25
    _same_optimizer_state(resumed.state_dict(), opt.state_dict())
    # re-saved by today's code: a PEFT adapter folder + manifest, same outputs, same optimiser
    again = ied.save_checkpoint(tmp_path / "v2", ckpt.bank, reweight_mode=ckpt.mode, template=ckpt.template,
                                encoder=ckpt.config["encoder"], model_config=model.config,
                                training=ckpt.config["training"], trainer_state=ied.save_trainer_state(resumed, None, info))
    assert {p.name for p in again.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "manifest.json",
                                                 "trainer_state.safetensors", "trainer_state.json"}
    assert torch.equal(_instructed_logits(model, tok, ied.load_checkpoint(again).bank), expected)
    again_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros_like(bank.embeddings))], lr=1e-3)
    ied.load_trainer_state(again, again_opt, None)
    _same_optimizer_state(again_opt.state_dict(), opt.state_dict())


def test_the_shipped_format_1_prefixes_still_load():
    from instructedit_plugin.instructed.shipped import shipped_prefixes_dir

    ckpt = ied.load_checkpoint(shipped_prefixes_dir())
    assert ckpt.manifest["format_version"] == 1 and list(ckpt.bank.layers) == list(range(6, 12))
    assert ckpt.peft_config.prefix_layers == list(range(6, 12)) and ckpt.peft_config.hidden_size == 640


# ----------------------------------------------------------------------------------------------
# InstructEdit, format 2 (editor_config.json, training_config)
# ----------------------------------------------------------------------------------------------
def test_old_instructedit_checkpoint_loads_to_identical_editor_outputs_and_optimizer(tiny_gpt2_dir, tmp_path):
    from instructedit_plugin.instructedit import InstructEditHyperParams
    from instructedit_plugin.instructedit.instructedit_main import (
        build_edit_batch,
        load_editor_for,
    )

    from .test_instructedit_editing import EDIT_YAML, synthetic_tasks

    model, tok = load_causal_lm(tiny_gpt2_dir)
    wrapper, opt = instructedit_content(load_causal_lm(tiny_gpt2_dir)[0], tiny_gpt2_dir)
    expected = wrapper.state_dict()
    tensors, meta = ie.load_editor(OLD / "instructedit_v2")
    assert meta["format_version"] == 2 and meta["hparams"] == meta["training_config"] and meta["hparams"]["rank"] == 64
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], v) for k, v in expected.items())
    loaded = ie.load_trainer_state(OLD / "instructedit_v2")
    assert loaded is not None and loaded[1]["step"] == 5
    _same_optimizer_state(loaded[0], opt.state_dict())
    # re-saved by today's code (format 3, manifest.json) with the optimiser state
    folder = ie.save_editor(tmp_path / "v3", tensors, meta, extra_files=ie.trainer_state_files(loaded[0], loaded[1]))
    assert {p.name for p in folder.iterdir()} == {"editor.safetensors", "manifest.json", "trainer_state.safetensors",
                                                  "trainer_state.json"}
    _same_optimizer_state(ie.load_trainer_state(folder)[0], opt.state_dict())
    # identical edits from the old folder and the re-saved one; they do change the weights
    hp = InstructEditHyperParams.from_hparams(EDIT_YAML)
    hp.model_name = str(tiny_gpt2_dir)
    batch = build_edit_batch(tok, synthetic_tasks()["counterfact"][:2], hp, "cpu")
    old, _ = load_editor_for(model, OLD / "instructedit_v2").new_weights(model, batch)
    new, _ = load_editor_for(model, folder).new_weights(model, batch)
    params = dict(model.named_parameters())
    assert sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)
    assert any(not torch.equal(old[k], params[k]) for k in old)


def test_a_resumed_old_folder_saved_again_drops_its_old_manifest(tmp_path):
    folder = tmp_path / "last"
    shutil.copytree(OLD / "instructedit_v2", folder)
    tensors, meta = ie.load_editor(folder)
    ie.save_editor(folder, tensors, meta)
    assert not (folder / "editor_config.json").exists() and not (folder / "trainer_state.json").exists()
    assert ie.load_editor(folder)[1]["format_version"] == ie.FORMAT_VERSION


# ----------------------------------------------------------------------------------------------
# One manifest, one optimiser layout, one error type
# ----------------------------------------------------------------------------------------------
def test_both_methods_write_the_same_manifest_and_trainer_state_layout(tiny_gpt2_dir, tmp_path):
    model, _ = load_causal_lm(tiny_gpt2_dir)
    bank, opt = instructed_content(model)
    ied.save_checkpoint(tmp_path / "ied", bank, reweight_mode="paper", template="default", encoder="e",
                        model_config=model.config, training={"lr": 1e-3},
                        trainer_state=ied.save_trainer_state(opt, None, {"step": 1}))
    wrapper, ie_opt = instructedit_content(model, tiny_gpt2_dir)
    ie.save_editor(tmp_path / "ie", wrapper.state_dict(), wrapper.editor_config(),
                   extra_files=ie.trainer_state_files(ie_opt.state_dict(), {"step": 1}))
    manifests = {m: json.loads((tmp_path / m / "manifest.json").read_text()) for m in ("ied", "ie")}
    for name, manifest in manifests.items():
        assert CORE_KEYS <= set(manifest), name
        assert manifest["base_model"] == core.base_model_identity(model), name
        assert set(manifest["files"]) >= {"trainer_state.safetensors", "trainer_state.json"}, name
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        tensors = core.read_tensors((tmp_path / name / "trainer_state.safetensors").read_bytes(), name)
        assert set(state["optimizer"]) == {"state", "param_groups"} and state["step"] == 1, name
        assert tensors and all(k.startswith("state.") for k in tensors), name
    assert "training_config" not in manifests["ie"] and manifests["ie"]["hparams"]["rank"] == 64
    assert manifests["ied"]["hparams"] == {"lr": 1e-3}


@pytest.mark.parametrize("method", ["InstructEd", "InstructEdit"])
def test_one_error_type_for_a_damaged_checkpoint(tmp_path, method):
    source = OLD / ("instructed_v1" if method == "InstructEd" else "instructedit_v2")
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    victim = folder / ("prefixes.safetensors" if method == "InstructEd" else "editor.safetensors")
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    load = ied.load_checkpoint if method == "InstructEd" else ie.load_editor
    with pytest.raises(core.CheckpointError) as info:
        load(folder)
    error = info.value
    assert isinstance(error, HyperParamsError) and isinstance(error, PluginError)
    assert error.field == "archive" and victim.name in str(error) and "sha256" in str(error) and "Fix:" in str(error)
    assert ied.CheckpointError is ie.CheckpointError is core.CheckpointError
