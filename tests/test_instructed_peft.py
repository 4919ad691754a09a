"""InstructEd prefixes through PEFT's own API (``instructed/tuner.py``).

* ``get_peft_model(model, InstructEdConfig(...))`` -> ``save_pretrained`` -> ``PeftModel.from_pretrained``
  gives logits bit-identical to the plugin's own path (same prefixes, instruction and question), on
  every tiny architecture; a forward of the ``PeftModel`` itself under ``instruction_context`` is
  re-weighted exactly as :class:`InstructedLM` does it (spans and ``sim`` reach the attention).
* The folder the trainer writes *is* a PEFT adapter folder: ``PeftModel.from_pretrained`` loads it.
* A folder from ``save_pretrained`` works as ``archive:`` when editing through EasyEdit's ``BaseEditor``.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from instructedit_plugin.instructed.checkpoint import load_checkpoint
from instructedit_plugin.instructed.context import instruction_context
from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.prefix import PrefixBank
from instructedit_plugin.instructed.tuner import InstructEdConfig, InstructEdModel
from instructedit_plugin.models.loading import load_causal_lm

QUESTIONS = ["Alice lives in", "The capital of Peru is the city of"]
INSTRUCTIONS = ["Alice lives in Oslo.", "Lima is the capital of Peru."]


class _Encoder:
    """Deterministic ``sim`` values below 1, so that the re-weighting changes the outputs."""

    identity = "stub"

    def cosine(self, a, b):
        return torch.tensor([0.3 + 0.4 * (len(x) % 2) for x in a])


def _bank_values(bank: PrefixBank) -> torch.Tensor:
    n = bank.embeddings.numel()
    return (torch.cos(torch.arange(n, dtype=torch.float64) * 0.37) * 0.5).float().reshape(bank.embeddings.shape)


def _inputs(tok):
    tok.padding_side = "left"
    return tok(QUESTIONS, return_tensors="pt", padding=True)


def _logits(model, tok, bank, use_prefixes: bool = True) -> torch.Tensor:
    lm = InstructedLM(model, tok, bank, encoder=_Encoder(), use_prefixes=use_prefixes)
    with torch.no_grad():
        return lm(**_inputs(tok), instructions=INSTRUCTIONS).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "qwen2"])
def test_peft_round_trip_is_bit_identical_to_the_plugin_path(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model, _ = load_causal_lm(model_dir)
    peft_model = get_peft_model(model, InstructEdConfig(prefix_len=4, reweight_mode="paper"))
    assert isinstance(peft_model.base_model, InstructEdModel)
    bank = peft_model.base_model.bank
    with torch.no_grad():
        bank.embeddings.copy_(_bank_values(bank))
    # only the prefixes train; the base model is frozen
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.instructed_prefixes.banks.default.embeddings"], trainable
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "INSTRUCTED" and saved["prefix_layers"] == list(bank.layers)

    # the plugin's own path: a fresh model, the same prefix values
    plain, tok2 = load_causal_lm(model_dir)
    own_bank = PrefixBank(bank.layers, bank.prefix_len, bank.hidden_size)
    with torch.no_grad():
        own_bank.embeddings.copy_(_bank_values(own_bank))
    expected = _logits(plain, tok2, own_bank)
    in_context = _logits(plain, tok2, own_bank, use_prefixes=False)
    assert not torch.equal(expected, in_context)  # the prefixes change the outputs

    # PEFT's path: another fresh model, the adapter loaded by PeftModel.from_pretrained
    base, tok3 = load_causal_lm(model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded_bank = loaded.base_model.bank
    assert torch.equal(loaded_bank.embeddings, own_bank.embeddings) and not loaded_bank.embeddings.requires_grad
    assert torch.equal(_logits(loaded.get_base_model(), tok3, loaded_bank), expected)
    # the PeftModel's own forward, with the spans and sim InstructedLM builds, is the same computation
    lm = InstructedLM(plain, tok2, own_bank, encoder=_Encoder())
    enc = _inputs(tok2)
    rows = lm._rows(enc["input_ids"], enc["attention_mask"])
    batch = lm.build(rows, lm.select(rows, INSTRUCTIONS))
    assert batch.spans[0] is not None and bool((batch.sim < 1).all())
    with torch.no_grad():
        want = lm.run(batch.input_ids, batch.attention_mask, batch.spans, batch.sim, batch.use_prefix).logits
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)  # what run() gives left-padded rows
        with instruction_context(spans=batch.spans, sim=batch.sim, use_prefix=batch.use_prefix):
            got = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    assert torch.equal(got, want)
    # disabled (PEFT's context manager), the model inside is the stock model
    with torch.no_grad(), loaded.disable_adapter():
        assert loaded.get_model_status().enabled is False
        stock = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        reference = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(stock, reference) and not torch.equal(stock, got)
    assert loaded.get_model_status().enabled is True
    assert torch.equal(_logits(base, tok3, loaded_bank), expected)


def test_the_trainers_archive_is_a_peft_adapter_folder(instructed_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    archive = instructed_world["archive"]
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {p.name for p in archive.iterdir()}
    ckpt = load_checkpoint(archive)
    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    plain = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()
    expected = _logits(plain, tok, ckpt.bank)
    base = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]).eval()
    peft_model = PeftModel.from_pretrained(base, archive)
    config = peft_model.peft_config["default"]
    assert config.reweight_mode == ckpt.mode and config.template == ckpt.template
    assert torch.equal(peft_model.base_model.bank.embeddings, ckpt.bank.embeddings)
    assert torch.equal(_logits(peft_model.get_base_model(), tok, peft_model.base_model.bank), expected)


def test_a_save_pretrained_folder_is_an_archive_for_editing(instructed_world, tmp_path):
    from easyeditor import BaseEditor
    from transformers import AutoModelForCausalLM

    import instructedit_plugin
    from instructedit_plugin.evaluation.summary import summarize_metrics
    from instructedit_plugin.instructed import InstructEdHyperParams

    instructedit_plugin.register()
    ckpt = load_checkpoint(instructed_world["archive"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"]), ckpt.peft_config)
    with torch.no_grad():
        peft_model.base_model.bank.embeddings.copy_(ckpt.bank.embeddings)
    peft_model.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "manifest.json").exists()  # a bare PEFT folder
    requests = instructed_world["test"][:4]
    kwargs = dict(prompts=[r["prompt"] for r in requests], target_new=[r["target_new"] for r in requests],
                  ground_truth=[r["ground_truth"] for r in requests],
                  rephrase_prompts=[r["rephrase_prompt"] for r in requests], verbose=False)

    def edit(archive) -> list:
        hp = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(instructed_world["base_dir"]),
                                                  archive=str(archive), device="cpu", max_length=40))
        metrics, _, _ = BaseEditor.from_hparams(hp).edit(**kwargs)
        return [{k: v for k, v in m.items() if k != "time"} for m in metrics]  # all but the wall-clock time

    from_peft = edit(tmp_path / "peft")
    from_trainer = edit(instructed_world["archive"])
    assert from_peft == from_trainer
    assert summarize_metrics(from_peft)["Rel"] >= 75.0, summarize_metrics(from_peft)
