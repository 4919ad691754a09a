"""CPU benchmark: InstructEdit vs MEND without instructions on the embedded Gemma-3-270M.

Trains, on the same data with the same editor network and trainer
(:class:`~instructedit_plugin.instructedit.evaluate.AnswerLogitsTrainer`):

* ``instructedit``: multi-task (counterfact, recent, convsent), instruction-prefixed inputs;
* ``mend_multitask``: the same tasks, instructions switched off (plain multi-task MEND);
* ``mend_single_task``: CounterFact only, no instructions (skipped with ``--no_single_task``);

all for the same number of steps: InstructEdit trains for half of
``--budget_minutes`` (its steps are the most expensive: the instruction makes
the inputs 3-4x longer), the baselines for the same step count. Then it edits
the first ``--n_test`` records of each test file (CounterFact: KnowEdit
``test_cf``; Recent: a seeded hold-out split of ``recent_train``, never trained
on; ConvSent: ``blender_test``; hold-out ZsRE: ``zsre_mend_eval_portability_gpt4``)
and writes ``benchmarks/results/instructedit_cpu.json`` (+ ``.md``).

Run from the repository root::

    python benchmarks/instructedit_cpu.py --data_dir ../shared/data            # defaults: 15 min budget, 100 records
    python benchmarks/instructedit_cpu.py --data_dir ../shared/data --budget_minutes 3 --n_test 10   # quick
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructedit_plugin.data import load_requests, resolve_data_dir
from instructedit_plugin.instructedit import InstructEditTrainingHparams
from instructedit_plugin.instructedit.dataset import record_identity, split_tasks
from instructedit_plugin.instructedit.evaluate import (
    HOLDOUT_TASK,
    MethodSpec,
    evaluate_instructedit,
    results_markdown,
    train_editor,
)
from instructedit_plugin.models.embedded import embedded_model_dir
from instructedit_plugin.models.loading import load_causal_lm

LOG = logging.getLogger("instructedit_cpu")
TASK_ORDER = ("counterfact", "recent", "convsent", HOLDOUT_TASK)
METRICS = ("Rel", "Gen", "Loc", "Por")
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "gemma-3-270m.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--budget_minutes", type=float, default=15.0, help="CPU training budget for all editors together")
    p.add_argument("--n_test", type=int, default=100, help="records per test file (first N)")
    p.add_argument("--n_train", type=int, default=2000, help="at most this many training records per task")
    p.add_argument("--max_pairs", type=int, default=4, help="locality/portability prompts scored per key and record")
    p.add_argument("--layers", default="16,17", help="decoder layers whose MLP up/down projections are edited")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--edit_lr", type=float, default=1e-6)
    p.add_argument("--lr_lr", type=float, default=1e-6)
    p.add_argument("--cedit", type=float, default=1.0)
    p.add_argument("--cloc", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no_single_task", action="store_true", help="skip the single-task MEND baseline")
    p.add_argument("--work_dir", default=None,
                   help="editor checkpoints (default: a fresh temporary folder, outside the repository)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructedit_cpu.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_data(data_dir: Path, n_test: int, n_train: int, seed: int):
    cf_test = load_requests(data_dir / "counterfact" / "test_cf-generate-10.jsonl", limit=n_test)
    test_subjects = {r["subject"] for r in cf_test}
    cf_train = [r for r in load_requests(data_dir / "counterfact" / "counterfact-train.json", limit=n_train + 200)
                if r["subject"] not in test_subjects][:n_train]
    recent_all = load_requests(data_dir / "recent" / "recent_train.json")
    recent_split = split_tasks({"recent": recent_all}, seed=seed, val_size=min(100, len(recent_all) // 5))
    recent_train, recent_test = recent_split[0]["recent"], recent_split[1]["recent"][:n_test]
    convsent_train = load_requests(data_dir / "convsent" / "blender_val.json", limit=n_train)
    convsent_test = load_requests(data_dir / "convsent" / "blender_test.json", limit=n_test)
    zsre_test = load_requests(data_dir / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=n_test)
    train = {"counterfact": cf_train, "recent": recent_train[:n_train], "convsent": convsent_train}
    test = {"counterfact": cf_test, "recent": recent_test, "convsent": convsent_test, HOLDOUT_TASK: zsre_test}
    # disjointness checks (by record identity; ConvSent by topic)
    for task in ("counterfact", "recent"):
        assert not {record_identity(task, r) for r in train[task]} & {record_identity(task, r) for r in test[task]}
    assert not {r["topic"] for r in convsent_train} & {r["topic"] for r in convsent_test}
    return train, test


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("instructedit_plugin.instructedit.trainer", "instructedit_plugin.instructedit.checkpoint",
                  "instructedit_plugin.models.loading", "instructedit_plugin.instructedit.apply"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.time()
    if args.work_dir is None:
        import tempfile

        args.work_dir = tempfile.mkdtemp(prefix="instructedit_cpu_")
    data_dir = resolve_data_dir(args.data_dir)
    train, test = load_data(data_dir, args.n_test, args.n_train, args.seed)
    LOG.info("train records: %s; test records: %s", {k: len(v) for k, v in train.items()}, {k: len(v) for k, v in test.items()})

    model_dir = embedded_model_dir()
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    cfg = InstructEditTrainingHparams.from_hparams(TRAIN_YAML)
    cfg.model_name = str(model_dir)
    cfg.inner_params = [f"model.layers.{i}.mlp.{w}_proj.weight" for i in layers for w in ("up", "down")]
    cfg.device = "cpu"
    cfg.dtype = args.dtype
    cfg.rank, cfg.lr, cfg.edit_lr, cfg.lr_lr = args.rank, args.lr, args.edit_lr, args.lr_lr
    cfg.cedit, cfg.cloc = args.cedit, args.cloc
    cfg.accumulate_bs, cfg.batch_size = 1, 1
    cfg.max_iters = 100000
    cfg.val_interval, cfg.val_steps = 100000, 12
    cfg.log_interval = 25
    cfg.progress = False
    cfg.seed = args.seed

    budget_s = 60.0 * args.budget_minutes
    LOG.info("CPU training budget: %.1f minutes for all editors (InstructEdit gets half; baselines the same step count)",
             args.budget_minutes)
    runs = {}
    cfg.results_dir = str(Path(args.work_dir) / "instructedit")
    runs["instructedit"] = train_editor(cfg, train, tok, model, use_instructions=True, val_size=4,
                                        calibrate_steps=3, budget_s=budget_s / (2.0 if not args.no_single_task else 1.6))
    steps = int(runs["instructedit"]["steps"])
    LOG.info("instructedit: %d steps, %.1fs (%.2fs/step)", steps, runs["instructedit"]["train_time_s"],
             runs["instructedit"]["seconds_per_step"])
    base = {"mend_multitask": train}
    if not args.no_single_task:
        base["mend_single_task"] = {"counterfact": train["counterfact"]}
    for name, tasks in base.items():
        cfg.results_dir = str(Path(args.work_dir) / name)
        cfg.max_iters = steps
        runs[name] = train_editor(cfg, tasks, tok, model, use_instructions=False, val_size=4)
        LOG.info("%s: %d steps, %.1fs", name, runs[name]["steps"], runs[name]["wall_s"])
    train_seconds = sum(r["wall_s"] for r in runs.values())

    methods = [MethodSpec(name, r["best_checkpoint"], name == "instructedit") for name, r in runs.items()]
    t_eval = time.time()
    results = evaluate_instructedit(model, tok, methods, test, max_pairs=args.max_pairs, seed=args.seed,
                                    progress=lambda line: LOG.info("%s", line))
    eval_seconds = time.time() - t_eval

    def cell(summary):
        return {m: (None if summary.get(m) is None else round(float(summary[m]), 2)) for m in METRICS}

    out = {
        "model": f"gemma-3-270m (embedded, {args.dtype}, CPU)",
        "train_steps": steps,
        "train_seconds": round(train_seconds, 1),
        "tasks": {t: {m: cell(s) for m, s in results["tasks"].get(t, {}).items()} for t in TASK_ORDER},
        "unseen_instruction": {t: {"instructedit": cell(results["unseen_instruction"][t]["instructedit"])}
                               for t in TASK_ORDER if t in results["unseen_instruction"]},
        "latency": {m: {"edit_ms": round(v["edit_ms"], 2)} for m, v in results["latency"].items()},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")

    ie, mm = out["tasks"][HOLDOUT_TASK]["instructedit"], out["tasks"][HOLDOUT_TASK]["mend_multitask"]
    gaps = {t: (out["tasks"][t]["instructedit"]["Rel"] - out["unseen_instruction"][t]["instructedit"]["Rel"])
            for t in TASK_ORDER}
    lat_ratio = out["latency"]["instructedit"]["edit_ms"] / out["latency"]["mend_multitask"]["edit_ms"]
    lines = [results_markdown(results, "InstructEdit CPU benchmark (Gemma-3-270M)").rstrip(), "",
             "## Configuration", "",
             f"- model: {out['model']}; edited weights: {', '.join(cfg.inner_params)}",
             (f"- editor: rank {args.rank}, lr {args.lr}, edit_lr {args.edit_lr}, lr_lr {args.lr_lr}, cedit {args.cedit}, "
             f"cloc {args.cloc}, batch 1, Adam; trainer: AnswerLogitsTrainer (answer-position logits)"),
             f"- CPU budget {args.budget_minutes} min ({args.threads} thread(s), shared machine): {steps} steps per editor; "
             + "; ".join(f"{n}: {r['wall_s']:.0f} s ({r['seconds_per_step']:.2f} s/step), tasks {r['tasks']}"
                         for n, r in runs.items()),
             (f"- training data: { {k: len(v) for k, v in train.items()} } (CounterFact: counterfact-train.json minus test "
             "subjects; Recent: recent_train.json minus the test split; ConvSent: blender_val.json)"),
             (f"- test data (first {args.n_test} per file): { {k: len(v) for k, v in test.items()} }; "
             f"at most {args.max_pairs} locality/portability prompts per key and record"),
             f"- evaluation time {eval_seconds:.0f} s; total wall time {time.time() - t_start:.0f} s",
             "", "## Targets", "",
             (f"- hold-out ZsRE Rel: InstructEdit {ie['Rel']:.1f} vs multi-task MEND {mm['Rel']:.1f} "
             f"(difference {ie['Rel'] - mm['Rel']:+.1f}; target >= +10): {'met' if ie['Rel'] - mm['Rel'] >= 10 else 'missed'}"),
             "- seen minus unseen instruction Rel: " + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items())
             + f" (target within 5): {'met' if all(abs(g) <= 5 for g in gaps.values()) else 'missed'}",
             f"- edit latency InstructEdit / MEND: {lat_ratio:.2f}x (target <= 1.1x): {'met' if lat_ratio <= 1.1 else 'missed'}",
             ""]
    out_path.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    LOG.info("wrote %s and %s in %.0f s", out_path, out_path.with_suffix(".md"), time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
