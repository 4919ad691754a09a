"""EasyEdit-style example: train InstructEdit (and baselines), then edit and evaluate on KnowEdit-format files.

Like EasyEdit's ``examples/run_knowedit_llama2.py``: point ``--data_dir`` at the
datasets, ``--hparams_dir`` at an InstructEdit *training* YAML, and the script

1. meta-trains InstructEdit on the training tasks (CounterFact, Recent, ConvSent)
   with instructions, and, unless ``--no_baselines``, the same editor without
   instructions (multi-task MEND) and on CounterFact only (single-task MEND);
2. edits the first ``--ds_size`` records of each test file with every editor:
   the training tasks plus hold-out ZsRE, InstructEdit with a seen and with the
   held-back (unseen) instruction;
3. writes ``<metrics_save_dir>/InstructEdit_results.json`` (summaries, and the
   per-edit metrics in EasyEdit's layout) and ``InstructEdit_results.md``.

Example (CPU, the tiny YAML's budget; use a real model folder in the YAML or ``--model_dir``)::

    python examples/run_instructedit.py --data_dir ../shared/data \\
        --hparams_dir hparams/TRAINING/InstructEdit/gemma-3-270m.yaml --model_dir embedded \\
        --ds_size 20 --max_iters 200 --metrics_save_dir ./output

``--archive DIR`` skips training InstructEdit and evaluates that checkpoint;
``--metric_backend easyedit`` scores with EasyEdit's own ``compute_edit_quality``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instructedit_plugin.core.devices import resolve_device
from instructedit_plugin.data import resolve_data_dir
from instructedit_plugin.data.preflight import check_data_files
from instructedit_plugin.instructedit import InstructEditTrainingHparams
from instructedit_plugin.instructedit.dataset import split_tasks
from instructedit_plugin.instructedit.evaluate import (
    HOLDOUT_TASK,
    MethodSpec,
    evaluate_instructedit,
    results_markdown,
    save_results,
    train_editor,
)
from instructedit_plugin.models.loading import load_causal_lm

LOG = logging.getLogger("run_instructedit")

TRAIN_FILES = {"counterfact": "counterfact/train_cf.json", "recent": "recent/recent_train.json",
               "convsent": "convsent/blender_val.json"}
TEST_FILES = {"counterfact": "counterfact/test_cf-generate-10.jsonl", "recent": None,  # split off recent_train
              "convsent": "convsent/blender_test.json", HOLDOUT_TASK: "zsre/zsre_mend_eval_portability_gpt4.json"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train InstructEdit and evaluate it against MEND baselines")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--hparams_dir", required=True, help="InstructEdit training YAML (hparams/TRAINING/InstructEdit/*.yaml)")
    p.add_argument("--model_dir", default=None, help="override model_name: a local HF folder, or 'embedded' (Gemma-3-270M)")
    p.add_argument("--ds_size", type=int, default=None, help="first N records of each test file (default: all)")
    p.add_argument("--train_size", type=int, default=None, help="at most N training records per task")
    p.add_argument("--metrics_save_dir", default="./output")
    p.add_argument("--max_iters", type=int, default=None, help="override the YAML's max_iters")
    p.add_argument("--archive", default=None, help="evaluate this InstructEdit checkpoint instead of training one")
    p.add_argument("--no_baselines", action="store_true", help="skip the MEND baselines")
    p.add_argument("--metric_backend", default="plugin", choices=("plugin", "easyedit"))
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def check_files(data_dir: Path, ds_size: int | None, train_size: int | None) -> dict[tuple[str, str], list]:
    """Every training and test file exists and parses, before a model is loaded:
    ``{("train" | "test", task): edits}`` (each file read with the limit the run uses)."""
    files, limits = {}, {}
    for kind, table, limit in (("train", TRAIN_FILES, train_size), ("test", TEST_FILES, ds_size)):
        for task, name in table.items():
            if name is not None:
                label = f"{kind} {task}"
                files[label] = data_dir / name
                limits[label] = None if (kind, task) == ("train", "recent") else limit  # recent: split below
    checked = check_data_files(files, limit=limits)
    return {tuple(label.split(" ", 1)): item.records for label, item in checked.items()}


def load_tasks(data_dir: Path, ds_size: int | None, train_size: int | None, seed: int, loaded: dict | None = None):
    """Training and test edits per task; ``loaded`` is what :func:`check_files` read (None: check and read now)."""
    loaded = loaded if loaded is not None else check_files(data_dir, ds_size, train_size)
    train = {t: loaded[("train", t)] for t in TRAIN_FILES}
    n_recent_test = min(ds_size or 100, len(train["recent"]) // 5)
    rest, held = split_tasks({"recent": train["recent"]}, seed=seed, val_size=n_recent_test)
    train["recent"] = rest["recent"][:train_size] if train_size else rest["recent"]
    test = {t: (held["recent"] if f is None else loaded[("test", t)]) for t, f in TEST_FILES.items()}
    return train, test


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data_dir = resolve_data_dir(args.data_dir)
    loaded = check_files(data_dir, args.ds_size, args.train_size)  # every file, before any model is loaded
    cfg = InstructEditTrainingHparams.from_hparams(args.hparams_dir)
    if args.model_dir == "embedded":
        from instructedit_plugin.models.embedded import embedded_model_dir

        cfg.model_name = str(embedded_model_dir())
    elif args.model_dir:
        cfg.model_name = args.model_dir
    if args.max_iters is not None:
        cfg.max_iters = args.max_iters
        cfg.val_interval = min(cfg.val_interval, args.max_iters)
    if args.dtype:
        cfg.dtype = args.dtype
    out_dir = Path(args.metrics_save_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.results_dir = str(out_dir / "editors")
    if not torch.cuda.is_available():
        cfg.device = "cpu"

    train, test = load_tasks(data_dir, args.ds_size, args.train_size, cfg.seed, loaded)
    model, tok = load_causal_lm(cfg.model_name, dtype=cfg.dtype)
    model.to(resolve_device(cfg.device))
    model.eval()

    archives = {}
    if args.archive:
        archives["instructedit"] = args.archive
    else:
        cfg.results_dir = str(out_dir / "editors" / "instructedit")
        archives["instructedit"] = train_editor(cfg, train, tok, model, use_instructions=True)["best_checkpoint"]
    if not args.no_baselines:
        for name, tasks in (("mend_multitask", train), ("mend_single_task", {"counterfact": train["counterfact"]})):
            cfg.results_dir = str(out_dir / "editors" / name)
            archives[name] = train_editor(cfg, tasks, tok, model, use_instructions=False)["best_checkpoint"]

    easyedit_hp = None
    if args.metric_backend == "easyedit":
        import instructedit_plugin

        instructedit_plugin.register()
        easyedit_hp = SimpleNamespace(alg_name="InstructEdit", model_name=cfg.model_name, max_length=cfg.max_length,
                                      device=cfg.device)
    methods = [MethodSpec(name, path, name == "instructedit") for name, path in archives.items()]
    results = evaluate_instructedit(model, tok, methods, test, metric_backend=args.metric_backend,
                                    easyedit_hparams=easyedit_hp, keep_records=True,
                                    progress=lambda line: LOG.info("%s", line))
    save_results(results, out_dir / "InstructEdit_results.json", out_dir / "InstructEdit_results.md")
    print(results_markdown(results))
    LOG.info("wrote %s", out_dir / "InstructEdit_results.json")
    return 0


if __name__ == "__main__":
    from instructedit_plugin.cli import run_script

    sys.exit(run_script("run_instructedit", main))
