"""InstructEdit's paper protocol as switches: the paper's instruction library, task aliases,
instructed metric inputs, mixing by records with ConvSent subsampled, ConvSent in both
directions, EasyEdit's sentiment ES and Fluency (n-gram entropy)."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from scipy.stats import chisquare

from instructedit_plugin.data import load_convsent, load_requests
from instructedit_plugin.evaluation.convsent import (
    classifier_success, n_gram_entropy, sentiment_pairs, sentiment_scores, summarize_sentiment,
)
from instructedit_plugin.instructedit import InstructEditTrainingHparams
from instructedit_plugin.instructedit.dataset import InstructEditDataset, make_datasets
from instructedit_plugin.instructedit.evaluate import (
    EditEvaluator, MethodSpec, evaluate_instructedit, greedy_reply_ids, greedy_replies, instruction_for,
    prepare_test_requests, results_markdown, train_editor,
)
from instructedit_plugin.instructions import (
    InstructionError, canonical_task, default_library, load_instructions,
)
from instructedit_plugin.models.loading import load_causal_lm
from tests.support.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "tiny.yaml"
PAPER_YAMLS = ("gpt2-xl", "llama-2-7b")
DESCRIPTIONS = Path("instructedit") / "easyedit_task_descriptions.json"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def paper(shared_data_dir):
    return load_instructions("easyedit", data_dir=shared_data_dir)


def _file(shared_data_dir) -> dict:
    return json.loads((shared_data_dir / DESCRIPTIONS).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ (1) the instruction library
def test_paper_library_has_ten_descriptions_per_task_and_holds_out_the_tenth(paper, shared_data_dir):
    raw = _file(shared_data_dir)
    assert sorted(paper.tasks) == ["convsent", "counterfact", "wikirecent", "zsre"]
    for task, descriptions in raw["tasks"].items():
        family = paper.get(task)
        assert family.descriptions == tuple(descriptions) and len(descriptions) == 10
        assert family.held_out_index == 9 and family.training_indices == tuple(range(9))
        assert family.held_out_description == descriptions[9]
        # EasyEdit's rendering: template.format(task, description, input) with the file's own task name
        assert family.format("PROMPT", 3, {"label": "negative", "topic": "T"}) == raw["template"].format(
            task, descriptions[3].replace("[LABEL]", "negative").replace("[TOPIC]", "T"), "PROMPT")
    # training draws never reach the 10th description
    rng = random.Random(0)
    assert {paper.get("zsre").sample_index(rng) for _ in range(500)} == set(range(9))
    # the same file by path, and the shipped families by name
    by_path = load_instructions(str(shared_data_dir / DESCRIPTIONS))
    assert by_path.get("zsre").descriptions == paper.get("zsre").descriptions
    assert load_instructions("plugin") is default_library()
    assert load_instructions("plugin").get("zsre").descriptions != paper.get("zsre").descriptions


def test_unknown_instructions_name_fails_with_a_fix(tmp_path):
    with pytest.raises(InstructionError, match=r"instructions: 'nonsense'.*Fix:"):
        load_instructions("nonsense")
    with pytest.raises(InstructionError, match="Fix:"):
        load_instructions(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------ (2) aliases
def test_wikirecent_and_recent_resolve_to_the_same_family_in_both_libraries(paper):
    assert canonical_task("wikirecent") == canonical_task("WikiRecent") == canonical_task("recent") == "recent"
    assert canonical_task("zsre_holdout") == "zsre_holdout"  # unknown names unchanged
    assert paper.get("recent") is paper.get("wikirecent")
    assert paper.get("recent").format("x", 0).startswith("Task: wikirecent\n")  # EasyEdit's task name
    shipped = default_library()
    assert shipped.get("wikirecent") is shipped.get("recent")


def test_dataset_reads_wikirecent_as_recent_and_renders_easyedit_names(tok, paper):
    records = [{"prompt": f"The gender of P{i} is", "target_new": "female", "subject": f"P{i}"} for i in range(4)]
    ds = InstructEditDataset({"wikirecent": records, "counterfact": records}, tok, library=paper,
                             proportions={"wikirecent": 1.0, "counterfact": 0.0})
    assert ds.task_names == ["counterfact", "recent"]
    item = ds.draw(random.Random(0))
    assert item["task"] == "recent" and item["edit"][0].startswith("Task: wikirecent\nDescription: ")


# ------------------------------------------------------------------- (3) instructed metric inputs
@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    torch.set_num_threads(1)
    return load_causal_lm(tiny_gpt2_dir)


def test_instructed_metric_inputs_put_the_instruction_where_easyedit_does(tiny, paper, shared_data_dir):
    model, tok = tiny
    evaluator = EditEvaluator(model, tok, library=paper, max_pairs=2)
    zsre = prepare_test_requests("zsre_holdout", load_requests(shared_data_dir / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=1))[0]
    instruct = instruction_for(zsre, "zsre_holdout", "seen", 0, paper)
    prefix = instruct("")
    assert prefix.startswith("Task: zsre\nDescription: ") and prefix.endswith("\nInput: ")
    rows = evaluator._rows(zsre, None, instruct)
    by_kind = {name: rows.pairs[sl] for name, sl in rows.slices.items()}
    assert by_kind["rewrite"] == [(prefix + zsre["prompt"], zsre["target_new"])]
    assert by_kind["rephrase"] == [(prefix + zsre["rephrase_prompt"], zsre["target_new"])]
    assert by_kind["port:one_hop"] == [(prefix + zsre["portability"]["one_hop"]["prompt"], "Athletics")]
    assert by_kind["loc:nq"] == [(zsre["locality"]["nq"]["prompt"], "The String")]  # locality stays plain
    assert all("Task:" not in p for p, _ in by_kind["loc:nq"])
    # the held-out (unseen) instruction uses the 10th description on every instructed input
    unseen = instruction_for(zsre, "zsre_holdout", "unseen", 0, paper)("")
    assert paper.get("zsre").held_out_description in unseen
    # plain rows: no instruction anywhere
    plain = evaluator._rows(zsre, None)
    assert all("Task:" not in p for p, _ in plain.pairs)
    # the EasyEdit metric backend receives the same inputs (its compute_edit_quality record)
    record = evaluator._easyedit_record(zsre, rows)
    assert record["prompt"] == prefix + zsre["prompt"] and record["rephrase_prompt"] == prefix + zsre["rephrase_prompt"]
    assert record["portability"]["one_hop"]["prompt"] == [prefix + zsre["portability"]["one_hop"]["prompt"]]
    assert record["locality"]["nq"]["prompt"] == [zsre["locality"]["nq"]["prompt"]]


# -------------------------------------------------------- (5) mixing by records, ConvSent subsampled
def _records(task: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"prompt": f"The capital of {task}{i} is", "target_new": f"City{i % 7}", "subject": f"{task}{i}"}
        if task == "convsent":
            rec.update(topic=f"topic{i}", pos=[f"I like topic{i}."], neg=[f"I hate topic{i}."], target_new=f"I like topic{i}.")
        out.append(rec)
    return out


def test_mixing_by_records_draws_tasks_in_proportion_to_their_records(tok):
    sizes = {"counterfact": 60, "recent": 15, "convsent": 30}
    tasks = {t: _records(t, n) for t, n in sizes.items()}
    draws = 6000
    rng = random.Random(7)
    ds = InstructEditDataset(tasks, tok, mixing="records")
    counts = Counter(ds.draw(rng)["task"] for _ in range(draws))
    names = sorted(sizes)
    expected = [draws * sizes[t] / sum(sizes.values()) for t in names]
    assert chisquare([counts[t] for t in names], expected).pvalue > 1e-3
    # ...and not uniformly: the uniform expectation is rejected outright
    assert chisquare([counts[t] for t in names], [draws / 3] * 3).pvalue < 1e-6
    uniform = InstructEditDataset(tasks, tok, mixing="uniform")
    rng_u = random.Random(7)
    counts_u = Counter(uniform.draw(rng_u)["task"] for _ in range(draws))
    assert chisquare([counts_u[t] for t in names], [draws / 3] * 3).pvalue > 1e-3


def test_convsent_subsample_keeps_a_seeded_subset_and_weights_it_by_its_new_size(tok):
    tasks = {"counterfact": _records("counterfact", 20), "convsent": _records("convsent", 50)}
    ds = InstructEditDataset(tasks, tok, mixing="records", convsent_subsample=10, seed=3)
    assert len(ds.tasks["convsent"]) == 10 and len(ds.tasks["counterfact"]) == 20
    assert ds.weights == [10.0, 20.0]  # sorted names: convsent, counterfact
    again = InstructEditDataset(tasks, tok, mixing="records", convsent_subsample=10, seed=3)
    assert [r["topic"] for r in again.tasks["convsent"]] == [r["topic"] for r in ds.tasks["convsent"]]
    other = InstructEditDataset(tasks, tok, mixing="records", convsent_subsample=10, seed=4)
    assert [r["topic"] for r in other.tasks["convsent"]] != [r["topic"] for r in ds.tasks["convsent"]]
    val = InstructEditDataset(tasks, tok, mode="val", convsent_subsample=10)
    assert len(val.tasks["convsent"]) == 50  # validation data is never subsampled
    with pytest.raises(Exception, match="task_mixing.*Fix"):
        InstructEditDataset(tasks, tok, mixing="by_task")


def test_make_datasets_reads_the_protocol_switches_from_the_config(tok, shared_data_dir):
    cfg = InstructEditTrainingHparams.from_hparams(TINY_YAML)
    cfg.instructions = str(shared_data_dir / DESCRIPTIONS)
    cfg.task_mixing, cfg.convsent_subsample, cfg.raw_edit_loss, cfg.max_iters = "records", 4, False, 10
    tasks = {"wikirecent": _records("recent", 12), "convsent": _records("convsent", 12)}
    train, _ = make_datasets(tasks, tok, cfg)
    assert train.mixing == "records" and len(train.tasks["convsent"]) == 4
    assert train.library.get("recent").task == "wikirecent"
    batch = train.collate([train.draw(random.Random(0)) for _ in range(2)])
    # raw_edit_loss false: the post-edit loss rows are only the instructed ones
    assert batch["edit_outer"]["input_ids"].shape[0] == batch["edit_inner"]["input_ids"].shape[0]


# -------------------------------------------------------------------- (4) the paper-scale YAMLs
@pytest.mark.parametrize("name", PAPER_YAMLS)
def test_paper_scale_yamls_use_the_papers_protocol(name):
    path = ROOT / "hparams" / "TRAINING" / "InstructEdit" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    cfg = InstructEditTrainingHparams.from_dict(data, source=str(path))
    assert cfg.raw_edit_loss is False and cfg.task_mixing == "records" and cfg.convsent_subsample == 1427
    assert cfg.instructions == "easyedit"


# ------------------------------------------------------------------- (6) ConvSent both directions
def test_convsent_both_directions_alternate_and_negative_records_get_a_negative_target(shared_data_dir, paper):
    path = shared_data_dir / "convsent" / "blender_test.json"
    raw = json.loads(path.read_text(encoding="utf-8"))[:4]
    both = load_convsent(path, limit=4, direction="both")
    assert [r["label"] for r in both] == ["positive", "negative", "positive", "negative"]
    assert both[1]["target_new"] == raw[1]["neg"][0].strip() and both[0]["target_new"] == raw[0]["pos"][0].strip()
    assert [r["label"] for r in load_convsent(path, limit=2)] == ["positive", "positive"]  # default unchanged
    assert all(r["target_new"] == raw[i]["neg"][0].strip() for i, r in enumerate(load_convsent(path, limit=2, direction="negative")))
    # the instruction's [LABEL] and the sentiment pairs follow the record's direction
    text = paper.get("convsent").format(both[1]["prompt"], 0, both[1])
    assert "sound negative when talking about " + raw[1]["ent"] in text
    toward, away = sentiment_pairs(both[1], max_responses=20)
    assert {a for _, a in toward} == {r.strip() for r in raw[1]["neg"]} - {both[1]["target_new"]}
    assert {a for _, a in away} == {r.strip() for r in raw[1]["pos"]}
    with pytest.raises(ValueError, match="direction.*Fix"):
        load_convsent(path, limit=1, direction="up")


def test_easyedit_sentiment_es_on_known_numbers():
    pre = sentiment_scores([-1.5], [-1.0])
    post = sentiment_scores([-1.0, -3.0], [-2.0], toward_counts=[3, 1], away_counts=[2], pre={"target_logp": -0.5})
    # tokens pooled: (3 * -1.0 + 1 * -3.0) / 4 = -1.5; margin = -1.5 - -2.0 = 0.5
    assert post["margin"] == pytest.approx(0.5) and post["success"] == 1.0
    assert post["es"] == pytest.approx(1 / (1 + math.exp(-0.5)) * math.exp(-1.5 + 0.5))
    better = sentiment_scores([-0.2], [-2.0], pre={"target_logp": -0.5})  # z_topic capped at 1
    assert better["es"] == pytest.approx(1 / (1 + math.exp(-1.8)))
    summary = summarize_sentiment([pre], [post])
    assert summary["flipped"] == 100.0 and summary["es"] == pytest.approx(100 * post["es"])


# ---------------------------------------------------------------------------------- Fluency
def test_n_gram_entropy_equals_hand_computed_values():
    # "a b a b": bigrams ab, ba, ab -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # six distinct-ish words: 5 distinct bigrams (log2 5), 4 distinct trigrams (2 bits)
    assert n_gram_entropy("the cat sat on the mat") == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2)
    assert n_gram_entropy("yes yes yes yes yes") == 0.0  # pure repetition
    assert n_gram_entropy("Hi") == 0.0
    # punctuation is a word of its own (NLTK's word tokenizer): "a, b" -> a , b
    assert n_gram_entropy("a, b") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)


def test_classifier_success_uses_the_plugged_classifier():
    def stub(texts):
        return ["negative" if "hate" in t else "positive" for t in texts]

    assert classifier_success(["I hate it", "I love it"], ["negative", "negative"], stub) == [1.0, 0.0]
    with pytest.raises(ValueError, match="Fix"):
        classifier_success(["a", "b"], ["positive", "positive"], lambda texts: ["positive"])


# ------------------------------------------------------- end to end: both input styles, Fluency
def test_evaluation_reports_instructed_and_plain_inputs_beside_with_fluency(tiny, paper, tmp_path):
    model, tok = tiny
    cfg = InstructEditTrainingHparams.from_hparams(TINY_YAML)
    cfg.model_name = str(model.name_or_path)
    cfg.max_iters, cfg.val_interval, cfg.val_steps, cfg.progress = 3, 3, 1, False
    train = {"counterfact": _records("counterfact", 6), "convsent": _records("convsent", 6)}
    for r in train["convsent"]:
        r["neg"] = [f"I hate topic{r['topic']}.", "Awful."]
    methods = []
    for name, instr in (("instructedit", True), ("mend_multitask", False)):
        cfg.results_dir = str(tmp_path / name)
        run = train_editor(cfg, train, tok, model, use_instructions=instr, val_size=1)
        methods.append(MethodSpec(name, run["best_checkpoint"], instr))
    sent = [{"prompt": f"What do you think of topic{i}?", "topic": f"topic{i}", "subject": f"topic{i}",
             "pos": [" Nice. ", " I like it a lot. ", " Great. "], "neg": [" Bad. ", " I hate it. ", " Awful. "],
             "label": label, "target_new": "Nice." if label == "positive" else "Bad."}
            for i, label in enumerate(("positive", "negative"))]
    test = {"counterfact": _records("counterfact", 2), "convsent": sent}
    judged = []

    def stub(texts):
        judged.extend(texts)
        return ["negative"] * len(texts)

    res = evaluate_instructedit(model, tok, methods, test, library=paper, metric_inputs=("instructed", "plain"),
                                fluency_tokens=6, sentiment_classifier=stub, keep_records=True)
    assert set(res["tasks_plain_inputs"]["counterfact"]) == {"instructedit"}  # baselines: plain in both styles
    assert set(res["tasks"]["counterfact"]) == {"instructedit", "mend_multitask"}
    rec = res["records"]["tasks"]["counterfact"]["instructedit"][0]
    assert rec["metric_inputs"] == "instructed" and rec["rewrite_input"] == rec["edit_prompt"]
    assert rec["edit_prompt"].startswith("Task: counterfact\nDescription: ")
    base = res["records"]["tasks"]["counterfact"]["mend_multitask"][0]
    assert base["rewrite_input"] == test["counterfact"][0]["prompt"]
    for method in ("instructedit", "mend_multitask"):  # Fluency for every method
        s = res["tasks"]["convsent"][method]["sentiment"]
        assert s["fluency_pre"] is not None and s["fluency_post"] is not None and s["fluency_post"] >= 0
        assert s["classifier_success"] == 50.0  # the stub says "negative": right for one of the two edits
        assert 0.0 <= s["es"] <= 100.0
    assert judged and all(isinstance(t, str) for t in judged)
    md = results_markdown(res)
    assert "## Seen instruction, plain metric inputs" in md and "| Fluency pre |" in md
    assert "instructed (as EasyEdit's InstructEdit evaluation" in res["notes"]["metric_inputs"]


# ------------------------------------------------- ConvSent replies generated as one left-padded batch
REPLY_QUESTIONS = ["Hi?", "What do you think of topic3 and of the long list of things around it?",
                   "Task: convsent\nDescription: make it nice\nInput: What do you think of topic1?"]


def test_batched_greedy_replies_equal_one_at_a_time_and_right_padding_breaks_them(tiny):
    model, tok = tiny
    model.eval()
    alone = [greedy_reply_ids(model, tok, [q], 8)[0] for q in REPLY_QUESTIONS]
    assert all(len(ids) > 0 for ids in alone)
    assert greedy_reply_ids(model, tok, REPLY_QUESTIONS, 8) == alone
    assert greedy_replies(model, tok, REPLY_QUESTIONS, 8) == [tok.decode(i, skip_special_tokens=True) for i in alone]
    # padding on the wrong side: the short questions' replies start after padding and change
    right = greedy_reply_ids(model, tok, REPLY_QUESTIONS, 8, padding_side="right")
    assert right != alone and right[2] == alone[2]  # the longest question has no padding and is unchanged


def test_evaluator_generates_a_records_replies_in_two_batches_equal_to_sequential(tiny, paper, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = InstructEditTrainingHparams.from_hparams(TINY_YAML)
    cfg.model_name = str(model.name_or_path)
    cfg.max_iters, cfg.val_interval, cfg.val_steps, cfg.progress = 3, 3, 1, False
    cfg.results_dir = str(tmp_path / "ie")
    train = {"counterfact": _records("counterfact", 6), "convsent": _records("convsent", 6)}
    editor_path = train_editor(cfg, train, tok, model, use_instructions=True, val_size=1)["best_checkpoint"]
    record = {"prompt": "What do you think of topic1?", "topic": "topic1", "subject": "topic1", "label": "negative",
              "pos": [" Nice. ", " Great. "], "neg": [" Bad. ", " Awful. "], "target_new": "Bad."}
    evaluator = EditEvaluator(model, tok, library=paper, fluency_tokens=8)
    editor = evaluator.editor(editor_path)
    batches = []
    generate = model.generate

    def counting_generate(*args, **kwargs):
        batches.append(int(kwargs["input_ids"].shape[0]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    records, _ = evaluator.evaluate_inputs(editor, record, "convsent", 0, "seen", None, ("instructed", "plain"))
    assert batches == [2, 2]  # the two pre-edit replies, then the two edited-model replies
    monkeypatch.setattr(model, "generate", generate)
    questions = {style: rec["rewrite_input"] for style, rec in records.items()}
    assert questions["instructed"].startswith("Task: convsent") and questions["plain"] == record["prompt"]
    new, _ = evaluator.edit_weights(editor, questions["instructed"], record["target_new"],
                                    instruction=questions["instructed"][: -len(record["prompt"])])
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in new}
    alone_pre = {s: greedy_replies(model, tok, [q], 8)[0] for s, q in questions.items()}
    with torch.no_grad():
        for k, v in new.items():
            params[k].copy_(v)
        alone_post = {s: greedy_replies(model, tok, [q], 8)[0] for s, q in questions.items()}
        for k, v in saved.items():
            params[k].copy_(v)
    assert any(new[k].ne(saved[k]).any() for k in new)  # the edit changed the weights the replies were made with
    for style, rec in records.items():
        assert rec["pre"]["sentiment"]["reply"] == alone_pre[style]
        assert rec["post"]["sentiment"]["reply"] == alone_post[style]
        assert rec["post"]["sentiment"]["fluency"] == n_gram_entropy(alone_post[style])
    assert all(torch.equal(params[k], saved[k]) for k in new)  # the model's own weights are restored
