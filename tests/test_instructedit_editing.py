"""InstructEdit end to end on a tiny GPT-2: training, checkpoints, editing through EasyEdit.

The tiny test models are randomly initialised; a random model's logits are too
flat for any edit to reach a confident prediction, so the module first teaches
the tiny GPT-2 a small synthetic world (capitals and languages of countries,
~10 s) and then meta-trains the editor on two synthetic tasks (counterfactual
capitals as ``counterfact``, languages as ``recent``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
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
from instructedit_plugin.instructedit.instructedit_main import build_edit_batch
from instructedit_plugin.models.loading import load_causal_lm
from tests.support.tiny_models import build_tiny_model_dir

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
EDIT_YAML = ROOT / "hparams" / "InstructEdit" / "tiny.yaml"

pytestmark = pytest.mark.slow

COUNTRIES = ("France Germany Italy Spain Japan China England Russia Canada Australia Egypt India Brazil Greece "
             "Poland Sweden Norway Finland Turkey Mexico").split()
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "London", "Ottawa"]  # one token each
LANGS = ["French", "German", "Spanish", "English"]


def _truth():
    rng = random.Random(1)
    return {c: rng.choice(CITIES) for c in COUNTRIES}, {c: rng.choice(LANGS) for c in COUNTRIES}


CAPITAL, LANGUAGE = "The capital of {} is", "The official language of {} is"
#: neighbours per record: other subjects, same relation, with their true answers (the locality data)
N_NEIGHBOURS = 3


def neighbours(template: str, subject: str, truth: dict[str, str], rng: random.Random) -> dict:
    others = rng.sample([c for c in COUNTRIES if c != subject], N_NEIGHBOURS)
    return {"neighborhood": {"prompt": [template.format(c) for c in others], "ground_truth": [truth[c] for c in others]}}


def synthetic_tasks() -> dict[str, list[dict]]:
    rng = random.Random(0)
    loc_rng = random.Random(5)
    city, lang = _truth()
    capitals, languages = [], []
    for c in COUNTRIES:
        for target in rng.sample([x for x in CITIES if x != city[c]], 4):
            capitals.append({"prompt": CAPITAL.format(c), "target_new": target, "ground_truth": city[c],
                             "subject": c, "rephrase_prompt": f"Which city is the capital of {c}?",
                             "locality": neighbours(CAPITAL, c, city, loc_rng), "portability": {}})
        for target in [x for x in LANGS if x != lang[c]]:
            languages.append({"prompt": LANGUAGE.format(c), "target_new": target,
                              "ground_truth": lang[c], "subject": c, "rephrase_prompt": f"People in {c} speak",
                              "locality": neighbours(LANGUAGE, c, lang, loc_rng), "portability": {}})
    return {"counterfact": capitals, "recent": languages}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest single-threaded; on a shared machine extra threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world_model_dir(one_torch_thread, tmp_path_factory) -> Path:
    """The tiny GPT-2, briefly trained on the true facts of the synthetic world."""
    model, tok = load_causal_lm(build_tiny_model_dir("gpt2"))
    city, lang = _truth()
    pairs = []
    for c in COUNTRIES:
        pairs += [(f"The capital of {c} is", city[c]), (f"Which city is the capital of {c}?", city[c]),
                  (f"The official language of {c} is", lang[c]), (f"People in {c} speak", lang[c])]
    batch = encode_pairs(tok, pairs, 64)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(120):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("world") / "tiny-world"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="module")
def one_edit_figures(trained, world_model_dir) -> dict[str, dict[str, float]]:
    """Each held-out edit applied alone by the trained editor: rewrite and rephrase success, and
    the share of the *other* subjects (same relation) that keep their true answer (locality)."""
    model, tok = load_causal_lm(world_model_dir)
    hp = edit_hparams(world_model_dir, trained["result"]["best_checkpoint"])
    city, lang = _truth()
    figures = {}
    for task, template, truth in (("counterfact", CAPITAL, city), ("recent", LANGUAGE, lang)):
        before = sum(_next_token(model, tok, template.format(c)) == truth[c] for c in COUNTRIES) / len(COUNTRIES)
        rewrite = rephrase = kept = n_other = 0
        requests = trained["val"].tasks[task]
        for request in requests:
            _, original = apply_to_model(model, tok, [dict(request, task=task)], hp, return_orig_weights=True)
            rewrite += _next_token(model, tok, request["prompt"]) == request["target_new"]
            rephrase += _next_token(model, tok, request["rephrase_prompt"]) == request["target_new"]
            for c in COUNTRIES:
                if c != request["subject"]:
                    kept += _next_token(model, tok, template.format(c)) == truth[c]
                    n_other += 1
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in original.items():
                    params[name].copy_(value)
        figures[task] = {"before": before, "rewrite": rewrite / len(requests), "rephrase": rephrase / len(requests),
                         "locality": kept / n_other}
    LOG.info("one edit by the trained editor, held-out synthetic facts: %s", figures)
    return figures


def test_one_edit_reaches_its_prompt_and_its_rephrase(one_edit_figures):
    for task, f in one_edit_figures.items():
        assert f["before"] == 1.0, (task, f)  # the world model knows every fact before editing
        assert f["rewrite"] >= 0.9 and f["rephrase"] >= 0.8, (task, f)


@pytest.mark.xfail(strict=True, reason="issue #13 item 4, open: other subjects keep their answer only ~16-29% of "
                   "the time after one edit. Cause found in this test world: the tiny GPT-2 never saw the instruction "
                   "prefix (nor positions past ~12), so under it the edited layers' answer-position inputs are the "
                   "same for every subject (cosine 0.994; 0/20 instructed facts answered), and any update keyed on "
                   "the instructed edit input moves every subject's plain prompt alike (same-subject vs other-subject "
                   "response 0.20 vs 0.20). key_whitening (ROME-style C^-1 keys, an option) does not change that here; "
                   "measurements in the stop-18 note")
def test_one_edit_leaves_the_other_subjects_answers_alone(one_edit_figures):
    for task, f in one_edit_figures.items():
        assert f["locality"] >= 0.9, (task, f)


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
