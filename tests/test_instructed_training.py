"""InstructEd prefix training on a synthetic fact world: training, best checkpoint, round trip, resume.

The tiny models are randomly initialised: a 4-layer random transformer cannot read anything from
its context, and 2 x 5 prefix vectors cannot give it that ability (tried: held-out accuracy stays
at chance). InstructEd assumes an LLM that can already follow an instruction in its input, so the
session fixture first *pretrains* the tiny LLaMA (all weights, ~500 steps) on a small world:
closed-book questions about 16 people, ``Instructions: {fact}\\nInput: {question}`` with a fact
about the question (answer: the fact's object) and with a fact about another person and relation
(answer: the closed-book one). That model is then frozen and InstructEd's prefixes are trained on
40 *edits* (new facts) with the plugin's trainer; held-out edits are used by the editing tests.
Everything is cached once per session (:func:`instructed_world`).
"""
from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

import pytest
import torch

from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructed.checkpoint import load_checkpoint, save_checkpoint
from instructedit_plugin.instructed.config import InstructEdTrainingHparams
from instructedit_plugin.instructed.model import InstructedLM
from instructedit_plugin.instructed.trainer import InstructEdTrainer

SUBJECTS = ["Lionel Messi", "Tiger Woods", "Mozart", "Beethoven", "Marie Curie", "Tim Cook", "Leo Tolstoy",
            "Michael Jordan", "Roger Federer", "Albert Einstein", "Pablo Picasso", "Danielle Darrieux",
            "Barack Obama", "Isaac Newton", "Serena Williams", "LeBron James"]
RELATIONS = {
    "city": (["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "London", "Ottawa"],
             "{} lives in {}.", ["Where does {} live?", "In which city does {} live?"]),
    "sport": (["soccer", "basketball", "tennis", "golf"],
              "{} plays {}.", ["Which sport does {} play?", "What sport does {} play?"]),
    "language": (["French", "Spanish", "German", "English"],
                 "The mother tongue of {} is {}.", ["What is the mother tongue of {}?", "What is the native language of {}?"]),
    "job": (["physicist", "chemist", "painter", "composer"],
            "{} works as a {}.", ["What is the occupation of {}?", "What does {} work as?"]),
}
TEMPLATE = "Instructions: {}\nInput: {}"
PRETRAIN_STEPS = 500
N_TRAIN_EDITS, N_TEST_EDITS = 40, 8


def world() -> dict[tuple[str, str], str]:
    rng = random.Random(0)
    return {(s, r): rng.choice(RELATIONS[r][0]) for s in SUBJECTS for r in RELATIONS}


def make_edits(n: int, seed: int = 1) -> list[dict]:
    """``n`` edit requests (distinct subject/relation pairs, new object != the world's) with an
    instruction, a rephrase and a locality question about another person and relation."""
    facts = world()
    rng = random.Random(seed)
    pairs = [(s, r) for s in SUBJECTS for r in RELATIONS]
    rng.shuffle(pairs)
    out = []
    for s, r in pairs[:n]:
        objects, statement, questions = RELATIONS[r]
        new = rng.choice([o for o in objects if o != facts[(s, r)]])
        s2 = rng.choice([x for x in SUBJECTS if x != s])
        r2 = rng.choice([x for x in RELATIONS if x != r])
        out.append(dict(prompt=questions[0].format(s), rephrase_prompt=questions[1].format(s), target_new=new,
                        ground_truth=facts[(s, r)], subject=s, instruction=statement.format(s, new),
                        locality={"neighborhood": {"prompt": RELATIONS[r2][2][0].format(s2), "ground_truth": facts[(s2, r2)]}}))
    return out


def _pretrain(src: Path, dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    facts = world()
    rng = random.Random(0)

    def sample() -> tuple[str, str]:
        s, r = rng.choice(SUBJECTS), rng.choice(list(RELATIONS))
        objects, statement, questions = RELATIONS[r]
        q = rng.choice(questions).format(s)
        u = rng.random()
        if u < 0.4:
            return q, facts[(s, r)]
        if u < 0.75:
            o = rng.choice(objects)
            return TEMPLATE.format(statement.format(s, o), q), o
        s2 = rng.choice([x for x in SUBJECTS if x != s])
        r2 = rng.choice([x for x in RELATIONS if x != r])
        return TEMPLATE.format(RELATIONS[r2][1].format(s2, rng.choice(RELATIONS[r2][0])), q), facts[(s, r)]

    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.02, 1 - s / PRETRAIN_STEPS))
    model.train()
    for _ in range(PRETRAIN_STEPS):
        items = [sample() for _ in range(32)]
        seqs = [tok(p + " " + a)["input_ids"] for p, a in items]
        cut = [len(tok(p)["input_ids"]) for p, _ in items]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (seq, c) in enumerate(zip(seqs, cut)):
            n = width - len(seq)
            ids[i, n:] = torch.tensor(seq)
            mask[i, n:] = 1
            labels[i, n + c:] = torch.tensor(seq[c:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def training_config(base_dir: Path, results_dir: Path, **overrides) -> InstructEdTrainingHparams:
    """The tiny training YAML with test paths (and overrides)."""
    repo = Path(__file__).resolve().parents[1]
    cfg = InstructEdTrainingHparams.from_hparams(repo / "hparams/TRAINING/InstructEd/tiny.yaml")
    data = cfg.to_dict()
    data.update(model_name=str(base_dir), results_dir=str(results_dir), progress=False, **overrides)
    return InstructEdTrainingHparams.from_dict(data)


@functools.lru_cache(maxsize=None)
def _build_world(root: str, tiny_llama: str) -> dict:
    root_path = Path(root)
    base_dir = root_path / "base"
    t0 = time.perf_counter()
    _pretrain(Path(tiny_llama), base_dir)
    pretrain_s = time.perf_counter() - t0
    edits = make_edits(N_TRAIN_EDITS + N_TEST_EDITS)
    train, test = edits[:N_TRAIN_EDITS], edits[N_TRAIN_EDITS:]
    cfg = training_config(base_dir, root_path / "results")
    t0 = time.perf_counter()
    trainer = InstructEdTrainer(cfg, train)  # validation: val_fraction of the training edits
    result = trainer.run()
    trainer.close()
    result["train_s"] = time.perf_counter() - t0
    result["pretrain_s"] = pretrain_s
    (root_path / "training_result.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=1, default=str))
    return {"base_dir": base_dir, "archive": Path(result["best_dir"]), "results_dir": root_path / "results",
            "train": train, "test": test, "val": trainer.val_requests, "result": result}


@pytest.fixture(scope="session")
def instructed_world(tmp_path_factory, tiny_llama_dir) -> dict:
    """Pretrained tiny base + InstructEd prefixes trained on synthetic edits (built once per session)."""
    return _build_world(str(tmp_path_factory.getbasetemp() / "instructed-world"), str(tiny_llama_dir))


# ----------------------------------------------------------------------------------------------
def test_training_runs_validates_and_keeps_the_best(instructed_world):
    result = instructed_world["result"]
    history = result["history"]
    cfg = training_config(instructed_world["base_dir"], instructed_world["results_dir"])
    assert result["step"] == cfg.max_steps
    assert [h["step"] for h in history] == list(range(cfg.val_interval, cfg.max_steps + 1, cfg.val_interval))
    assert result["best_val_loss"] == min(h["loss"] for h in history)
    # the validation edits are held out from training, and the prefixes answer them from the instruction
    val_prompts = {r["prompt"] for r in instructed_world["val"]}
    assert val_prompts and not val_prompts & {r["prompt"] for r in instructed_world["train"] if r not in instructed_world["val"]}
    best = min(history, key=lambda h: h["loss"])
    assert best["edit_acc"] >= 0.75 and best["loc_acc"] >= 0.9, history
    ckpt = load_checkpoint(instructed_world["archive"])
    assert ckpt.config["prefix_layers"] == [1, 2] and ckpt.config["prefix_len"] == 5
    assert ckpt.config["info"]["loss"] == pytest.approx(result["best_val_loss"])
    assert ckpt.config["training"]["lr"] == cfg.lr
    assert isinstance(ckpt.config["encoder"], (dict, str)) and ckpt.config["base_model_fingerprint"]
    assert not (instructed_world["archive"] / "trainer_state.safetensors").exists()
    assert (instructed_world["results_dir"] / "last" / "trainer_state.safetensors").exists()


def _lm(base_dir, bank):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructedit_plugin.instructed.model import load_encoder

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
    first = lm(**enc, instructions=[req["instruction"]] * 2).logits
    lm2, _ = _lm(instructed_world["base_dir"], again.bank)
    assert torch.equal(first, lm2(**enc, instructions=[req["instruction"]] * 2).logits)
    # a damaged file is detected through the manifest
    data = bytearray((copy_dir / "prefixes.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy_dir / "prefixes.safetensors").write_bytes(bytes(data))
    with pytest.raises(PluginError, match="sha256"):
        load_checkpoint(copy_dir)


def test_resume_continues_from_the_saved_step(instructed_world, tmp_path):
    reqs = instructed_world["train"][:8]
    common = dict(max_steps=4, val_interval=2, warmup_steps=2, batch_size=2, unmodified_batch_size=2, val_fraction=0.25)
    first = InstructEdTrainer(training_config(instructed_world["base_dir"], tmp_path, **common), reqs)
    out = first.run()
    first.close()
    assert out["step"] == 4
    saved_state = {k: v.clone() for k, v in first.optimizer.state[first.bank.embeddings].items() if torch.is_tensor(v)}
    saved_bank = first.bank.embeddings.detach().clone()
    saved_lr = first.scheduler.get_last_lr()

    second = InstructEdTrainer(training_config(instructed_world["base_dir"], tmp_path, **dict(common, max_steps=6, resume=True)), reqs)
    second._resume()
    assert second.step == 4
    assert torch.equal(second.bank.embeddings, saved_bank)
    for key, value in second.optimizer.state[second.bank.embeddings].items():
        if torch.is_tensor(value):
            assert torch.equal(value, saved_state[key]), key
    assert second.scheduler.get_last_lr() == saved_lr
    second.config.resume = False  # already resumed above
    out = second.run()
    second.close()
    assert out["step"] == 6
    assert [h["step"] for h in out["history"]] == [2, 4, 6]


def test_easyedit_edit_trainer_is_pointed_to_the_plugin_trainer():
    import instructedit_plugin

    instructedit_plugin.register()
    import sys

    train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
    with pytest.raises(PluginError, match="InstructEdTrainer"):
        train_dict["INSTRUCTED"](None, None, None)


def test_val_set_must_be_disjoint(instructed_world):
    reqs = instructed_world["train"][:4]
    cfg = training_config(instructed_world["base_dir"], Path("/nonexistent-unused"), max_steps=1)
    with pytest.raises(PluginError, match="shares"):
        InstructEdTrainer(cfg, reqs, reqs[:1])
