"""The ``instructedit`` command line.

Subcommands are table-driven (name -> handler) so each one stays a small
function; every handler returns a process exit code.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

LOG = logging.getLogger("instructedit_plugin.cli")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ERROR = 1


def collect_info() -> dict[str, Any]:
    """What a user needs to know before editing: EasyEdit flavour, methods, device, paths."""
    import torch
    import transformers

    from . import __version__
    from .compat.easyeditor_loader import EasyEditNotInstalledError
    from .models.cache import cache_dir
    from .registry import register, registered_algorithms

    info: dict[str, Any] = {
        "instructedit_plugin": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cache_dir": str(cache_dir()),
        "data_dir": os.environ.get("INSTRUCTEDIT_DATA_DIR") or "(not set: pass --data_dir or set INSTRUCTEDIT_DATA_DIR)",
    }
    try:
        easyedit = register()
    except EasyEditNotInstalledError as exc:
        info["easyedit"] = {"flavour": None, "error": str(exc)}
    else:
        alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
        train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
        info["easyedit"] = {
            "flavour": easyedit.flavour,
            "location": easyedit.location,
            "placeholder_modules": sorted(easyedit.stubbed_modules),
            "ALG_DICT": sorted(alg_dict),
            "ALG_TRAIN_DICT": sorted(train_dict),
        }
    info["plugin_algorithms"] = sorted(registered_algorithms())
    return info


def _format_info(info: dict[str, Any]) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    sys.stdout.write((json.dumps(info, indent=2) if args.json else _format_info(info)) + "\n")
    return EXIT_OK


# ------------------------------------------------------------------------------------ helpers
def _parse_task_files(specs: Sequence[str]) -> dict[str, str]:
    """``--task NAME=FILE`` specs as ``{name: file}`` (files are checked by :func:`_check_data`)."""
    from .errors import PluginError

    tasks = {}
    for spec in specs:
        if "=" not in spec:
            raise PluginError(f"--task '{spec}' is not NAME=FILE. Fix: write e.g. "
                              "--task counterfact=counterfact/counterfact-train.json")
        name, path = spec.split("=", 1)
        tasks[name.strip()] = path.strip()
    return tasks


def _check_data(files: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Every data file the command will read exists and parses (before any model is loaded or
    trained); ``{label: records}``. Relative paths are also looked up under ``--data_dir``."""
    from .data.preflight import check_data_files

    checked = check_data_files(files, data_dir=getattr(args, "data_dir", None), limit=getattr(args, "limit", None))
    return {label: item.records for label, item in checked.items()}


def _peek_alg(path: str) -> str | None:
    """The ``alg:`` of a training YAML without validating it (None when unreadable: load_hparams reports it)."""
    from .core.config import read_yaml
    from .errors import HyperParamsError

    try:
        data, _ = read_yaml(path)
    except HyperParamsError:
        return None
    return str(data.get("alg")) if isinstance(data, dict) and data.get("alg") is not None else None


#: InstructEdit's default multi-task training files (relative to the data folder), as in the paper.
INSTRUCTEDIT_DEFAULT_TASKS = {
    "counterfact": "counterfact/counterfact-train.json",
    "recent": "recent/recent_train.json",
    "convsent": "convsent/blender_val.json",
}


def _instructedit_data(args: argparse.Namespace) -> dict[str, Any]:
    """InstructEdit's training tasks, checked: ``{task: records}`` (``--task`` or the paper's defaults)."""
    given = _parse_task_files(args.task) if args.task else INSTRUCTEDIT_DEFAULT_TASKS
    labels = {(f"--task {name}" if args.task else f"task {name} (default)"): name for name in given}
    records = _check_data({label: given[name] for label, name in labels.items()}, args)
    return {labels[label]: value for label, value in records.items()}


def _instructed_data(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """InstructEd's training (``--train``, repeatable) and validation (``--val``) edits, checked."""
    from .errors import PluginError

    if not args.train:
        raise PluginError("InstructEd training needs a training file. Fix: add --train FILE "
                          "(e.g. --train counterfact/counterfact-train.json)")
    files = {("--train" if i == 0 else f"--train ({i + 1})"): path for i, path in enumerate(args.train)}
    if args.val:
        files["--val"] = args.val
    records = _check_data(files, args)
    val = records.pop("--val", None)
    return [r for chunk in records.values() for r in chunk], val


def _train_instructedit(config: Any, args: argparse.Namespace, tasks: dict[str, Any]) -> dict[str, Any]:
    from .instructedit.dataset import make_datasets
    from .instructedit.trainer import InstructEditTrainer
    from .models.loading import load_causal_lm

    _, tok = load_causal_lm(config.model_name)
    train_set, val_set = make_datasets(tasks, tok, config)
    return InstructEditTrainer(config, train_set, val_set).run()


def _train_instructed(config: Any, args: argparse.Namespace,
                      data: tuple[list[dict[str, Any]], list[dict[str, Any]] | None]) -> dict[str, Any]:
    from .instructed.trainer import InstructEdTrainer

    train, val = data
    return InstructEdTrainer(config, train, val).run()


#: Per algorithm (the value of ``alg:`` in a training YAML): the data check, run before the YAML's
#: model is resolved or loaded, and the training entry point, which gets the checked data.
TRAINERS: dict[str, tuple[Callable[[argparse.Namespace], Any], Callable[[Any, argparse.Namespace, Any], dict[str, Any]]]] = {
    "InstructEdit": (_instructedit_data, _train_instructedit),
    "InstructEd": (_instructed_data, _train_instructed),
}


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from .errors import PluginError
    from .core.config import check_model_name
    from .registry import load_hparams

    # the data first: a missing or broken file fails in a second, before `model_name: embedded`
    # is resolved (a conversion on first use) or any model is loaded
    peeked = TRAINERS.get(_peek_alg(args.hparams) or "")
    data = peeked[0](args) if peeked is not None else None
    overrides = {k: v for k, v in (("model_name", args.model_name), ("results_dir", args.results_dir)) if v}
    config = load_hparams(args.hparams, training=True, **overrides)
    if args.max_iters is not None:
        config.max_iters = args.max_iters
    entry = TRAINERS.get(config.alg)
    if entry is None:
        raise PluginError(f"no plugin trainer for alg '{config.alg}'. Fix: use one of {', '.join(TRAINERS)}")
    check_data, trainer = entry
    if peeked is not entry:
        data = check_data(args)
    check_model_name(config.model_name, getattr(config, "_source", None))
    result = trainer(config, args, data)
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return EXIT_OK  # under `accelerate launch` only the main process reports
    sys.stdout.write(yaml.safe_dump({k: str(v) if not isinstance(v, (int, float, str)) else v
                                     for k, v in result.items() if not isinstance(v, (list, dict))}, sort_keys=False))
    return EXIT_OK


def _load_editor(args: argparse.Namespace) -> Any:
    from .compat import make_editor
    from .registry import load_hparams

    overrides = {k: v for k, v in (("model_name", args.model_name), ("archive", getattr(args, "archive", None)),
                                    ("device", args.device)) if v}
    return make_editor(load_hparams(args.hparams, **overrides))


def cmd_edit(args: argparse.Namespace) -> int:
    """Edit one fact from the command line and show the metrics before and after."""
    from .compat import run_edit_requests
    from .evaluation import summarize_metrics

    request: dict[str, Any] = {"prompt": args.prompt, "target_new": args.target_new,
                               "ground_truth": args.ground_truth or "<|endoftext|>"}
    if args.rephrase:
        request["rephrase_prompt"] = args.rephrase
    if args.instruction:
        request["instruction"] = args.instruction
    if args.task:
        request["task"] = args.task
    editor = _load_editor(args)
    metrics, _, _ = run_edit_requests(editor, [request])
    pre, post = summarize_metrics(metrics, "pre"), summarize_metrics(metrics, "post")
    sys.stdout.write(f"{args.prompt!r} -> {args.target_new!r}\n")
    for name in ("Rel", "Gen"):
        if post.get(name) is not None:
            sys.stdout.write(f"  {name}: {pre.get(name) or 0.0:.1f} -> {post[name]:.1f}\n")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Edit every record of a dataset file with EasyEdit's BaseEditor; write JSON + table + chart."""
    from pathlib import Path

    from .compat import run_edit_requests
    from .evaluation import summarize_metrics
    from .evaluation.report import markdown_table, write_report

    requests = _check_data({"--data": args.data}, args)["--data"]  # before the model loads
    editor = _load_editor(args)
    metrics, _, _ = run_edit_requests(editor, requests, sequential=args.sequential)
    rows = {"pre-edit": summarize_metrics(metrics, "pre"), editor.alg_name: summarize_metrics(metrics, "post")}
    rows["pre-edit"]["Loc"] = None  # EasyEdit computes locality only after the edit
    payload = {"alg_name": editor.alg_name, "hparams": args.hparams, "data": args.data, "n_edits": len(requests),
               "sequential": args.sequential, "summary": rows, "per_edit": metrics}
    written = write_report(Path(args.metrics_save_dir), args.name, payload, rows,
                           title=f"{editor.alg_name} on {Path(args.data).name}")
    sys.stdout.write(markdown_table(rows))
    sys.stdout.write("written: " + ", ".join(str(p) for p in written.values()) + "\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train InstructEd prefixes on Gemma-3-270M (cached), edit real facts, compare."""
    from .demo import DemoConfig, run_demo
    from .evaluation.report import markdown_table

    config = DemoConfig(quick=args.quick, n_facts=args.n_facts, train=args.train, budget_minutes=args.budget_minutes,
                        data_dir=args.data_dir, out_dir=args.out_dir, archive=args.archive,
                        hparams_dir=args.hparams_dir)
    result = run_demo(config)
    out = sys.stdout
    out.write(f"\nmodel: {result['model']}\ndata: {result['data_dir']} ({result['data_origin']})\n"
              f"InstructEd prefixes: {result['prefixes']}: {result['archive']}\n\n")
    out.write("Before/after answers (greedy) with InstructEd, the fact given as an instruction:\n")
    for fact in result["facts"]:
        out.write(f"- [{fact['dataset']}] {fact['prompt']}\n    new fact: {fact['target_new']!r}  "
                  f"before: {fact['before']!r}  after: {fact['after']!r}\n")
    out.write(f"\nEasyEdit metrics over {result['n_facts']} edits (percent):\n\n")
    out.write(markdown_table(result["table"]))
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items())
    out.write("\nwritten: " + ", ".join(result["files"].values()) + f"\n({result['seconds']:.0f}s: {phases})\n")
    return EXIT_OK


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer facts (3 per dataset); with --train the short recipe")
    p.add_argument("--n_facts", type=int, help="facts per dataset (CounterFact, ZsRE); default 8, quick 3")
    p.add_argument("--train", action="store_true",
                   help="train the InstructEd prefixes here (a fixed number of steps, cached) instead of using the "
                        "ones shipped with the package")
    p.add_argument("--budget_minutes", type=float,
                   help="with --train: wall-clock safety cap of training (default: the recipe's); it never changes "
                        "what is trained, a capped run resumes next time")
    p.add_argument("--data_dir", help="dataset folder (default: INSTRUCTEDIT_DATA_DIR, else the demo data packaged "
                                      "with the plugin)")
    p.add_argument("--out_dir", default="./results/demo", help="where demo.json / demo.md / demo.png go")
    p.add_argument("--archive", help="use these trained prefixes instead of training")
    p.add_argument("--hparams_dir", help="the repository's hparams/ folder (default: found from the current directory)")


def cmd_analyze(args: argparse.Namespace) -> int:
    from .instructedit.analysis import run_analyze

    return run_analyze(args)


def _add_analyze_args(p: argparse.ArgumentParser) -> None:
    from .instructedit.analysis import add_analyze_arguments

    add_analyze_arguments(p)


def cmd_make_multitask(args: argparse.Namespace) -> int:
    from .data.multitask_file import write_multitask_file

    counts = write_multitask_file(args.out, args.data_dir, args.n, seed=args.seed)
    print(f"wrote {sum(counts.values())} records to {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _add_make_multitask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", help="the shared data folder (default: INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--out", required=True, help="the JSON file to write (EasyEdit MultiTaskDataset's input)")
    p.add_argument("--n", type=int, help="records per task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffling / ConvSent locality seed")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hparams", required=True, help="editing hparams YAML (e.g. hparams/InstructEd/gemma-3-270m.yaml)")
    p.add_argument("--model_name", help="override model_name: a local Hugging Face folder")
    p.add_argument("--archive", help="override archive: the trained editor / prefix checkpoint folder")
    p.add_argument("--device", help="override device: 'cpu', a CUDA index or 'cuda:N'")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hparams", required=True, help="training YAML (hparams/TRAINING/<alg>/<model>.yaml)")
    p.add_argument("--data_dir", help="folder holding the datasets (default: INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--train", action="append", help="InstructEd: training file (repeatable)")
    p.add_argument("--val", help="InstructEd: validation file (default: a split of --train)")
    p.add_argument("--task", action="append",
                   help="InstructEdit: NAME=FILE per training task (repeatable; default: counterfact, recent, convsent)")
    p.add_argument("--limit", type=int, help="read only the first N records of each file")
    p.add_argument("--model_name", help="override model_name")
    p.add_argument("--results_dir", help="override results_dir (checkpoints go below it)")
    p.add_argument("--max_iters", "--max_steps", dest="max_iters", type=int,
                   help="override max_iters, the number of training steps (--max_steps: its earlier name)")


def _add_edit_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the question/prompt whose answer changes")
    p.add_argument("--target_new", required=True, help="the new answer")
    p.add_argument("--ground_truth", help="the old answer (optional)")
    p.add_argument("--rephrase", help="a paraphrase of the prompt, to measure generalisation")
    p.add_argument("--instruction", help="InstructEd: the fact as an instruction (default: built from prompt + target)")
    p.add_argument("--task", help="InstructEdit: the task family whose instruction prefixes the edit")


def _add_evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="dataset file (any format instructedit_plugin.data reads)")
    p.add_argument("--data_dir", help="folder the --data path is relative to (default: INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--limit", type=int, default=100, help="number of records to edit (default 100)")
    p.add_argument("--sequential", action="store_true", help="accumulate edits instead of evaluating each alone")
    p.add_argument("--metrics_save_dir", default="./results/metrics", help="where JSON/markdown/PNG go")
    p.add_argument("--name", default="evaluation", help="file name stem of the results")


def cmd_calibrate_gate(args: argparse.Namespace) -> int:
    """Fit the retrieval gate's threshold of a saved instruction memory; store it in the manifest."""
    from pathlib import Path

    from .data import load_requests
    from .errors import PluginError
    from .instructed.memory import InstructionMemory
    from .instructed.memory.calibration import (calibrate_memory, queries_from_requests, read_queries,
                                                store_calibration)
    from .instructed.memory.gate import StdGate

    folder = Path(args.memory)
    if not folder.is_dir():
        raise PluginError(f"memory: {folder} is not a folder. Fix: give the folder InstructionMemory.save() / "
                          "save_memory() wrote")
    gate = StdGate.from_options(args.threshold, args.top_k, score=args.score, std=args.std, pad=args.pad)
    positives = read_queries(args.positives, "--positives") if args.positives else []
    negatives = read_queries(args.negatives, "--negatives") if args.negatives else []
    for path in args.requests or []:
        pos, neg = queries_from_requests(load_requests(path), in_memory=True)
        positives, negatives = positives + pos, negatives + neg
    for path in args.held_out or []:
        negatives += queries_from_requests(load_requests(path), in_memory=False)[1]
    memory = InstructionMemory.load(folder)
    result = calibrate_memory(memory, positives, negatives, gate, batch_size=args.batch_size)
    written = None if args.dry_run else store_calibration(folder, result, memory)
    if args.json:
        print(json.dumps({**result.to_manifest(), "written": str(written) if written else None}, indent=2))
    else:
        print(f"gate ({result.score}, {result.std} std, pad {result.pad}, top_k {result.top_k}) on "
              f"{result.positives} positives / {result.negatives} negatives:")
        print(result.table())
        print(f"stored threshold {result.threshold:.6f} in {written}" if written else "dry run: nothing written")
    return EXIT_OK


def _add_calibrate_gate_args(p: argparse.ArgumentParser) -> None:
    from .instructed.memory.gate import DEFAULT_GATE, DEFAULT_TOP_K, GATE_PADS, GATE_SCORES, GATE_STDS

    p.add_argument("memory", help="folder of a saved instruction memory (InstructionMemory.save / save_memory)")
    p.add_argument("--requests", action="append", help="edit-request file whose facts ARE in the memory: prompts and "
                   "rephrases are positives, locality prompts negatives (repeatable)")
    p.add_argument("--held_out", action="append", help="edit-request file whose facts are NOT in the memory: its "
                   "prompts and rephrases are negatives (repeatable)")
    p.add_argument("--positives", help="questions about facts in the memory (JSON list, JSON Lines or text lines)")
    p.add_argument("--negatives", help="questions about facts not in the memory (same formats)")
    p.add_argument("--score", choices=GATE_SCORES, default="cosine")
    p.add_argument("--std", choices=GATE_STDS, default="population")
    p.add_argument("--pad", choices=GATE_PADS, default="zero")
    p.add_argument("--top_k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--threshold", type=float, default=DEFAULT_GATE, help="the threshold to compare with (default 0.1)")
    p.add_argument("--batch_size", type=int, default=256, help="queries per encoder call")
    p.add_argument("--dry_run", action="store_true", help="report only; leave the manifest as it is")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "info": (
        "show the detected EasyEdit flavour, registered methods, device and where models/data are found",
        cmd_info,
        lambda p: p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table"),
    ),
    "train": ("train an InstructEdit editor or InstructEd prefixes from a training YAML", cmd_train, _add_train_args),
    "edit": ("edit one fact through EasyEdit's BaseEditor and show Rel/Gen before and after", cmd_edit, _add_edit_args),
    "demo": ("the main job: train InstructEd prefixes on the embedded Gemma-3-270M (cached), edit real facts, "
             "compare with in-context and EasyEdit FT; writes JSON, markdown and a PNG", cmd_demo, _add_demo_args),
    "analyze": ("InstructEdit editing-gradient directions per task, with/without instruction: PCA + t-SNE PNG "
                "and a JSON of separation figures", cmd_analyze, _add_analyze_args),
    "make-multitask": ("write the multi-task file of EasyEdit's MultiTaskDataset (records with 'type') from the "
                       "CounterFact/Recent/ConvSent files", cmd_make_multitask, _add_make_multitask_args),
    "evaluate": ("edit every record of a dataset through BaseEditor; write JSON, a markdown table and a PNG",
                 cmd_evaluate, _add_evaluate_args),
    "calibrate-gate": ("fit InstructEd's retrieval-gate threshold of a saved instruction memory on held-out "
                       "questions (max F1 of 'the fact is in the memory'); store it in the memory's manifest",
                       cmd_calibrate_gate, _add_calibrate_gate_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructedit",
        description="InstructEdit and InstructEd knowledge editing on top of EasyEdit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run_script(prog: str, main_fn: Callable[[Any], int], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main(argv)`` (the examples use it): a plugin error becomes one line
    ``<prog>: error: ...`` on stderr and exit code 1 instead of a traceback."""
    from .errors import MissingDependencyError, PluginError

    try:
        return main_fn(None if argv is None else list(argv))
    except (PluginError, MissingDependencyError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # EasyEdit configures the root logger at INFO when imported; the CLI decides instead.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .errors import MissingDependencyError, PluginError, cli_context

    try:
        import instructedit_plugin  # noqa: F401  (registers into EasyEdit, which resets logging)

        logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
        with cli_context():  # fixes name CLI options and commands, not Python calls
            return COMMANDS[args.command][1](args)
    except (PluginError, MissingDependencyError) as exc:
        sys.stderr.write(f"instructedit: error: {exc}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
