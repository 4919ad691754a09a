"""InstructEdit evaluation: per-task / seen / unseen structure, baselines without instructions, spies."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from instructedit_plugin.instructedit import InstructEditTrainingHparams
from instructedit_plugin.instructedit import evaluate as ev
from instructedit_plugin.instructedit.instructedit_main import instructed_prompt
from instructedit_plugin.instructedit.dataset import InstructEditDataset
from instructedit_plugin.instructedit.evaluate import (
    MethodSpec,
    edit_prompt,
    evaluate_instructedit,
    left_pad,
    prepare_test_requests,
    save_results,
    train_editor,
)
from instructedit_plugin.instructions import default_library
from instructedit_plugin.models.loading import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
TASKS = ("counterfact", "recent", "convsent")


def _record(i: int, task: str) -> dict:
    r = {"prompt": f"The capital of Country{i} is", "target_new": f"City{i % 5}", "ground_truth": "Paris",
         "subject": f"Country{i}", "rephrase_prompt": f"Which city is the capital of Country{i}?",
         "locality": {"nq": {"prompt": "The Moon orbits the", "ground_truth": "Earth"}},
         "portability": {"one_hop": {"prompt": f"The capital city of Country{i} is", "ground_truth": f"City{i % 5}"}}}
    if task == "convsent":
        r.update(topic=f"topic{i}", subject=f"topic{i}", prompt=f"What do you think of topic{i}?",
                 pos=[f" I like topic{i}. ", " It is great. ", " Lovely. "], neg=[" I hate it. ", " Awful. "],
                 target_new=f"I like topic{i}.", rephrase_prompt=None, locality={}, portability={})
        del r["rephrase_prompt"]
    return r


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, tmp_path_factory):
    torch.set_num_threads(1)
    model, tok = load_causal_lm(tiny_gpt2_dir)
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.model_name = str(tiny_gpt2_dir)
    cfg.max_iters, cfg.val_interval, cfg.val_steps, cfg.progress = 6, 6, 2, False
    root = tmp_path_factory.mktemp("eval")
    train = {t: [_record(i, t) for i in range(10)] for t in TASKS}
    runs = {}
    for name, instr, tasks in (("instructedit", True, train), ("mend_multitask", False, train),
                               ("mend_single_task", False, {"counterfact": train["counterfact"]})):
        cfg.results_dir = str(root / name)
        runs[name] = train_editor(cfg, tasks, tok, model, use_instructions=instr, val_size=2)
    methods = [MethodSpec(n, r["best_checkpoint"], n == "instructedit") for n, r in runs.items()]
    test = {t: [_record(100 + i, t) for i in range(2)] for t in TASKS}
    test["zsre_holdout"] = [_record(200 + i, "zsre") for i in range(2)]
    return {"model": model, "tok": tok, "runs": runs, "methods": methods, "test": test, "root": root}


def test_evaluation_has_per_task_seen_and_unseen_structure_in_percent(setup, tmp_path):
    res = evaluate_instructedit(setup["model"], setup["tok"], setup["methods"], setup["test"])
    assert set(res["tasks"]) == {"counterfact", "recent", "convsent", "zsre_holdout"}
    for per_method in res["tasks"].values():
        assert set(per_method) == {"instructedit", "mend_multitask", "mend_single_task"}
        for summary in per_method.values():
            assert summary["n_edits"] == 2
            for m in ("Rel", "Loc"):
                assert 0.0 <= summary[m] <= 100.0
            for m in ("Gen", "Por"):
                assert summary[m] is None or 0.0 <= summary[m] <= 100.0
    assert set(res["unseen_instruction"]) == set(res["tasks"])
    assert all(set(v) == {"instructedit"} for v in res["unseen_instruction"].values())
    assert res["tasks"]["counterfact"]["instructedit"]["Por"] is not None
    sent = res["tasks"]["convsent"]["instructedit"]["sentiment"]
    assert 0.0 <= sent["success_post"] <= 100.0 and sent["n_edits"] == 2
    assert set(res["latency"]) == {"instructedit", "mend_multitask", "mend_single_task"}
    assert all(v["edit_ms"] > 0 for v in res["latency"].values())
    save_results(res, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["zsre_holdout"]
    assert "| zsre_holdout | instructedit |" in (tmp_path / "r.md").read_text()
    # the model's own weights were never written
    fresh, _ = load_causal_lm(setup["model"].name_or_path)
    for (name, a), (_, b) in zip(setup["model"].named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def _spy(monkeypatch, tok):
    seen: list[tuple[int, str]] = []
    real = ev.compute_edited_weights

    def spy(model, hypernet, edit_lrs, specs, batch, *args, **kwargs):
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen.append((id(hypernet), tok.decode(row[mask.bool()])))
        return real(model, hypernet, edit_lrs, specs, batch, *args, **kwargs)

    monkeypatch.setattr(ev, "compute_edited_weights", spy)
    return seen


def test_baselines_send_no_instruction_and_unseen_uses_only_the_held_back_description(setup, monkeypatch):
    tok = setup["tok"]
    library = default_library()
    test = {"counterfact": setup["test"]["counterfact"], "convsent": setup["test"]["convsent"]}
    for spec in setup["methods"]:
        seen = _spy(monkeypatch, tok)
        res = evaluate_instructedit(setup["model"], tok, [spec], test, unseen=True)
        assert len(seen) == (8 if spec.instructions else 4)
        if not spec.instructions:
            assert "unseen_instruction" not in res or not res["unseen_instruction"]
            for _, text in seen:
                assert "Task:" not in text and "Description:" not in text
                assert text.split(" City")[0].split(" I like")[0].strip() in {r["prompt"] for rs in test.values() for r in rs}
        else:
            seen_texts = [t for _, t in seen[:2]] + [t for _, t in seen[4:6]]
            unseen_texts = [t for _, t in seen[2:4]] + [t for _, t in seen[6:8]]
            for task, texts, recs in (("counterfact", (seen_texts[:2], unseen_texts[:2]), test["counterfact"]),
                                      ("convsent", (seen_texts[2:], unseen_texts[2:]), test["convsent"])):
                family = library.get(task)
                for text, rec in zip(texts[1], recs):  # unseen: exactly the held-back description
                    held = family.description(family.held_out_index, rec)
                    assert f"Description: {held}\n" in text
                    others = [family.description(i, rec) for i in family.training_indices]
                    assert not any(f"Description: {o}\n" in text for o in others)
                for text, rec in zip(texts[0], recs):  # seen: a training description, never the held-back one
                    assert family.description(family.held_out_index, rec) not in text
                    assert any(f"Description: {family.description(i, rec)}\n" in text for i in family.training_indices)


def test_instruction_switch_in_dataset_and_apply(setup):
    tok = setup["tok"]
    train = {t: [_record(i, t) for i in range(4)] for t in TASKS}
    plain = InstructEditDataset(train, tok, mode="train", use_instructions=False)
    item = plain.draw(random.Random(0))
    assert item["edit"][0] == train[item["task"]][item["index"]]["prompt"]
    assert not item["rephrase"] or "Task:" not in item["rephrase"][0]
    instructed = InstructEditDataset(train, tok, mode="train")
    assert instructed.draw(random.Random(0))["edit"][0].startswith("Task: ")

    class HP:
        use_instructions = False
        default_task = "counterfact"
        instructions_dir = None
        description_index = None

    assert instructed_prompt(train["counterfact"][0], HP()) == train["counterfact"][0]["prompt"]
    HP.use_instructions = True
    assert instructed_prompt(train["counterfact"][0], HP()).startswith("Task: counterfact")


def test_edit_prompt_modes_and_helpers():
    rec = _record(1, "counterfact")
    assert edit_prompt(rec, "counterfact", "none") == rec["prompt"]
    family = default_library().get("zsre")
    unseen = edit_prompt(rec, "zsre_holdout", "unseen")
    assert unseen.startswith("Task: zsre\n") and family.held_out_description in unseen
    with pytest.raises(ValueError):
        edit_prompt(rec, "counterfact", "sometimes")
    prepared = prepare_test_requests("counterfact", [dict(rec, rephrase_prompt=None, generate_prompts=["1. Where is X?"])])
    assert prepared[0]["rephrase_prompt"] == "Where is X?" and prepared[0]["task"] == "counterfact"
    enc = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
           "labels": torch.tensor([[-100, -100, 7, -100], [-100, 9, -100, -100]])}
    lp = left_pad(enc)
    assert lp["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert lp["labels"][:, -1].tolist() == [7, 9]
    assert lp["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]


@pytest.fixture(scope="module")
def llama_setup(tiny_llama_dir, tmp_path_factory):
    """One InstructEdit editor on a rotary (LLaMA) model, where EasyEdit's left padding
    without position ids shifts every position by the same amount and so changes nothing."""
    torch.set_num_threads(1)
    model, tok = load_causal_lm(tiny_llama_dir)
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.model_name = str(tiny_llama_dir)
    cfg.inner_params = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    cfg.max_iters, cfg.val_interval, cfg.val_steps, cfg.progress = 40, 40, 2, False
    cfg.edit_lr = 1e-1
    cfg.results_dir = str(tmp_path_factory.mktemp("eval_llama") / "instructedit")
    train = {t: [_record(i, t) for i in range(10)] for t in TASKS}
    run = train_editor(cfg, train, tok, model, use_instructions=True, val_size=2)
    test = {"counterfact": [_record(100 + i, "counterfact") for i in range(3)],
            "zsre_holdout": [_record(200 + i, "zsre") for i in range(3)]}
    return {"model": model, "tok": tok, "spec": MethodSpec("instructedit", run["best_checkpoint"], True), "test": test}


def test_plugin_metrics_match_easyedit_compute_edit_quality(llama_setup):
    """Every metric, Loc included, agrees with EasyEdit's ``compute_edit_quality`` to 1e-3."""
    from types import SimpleNamespace

    import instructedit_plugin

    instructedit_plugin.register()
    s = llama_setup
    hp = SimpleNamespace(alg_name="InstructEdit", model_name=str(s["model"].name_or_path), max_length=40, device="cpu")
    ours = evaluate_instructedit(s["model"], s["tok"], [s["spec"]], s["test"], unseen=False)
    theirs = evaluate_instructedit(s["model"], s["tok"], [s["spec"]], s["test"], unseen=False,
                                   metric_backend="easyedit", easyedit_hparams=hp)
    # the edits are strong enough that Loc is not trivially 100 (it is 22 and 56 on this seed)
    assert min(ours["tasks"][t]["instructedit"]["Loc"] for t in s["test"]) < 90.0
    for task in s["test"]:
        a, b = ours["tasks"][task]["instructedit"], theirs["tasks"][task]["instructedit"]
        for m in ("Rel", "Gen", "Loc", "Por"):
            assert a[m] == pytest.approx(b[m], abs=1e-3), (task, m, a, b)
