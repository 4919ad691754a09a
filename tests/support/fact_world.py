"""Tiny synthetic fact worlds for the InstructEdit tests: facts, edit records, a taught world model.

A *world* is a set of relations ("The capital of {} is", ...) over countries, each country's true
answer drawn with a seeded RNG (:func:`world_truth`). :func:`build_world_model_dir` teaches a tiny
GPT-2 those facts (plain prompts and rephrases, and optionally the same prompts under every
instruction of the task's family, ``Task: ..\\nDescription: ..\\nInput: <prompt>``) and saves it as
an ordinary Hugging Face folder in the plugin cache, keyed by everything that decides its weights,
so a second test run reuses it. :func:`edit_records` makes counterfactual edit records with
rephrases and same-relation neighbours (other subjects with their true answers) as locality data.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from instructedit_plugin.models.cache import atomic_dir, cache_dir, content_key, read_json, write_json

LOG = logging.getLogger(__name__)

#: Bump when the teaching recipe changes (invalidates every cached world folder).
WORLD_BUILD_VERSION = 1
BUILD_INFO_FILE = "fact_world.json"


@dataclasses.dataclass(frozen=True)
class Relation:
    """One relation of the world, named by the InstructEdit task it stands for."""

    task: str
    prompt: str  # "The capital of {} is"
    rephrase: str  # "Which city is the capital of {}?"
    answers: tuple[str, ...]  # one tokenizer token each


def world_truth(relations: Sequence[Relation], countries: Sequence[str], seed: int = 1) -> dict[str, dict[str, str]]:
    """``{task: {country: true answer}}``: one seeded draw per relation, then per country."""
    rng = random.Random(seed)
    return {r.task: {c: rng.choice(r.answers) for c in countries} for r in relations}


def instructed_inputs(task: str, text: str, library=None) -> list[str]:
    """``text`` under every description of ``task``'s instruction family (training and held-out)."""
    from instructedit_plugin.instructions import default_library

    family = (library or default_library()).get(task)
    return [family.render(text, family.description(i, {"prompt": text})) for i in range(len(family.descriptions))]


def fact_pairs(relations: Sequence[Relation], countries: Sequence[str], truth: dict, instructed: bool = False) -> list[tuple[str, str]]:
    """(prompt, true answer) pairs: every relation's prompt and rephrase for every country, and with
    ``instructed`` the same inputs under every description of the relation's task."""
    pairs = []
    for relation in relations:
        for c in countries:
            for text in (relation.prompt.format(c), relation.rephrase.format(c)):
                pairs.append((text, truth[relation.task][c]))
                if instructed:
                    pairs += [(x, truth[relation.task][c]) for x in instructed_inputs(relation.task, text)]
    return pairs


@dataclasses.dataclass(frozen=True)
class WorldRecipe:
    """How the world model is taught (all of it goes into the cache key)."""

    steps: int = 150
    lr: float = 3e-3
    #: None: every step uses every pair (full batch); else that many pairs drawn per step
    batch: int | None = None
    instructed: bool = False
    seed: int = 0
    #: True: the loss is on the answer tokens only; False: on every real token (prompt as text too)
    answer_only: bool = False
    #: GPT-2 size overrides of the tiny config (e.g. {"n_embd": 128}); empty: the tiny GPT-2 as built
    #: (pretrained on the tokenizer corpus) by tests.support.tiny_models
    size: tuple[tuple[str, int], ...] = ()


def teach(model, tok, pairs: Sequence[tuple[str, str]], recipe: WorldRecipe) -> float:
    """Train ``model`` on ``pairs`` (loss on the answer tokens with ``recipe.answer_only``, else on every
    real token), full batch or ``recipe.batch`` seeded random pairs per step; returns the last loss."""
    from instructedit_plugin.instructedit import encode_pairs

    batch = encode_pairs(tok, pairs, 128)
    labels = batch["labels"] if recipe.answer_only else batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        for _ in range(recipe.steps):
            if recipe.batch is None:
                idx = slice(None)
                width = batch["input_ids"].shape[1]
            else:
                idx = torch.randint(0, len(pairs), (recipe.batch,), generator=generator)
                width = int(batch["attention_mask"][idx].sum(1).max())
            loss = model(input_ids=batch["input_ids"][idx, :width], attention_mask=batch["attention_mask"][idx, :width],
                         labels=labels[idx, :width]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    return float(loss.detach())


def _base_model(recipe: WorldRecipe):
    """The tiny GPT-2 of tests.support.tiny_models, or a fresh one of ``recipe.size``."""
    from instructedit_plugin.models.loading import load_causal_lm
    from tests.support.tiny_models import build_tiny_model_dir

    model, tok = load_causal_lm(build_tiny_model_dir("gpt2"))
    if not recipe.size:
        return model, tok
    from transformers import AutoModelForCausalLM

    config = model.config
    for key, value in recipe.size:
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model, tok


def build_world_model_dir(relations: Sequence[Relation], countries: Sequence[str], recipe: WorldRecipe,
                          root: Path | None = None) -> Path:
    """A saved tiny GPT-2 that knows the world's facts (see the module docstring); cached by content key."""
    from tests.support.tiny_models import tiny_model_key

    root = Path(root) if root is not None else cache_dir()
    key = content_key({"version": WORLD_BUILD_VERSION, "base": tiny_model_key("gpt2"),
                       "relations": [dataclasses.asdict(r) for r in relations], "countries": list(countries),
                       "recipe": dataclasses.asdict(recipe),
                       "instructions": [instructed_inputs(r.task, "{}") for r in relations] if recipe.instructed else None})
    target = root / f"fact-world-{key}"
    info = read_json(target / BUILD_INFO_FILE)
    if info is not None and info.get("key") == key and (target / "model.safetensors").is_file():
        return target
    model, tok = _base_model(recipe)
    pairs = fact_pairs(relations, countries, world_truth(relations, countries), recipe.instructed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = teach(model, tok, pairs, recipe)
    finally:
        torch.set_num_threads(threads)
    LOG.info("taught the tiny world model %d steps on %d pairs, last loss %.4f", recipe.steps, len(pairs), loss)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / BUILD_INFO_FILE, {"key": key, "pairs": len(pairs), "last_loss": loss,
                                           "recipe": dataclasses.asdict(recipe)})
    return target


def neighbours(relation: Relation, subject: str, truth: dict, countries: Sequence[str], rng: random.Random,
               n: int = 3) -> dict:
    """Locality data: ``n`` other subjects' prompts of the same relation with their true answers."""
    others = rng.sample([c for c in countries if c != subject], n)
    return {"neighborhood": {"prompt": [relation.prompt.format(c) for c in others],
                             "ground_truth": [truth[relation.task][c] for c in others]}}


def edit_records(relations: Sequence[Relation], countries: Sequence[str], truth: dict, *, max_targets: int = 4,
                 seed: int = 0, locality_seed: int = 5) -> dict[str, list[dict]]:
    """``{task: [edit record, ...]}``: for every country, up to ``max_targets`` counterfactual answers
    (seeded draw among the wrong ones), each with its rephrase and :func:`neighbours` as locality."""
    rng, loc_rng = random.Random(seed), random.Random(locality_seed)
    out: dict[str, list[dict]] = {}
    for relation in relations:
        records = []
        for c in countries:
            wrong = [a for a in relation.answers if a != truth[relation.task][c]]
            for target in rng.sample(wrong, min(max_targets, len(wrong))):
                records.append({"prompt": relation.prompt.format(c), "target_new": target,
                                "ground_truth": truth[relation.task][c], "subject": c,
                                "rephrase_prompt": relation.rephrase.format(c),
                                "locality": neighbours(relation, c, truth, countries, loc_rng), "portability": {}})
        out[relation.task] = records
    return out
