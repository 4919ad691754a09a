"""InstructEd ablation on the tiny world's held-out edits: trained prefixes vs an untrained bank vs none.

The paper's Table 13 compares InstructEd with the same frozen model "w/o prefix" (the instruction in
context, nothing trained): the prefixes are what makes Gen and Loc high. Here the same comparison
runs on the 8 held-out edits of the session's world (:mod:`tests._instructed_world`), in the gold
setting (each question gets its own edit's instruction; a locality question gets the edit's
instruction too, and is scored against the unedited model's answer without it):

* ``trained``: the archive the plugin's trainer wrote (``instructed_world["archive"]``);
* ``initial``: the trainer's own bank before its first step (what training started from);
* ``random``: another draw from the same init distribution (``N(0, init_std^2)``, seed 1);
* ``none``: ``InstructedLM(use_prefixes=False)``, the instruction in context on the plain model.

Measured (torch 2.13 CPU, one thread): trained Rel/Gen/Loc 100/100/87.5, the three others 0/0/0
(worlds pretrained with other seeds: trained 87.5-100 on each, the others 0-12.5). Asserted: trained Gen and Loc >= 75 and at least
:data:`MARGIN` points above each of the others; the others <= 25.
"""
from __future__ import annotations

import pytest
import torch

from instructedit_plugin.instructed.checkpoint import load_checkpoint
from instructedit_plugin.instructed.lm import InstructedLM, load_encoder
from instructedit_plugin.instructed.prefix import PrefixBank

from ._instructed_world import gold_scores

#: points by which trained prefixes beat each ablation on Gen and Loc (measured gaps: 87.5-100)
MARGIN = 50.0
#: trained prefixes' Rel, Gen and Loc (measured 100/100/87.5); the ablations stay at or below CEILING (measured 0)
FLOOR, CEILING = 75.0, 25.0


@pytest.fixture(scope="module")
def scores(instructed_world) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = instructed_world["base_dir"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    encoder = load_encoder("default")
    ckpt = load_checkpoint(instructed_world["archive"])
    trained, init_std = ckpt.bank, float(ckpt.config["training"]["init_std"])
    initial = PrefixBank(trained.layers, trained.prefix_len, trained.hidden_size)
    with torch.no_grad():
        initial.embeddings.copy_(instructed_world["initial_bank"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        random_bank = PrefixBank(trained.layers, trained.prefix_len, trained.hidden_size, init_std=init_std)
    banks = {"trained": trained, "initial": initial, "random": random_bank}
    out = {name: gold_scores(InstructedLM(base, tok, bank, encoder=encoder), base, tok, instructed_world["test"])
           for name, bank in banks.items()}
    out["none"] = gold_scores(InstructedLM(base, tok, trained, encoder=encoder, use_prefixes=False), base, tok,
                              instructed_world["test"])
    print("gold, held-out world edits:", {k: {m: round(v, 1) for m, v in s.items()} for k, s in out.items()})
    return out


def test_trained_prefixes_beat_an_untrained_bank_and_no_prefixes(scores):
    trained = scores["trained"]
    assert trained["Rel"] >= FLOOR and trained["Gen"] >= FLOOR and trained["Loc"] >= FLOOR, scores
    for name in ("initial", "random", "none"):
        other = scores[name]
        for metric in ("Gen", "Loc"):
            assert trained[metric] - other[metric] >= MARGIN, (name, metric, scores)
            assert other[metric] <= CEILING, (name, metric, scores)
        assert other["Rel"] <= CEILING, (name, scores)


def test_the_trained_bank_is_not_the_bank_training_started_from(instructed_world):
    """A trainer whose steps change nothing would hand back its initial bank (and fail the test above)."""
    trained = load_checkpoint(instructed_world["archive"]).bank.embeddings
    moved = (trained - instructed_world["initial_bank"]).norm() / instructed_world["initial_bank"].norm()
    assert moved > 0.05, float(moved)
