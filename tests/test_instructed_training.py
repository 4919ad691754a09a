"""InstructEd prefix training on the tiny world: training, best checkpoint, round trip, resume.

The world (:mod:`tests._instructed_world`) is a tiny LLaMA pretrained so that it knows 12 people's
facts but cannot use an ``Instructions: {fact}\nInput: {question}`` instruction on its own (it
writes ``\nOutput:`` instead of answering, with no prefix or with a random bank), while prefixes in
layers 1-2 can switch on an instruction-following mode planted in it. The session fixture
:func:`instructed_world` trains InstructEd's prefixes with the plugin's trainer from the trainer's
own random bank on 40 edits (new facts); the 8 held-out edits are used by the editing, example,
ablation and demo tests. The validation at step 0 (the untrained bank) is part of the result, so
that the tests see the loss fall. Everything is built once per session (the pretrained base is
cached under the models cache when ``$INSTRUCTEDIT_CACHE`` is set).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import torch

from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructed.checkpoint import load_checkpoint, save_checkpoint
from instructedit_plugin.instructed.instructed_hparams import InstructEdTrainingHparams
from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.templates import instruction_of
from instructedit_plugin.instructed.trainer import InstructEdTrainer

from ._instructed_world import N_TEST_EDITS, N_TRAIN_EDITS, make_edits, world_base_dir

#: The world's prefix training: the tiny YAML with fewer steps (the validation loss is flat after
#: step 50 on this world: 10.5 at step 0, 0.16 at 50, 0.21 at 150).
WORLD_TRAINING = dict(max_iters=150, val_interval=50, warmup_steps=10)


def training_config(base_dir: Path, results_dir: Path, **overrides) -> InstructEdTrainingHparams:
    """The tiny training YAML with the world's step counts, test paths (and overrides)."""
    repo = Path(__file__).resolve().parents[1]
    cfg = InstructEdTrainingHparams.from_hparams(repo / "hparams/TRAINING/InstructEd/tiny.yaml")
    data = cfg.to_dict()
    data.update(model_name=str(base_dir), results_dir=str(results_dir), progress=False, **{**WORLD_TRAINING, **overrides})
    return InstructEdTrainingHparams.from_dict(data)


@functools.lru_cache(maxsize=None)
def _build_world(root: str, tiny_llama: str, cache_root: str) -> dict:
    root_path = Path(root)
    t0 = time.perf_counter()
    base_dir = world_base_dir(Path(cache_root), Path(tiny_llama))
    pretrain_s = time.perf_counter() - t0
    edits = make_edits(N_TRAIN_EDITS + N_TEST_EDITS)
    train, test = edits[:N_TRAIN_EDITS], edits[N_TRAIN_EDITS:]
    cfg = training_config(base_dir, root_path / "results")
    t0 = time.perf_counter()
    trainer = InstructEdTrainer(cfg, train)  # validation: val_fraction of the training edits
    step0 = {"step": 0, **trainer.validate()}  # the trainer's own untrained bank
    initial_bank = trainer.bank.embeddings.detach().clone()
    result = trainer.run()
    trainer.close()
    result["step0"] = step0
    result["train_s"] = time.perf_counter() - t0
    result["pretrain_s"] = pretrain_s
    (root_path / "training_result.json").write_text(json.dumps(result, indent=1, default=str))
    return {"base_dir": base_dir, "archive": Path(result["best_dir"]), "results_dir": root_path / "results",
            "train": train, "test": test, "val": trainer.val_requests, "result": result, "initial_bank": initial_bank}


@pytest.fixture(scope="session")
def instructed_world(tmp_path_factory, tiny_llama_dir, models_cache_root) -> dict:
    """World base + InstructEd prefixes trained on its edits (built once per session). Keys: ``base_dir``,
    ``archive``, ``results_dir``, ``train``, ``test``, ``val``, ``result`` (the trainer's result plus
    ``step0``, the validation of the untrained bank) and ``initial_bank`` (that bank's embeddings)."""
    return _build_world(str(tmp_path_factory.getbasetemp() / "instructed-world"), str(tiny_llama_dir),
                        str(models_cache_root))


# ----------------------------------------------------------------------------------------------
def test_training_runs_validates_and_keeps_the_best(instructed_world):
    result = instructed_world["result"]
    history, step0 = result["history"], result["step0"]
    cfg = training_config(instructed_world["base_dir"], instructed_world["results_dir"])
    print("validation:", step0, *history, sep="\n  ")
    assert result["step"] == cfg.max_iters
    assert [h["step"] for h in history] == list(range(cfg.val_interval, cfg.max_iters + 1, cfg.val_interval))
    assert result["best_val_loss"] == min(h["loss"] for h in history)
    # the validation edits are held out from training
    val_prompts = {r["prompt"] for r in instructed_world["val"]}
    assert val_prompts and not val_prompts & {r["prompt"] for r in instructed_world["train"] if r not in instructed_world["val"]}
    # the untrained bank cannot make the base answer (it writes "\nOutput:"); training can.
    # Measured: step 0 loss 10.5, edit_acc 0, loc_acc 0; best loss 0.155 at step 50 (1/68 of step 0),
    # edit_acc 1.0, loc_acc 0.875 (validation: 4 held-out training edits; answer-token accuracies).
    assert step0["edit_acc"] <= 0.1 and step0["loc_acc"] <= 0.25, step0
    best = min(history, key=lambda h: h["loss"])
    assert best["loss"] <= 0.5 * step0["loss"], (step0, best)
    assert best["edit_acc"] >= 0.85 and best["loc_acc"] >= 0.75, history
    ckpt = load_checkpoint(instructed_world["archive"])
    assert ckpt.config["prefix_layers"] == [1, 2] and ckpt.config["prefix_len"] == 5
    assert ckpt.config["info"]["loss"] == pytest.approx(result["best_val_loss"])
    assert ckpt.config["training"]["lr"] == cfg.lr
    assert isinstance(ckpt.config["encoder"], (dict, str)) and ckpt.config["base_model_fingerprint"]
    assert not (instructed_world["archive"] / "trainer_state.safetensors").exists()
    assert (instructed_world["results_dir"] / "last" / "trainer_state.safetensors").exists()


def _lm(base_dir, bank):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed.lm import load_encoder

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return InstructedLM(model, tok, bank, encoder=load_encoder("default")), tok


@torch.no_grad()
def test_checkpoint_round_trip_gives_identical_logits(instructed_world, tmp_path):
    ckpt = load_checkpoint(instructed_world["archive"])
    lm, tok = _lm(instructed_world["base_dir"], ckpt.bank)
    copy_dir = save_checkpoint(tmp_path / "copy", ckpt.bank, reweight_mode=ckpt.mode, template=ckpt.template,
                               encoder=ckpt.config["encoder"], model_config=lm.model.config)
    again = load_checkpoint(copy_dir)
    assert torch.equal(again.bank.embeddings, ckpt.bank.embeddings)
    req = instructed_world["test"][0]
    enc = tok([req["prompt"] + " " + req["target_new"], req["rephrase_prompt"]], return_tensors="pt", padding=True)
    first = lm(**enc, instructions=[instruction_of(req)] * 2).logits
    lm2, _ = _lm(instructed_world["base_dir"], again.bank)
    assert torch.equal(first, lm2(**enc, instructions=[instruction_of(req)] * 2).logits)
    # a damaged file is detected through the manifest
    data = bytearray((copy_dir / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy_dir / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PluginError, match="sha256"):
        load_checkpoint(copy_dir)


def test_resume_continues_from_the_saved_step(instructed_world, tmp_path):
    reqs = instructed_world["train"][:8]
    common = dict(max_iters=4, val_interval=2, warmup_steps=2, batch_size=2, unmodified_batch_size=2, val_fraction=0.25)
    first = InstructEdTrainer(training_config(instructed_world["base_dir"], tmp_path, **common), reqs)
    out = first.run()
    first.close()
    assert out["step"] == 4
    saved_state = {k: v.clone() for k, v in first.optimizer.state[first.bank.embeddings].items() if torch.is_tensor(v)}
    saved_bank = first.bank.embeddings.detach().clone()
    saved_lr = first.scheduler.get_last_lr()

    second = InstructEdTrainer(training_config(instructed_world["base_dir"], tmp_path, **dict(common, max_iters=6, resume=True)), reqs)
    second.resume_once()
    assert second.step == 4
    assert torch.equal(second.bank.embeddings, saved_bank)
    for key, value in second.optimizer.state[second.bank.embeddings].items():
        if torch.is_tensor(value):
            assert torch.equal(value, saved_state[key]), key
    assert second.scheduler.get_last_lr() == saved_lr
    out = second.run()
    second.close()
    assert out["step"] == 6
    assert [h["step"] for h in out["history"]] == [2, 4, 6]


def test_easyedit_train_dict_holds_the_edit_trainer_module(tmp_path):
    """``ALG_TRAIN_DICT['INSTRUCTED']`` is the module EasyEdit's EditTrainer drives (trained end to end in
    tests/test_instructed_easyedit_trainer.py); a config that would train the base model is refused."""
    import instructedit_plugin
    from instructedit_plugin.errors import HyperParamsError
    from instructedit_plugin.instructed.easyedit_training import InstructEdTrainModule

    instructedit_plugin.register()
    import sys

    train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
    assert train_dict["INSTRUCTED"] is InstructEdTrainModule
    with pytest.raises(HyperParamsError, match="train_base.*Fix: set train_base: false"):
        training_config(tmp_path, tmp_path, train_base=True)
    # EasyEdit's early stopping compares with early_stop_patience: null is refused before any model work
    with pytest.raises(HyperParamsError, match="early_stop_patience.*Fix: set it"):
        InstructEdTrainModule(None, training_config(tmp_path, tmp_path, early_stop_patience=None))


def test_val_set_must_be_disjoint(instructed_world):
    reqs = instructed_world["train"][:4]
    cfg = training_config(instructed_world["base_dir"], Path("/nonexistent-unused"), max_iters=1)
    with pytest.raises(PluginError, match="shares"):
        InstructEdTrainer(cfg, reqs, reqs[:1])
