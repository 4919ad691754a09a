"""InstructEdit's multi-task dataset: sampling, splits, instructions and batches."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from instructedit_plugin.errors import PluginError
from instructedit_plugin.instructedit.dataset import InstructEditDataset, record_identity, split_tasks
from instructedit_plugin.instructions import default_library
from tests.support.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer()
    return tokenizer


def _records(task: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"prompt": f"The capital of Country{i} is", "target_new": f"City{i % 7}", "ground_truth": "Paris",
               "subject": f"Country{i}", "rephrase_prompt": f"Which city is the capital of Country{i}?",
               "locality": {"nq": {"prompt": "The Moon orbits the", "ground_truth": "Earth"}}, "portability": {}}
        if task == "convsent":
            rec.update(topic=f"topic{i}", pos=[f"I like topic{i}."], neg=[f"I hate topic{i}."], target_new=f"I like topic{i}.")
        out.append(rec)
    return out


def _tasks(sizes=(("counterfact", 40), ("recent", 10), ("convsent", 20))):
    return {t: _records(t, n) for t, n in sizes}


def test_held_out_description_never_used_in_1000_training_examples(tok):
    ds = InstructEditDataset(_tasks(), tok, mode="train", seed=3)
    library = default_library()
    rng = random.Random(0)
    seen: dict[str, set[int]] = {}
    for _ in range(1000):
        item = ds.draw(rng)
        family = library.get(item["task"])
        assert item["description_index"] != family.held_out_index
        held = family.fill(family.held_out_description, ds.tasks[item["task"]][item["index"]])
        for text in (item["edit"][0], item["rephrase"][0]):
            assert held not in text
            assert text.startswith(f"Task: {item['task']}\nDescription: ")
        seen.setdefault(item["task"], set()).add(item["description_index"])
    # a fresh description per draw: every training description shows up
    assert all(len(indices) == 9 for indices in seen.values())


def test_balanced_default_and_configured_proportions(tok):
    rng = random.Random(1)
    ds = InstructEditDataset(_tasks(), tok, mode="train")
    counts = Counter(ds.draw(rng)["task"] for _ in range(3000))
    for task in ("counterfact", "recent", "convsent"):  # uniform over tasks, not over records
        assert abs(counts[task] / 3000 - 1 / 3) < 0.04
    ds = InstructEditDataset(_tasks(), tok, mode="train", proportions={"counterfact": 3, "recent": 1, "convsent": 0})
    counts = Counter(ds.draw(rng)["task"] for _ in range(3000))
    assert counts["convsent"] == 0
    assert abs(counts["counterfact"] / 3000 - 0.75) < 0.04
    with pytest.raises(PluginError, match="zsre"):
        InstructEditDataset(_tasks(), tok, proportions={"zsre": 1.0})


def test_validation_split_is_seeded_and_disjoint_by_record_identity(tok):
    tasks = _tasks()
    tasks["counterfact"].append(dict(tasks["counterfact"][0]))  # a duplicate record
    train, val = split_tasks(tasks, val_fraction=0.25, seed=7)
    again_train, again_val = split_tasks(tasks, val_fraction=0.25, seed=7)
    assert train == again_train and val == again_val
    for task in tasks:
        train_ids = {record_identity(task, r) for r in train[task]}
        val_ids = {record_identity(task, r) for r in val[task]}
        assert not train_ids & val_ids
        assert len(train[task]) + len(val[task]) == len(tasks[task])
        assert val[task]
    other_train, _ = split_tasks(tasks, val_fraction=0.25, seed=8)
    assert other_train != train


def test_batches_mask_prompt_and_padding(tok):
    ds = InstructEditDataset(_tasks(), tok, mode="train", raw_edit_loss=True)
    batch = ds.sample_batch(3, random.Random(0))
    assert batch["cond"] is None and len(batch["tasks"]) == 3
    edit = batch["edit_inner"]
    assert edit["input_ids"].shape == edit["labels"].shape == edit["attention_mask"].shape
    for row, item in enumerate(batch["raw"]):
        prompt, target = item["edit"]
        ids = edit["input_ids"][row]
        labels = edit["labels"][row]
        n_prompt = len(tok(prompt)["input_ids"])
        n_real = int(edit["attention_mask"][row].sum())
        assert (labels[:n_prompt] == -100).all()
        assert (labels[n_real:] == -100).all()  # padding
        assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])
        assert tok.decode(ids[n_prompt:n_real]).strip() == target
    # outer rows: instructed edit inputs, then rephrases, then the raw prompts
    assert batch["edit_outer"]["input_ids"].shape[0] == 9
    assert batch["loc"]["input_ids"].shape[0] == 3
    assert "Task:" not in tok.decode(batch["edit_raw"]["input_ids"][0])


def test_validation_items_are_fixed_and_can_use_the_held_out_description(tok):
    val = InstructEditDataset(_tasks(), tok, mode="val", description="held_out")
    assert len(val) == 70
    library = default_library()
    item = val[0]
    assert item == val[0]
    assert item["description_index"] == library.get(item["task"]).held_out_index
    val_train = InstructEditDataset(_tasks(), tok, mode="val")
    assert all(val_train[i]["description_index"] != library.get(val_train[i]["task"]).held_out_index for i in range(len(val_train)))


def test_locality_inputs_can_carry_the_instruction(tok):
    plain = InstructEditDataset(_tasks(), tok, instruct_locality=False).draw(random.Random(0))
    instructed = InstructEditDataset(_tasks(), tok, instruct_locality=True).draw(random.Random(0))
    assert plain["loc"][0] == "The Moon orbits the"
    assert instructed["loc"][0].startswith("Task: ") and instructed["loc"][0].endswith("The Moon orbits the")


def test_unknown_task_is_rejected(tok):
    with pytest.raises(PluginError, match="known tasks"):
        InstructEditDataset({"nonsense": _records("x", 3)}, tok)


def test_long_inputs_lose_the_start_of_the_input_not_the_instruction(tok, caplog):
    from instructedit_plugin.instructedit.dataset import encode_pairs

    prompt = "Task: CounterFact\nDescription: Change the fact.\nInput: " + "very " * 60 + "The capital of France is"
    with caplog.at_level("WARNING"):
        batch = encode_pairs(tok, [(prompt, "Rome"), ("Task: A\nDescription: B\nInput: short", "x")], max_length=32)
    assert batch["input_ids"].shape[1] == 32
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.startswith("Task: CounterFact\nDescription: Change the fact.\nInput:")  # instruction kept
    assert text.endswith("The capital of France is Rome")  # answer and the end of the input kept
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(answer).strip() == "Rome"
    assert "1 of 2 edit inputs are longer than max_length=32" in caplog.text
    # no instruction (plain MEND): the start goes, the answer stays
    plain = encode_pairs(tok, [("very " * 60 + "The capital of France is", "Rome")], max_length=16)
    assert tok.decode(plain["input_ids"][0]).endswith("The capital of France is Rome")
