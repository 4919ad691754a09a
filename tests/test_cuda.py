"""Both methods on a CUDA device: training, editing and archives, checked against the CPU path.

CI has no GPU, so this module is skipped there; run it on a GPU machine with
``pytest tests/test_cuda.py``. ``INSTRUCTEDIT_TEST_DEVICE=cpu`` runs the same tests on the CPU (how
the tests themselves were checked on a machine without CUDA). What they assert on the device:

* InstructEd's instructed forward (``paper`` and ``question_rows`` with cached instruction
  keys/values, also with ``sim_overlap``) gives the CPU's logits on the tiny LLaMA and Gemma 3, and the
  prefixes move them;
* InstructEd's trainer trains the prefixes on the device (validation loss falls, float32 and bf16
  autocast), and the checkpoint it writes reloads on the CPU to the same tensors and logits;
* InstructEdit's trainer meta-trains the editor on the device in the tiny fact world, one edit made
  there lands on its instructed prompt and rephrase and leaves the other subjects' answers alone
  (the CPU test's thresholds), and the edited weights equal those the CPU computes with the same
  archive.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from instructedit_plugin.instructed.checkpoint import load_checkpoint
from instructedit_plugin.instructed.lm import InstructedLM
from instructedit_plugin.instructed.prefix import PrefixBank
from instructedit_plugin.instructed.trainer import InstructEdTrainer

DEVICE = torch.device(os.environ.get("INSTRUCTEDIT_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device (INSTRUCTEDIT_TEST_DEVICE=cpu runs it on the CPU)"),
    pytest.mark.slow,
]

QUESTIONS = ["What is the capital of France? Paris", "Who is the CEO of Apple?", "The Moon orbits the Earth"]
FACTS = ["The capital of France is Rome.", "Tim Cook leads Apple, a company in California, since 2011.", "Moon."]
#: float32 on both sides, TF32 off: what is left is the order of the device's reductions
ATOL = 2e-4


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


class CosineByLength:
    """A deterministic stand-in for the sentence encoder (no model files): a different cosine per pair."""

    identity = "length-test-encoder"
    cosine_from_encode = False

    def encode(self, texts):
        return torch.nn.functional.normalize(torch.tensor([[1.0 + len(t) % 5, 1.0 + len(t) % 3, 1.0] for t in texts]), dim=-1)

    def cosine(self, a, b):
        return torch.tensor([0.3 + 0.6 * (len(x) % 7) / 7 for x in a])


def _model(path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    if model.config.model_type.startswith("gemma3"):  # the tiny Gemma's sliding window (8) is shorter than a fact
        model.config.sliding_window = 256
    return model, tok


def _bank(model) -> PrefixBank:
    g = torch.Generator().manual_seed(0)
    bank = PrefixBank([1, 2], 4, model.config.hidden_size, init_std=0.0)
    with torch.no_grad():
        bank.embeddings.normal_(0.0, 1.0, generator=g)
    return bank.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# InstructEd: the instructed forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["paper", "question_rows"])
def test_the_instructed_forward_on_the_device_gives_the_cpu_logits(request, arch, mode):
    path = request.getfixturevalue(f"tiny_{arch}_dir")  # (built with gradients on)
    with torch.no_grad():
        _compare_devices(path, mode)


def _compare_devices(path, mode):
    logits = {}
    for device in (torch.device("cpu"), DEVICE):
        model, tok = _model(path, device)
        cache = 8 if mode == "question_rows" else None
        lm = InstructedLM(model, tok, _bank(model).to(device), encoder=CosineByLength(), mode=mode, instruction_cache=cache)
        enc = tok(QUESTIONS, return_tensors="pt", padding=True).to(device)
        first = lm(**enc, instructions=FACTS).logits
        if mode == "question_rows":  # asked again: the instruction keys/values come from the cache, on the device
            again = lm(**enc, instructions=FACTS).logits
            assert lm.instruction_cache.hits == 3 and torch.equal(again, first)
            assert all(t.device.type == device.type for t in _tensors(lm.instruction_cache))
            # sim computed in a worker thread while the forward starts: the same logits
            overlapped = InstructedLM(model, tok, lm.bank, encoder=CosineByLength(), mode=mode, instruction_cache=8,
                                      sim_overlap=True)
            assert torch.equal(overlapped(**enc, instructions=FACTS).logits, first)
        plain = model(**enc).logits
        real = enc["attention_mask"].bool()
        assert (first[real] - plain[real]).abs().max() > 100 * ATOL  # the prefixes and instruction move the logits
        logits[device.type] = first[real].cpu()
    torch.testing.assert_close(logits[DEVICE.type], logits["cpu"], atol=ATOL, rtol=0)


def _tensors(obj, depth: int = 0):
    """Every tensor held (a few levels deep) by the instruction cache."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 6:
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else vars(obj).values() \
            if hasattr(obj, "__dict__") else ()
        for item in items:
            yield from _tensors(item, depth + 1)


# ----------------------------------------------------------------------------------------------
# InstructEd: prefix training on the device
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_instructed_prefixes_train_on_the_device_and_reload_on_the_cpu(tiny_llama_dir, tmp_path, precision):
    from ._instructed_world import make_edits
    from .test_instructed_training import training_config

    if precision == "bf16" and DEVICE.type == "cpu":
        pytest.skip("bf16 autocast is checked on CUDA")
    edits = make_edits(48)
    cfg = training_config(tiny_llama_dir, tmp_path / "results", device=str(DEVICE), max_iters=200, val_interval=100,
                          mixed_precision=precision)
    trainer = InstructEdTrainer(cfg, edits[:40], edits[40:], encoder=CosineByLength())
    assert trainer.bank.embeddings.device.type == DEVICE.type
    step0 = trainer.validate()
    result = trainer.run()
    trainer.close()
    best = min(h["edit_loss"] for h in result["history"])
    assert best <= 0.75 * step0["edit_loss"], (step0, result["history"])  # measured on the CPU: 8.08 -> 5.39
    # the checkpoint written on the device reloads on the CPU: same tensors, same logits
    ckpt = load_checkpoint(result["best_dir"])
    assert ckpt.bank.embeddings.device.type == "cpu"
    model, tok = _model(tiny_llama_dir, "cpu")
    on_cpu = InstructedLM(model, tok, ckpt.bank, encoder=CosineByLength(), template=cfg.template)
    device_model, _ = _model(tiny_llama_dir, DEVICE)
    on_device = InstructedLM(device_model, tok, load_checkpoint(result["best_dir"]).bank.to(DEVICE),
                             encoder=CosineByLength(), template=cfg.template)
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = on_cpu(**enc, instructions=FACTS).logits
        got = on_device(**enc.to(DEVICE), instructions=FACTS).logits.cpu()
    real = enc["attention_mask"].bool().cpu()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# InstructEdit: meta-training and editing on the device
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fact_world():
    from .support.fact_world import build_world_model_dir
    from .test_instructedit_editing import COUNTRIES, RELATIONS, WORLD

    return build_world_model_dir(RELATIONS, COUNTRIES, WORLD)


def _next_tokens(model, tok, prompts):
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(**tok(prompt, return_tensors="pt").to(device)).logits[0, -1]
            out.append(tok.decode(logits.argmax()).strip())
    return out


def test_instructedit_trains_and_edits_on_the_device(fact_world, tmp_path):
    from instructedit_plugin.instructedit import InstructEditTrainer, apply_to_model, load_editor_for, make_datasets
    from instructedit_plugin.instructedit.instructedit_main import build_edit_batch, instructed_prompt
    from instructedit_plugin.models.loading import load_causal_lm

    from .test_instructedit_editing import COUNTRIES, LOCAL_EDITOR, RELATIONS, _truth, edit_hparams, synthetic_tasks, \
        training_config

    cfg = training_config(fact_world, tmp_path / "results", **dict(LOCAL_EDITOR, device=str(DEVICE)))
    model, tok = load_causal_lm(fact_world)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    result = InstructEditTrainer(cfg, train_set, val_set, answer_logits=True).run()
    archive = result["best_checkpoint"]

    model = model.to(DEVICE).eval()
    hp = edit_hparams(fact_world, archive)
    truth = _truth()
    for relation in RELATIONS:
        task = relation.task
        requests = val_set.tasks[task]
        landed = kept = n_other = 0
        for request in requests:
            request = dict(request, task=task)
            _, original = apply_to_model(model, tok, [request], hp, return_orig_weights=True)
            assert next(iter(original.values())).device.type == DEVICE.type
            rewrite, rephrase = _next_tokens(model, tok, [instructed_prompt(request, hp), instructed_prompt(
                dict(request, prompt=request["rephrase_prompt"]), hp)])
            landed += (rewrite == request["target_new"]) + (rephrase == request["target_new"])
            others = [c for c in COUNTRIES if c != request["subject"]]
            kept += sum(got == truth[task][c] for got, c in zip(
                _next_tokens(model, tok, [relation.prompt.format(c) for c in others]), others))
            n_other += len(others)
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in original.items():
                    params[name].copy_(value)
        # the CPU test's thresholds (test_instructedit_editing.test_one_edit_leaves_the_other_subjects_answers_alone)
        assert landed / (2 * len(requests)) >= 0.8 and kept / n_other >= 0.9, (task, landed, kept, n_other)

    # the same archive computes the same new weights on the device and on the CPU
    cpu_model, _ = load_causal_lm(fact_world)
    requests = [dict(r, task="counterfact") for r in val_set.tasks["counterfact"][:3]]
    weights = {}
    for m in (cpu_model, model):
        device = next(m.parameters()).device
        new, _ = load_editor_for(m, archive).new_weights(m, build_edit_batch(tok, requests, hp, device))
        weights[device.type] = {k: v.detach().cpu() for k, v in new.items()}
    assert weights["cpu"].keys() == weights[DEVICE.type].keys()
    for name, value in weights["cpu"].items():
        torch.testing.assert_close(weights[DEVICE.type][name], value, atol=1e-4, rtol=1e-4)
