"""The InstructEd training recipe: data split disjoint from the evaluation, cache key, a budgeted tiny run."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import pytest

from instructedit_plugin.instructed.recipes import (
    BENCHMARK, DEFAULT, EVAL_FILES, EVAL_LIMIT, QUICK, TRAIN_SOURCES, evaluation_exclusions, evaluation_records,
    model_identity, recipe_info, recipe_key, train_embedded_prefixes, training_split,
)
from instructedit_plugin.instructed.templates import request_prompts


def _norm(text):
    return " ".join(str(text).split()).lower()


def _assert_disjoint(train, evaluation):
    excl = evaluation_exclusions(evaluation)
    for req in train:
        if req["recipe_source"].startswith("counterfact") and req.get("case_id") is not None:
            assert int(req["case_id"]) not in excl["case_ids"], req
        assert _norm(req.get("subject", "")) not in excl["subjects"], req
        assert not {_norm(p) for p in request_prompts(req, include_locality=False)} & excl["questions"], req


@pytest.mark.parametrize("recipe", [DEFAULT, BENCHMARK], ids=["demo", "benchmark"])
def test_demo_and_benchmark_splits_are_disjoint_from_their_evaluation_records(shared_data_dir, recipe):
    evaluation = evaluation_records(shared_data_dir, evaluation=recipe.evaluation)
    assert {k: len(v) for k, v in evaluation.items()} == {"counterfact": EVAL_LIMIT, "zsre": EVAL_LIMIT}
    train, val, stats = training_split(recipe, shared_data_dir, evaluation=evaluation)
    assert len(train) == recipe.n_train and len(val) >= 1
    _assert_disjoint(train + val, evaluation)
    assert set(stats["sources"]) == set(recipe.sources)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


def test_split_is_disjoint_from_evaluation_records(shared_data_dir):
    evaluation = evaluation_records(shared_data_dir)
    assert {k: len(v) for k, v in evaluation.items()} == {"counterfact": EVAL_LIMIT, "zsre": EVAL_LIMIT}
    train, val, stats = training_split(BENCHMARK, shared_data_dir, evaluation=evaluation)
    assert len(train) == BENCHMARK.n_train and len(val) >= 1
    _assert_disjoint(train + val, evaluation)
    # the InstructEd files never contribute one of their first EVAL_LIMIT (evaluated) records
    assert all(r["recipe_index"] >= EVAL_LIMIT for r in train if r["recipe_source"] in ("counterfact_ins", "zsre_ins"))
    assert set(stats["sources"]) == set(BENCHMARK.sources)
    # train and validation are disjoint too, and every edit has an instruction-worthy prompt and target
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert all(isinstance(r["target_new"], str) and r["target_new"] for r in train)
    # a record sharing an evaluated case id, subject or question is recognised (the tiny run below
    # checks that such records are really dropped)
    from instructedit_plugin.instructed.recipes import _excluded

    excl = evaluation_exclusions(evaluation)
    cf0, zs0 = evaluation["counterfact"][0], evaluation["zsre"][0]
    other = dict(prompt="Nobody in particular was born in", subject="Nobody in particular", target_new="x")
    assert not _excluded("counterfact_train", dict(other, case_id=-1), excl)
    assert _excluded("counterfact_train", dict(other, case_id=cf0["case_id"]), excl)
    assert _excluded("zsre_ins", dict(other, subject=zs0["subject"].upper()), excl)
    assert _excluded("zsre_ins", dict(other, rephrase_prompt=zs0["rephrase_prompt"]), excl)


def test_cache_key_changes_with_config(tiny_llama_dir):
    ident = model_identity(tiny_llama_dir)
    key = recipe_key(DEFAULT, ident)
    assert key == recipe_key(dataclasses.replace(DEFAULT), ident)
    others = [QUICK, BENCHMARK, dataclasses.replace(DEFAULT, lr=2e-2), dataclasses.replace(DEFAULT, steps=251),
              dataclasses.replace(DEFAULT, dtype="float32"), dataclasses.replace(DEFAULT, n_train=100),
              dataclasses.replace(DEFAULT, seed=1), dataclasses.replace(DEFAULT, prefix_layers=(1, 2))]
    keys = {recipe_key(c, ident) for c in others}
    assert key not in keys and len(keys) == len(others)
    # the wall-clock cap never changes what is trained, so it is not part of the key
    assert recipe_key(dataclasses.replace(DEFAULT, budget_minutes=11.0), ident) == key
    assert recipe_key(DEFAULT, dict(ident, fingerprint="other")) != key
    assert recipe_key(DEFAULT, ident, {"file.json": 1}) != recipe_key(DEFAULT, ident, {"file.json": 2})


def _write(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def tiny_data_dir(shared_data_dir, tmp_path_factory) -> Path:
    """Small copies of the real files: the evaluated first 100 records plus a few more; the CounterFact
    training file holds 4 clean records, one sharing an evaluated case_id and one an evaluated subject."""
    root = tmp_path_factory.mktemp("recipe-data")
    raw = lambda rel: json.loads((shared_data_dir / rel).read_text())  # noqa: E731
    ins_cf, ins_zsre = TRAIN_SOURCES["counterfact_ins"][0], TRAIN_SOURCES["zsre_ins"][0]
    cf_eval = raw(ins_cf)
    _write(root / ins_cf, cf_eval[: EVAL_LIMIT + 6])
    _write(root / ins_zsre, raw(ins_zsre)[: EVAL_LIMIT + 6])
    _write(root / EVAL_FILES["zsre"], raw(EVAL_FILES["zsre"])[:EVAL_LIMIT])
    train = raw(TRAIN_SOURCES["counterfact_train"][0])
    eval_ids = {r["case_id"] for r in cf_eval[:EVAL_LIMIT]}
    eval_subjects = {r["requested_rewrite"]["subject"] for r in cf_eval[:EVAL_LIMIT]}
    clean = [r for r in train if r["case_id"] not in eval_ids and r["subject"] not in eval_subjects][:4]
    same_id = dict(next(r for r in train if r["case_id"] not in eval_ids), case_id=cf_eval[0]["case_id"])
    same_subject = dict(clean[0], case_id=10**7, subject=cf_eval[1]["requested_rewrite"]["subject"],
                        prompt=f"{cf_eval[1]['requested_rewrite']['subject']} is a citizen of")
    _write(root / TRAIN_SOURCES["counterfact_train"][0], clean + [same_id, same_subject])
    return root


def test_tiny_recipe_trains_its_steps_and_returns_a_loadable_archive(tiny_llama_dir, tiny_data_dir, tmp_path):
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    from instructedit_plugin.instructed.recipes import BENCHMARK_CF_ZSRE  # three sources: enough tiny-data edits

    kwargs = dict(config=BENCHMARK_CF_ZSRE, steps=12, n_train=12, data_dir=tiny_data_dir, cache_dir=tmp_path,
                  dtype="float32", progress=False, model_dir=tiny_llama_dir, val_interval=6)
    archive = train_embedded_prefixes(**kwargs)
    info = recipe_info(archive)
    assert info["steps"] == info["planned_steps"] == 12 and not info["stopped_by_budget"]
    assert [h["step"] for h in info["history"]] == [6, 12]
    # the overlapping CounterFact training records were excluded; the evaluated _ins records skipped
    assert info["data"]["sources"]["counterfact_train"]["excluded_eval_overlap"] == 2
    assert 6 <= info["train_edits"] <= 12  # (the tiny tokenizer makes some questions too long: skipped)
    # the archive is what InstructEdHyperParams takes, and it reloads
    hp = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(tiny_llama_dir), archive=str(archive)))
    hp.check_ready()
    ckpt = load_checkpoint(archive)
    from instructedit_plugin.instructed.prefix import default_prefix_layers

    assert ckpt.bank.prefix_len == DEFAULT.prefix_len and list(ckpt.bank.layers) == list(default_prefix_layers(4))
    # a second call with the same configuration returns the cached archive at once
    t0 = time.perf_counter()
    assert train_embedded_prefixes(**kwargs) == archive and time.perf_counter() - t0 < 5


def _prefix_tensors(archive):
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    return {k: v.clone() for k, v in load_checkpoint(archive).bank.state_dict().items()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@contextlib.contextmanager
def _busy_machine(processes: int = 2):
    """Load every core with spinning processes (a shared, busy machine)."""
    code = "import time\nend = time.time() + 600\nwhile time.time() < end: sum(i * i for i in range(10000))"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_recipe_gives_identical_prefixes_on_a_busy_and_an_idle_machine(tiny_llama_dir, tmp_path):
    """Issue #10 item 5: a fixed number of steps, nothing depends on the clock."""
    from instructedit_plugin.data.demo_set import demo_data_dir

    kwargs = dict(config=DEFAULT, steps=16, n_train=16, n_val=4, val_interval=8, data_dir=demo_data_dir(),
                  dtype="float32", progress=False, model_dir=tiny_llama_dir)
    idle = train_embedded_prefixes(cache_dir=tmp_path / "idle", **kwargs)
    t0 = time.perf_counter()
    idle_again = train_embedded_prefixes(cache_dir=tmp_path / "idle2", **kwargs)
    idle_s = time.perf_counter() - t0
    with _busy_machine():
        t0 = time.perf_counter()
        busy = train_embedded_prefixes(cache_dir=tmp_path / "busy", **kwargs)
        busy_s = time.perf_counter() - t0
    print(f"idle {idle_s:.1f}s, busy {busy_s:.1f}s")
    ref = _prefix_tensors(idle)
    _assert_identical(ref, _prefix_tensors(idle_again))
    _assert_identical(ref, _prefix_tensors(busy))
    for archive in (idle, busy):
        info = recipe_info(archive)
        assert info["steps"] == 16 and not info["stopped_by_budget"]
    # and the steps did train: one step of the same recipe leaves different prefixes (a no-op optimizer
    # would make every run equal to the initial bank, and the equalities above would hold trivially)
    one = train_embedded_prefixes(cache_dir=tmp_path / "one", **dict(kwargs, steps=1, val_interval=1))
    moved = _prefix_tensors(one)
    assert any(not torch.equal(ref[name], moved[name]) for name in ref if ref[name].is_floating_point())


def test_safety_cap_is_recorded_and_the_next_call_resumes_to_the_same_prefixes(tiny_llama_dir, tmp_path):
    """A run stopped by the wall-clock cap says so, keeps no unscheduled 'best', and resuming it gives
    exactly the prefixes of an uninterrupted run."""
    from instructedit_plugin.data.demo_set import demo_data_dir
    from instructedit_plugin.errors import PluginError

    steps = 400
    kwargs = dict(config=DEFAULT, steps=steps, n_train=16, n_val=4, val_interval=200, data_dir=demo_data_dir(),
                  dtype="float32", progress=False, model_dir=tiny_llama_dir)
    full = train_embedded_prefixes(cache_dir=tmp_path / "full", budget_minutes=30, **kwargs)
    ran = recipe_info(full)["train_loop_seconds"]
    # a cap well below what the run needs (the whole call's preparation counts against it too)
    with pytest.raises(PluginError, match="safety cap stopped training at step .* Fix: call again with a larger"):
        train_embedded_prefixes(cache_dir=tmp_path / "capped", budget_minutes=max(ran / 6, 0.5) / 60, **kwargs)
    capped_info = json.loads(next((tmp_path / "capped").rglob("recipe.json")).read_text())
    assert capped_info["stopped_by_budget"] and 0 < capped_info["steps"] < 200
    resumed = train_embedded_prefixes(cache_dir=tmp_path / "capped", budget_minutes=30, **kwargs)
    info = recipe_info(resumed)
    assert info["steps"] == steps and not info["stopped_by_budget"]
    _assert_identical(_prefix_tensors(full), _prefix_tensors(resumed))


def test_benchmark_recipe_keeps_zsre_unseen_and_the_cf_zsre_option_trains_on_it(shared_data_dir):
    """The benchmark's default recipe is the paper's protocol: CounterFact only, ZsRE never trained on."""
    from instructedit_plugin.instructed.recipes import BENCHMARK_CF_ZSRE, RECIPES, recipe_files

    assert RECIPES["benchmark-cf"] is BENCHMARK and RECIPES["benchmark-cf-zsre"] is BENCHMARK_CF_ZSRE
    assert not any("zsre" in f for f in recipe_files(BENCHMARK) if f not in EVAL_FILES.values())
    evaluation = evaluation_records(shared_data_dir)
    train, val, stats = training_split(BENCHMARK, shared_data_dir, evaluation=evaluation)
    assert {r["recipe_source"] for r in train + val} == {"counterfact_train", "counterfact_ins"}
    assert len(train) == BENCHMARK.n_train and all(r.get("case_id") is not None for r in train + val)
    _assert_disjoint(train + val, evaluation)
    other, _, _ = training_split(BENCHMARK_CF_ZSRE, shared_data_dir, evaluation=evaluation)
    assert sum(r["recipe_source"] == "zsre_ins" for r in other) >= BENCHMARK_CF_ZSRE.n_train // 3 - 8
    assert recipe_key(BENCHMARK, {"m": 1}) != recipe_key(BENCHMARK_CF_ZSRE, {"m": 1})


def test_layer_block_last_trains_prefixes_on_the_last_third(tiny_llama_dir, tiny_data_dir, tmp_path):
    from instructedit_plugin.errors import PluginError
    from instructedit_plugin.instructed.checkpoint import load_checkpoint
    from instructedit_plugin.instructed.prefix import default_prefix_layers, last_third_layers

    assert last_third_layers(18) == list(range(12, 18)) and default_prefix_layers(18) == list(range(6, 12))
    assert last_third_layers(32) == list(range(22, 32)) and last_third_layers(2) == [1]
    kwargs = dict(config=BENCHMARK, steps=2, n_train=6, data_dir=tiny_data_dir, cache_dir=tmp_path, dtype="float32",
                  progress=False, model_dir=tiny_llama_dir, val_interval=2)
    last = load_checkpoint(train_embedded_prefixes(prefix_layers="last", **kwargs))
    middle = load_checkpoint(train_embedded_prefixes(prefix_layers="middle", **kwargs))
    assert list(last.bank.layers) == [3] and list(middle.bank.layers) == [1]  # 4 layers
    assert recipe_info(last.folder)["recipe"]["prefix_layers"] == "last"
    with pytest.raises(PluginError, match="prefix_layers 'first'.*Fix:"):
        train_embedded_prefixes(prefix_layers="first", **kwargs)


def test_long_recipe_is_the_benchmark_protocol_with_more_steps_on_more_edits(shared_data_dir):
    """#15 item 5: ``benchmark-cf-long`` trains the benchmark's CounterFact-only data (ZsRE unseen, the evaluated
    records excluded) for more optimizer steps on twice the edits, and caches under its own key."""
    from instructedit_plugin.instructed.recipes import BENCHMARK_LONG, RECIPES, recipe_files

    assert RECIPES["benchmark-cf-long"] is BENCHMARK_LONG
    assert BENCHMARK_LONG.steps > BENCHMARK.steps and BENCHMARK_LONG.n_train == 2 * BENCHMARK.n_train
    same = {f.name for f in dataclasses.fields(BENCHMARK)} - {"name", "steps", "n_train", "budget_minutes"}
    assert {k: getattr(BENCHMARK_LONG, k) for k in same} == {k: getattr(BENCHMARK, k) for k in same}
    assert recipe_files(BENCHMARK_LONG) == recipe_files(BENCHMARK)
    evaluation = evaluation_records(shared_data_dir)
    train, val, _ = training_split(BENCHMARK_LONG, shared_data_dir, evaluation=evaluation)
    assert len(train) == BENCHMARK_LONG.n_train and {r["recipe_source"] for r in train} == set(BENCHMARK.sources)
    _assert_disjoint(train + val, evaluation)
    assert recipe_key(BENCHMARK_LONG, {"m": 1}) != recipe_key(BENCHMARK, {"m": 1})
