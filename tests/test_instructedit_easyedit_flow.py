"""EasyEdit's own InstructEdit workflow, unchanged, with the plugin's classes (issue #13 item 2).

* (a) ``EditTrainer(config=InstructEditTrainingHparams, train_set=ZsreDataset(...) /
  CounterFactDataset(...))`` trains on EasyEdit's own dataset classes, on the PyPI flavour and on
  EasyEdit main (``EASYEDIT_SRC``), and writes an archive ``BaseEditor`` edits with; the trained
  editor lowers the edit loss further than the untrained one.
* (b) EasyEdit main: ``instructedit make-multitask`` writes the multi-task file from the shared
  CounterFact/Recent/ConvSent files, and ``MultiTaskDataset(<file>, config=...)`` +
  ``MultiTaskTrainer`` train an InstructEdit editor on it.
* (c) A prompt the caller templated already (``Task: ...\\nDescription: ...\\nInput: ...``, as
  EasyEdit's ``test_InstructEdit.py`` writes them) gets no second instruction.

Each flavour runs in a subprocess (this process may have imported the other one).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from instructedit_plugin.instructedit import InstructEditHyperParams
from instructedit_plugin.instructedit.instructedit_main import build_edit_batch, instructed_prompt, is_instructed
from instructedit_plugin.instructions import DEFAULT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")
DATA = Path(os.environ.get("INSTRUCTEDIT_DATA_DIR", str(REPO.parent / "shared" / "data")))
if not (DATA / "counterfact").is_dir():
    DATA = Path("/work/shared/data")
EDIT_YAML = REPO / "hparams" / "InstructEdit" / "tiny.yaml"

needs_data = pytest.mark.skipif(not (DATA / "counterfact" / "counterfact-train.json").is_file(),
                                reason="the shared data folder (INSTRUCTEDIT_DATA_DIR) is absent")


def _run(script: str, flavour: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EASYEDIT_SRC"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if flavour == "main":
        if not EASYEDIT_SRC:
            pytest.skip("EASYEDIT_SRC is not set: no clone of EasyEdit main to test against")
        env["EASYEDIT_SRC"] = EASYEDIT_SRC
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900,
                          cwd=str(cwd))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture()
def gpt2_named_dir(tiny_gpt2_dir, tmp_path) -> Path:
    """The tiny GPT-2 in a folder whose name says ``gpt2`` (EasyEdit main picks the tokenizer's
    padding from the name, as for ``hugging_cache/gpt2-xl``)."""
    target = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, target)
    return target


# ------------------------------------------------------------ (a) EditTrainer + EasyEdit datasets
EDIT_TRAINER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    import instructedit_plugin
    info = instructedit_plugin.register()
    from easyeditor import BaseEditor, CounterFactDataset, EditTrainer, ZsreDataset
    from instructedit_plugin.instructedit import InstructEditHyperParams, InstructEditModel, load_editor, load_editor_for
    from tests.test_instructedit_editing import training_config

    model_dir, work, data = Path({model!r}), Path({work!r}), Path({data!r})
    sources = {{"zsre": (ZsreDataset, data / "zsre" / "zsre_mend_eval_portability_gpt4.json"),
               "counterfact": (CounterFactDataset, data / "counterfact" / "counterfact-train.json")}}
    out = {{"flavour": info.flavour}}
    for name, (cls, path) in sources.items():
        small = work / f"{{name}}.json"
        small.write_text(json.dumps(json.loads(path.read_text())[:24]))
        cfg = training_config(model_dir, work / f"results-{{name}}", max_iters=40, val_interval=20, val_steps=4,
                              log_interval=20, max_length=40, progress=False)
        cfg.tokenizer_name = str(model_dir)
        train_set = cls(str(small), config=cfg)
        val_set = cls(str(small), config=cfg, size=8)
        trainer = EditTrainer(config=cfg, train_set=train_set, val_set=val_set)
        trainer.run()
        archive = Path(trainer.save_path)
        # edit loss after one edit, trained vs untrained editor, on EasyEdit's own batches
        tensors, _ = load_editor(archive)
        model = trainer.model.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            untrained = InstructEditModel(model, cfg)
        trained = InstructEditModel(model, cfg)
        trained.load_state_dict(tensors)
        losses = {{"trained": [], "untrained": [], "pre": []}}
        for i in range(0, 8, 2):
            batch = val_set.collate_gpt_fn([val_set[i], val_set[i + 1]])
            inner = batch["edit_inner"]
            for key, editor in (("trained", trained), ("untrained", untrained)):
                editor.eval()
                edited, info_ = editor.edit(inner)
                with torch.no_grad():
                    losses[key].append(float(editor.edit_loss_fn(cfg, edited(**inner), inner["labels"])["nll"]))
            losses["pre"].append(info_["edit/loss_pre"])
        # the archive, loaded for editing, is the trained editor (on the plugin's own batch layout)
        from instructedit_plugin.instructedit import encode_pairs
        own = encode_pairs(train_set.tok, [(val_set[0]["prompt"], val_set[0]["target_new"])], 40)
        loaded = load_editor_for(model, archive)
        new, _ = loaded.new_weights(model, own)
        edited, _ = trained.edit(own)
        same = all(torch.allclose(new[k], edited.new_weights[k].detach(), atol=1e-5) for k in new)
        # BaseEditor edits with EasyEdit's archive
        hp = InstructEditHyperParams.from_hparams({edit_yaml!r})
        hp.model_name, hp.archive = str(model_dir), str(archive)
        editor = BaseEditor.from_hparams(hp)
        record = train_set[0]
        kwargs = {{"keep_original_weight": True}} if info.flavour == "pypi" else {{"sequential_edit": False}}
        metrics, _, _ = editor.edit(prompts=[record["prompt"]], target_new=[record["target_new"]],
                                    ground_truth=[record["ground_truth"]], verbose=False, **kwargs)
        out[name] = {{"archive_is_file": archive.is_file(), "n_train": len(train_set), "same_edit": same,
                     "loss": {{k: sum(v) / len(v) for k, v in losses.items()}},
                     "post": [float(x) for x in metrics[0]["post"]["rewrite_acc"]],
                     "pre": [float(x) for x in metrics[0]["pre"]["rewrite_acc"]]}}
    print("RESULT " + json.dumps(out))
    """
)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["pypi", pytest.param("main", marks=pytest.mark.easyedit_main)])
def test_edit_trainer_trains_on_easyedit_zsre_and_counterfact_datasets(flavour, gpt2_named_dir, tmp_path):
    out = _run(EDIT_TRAINER.format(repo=str(REPO), model=str(gpt2_named_dir), work=str(tmp_path), data=str(DATA),
                                   edit_yaml=str(EDIT_YAML)), flavour, tmp_path)
    assert out["flavour"] == flavour
    for name in ("zsre", "counterfact"):
        facts = out[name]
        assert facts["archive_is_file"] and facts["n_train"] == 24, facts
        loss = facts["loss"]
        # meta-training made the editor's edits better than the untrained editor's
        assert loss["trained"] < 0.8 * loss["untrained"], facts
        assert loss["untrained"] > 0.9 * loss["pre"], facts
        # the archive loads for editing as the trained editor, and BaseEditor edits with it
        assert facts["same_edit"], facts
        assert len(facts["post"]) >= 1 and len(facts["pre"]) == len(facts["post"]), facts


# ----------------------------------------------------- (b) multi-task file + MultiTaskTrainer (main)
@needs_data
def test_make_multitask_writes_the_records_multitaskdataset_reads(tmp_path):
    from instructedit_plugin.cli import main

    out = tmp_path / "multitask.json"
    assert main(["make-multitask", "--data_dir", str(DATA), "--out", str(out), "--n", "4"]) == 0
    records = json.loads(out.read_text())
    assert sorted({r["type"] for r in records}) == ["convsent", "counterfact", "wikirecent"]
    assert len(records) == 12 and [r["case_id"] for r in records] == list(range(12))
    for r in records:
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["target_new"], str) and r["target_new"]
        assert r["locality"], r  # MultiTaskDataset's batches and MultiTaskTrainer's KL need locality
        for block in r["locality"].values():
            assert len(block["prompt"]) == len(block["ground_truth"]) >= 1
            assert all(isinstance(x, str) and x for x in block["prompt"] + block["ground_truth"])
    recent = [r for r in records if r["type"] == "wikirecent"]
    source = json.loads((DATA / "recent" / "recent_train.json").read_text())[:4]
    assert sorted(r["prompt"] for r in recent) == sorted(s["prompt"] for s in source)  # the first n of each file


def test_make_multitask_without_data_names_the_folder(tmp_path, capsys):
    from instructedit_plugin.cli import main

    code = main(["make-multitask", "--data_dir", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert code != 0
    err = capsys.readouterr().err
    assert "counterfact" in err and "Fix:" in err
    assert not (tmp_path / "x.json").exists()


MULTITASK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    import instructedit_plugin
    info = instructedit_plugin.register()
    from easyeditor import MultiTaskDataset, MultiTaskTrainer
    from tests.test_instructedit_editing import training_config

    model_dir, work = Path({model!r}), Path({work!r})
    cfg = training_config(model_dir, work / "results", max_iters=30, val_interval=15, val_steps=4, log_interval=15,
                          max_length=64, progress=False)
    cfg.tokenizer_name = str(model_dir)
    train_set = MultiTaskDataset({file!r}, config=cfg)
    val_set = MultiTaskDataset({file!r}, config=cfg, size=6)
    trainer = MultiTaskTrainer(config=cfg, train_set=train_set, val_set=val_set)
    start = {{k: v.clone() for k, v in trainer.model.state_dict().items()}}
    trainer.run()
    after = trainer.model.state_dict()
    out = {{"flavour": info.flavour, "n": len(train_set),
           "instructed": all(r["prompt"].startswith("Task: ") for r in train_set),
           "changed": [k for k in start if not torch.equal(start[k], after[k])],
           "archive_is_file": Path(trainer.save_path).is_file()}}
    print("RESULT " + json.dumps(out))
    """
)


@needs_data
@pytest.mark.slow
@pytest.mark.easyedit_main
def test_multitask_trainer_trains_instructedit_on_a_make_multitask_file(gpt2_named_dir, tmp_path):
    from instructedit_plugin.data.multitask_file import write_multitask_file

    file = tmp_path / "multitask.json"
    write_multitask_file(file, DATA, n_per_task=6)
    out = _run(MULTITASK.format(repo=str(REPO), model=str(gpt2_named_dir), work=str(tmp_path), file=str(file)),
               "main", tmp_path)
    assert out["flavour"] == "main" and out["n"] == 18 and out["instructed"]
    assert any(k.startswith("hypernet.") for k in out["changed"]) and "edit_lrs" in out["changed"], out
    assert out["archive_is_file"]


# --------------------------------------------------------------- (c) no second instruction
def _hp() -> InstructEditHyperParams:
    hp = InstructEditHyperParams.from_hparams(EDIT_YAML)
    hp.archive = None
    return hp


@pytest.mark.parametrize("task", ["counterfact", "recent", "zsre"])
def test_a_prompt_templated_by_the_caller_gets_no_second_instruction(task):
    hp = _hp()
    plain = "The capital of France is"
    once = instructed_prompt({"prompt": plain, "task": task}, hp)
    assert once != plain and once.endswith(plain) and is_instructed(once)
    assert instructed_prompt({"prompt": once, "task": task}, hp) == once
    # EasyEdit's test_InstructEdit.py template, with a description of the caller's own
    theirs = DEFAULT_TEMPLATE.format(task="wikirecent", description="A curated collection of WikiData facts.",
                                     input=plain)
    for request in ({"prompt": theirs}, {"prompt": [theirs], "task": task},
                    {"prompt": theirs, "task": task, "instruction": "another description"}):
        assert instructed_prompt(request, hp) == theirs
        assert instructed_prompt(request, hp).count("Task: ") == 1


def test_the_edit_batch_of_a_templated_prompt_equals_the_once_instructed_one(tiny_gpt2_dir):
    from instructedit_plugin.models.loading import load_causal_lm

    _, tok = load_causal_lm(tiny_gpt2_dir)
    hp = _hp()
    plain = {"prompt": "The capital of France is", "target_new": "Rome", "task": "counterfact"}
    templated = dict(plain, prompt=instructed_prompt(plain, hp))
    a = build_edit_batch(tok, [plain], hp, "cpu")
    b = build_edit_batch(tok, [templated], hp, "cpu")
    assert all(a[k].tolist() == b[k].tolist() for k in a)


@pytest.mark.parametrize("prompt", ["Task: counterfact is a dataset. The capital of France is",
                                    "The capital of France is\nTask: x\nDescription: y\nInput: z",
                                    "Task: zsre\nInput: q\nDescription: d"])
def test_prompts_that_only_look_like_the_template_are_still_instructed(prompt):
    assert not is_instructed(prompt)
    assert instructed_prompt({"prompt": prompt, "task": "zsre"}, _hp()).count("Task: ") == prompt.count("Task: ") + 1
