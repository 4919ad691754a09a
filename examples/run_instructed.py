"""EasyEdit-style example: train InstructEd prefixes, then edit and evaluate on a KnowEdit-format file.

Like EasyEdit's ``examples/run_knowedit_llama2.py``: ``--hparams_dir`` names the InstructEd
*editing* YAML (``hparams/InstructEd/<model>.yaml``), ``--data_dir`` the dataset folder and
``--data_type`` the KnowEdit dataset. The script

1. trains InstructEd's prefixes with the plugin's :class:`InstructEdTrainer` and the training YAML
   ``hparams/TRAINING/InstructEd/<model>.yaml`` (same file name as ``--hparams_dir``, or
   ``--train_hparams``) -- unless ``--archive`` names prefixes trained before. The training files
   (``--train_data``, default MEND-style ``counterfact/counterfact-train.json``) lose every record
   that shares a subject or a question with the evaluated records;
2. edits the first ``--ds_size`` records through
   ``BaseEditor.from_hparams(InstructEdHyperParams.from_hparams(...))``; EasyEdit's
   ``compute_edit_quality`` scores every edit before and after (one edit at a time, the
   instruction memory reset after each, or accumulated with ``--sequential_edit``);
3. writes ``<metrics_save_dir>/InstructEd_<data_type>_<model>_results.json`` (EasyEdit's per-edit
   metrics list), ``..._summary.json`` (Rel / Gen / Loc / Por / Score / H before and after, from
   :func:`instructedit_plugin.evaluation.summary.summarize_metrics`) and ``..._summary.md``.

``--data_type`` picks the KnowEdit file inside ``--data_dir`` (``--data`` names another one;
``--data_dir`` may also be the file itself):

==============  ==========================================  ========================================
data_type       file                                        note
==============  ==========================================  ========================================
counterfact     ``counterfact/test_cf-generate-10.jsonl``   KnowEdit WikiData_counterfact test
zsre            ``zsre/ZsRE-test-all.json``                 KnowEdit ZsRE test
recent          ``recent/recent_train.json``                KnowEdit's ``recent_test.json`` is not
                                                            in the shared data; pass it with --data
==============  ==========================================  ========================================

Examples (from the repository root)::

    # GPU, paper scale (LLaMA-2-7B): trains the prefixes, then edits 1000 CounterFact records
    python examples/run_instructed.py --editing_method InstructEd --hparams_dir hparams/InstructEd/llama-2-7b.yaml \\
        --data_dir ../shared/data --data_type counterfact --ds_size 1000 --metrics_save_dir ./output

    # CPU, the embedded Gemma-3-270M with the prefixes shipped in the package (the demo's default recipe)
    python examples/run_instructed.py --editing_method InstructEd --hparams_dir hparams/InstructEd/gemma-3-270m.yaml \\
        --model_dir embedded --dtype bfloat16 --archive default --data_dir ../shared/data --data_type zsre \\
        --ds_size 20 --instruction_source retrieval --sequential_edit
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import setup_logging  # noqa: E402  (the benchmarks' logging setup)

LOG = logging.getLogger("run_instructed")

#: KnowEdit dataset name -> file inside --data_dir.
DATA_FILES = {
    "counterfact": "counterfact/test_cf-generate-10.jsonl",
    "zsre": "zsre/ZsRE-test-all.json",
    "recent": "recent/recent_train.json",
}
#: Other spellings of the KnowEdit names (EasyEdit's InstructEdit script says ``wikirecent``).
DATA_TYPE_ALIASES = {"wikirecent": "recent", "wiki_recent": "recent", "wiki_counterfact": "counterfact",
                     "zsre-test": "zsre"}
DEFAULT_TRAIN_DATA = ["counterfact/counterfact-train.json"]
METRICS = ("Rel", "Gen", "Loc", "Por", "Score", "H")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train InstructEd prefixes, then edit and evaluate on a KnowEdit-format file")
    p.add_argument("--editing_method", default="InstructEd", help="InstructEd (the only method this script runs)")
    p.add_argument("--hparams_dir", required=True, help="InstructEd editing YAML (hparams/InstructEd/<model>.yaml)")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR), or the dataset file itself")
    p.add_argument("--data_type", "--datatype", dest="data_type", default="counterfact",
                   help="KnowEdit dataset: " + ", ".join(DATA_FILES) + f" (also {', '.join(DATA_TYPE_ALIASES)})")
    p.add_argument("--data", default=None, help="dataset file relative to --data_dir (default: by --data_type)")
    p.add_argument("--ds_size", type=int, default=None, help="first N records (default: all)")
    p.add_argument("--metrics_save_dir", default="./output")
    p.add_argument("--instruction_source", default=None, choices=("gold", "retrieval"),
                   help="gold: each input gets its own edit's instruction; retrieval: the instruction memory and "
                        "its gate (default: the YAML's)")
    p.add_argument("--sequential_edit", action="store_true",
                   help="accumulate the edits in the instruction memory instead of evaluating each alone")
    p.add_argument("--archive", default=None, help="trained prefixes (a folder InstructEdTrainer wrote): skip training")
    p.add_argument("--model_dir", default=None,
                   help="override model_name: a local Hugging Face folder, or 'embedded' (Gemma-3-270M)")
    p.add_argument("--device", default=None, help="override device: 'cpu', a CUDA index or 'cuda:N'")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="load the model in this dtype (default: as stored; bfloat16 is ~4x faster on CPU)")
    # training
    p.add_argument("--train_hparams", default=None,
                   help="InstructEd training YAML (default: hparams/TRAINING/InstructEd/<same file name>)")
    p.add_argument("--train_data", action="append", default=None,
                   help="training file relative to --data_dir (repeatable; default: counterfact/counterfact-train.json)")
    p.add_argument("--val_data", default=None, help="validation file (default: a split of the training data)")
    p.add_argument("--train_size", type=int, default=None, help="at most N training edits")
    p.add_argument("--max_iters", "--max_steps", dest="max_iters", type=int, default=None,
                   help="override the training YAML's max_iters (--max_steps: its earlier name)")
    p.add_argument("--results_dir", default=None, help="where the prefixes go (default: the training YAML's results_dir)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def data_type_of(name: str) -> str:
    key = name.strip().lower()
    key = DATA_TYPE_ALIASES.get(key, key)
    if key not in DATA_FILES:
        raise SystemExit(f"run_instructed: unknown --data_type {name!r}; use one of {', '.join(DATA_FILES)}")
    return key


def eval_file(args: argparse.Namespace, data_type: str) -> Path:
    from instructedit_plugin.data import resolve_data_dir

    if args.data_dir and Path(args.data_dir).is_file():
        return Path(args.data_dir)
    return resolve_data_dir(args.data_dir) / (args.data or DATA_FILES[data_type])


def _norm(text: Any) -> str:
    return " ".join(str(text).split()).lower() if text else ""


def _questions(req: dict) -> set[str]:
    out = {_norm(req.get("prompt")), _norm(req.get("rephrase_prompt"))}
    for entry in (req.get("portability") or {}).values():
        prompts = entry.get("prompt") if isinstance(entry, dict) else None
        out.update(_norm(p) for p in (prompts if isinstance(prompts, list) else [prompts]))
    out.discard("")
    return out


def disjoint_from(records: list[dict], evaluated: list[dict]) -> list[dict]:
    """``records`` without those sharing a subject or a question with ``evaluated``."""
    subjects = {_norm(r.get("subject")) for r in evaluated} - {""}
    questions = set().union(*(_questions(r) for r in evaluated)) if evaluated else set()
    return [r for r in records if _norm(r.get("subject")) not in subjects and not (_questions(r) & questions)]


# ----------------------------------------------------------------------------------------------
# Training and editing
# ----------------------------------------------------------------------------------------------
def training_yaml(args: argparse.Namespace) -> Path:
    if args.train_hparams:
        return Path(args.train_hparams)
    from instructedit_plugin.core.config import yaml_path

    return yaml_path(ROOT / "hparams" / "TRAINING" / "InstructEd" / Path(args.hparams_dir).name)


def training_root(args: argparse.Namespace) -> Path:
    """The folder ``--train_data`` / ``--val_data`` are relative to."""
    from instructedit_plugin.data import resolve_data_dir

    return resolve_data_dir(args.data_dir if args.data_dir and not Path(args.data_dir).is_file() else None)


def check_files(args: argparse.Namespace, data_type: str) -> tuple[list[dict], dict | None]:
    """Every file the run reads exists and parses, before a model is loaded: the evaluated file and,
    unless ``--archive`` is given, the training (and validation) files. Returns the evaluated edits and
    ``{"train": [...], "val": [...] or None}`` (None with ``--archive``)."""
    from instructedit_plugin.data.preflight import check_data_files

    evaluated = "--data" if args.data else f"--data_type {data_type}"
    files: dict[str, Path] = {evaluated: eval_file(args, data_type)}
    train_labels: list[str] = []
    if not args.archive:
        root = training_root(args)
        for i, name in enumerate(args.train_data or DEFAULT_TRAIN_DATA):
            label = ("--train_data" if args.train_data else "training data (default)") + (f" ({i + 1})" if i else "")
            files[label] = root / name
            train_labels.append(label)
        if args.val_data:
            files["--val_data"] = root / args.val_data
    checked = check_data_files(files, limit={evaluated: args.ds_size})
    if args.archive:
        return checked[evaluated].records, None
    train = [r for label in train_labels for r in checked[label].records]
    val = checked["--val_data"].records if args.val_data else None
    return checked[evaluated].records, {"train": train, "val": val}


def train_prefixes(args: argparse.Namespace, hparams: Any, model: Any, tok: Any, evaluated: list[dict],
                   edits: dict | None = None) -> dict:
    """Train prefixes with the plugin's InstructEdTrainer; returns its result (``best_dir`` is the archive).

    ``edits``: ``{"train": [...], "val": [...] or None}`` as :func:`check_files` read them; None reads them here."""
    from instructedit_plugin.data import load_requests
    from instructedit_plugin.instructed import InstructEdTrainer, InstructEdTrainingHparams

    cfg = InstructEdTrainingHparams.from_hparams(training_yaml(args))
    data = cfg.to_dict()
    data.update(model_name=str(hparams.model_name), device=hparams.device)
    if hparams.prefix_layers is not None:
        data["prefix_layers"] = list(hparams.prefix_layers)
    if hparams.prefix_len is not None:
        data["prefix_len"] = hparams.prefix_len
    if args.dtype:
        data["dtype"] = args.dtype
    if args.results_dir:
        data["results_dir"] = args.results_dir
    if args.max_iters is not None:
        data["max_iters"] = args.max_iters
        data["val_interval"] = min(cfg.val_interval, args.max_iters)
        data["warmup_steps"] = min(cfg.warmup_steps, max(0, args.max_iters // 10))
    cfg = InstructEdTrainingHparams.from_dict(data, source=str(training_yaml(args)))

    if edits is None:
        root = training_root(args)
        edits = {"train": [r for f in args.train_data or DEFAULT_TRAIN_DATA for r in load_requests(root / f)],
                 "val": load_requests(root / args.val_data) if args.val_data else None}
    loaded = edits["train"]
    train = disjoint_from(loaded, evaluated)
    LOG.info("training edits: %d of %d (%d share a subject or question with the evaluated records)",
             len(train), len(loaded), len(loaded) - len(train))
    if args.train_size:
        train = train[: args.train_size]
    val = disjoint_from(edits["val"], evaluated) if edits["val"] is not None else None
    trainer = InstructEdTrainer(cfg, train, val, model=model, tokenizer=tok)
    try:
        result = trainer.run()
    finally:
        trainer.close()  # detach: the editor attaches the archive's prefixes itself
    LOG.info("prefixes: %s (step %d, best validation loss %s)", result["best_dir"], result["step"], result["best_val_loss"])
    return {"archive": result["best_dir"], "steps": result["step"], "best_val_loss": result["best_val_loss"],
            "train_edits": len(train), "seconds": round(result["seconds"], 1), "training_yaml": str(training_yaml(args))}


def editing_hparams(args: argparse.Namespace):
    """The editing YAML through ``InstructEdHyperParams.from_hparams`` plus the command-line overrides."""
    from instructedit_plugin.instructed import InstructEdHyperParams

    hp = InstructEdHyperParams.from_hparams(args.hparams_dir)
    overrides: dict[str, Any] = {}
    if args.model_dir == "embedded":
        from instructedit_plugin.models.embedded import embedded_model_dir

        overrides["model_name"] = str(embedded_model_dir())
    elif args.model_dir:
        overrides["model_name"] = args.model_dir
    if args.device is not None:
        overrides["device"] = int(args.device) if str(args.device).isdigit() else args.device
    elif not torch.cuda.is_available():
        overrides["device"] = "cpu"
    if args.instruction_source:
        overrides["instruction_source"] = args.instruction_source
    if args.archive:
        overrides["archive"] = args.archive
    if overrides:
        hp = InstructEdHyperParams.from_dict({**hp.to_dict(), **overrides}, source=args.hparams_dir)
    return hp


def summarise(metrics: list[dict]) -> dict[str, dict]:
    """Rel/Gen/Loc/Por/Score/H before (``pre-edit``) and after (``InstructEd``) editing, in percent."""
    from instructedit_plugin.evaluation.summary import harmonic_mean, score, summarize_metrics

    pre = summarize_metrics(metrics, phase="pre")
    pre["Loc"] = 100.0  # the unedited model agrees with itself (EasyEdit scores locality only after the edit)
    measured = [pre[k] for k in ("Rel", "Gen", "Loc", "Por") if pre[k] is not None]
    pre["Score"], pre["H"] = score(measured), harmonic_mean(measured)
    return {"pre-edit": pre, "InstructEd": summarize_metrics(metrics, phase="post")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.editing_method.lower() != "instructed":
        raise SystemExit(f"run_instructed: --editing_method {args.editing_method!r} is not supported here; use "
                         "InstructEd (examples/run_instructedit.py runs InstructEdit)")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging()
    started = time.perf_counter()

    import instructedit_plugin
    import instructedit_plugin.instructed  # noqa: F401 - registers InstructEd with EasyEdit

    instructedit_plugin.register()
    from instructedit_plugin.compat import make_editor, run_edit_requests
    from instructedit_plugin.core.durable import atomic_write_text
    from instructedit_plugin.evaluation.report import markdown_table
    from instructedit_plugin.models.loading import load_causal_lm

    data_type = data_type_of(args.data_type)
    path = eval_file(args, data_type)
    requests, training_data = check_files(args, data_type)  # every file, before any model is loaded
    if not requests:
        raise SystemExit(f"run_instructed: no records in {path}")
    hp = editing_hparams(args)
    if hp.instruction_source == "gold" and args.sequential_edit:
        LOG.warning("gold instructions with --sequential_edit: each input is still given its own edit's instruction; "
                    "use --instruction_source retrieval to evaluate against the accumulated memory")
    model, tok = load_causal_lm(hp.model_name, dtype=args.dtype, alg_name=hp.alg_name)
    model.eval()

    training = None
    if not args.archive:
        training = train_prefixes(args, hp, model, tok, requests, training_data)
        hp.archive = training["archive"]
    hp.check_ready()
    editor = make_editor(hp, model, tok)  # BaseEditor.from_hparams on the loaded model
    LOG.info("editing %d records of %s (instruction_source=%s, sequential=%s)", len(requests), path,
             hp.instruction_source, args.sequential_edit)
    t0 = time.perf_counter()
    metrics, _, _ = run_edit_requests(editor, requests, sequential=args.sequential_edit)
    edit_seconds = time.perf_counter() - t0

    rows = summarise(metrics)
    out_dir = Path(args.metrics_save_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"InstructEd_{data_type}_{Path(str(hp.model_name)).name}"
    results_path = out_dir / f"{stem}_results.json"
    atomic_write_text(results_path, json.dumps(metrics, indent=2, default=str) + "\n")
    summary = {
        "editing_method": "InstructEd", "data_type": data_type, "data": str(path), "n_edits": len(metrics),
        "model_name": str(hp.model_name), "archive": str(hp.archive), "hparams": str(args.hparams_dir),
        "instruction_source": hp.instruction_source, "sequential_edit": args.sequential_edit, "dtype": args.dtype,
        "summary": rows, "training": training, "edit_seconds": round(edit_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1), "results": str(results_path),
        "command": "python examples/run_instructed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    atomic_write_text(out_dir / f"{stem}_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    table = markdown_table(rows, columns=METRICS)
    atomic_write_text(
        out_dir / f"{stem}_summary.md",
        f"# InstructEd on {path.name} ({len(metrics)} edits, instruction source {hp.instruction_source}"
        f"{', sequential' if args.sequential_edit else ''})\n\nModel: `{hp.model_name}`; prefixes: `{hp.archive}`.\n\n"
        + table)
    print(table, end="")
    LOG.info("wrote %s, %s and %s", results_path, out_dir / f"{stem}_summary.json", out_dir / f"{stem}_summary.md")
    return 0


if __name__ == "__main__":
    from instructedit_plugin.cli import run_script

    sys.exit(run_script("run_instructed", main))
