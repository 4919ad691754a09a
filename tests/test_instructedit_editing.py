"""InstructEdit end to end on a tiny GPT-2: training, checkpoints, editing through EasyEdit, locality.

The tiny test models are randomly initialised; a random model's logits are too flat for any
edit to reach a confident prediction, so the module first teaches the tiny GPT-2 a small
synthetic world (capitals and languages of 20 countries; :mod:`tests.support.fact_world`),
plainly and under every instruction of the task's family (the editor's edit inputs are
instruction-prefixed; a world model that never saw the prefix answers 0/20 instructed facts and
its edited layers cannot tell subjects apart under it, issue #13 item 4). The taught model is
cached after the first build. Then the editor is meta-trained on two synthetic tasks
(counterfactual capitals as ``counterfact``, languages as ``recent``), with each record's
rephrase and three same-relation neighbours (other subjects, true answers) as locality data.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from instructedit_plugin.errors import HyperParamsError
from instructedit_plugin.instructedit import (
    InstructEditHyperParams,
    InstructEditModel,
    InstructEditTrainer,
    InstructEditTrainingHparams,
    apply_to_model,
    encode_pairs,
    load_editor,
    load_editor_for,
    make_datasets,
    save_editor,
)
from instructedit_plugin.instructedit.instructedit_main import build_edit_batch, instructed_prompt
from instructedit_plugin.models.loading import load_causal_lm
from tests.support.fact_world import (
    Relation,
    WorldRecipe,
    build_world_model_dir,
    edit_records,
    instructed_inputs,
    world_truth,
)
from tests.support.tiny_models import build_tiny_model_dir

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
EDIT_YAML = ROOT / "hparams" / "InstructEdit" / "tiny.yaml"

pytestmark = pytest.mark.slow

COUNTRIES = ("France Germany Italy Spain Japan China England Russia Canada Australia Egypt India Brazil Greece "
             "Poland Sweden Norway Finland Turkey Mexico").split()
CAPITAL = Relation("counterfact", "The capital of {} is", "Which city is the capital of {}?",
                   ("Paris", "Berlin", "Rome", "Madrid", "Tokyo", "London", "Ottawa"))  # one token each
LANGUAGE = Relation("recent", "The official language of {} is", "People in {} speak", ("French", "German", "Spanish", "English"))
RELATIONS = (CAPITAL, LANGUAGE)
#: The world model answers every fact plainly and under every instruction of its task (the editor's
#: edit inputs are instruction-prefixed; a model that never saw the prefix cannot tell subjects apart
#: under it, see issue #13 item 4). Cached in the plugin cache after the first build.
WORLD = WorldRecipe(steps=300, batch=32, instructed=True, answer_only=True)


def _truth() -> dict[str, dict[str, str]]:
    return world_truth(RELATIONS, COUNTRIES)


def synthetic_tasks() -> dict[str, list[dict]]:
    """Counterfactual capitals as ``counterfact``, languages as ``recent``; rephrases and three
    same-relation neighbours (other subjects with their true answers) per record."""
    return edit_records(RELATIONS, COUNTRIES, _truth())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest single-threaded; on a shared machine extra threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world_model_dir(one_torch_thread) -> Path:
    """The tiny GPT-2 taught the true facts of the synthetic world, plainly and under instructions."""
    return build_world_model_dir(RELATIONS, COUNTRIES, WORLD)


def training_config(model_dir: Path, results_dir: Path, **overrides) -> InstructEditTrainingHparams:
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.model_name = str(model_dir)
    cfg.results_dir = str(results_dir)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def trained(world_model_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cfg = training_config(world_model_dir, results)
    _, tok = load_causal_lm(world_model_dir)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    start = time.time()
    result = InstructEditTrainer(cfg, train_set, val_set).run()
    result["wall_s"] = time.time() - start
    LOG.info("InstructEdit tiny training: %s", result)
    return {"cfg": cfg, "result": result, "val": val_set, "tok": tok}


def edit_hparams(model_dir: Path, archive) -> InstructEditHyperParams:
    hp = InstructEditHyperParams.from_hparams(EDIT_YAML)
    hp.model_name = str(model_dir)
    hp.archive = None if archive is None else str(archive)
    return hp


# ----------------------------------------------------------------------------- training
def test_training_writes_best_and_last_safetensors_checkpoints(trained):
    result = trained["result"]
    best = Path(result["best_checkpoint"])
    assert result["steps"] == trained["cfg"].max_iters
    assert result["best_step"] is not None
    for folder in (best, Path(result["last_checkpoint"])):
        names = {p.name for p in folder.iterdir()}
        assert {"editor.safetensors", "manifest.json"} <= names
        assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl", ".tmp"))]
    meta = json.loads((best / "manifest.json").read_text())
    assert meta["step"] == result["best_step"]
    assert meta["val_stats"][trained["cfg"].early_stop_key] == pytest.approx(result["best_value"])
    assert (Path(result["last_checkpoint"]) / "trainer_state.safetensors").is_file()


def test_edits_through_easyedit_base_editor_reach_high_rewrite_accuracy(trained, world_model_dir):
    import instructedit_plugin
    import instructedit_plugin.instructedit  # noqa: F401 - registers the algorithm

    instructedit_plugin.register()
    from easyeditor import BaseEditor

    hp = edit_hparams(world_model_dir, trained["result"]["best_checkpoint"])
    editor = BaseEditor.from_hparams(hp)
    before = {k: v.detach().clone() for k, v in editor.model.named_parameters()}
    val_tasks = trained["val"].tasks
    scores = {}
    for task in ("counterfact", "recent"):
        requests = val_tasks[task]
        editor.hparams.default_task = task
        metrics, _, _ = editor.edit(
            prompts=[r["prompt"] for r in requests],
            target_new=[r["target_new"] for r in requests],
            ground_truth=[r["ground_truth"] for r in requests],
            rephrase_prompts=[r["rephrase_prompt"] for r in requests],
            verbose=False,
        )
        rewrite = [float(m["post"]["rewrite_acc"][0]) for m in metrics]
        pre = [float(m["pre"]["rewrite_acc"][0]) for m in metrics]
        scores[task] = {"pre": sum(pre) / len(pre), "post": sum(rewrite) / len(rewrite),
                        "rephrase": sum(float(m["post"]["rephrase_acc"][0]) for m in metrics) / len(metrics)}
    LOG.info("post-edit metrics on held-out synthetic facts: %s", scores)
    for task, score in scores.items():
        assert score["post"] >= 0.9, scores
        assert score["pre"] <= 0.2, scores
    # EasyEdit restored the original weights from weights_copy after each edit
    for name, value in editor.model.named_parameters():
        assert torch.equal(value, before[name]), name


def _next_token(model, tok, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return tok.decode(logits.argmax()).strip()


def measure_one_edit(model_dir: Path, archive, val_tasks: dict, edit_lr_scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Each held-out edit applied alone: rewrite and rephrase success on the plain prompts and, as
    EasyEdit's InstructEdit evaluation scores them, on the instruction-prefixed ones (the edit's own
    instruction), and the share of the *other* subjects (same relation, plain prompt) that keep their
    true answer (locality, left plain as EasyEdit does). ``edit_lr_scale`` scales the editor's
    learned edit lrs (0: the editor's output is zeroed)."""
    model, tok = load_causal_lm(model_dir)
    hp = edit_hparams(model_dir, archive)
    if edit_lr_scale != 1.0:
        tensors, meta = load_editor(archive)
        tensors = dict(tensors, edit_lrs=tensors["edit_lrs"] * edit_lr_scale)
        hp.archive = str(save_editor(Path(archive).parent / f"scaled-{edit_lr_scale}", tensors,
                                     {k: v for k, v in meta.items() if k not in ("sha256", "format_version")}))
    truth = _truth()
    figures = {}
    for relation in RELATIONS:
        task, template = relation.task, relation.prompt
        before = sum(_next_token(model, tok, template.format(c)) == truth[task][c] for c in COUNTRIES) / len(COUNTRIES)
        hits = dict.fromkeys(("rewrite", "rephrase", "instructed_rewrite", "instructed_rephrase"), 0)
        kept = n_other = 0
        requests = val_tasks[task]
        for request in requests:
            request = dict(request, task=task)
            _, original = apply_to_model(model, tok, [request], hp, return_orig_weights=True)
            inputs = {"rewrite": request["prompt"], "rephrase": request["rephrase_prompt"],
                      "instructed_rewrite": instructed_prompt(request, hp),
                      "instructed_rephrase": instructed_prompt(dict(request, prompt=request["rephrase_prompt"]), hp)}
            for key, text in inputs.items():
                hits[key] += _next_token(model, tok, text) == request["target_new"]
            for c in COUNTRIES:
                if c != request["subject"]:
                    kept += _next_token(model, tok, template.format(c)) == truth[task][c]
                    n_other += 1
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in original.items():
                    params[name].copy_(value)
        figures[task] = {"before": before, **{k: v / len(requests) for k, v in hits.items()},
                         "locality": kept / n_other, "n_edits": len(requests)}
    LOG.info("one edit by %s (edit lrs x%s), held-out synthetic facts: %s", archive, edit_lr_scale, figures)
    return figures


@pytest.fixture(scope="module")
def one_edit_figures(trained, world_model_dir) -> dict[str, dict[str, float]]:
    """The tiny.yaml editor (the mechanics tests' fast settings: cedit 1, cloc 0.1, plain-prompt loss)."""
    return measure_one_edit(world_model_dir, trained["result"]["best_checkpoint"], trained["val"].tasks)


def test_one_edit_reaches_its_prompt_and_its_rephrase(one_edit_figures):
    for task, f in one_edit_figures.items():
        assert f["before"] == 1.0, (task, f)  # the world model knows every fact before editing
        assert f["rewrite"] >= 0.9 and f["rephrase"] >= 0.8, (task, f)


# ------------------------------------------------------------------------------ locality
def test_the_world_model_answers_its_facts_plainly_and_under_every_instruction(world_model_dir):
    """What the locality tests rest on: under the instruction prefix the world model still tells
    the subjects apart (the earlier world, taught plain prompts only, answered 0/20 instructed facts)."""
    model, tok = load_causal_lm(world_model_dir)
    truth = _truth()
    for relation in RELATIONS:
        pairs = [(text, truth[relation.task][c]) for c in COUNTRIES
                 for text in [relation.prompt.format(c), *instructed_inputs(relation.task, relation.prompt.format(c))]]
        batch = encode_pairs(tok, pairs, 128)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(pairs))
        at = (batch["labels"][:, 1:] != -100).float().argmax(1)  # the position that predicts the answer
        right = (logits[rows, at].argmax(-1) == batch["input_ids"][rows, at + 1]).tolist()
        plain = [ok for (text, _), ok in zip(pairs, right) if not text.startswith("Task: ")]
        instructed = [ok for (text, _), ok in zip(pairs, right) if text.startswith("Task: ")]
        assert len(plain) == len(COUNTRIES) and all(plain), relation.task
        assert sum(instructed) / len(instructed) >= 0.9, (relation.task, sum(instructed), len(instructed))


#: The editor of the locality tests (issue #13 item 4): the method's own loss weights (cedit 0.1,
#: cloc 1.0: InstructEditTrainingHparams' defaults and EasyEdit's MEND defaults; tiny.yaml's 1.0/0.1
#: serve the fast mechanics tests), no plain-prompt loss (``raw_edit_loss: false``, as in the paper),
#: the locality KL at the locality answer positions (as EasyEdit's trainer masks it;
#: ``answer_logits=True``, the benchmarks' training path), the ``key_whitening`` option (not in the
#: paper), the last layer's MLP only (its output gradient is nonzero only at the answer position, so
#: each edit is keyed on the instructed answer-position input alone; the fast tiny.yaml edits the
#: last two layers, whose earlier one also takes ~55 instruction-position rows) and 4 edits per step.
#: Measured in this world (one editor each; 16/12 held-out edits; counterfact/recent), locality |
#: instructed rewrite | instructed rephrase: this setting 0.964/0.996 | 0.875/0.917 | 0.875/0.917,
#: seed 1 0.977/0.991 | 1.0/1.0 | 1.0/1.0. Without the last-layer choice (layers 2-3, 600 steps,
#: one edit per step) 0.895/0.939 | 0.94/1.0 | 0.88/1.0 and seed 1 0.905/0.974 | 0.69/0.75 | 0.56/0.75;
#: last layer without whitening (600 steps, one edit per step) 0.941/0.939 | 0.31/0.67 | 0.31/0.42; tiny.yaml 0.674/0.671 | 1.0/0.92 | 1.0/0.92.
LOCAL_EDITOR = dict(cedit=0.1, cloc=1.0, raw_edit_loss=False, key_whitening=True, accumulate_bs=4, max_iters=300,
                    val_interval=50, inner_params=["transformer.h.3.mlp.c_fc.weight", "transformer.h.3.mlp.c_proj.weight"])


@pytest.fixture(scope="module")
def local_trained(world_model_dir, tmp_path_factory):
    cfg = training_config(world_model_dir, tmp_path_factory.mktemp("local"), **LOCAL_EDITOR)
    _, tok = load_causal_lm(world_model_dir)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    result = InstructEditTrainer(cfg, train_set, val_set, answer_logits=True).run()
    return {"cfg": cfg, "result": result, "val": val_set}


@pytest.fixture(scope="module")
def local_figures(local_trained, world_model_dir) -> dict[str, dict[str, float]]:
    return measure_one_edit(world_model_dir, local_trained["result"]["best_checkpoint"], local_trained["val"].tasks)


def test_one_edit_leaves_the_other_subjects_answers_alone(local_figures):
    """Issue #13 item 4: after one edit the other subjects keep their answers (plain prompts, as
    EasyEdit's evaluation leaves locality) >= 90%, while the edit lands on its instructed prompt and
    its instructed rephrase (Rel/Gen as EasyEdit's InstructEdit evaluation scores them). 0.8: the
    lowest measured rate over two seeds is 14/16; 0.8 allows one edit more to miss."""
    for task, f in local_figures.items():
        assert f["before"] == 1.0, (task, f)  # the world model knows every fact before editing
        assert f["locality"] >= 0.9, (task, f)
        assert f["instructed_rewrite"] >= 0.8 and f["instructed_rephrase"] >= 0.8, (task, f)


def test_a_weak_locality_loss_loses_the_other_subjects_answers(local_figures, one_edit_figures):
    """Break on purpose: the tiny.yaml editor (locality loss 0.1 against edit 1.0, its KL spread over
    every locality token, plus the plain-prompt loss, two layers) moves the other subjects' answers."""
    for task, f in local_figures.items():
        weak = one_edit_figures[task]
        assert weak["locality"] <= 0.8 < f["locality"], (task, weak, f)


def test_a_zeroed_editor_keeps_locality_but_edits_nothing(local_trained, world_model_dir):
    """Break on purpose: with the editor's output zeroed (edit lrs x0) nothing is edited: locality
    alone proves nothing, which is why the locality test also requires the edits to land."""
    figures = measure_one_edit(world_model_dir, local_trained["result"]["best_checkpoint"], local_trained["val"].tasks,
                               edit_lr_scale=0.0)
    for task, f in figures.items():
        assert f["locality"] == 1.0 and f["instructed_rewrite"] <= 0.1 and f["instructed_rephrase"] <= 0.1, (task, f)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_gives_identical_edits(trained, world_model_dir, tmp_path):
    model, tok = load_causal_lm(world_model_dir)
    cfg = trained["cfg"]
    tensors, meta = load_editor(trained["result"]["best_checkpoint"])
    wrapper = InstructEditModel(copy.deepcopy(model), cfg)
    wrapper.load_state_dict(tensors)
    wrapper.eval()
    save_editor(tmp_path / "copy", wrapper.state_dict(), {k: v for k, v in meta.items() if k not in ("sha256", "format_version")})
    hp = edit_hparams(world_model_dir, trained["result"]["best_checkpoint"])
    batch = build_edit_batch(tok, trained["val"].tasks["counterfact"][:3], hp, "cpu")
    original = load_editor_for(model, trained["result"]["best_checkpoint"])
    reloaded = load_editor_for(model, tmp_path / "copy")
    a, _ = original.new_weights(model, batch)
    b, _ = reloaded.new_weights(model, batch)
    edited, _ = wrapper.edit(batch)
    for name in a:
        assert torch.equal(a[name], b[name])
        assert torch.allclose(a[name], edited.new_weights[name].detach(), atol=1e-6)
    # the checkpoint is plain safetensors + JSON
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["layers"] == meta["layers"]


def test_two_editors_in_one_process_do_not_interfere(trained, world_model_dir, tmp_path):
    tensors, meta = load_editor(trained["result"]["best_checkpoint"])
    weak = dict(tensors)
    weak["edit_lrs"] = tensors["edit_lrs"] * 0.25
    save_editor(tmp_path / "weak", weak, {k: v for k, v in meta.items() if k not in ("sha256", "format_version")})
    model, tok = load_causal_lm(world_model_dir)
    hp_a = edit_hparams(world_model_dir, trained["result"]["best_checkpoint"])
    hp_b = edit_hparams(world_model_dir, tmp_path / "weak")
    request = dict(trained["val"].tasks["recent"][0], task="recent")

    def edit_with(hp):
        _, weights_copy = apply_to_model(model, tok, [request], hp, return_orig_weights=True)
        new = {k: dict(model.named_parameters())[k].detach().clone() for k in weights_copy}
        with torch.no_grad():
            for k, v in weights_copy.items():
                dict(model.named_parameters())[k].copy_(v)
        return new

    first_a = edit_with(hp_a)
    first_b = edit_with(hp_b)
    second_a = edit_with(hp_a)
    second_b = edit_with(hp_b)
    for name in first_a:
        assert torch.equal(first_a[name], second_a[name])
        assert torch.equal(first_b[name], second_b[name])
        assert not torch.equal(first_a[name], first_b[name])
    # a second model gets its own editors
    other, _ = load_causal_lm(world_model_dir)
    _, copy_b = apply_to_model(other, tok, [request], hp_b, return_orig_weights=True)
    for name in copy_b:
        assert torch.equal(dict(other.named_parameters())[name], first_b[name])


def test_copy_true_leaves_the_model_untouched(trained, world_model_dir):
    model, tok = load_causal_lm(world_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = edit_hparams(world_model_dir, trained["result"]["best_checkpoint"])
    edited, _ = apply_to_model(model, tok, trained["val"].tasks["counterfact"][:1], hp, copy=True)
    assert edited is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_resume_continues_from_the_last_checkpoint(world_model_dir, tmp_path):
    _, tok = load_causal_lm(world_model_dir)
    cfg = training_config(world_model_dir, tmp_path, max_iters=8, val_interval=4, val_steps=2, progress=False)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    first = InstructEditTrainer(cfg, train_set, val_set)
    first.run()
    state = {k: v.clone() for k, v in first.editor.state_dict().items()}
    resumed_cfg = dataclasses.replace(cfg, max_iters=12, resume=True)
    resumed = InstructEditTrainer(resumed_cfg, train_set, val_set)
    assert resumed.step == 8
    assert all(torch.equal(resumed.editor.state_dict()[k], v) for k, v in state.items())
    assert resumed.opt.state_dict()["state"]
    result = resumed.run()
    assert result["steps"] == 12


# -------------------------------------------------------------------------------- errors
def test_missing_archive_is_a_hyperparams_error_naming_archive(world_model_dir, tmp_path):
    model, tok = load_causal_lm(world_model_dir)
    request = synthetic_tasks()["counterfact"][0]
    for archive in (None, tmp_path / "nothing-here"):
        with pytest.raises(HyperParamsError) as info:
            apply_to_model(model, tok, [request], edit_hparams(world_model_dir, archive))
        assert info.value.field == "archive"
    (tmp_path / "no_archive.yaml").write_text(EDIT_YAML.read_text().replace("archive:", "# archive:"))
    with pytest.raises(HyperParamsError) as info:
        InstructEditHyperParams.from_hparams(tmp_path / "no_archive.yaml")
    assert info.value.field == "archive"


@pytest.mark.parametrize(
    "path, old, new, field",
    [
        (EDIT_YAML, "default_task:", "defualt_task:", "defualt_task"),
        (EDIT_YAML, "alg_name: InstructEdit", "alg_name: MEND", "alg_name"),
        (EDIT_YAML, "edit_max_length: 96", "edit_max_length: many", "edit_max_length"),
        (TRAIN_YAML, "lr: 1.0e-3\nlr_lr", "lr: fast\nlr_lr", "lr"),
        (TRAIN_YAML, "alg: InstructEdit", "alg: MEND", "alg"),
        (TRAIN_YAML, "cloc: 0.1", "cloc: -1", "cloc"),
        (TRAIN_YAML, "task_proportions: null", "task_proportions: {counterfact: -1}", "task_proportions.counterfact"),
    ],
)
def test_bad_yaml_names_the_field(tmp_path, path, old, new, field):
    text = path.read_text()
    assert old in text
    (tmp_path / "bad.yaml").write_text(text.replace(old, new, 1))
    cls = InstructEditHyperParams if path == EDIT_YAML else InstructEditTrainingHparams
    with pytest.raises(HyperParamsError) as info:
        cls.from_hparams(tmp_path / "bad.yaml")
    assert info.value.field == field


def test_unknown_inner_param_is_a_hyperparams_error(world_model_dir, tmp_path):
    model, _ = load_causal_lm(world_model_dir)
    cfg = training_config(world_model_dir, tmp_path, inner_params=["transformer.h.3.mlp.c_projj.weight"])
    with pytest.raises(HyperParamsError, match="c_proj") as info:
        InstructEditModel(model, cfg)
    assert info.value.field == "inner_params"


# ------------------------------------------------------------------ other paths / models
def test_easyedit_edit_trainer_trains_the_registered_module(world_model_dir, tmp_path):
    import instructedit_plugin
    import instructedit_plugin.instructedit  # noqa: F401

    info = instructedit_plugin.register()
    from easyeditor import EditTrainer
    from easyeditor.util.alg_train_dict import ALG_TRAIN_DICT

    assert ALG_TRAIN_DICT["INSTRUCTEDIT"] is InstructEditModel
    _, tok = load_causal_lm(world_model_dir)
    cfg = training_config(world_model_dir, tmp_path, max_iters=12, val_interval=5, val_steps=2, log_interval=5)
    train_set, val_set = make_datasets(synthetic_tasks(), tok, cfg)
    trainer = EditTrainer(config=cfg, train_set=train_set, val_set=val_set)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start), info.flavour
    assert Path(trainer.save_path).is_file()


def test_editing_works_on_a_llama_family_model():
    model, tok = load_causal_lm(build_tiny_model_dir("llama"))
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.inner_params = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    wrapper = InstructEditModel(model, cfg)
    batch = encode_pairs(tok, [("Task: recent\nDescription: d\nInput: The capital of France is", "Rome")], 64)
    edited, info = wrapper.edit(batch)
    for name, value in edited.new_weights.items():
        assert value.shape == dict(model.named_parameters())[name].shape
        assert not torch.equal(value, dict(model.named_parameters())[name])
    loss = wrapper.edit_loss_fn(cfg, edited(**batch), batch["labels"])["nll"]
    loss.backward()
    assert all(p.grad is not None for p in wrapper.outer_parameters())
    assert all(p.grad is None for p in model.parameters())
