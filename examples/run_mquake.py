"""EasyEdit-style example: multi-hop editing on MQuAKE with InstructEd.

For every MQuAKE case the script

1. edits all of the case's requested rewrites into an InstructEd instruction memory (one natural
   sentence per rewrite, ``"Hey Jude was performed by Madonna."``; a fresh memory per case, or one
   memory holding every case's edits with ``--shared_memory``);
2. answers each multi-hop question with the frozen model, the trained prefixes and the facts
   retrieved for it, one fact per hop, *from the question alone* (hop ``i`` queries with the
   question plus the fact found at hop ``i - 1``; never the gold decomposition), each hop through
   InstructEd's std gate -- :func:`instructedit_plugin.instructed.multihop.evaluate_multihop` with
   :func:`instructedit_plugin.instructed.answering.instructed_answer_fn`;
3. scores **Por_Nhop** (a case counts when any of its paraphrased multi-hop questions gives the
   new answer or an alias; by hop count too) and **Hop-Acc** (each gold single-hop sub-question
   answered with its own top-1 retrieved fact).

Methods (``--methods``):

* ``instructed`` -- InstructEd: retrieved facts as the instruction, prefixes and re-weighting;
* ``in_context`` -- the same retrieved facts in the same input layout, no prefixes (plain model);
* ``unedited`` -- the model without any instruction.

Writes ``<metrics_save_dir>/<name>.json`` (summaries, Wilson 95% intervals of Por_Nhop,
configuration, command, timing and, with ``--notes FILE``, that file's text), ``<name>.md`` (a
table, rendered from the JSON alone; ``--render --name NAME`` rebuilds it without running anything)
and ``<name>_records.json`` (every question, retrieved facts and answer; ``--no_records`` skips it).
``--name`` defaults to ``MQuAKE_<model>``.

Example (CPU, the embedded Gemma-3-270M with the prefixes shipped in the package; about 20 s of one
CPU thread per case for the three methods)::

    python examples/run_mquake.py --hparams_dir hparams/InstructEd/gemma-3-270m.yaml --model_dir embedded \\
        --dtype bfloat16 --archive default --data_dir ../shared/data --ds_size 20 --metrics_save_dir ./output

Prefixes are trained with ``examples/run_instructed.py`` or ``instructedit train --hparams
hparams/TRAINING/InstructEd/<model>.yaml --train FILE``; ``--archive`` (or ``archive:`` in the
YAML) names them.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
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

from benchmarks import paper_figures  # noqa: E402  (the paper's figures quoted under ours)

LOG = logging.getLogger("run_mquake")

DATA_FILE = "mquake/MQuAKE-hard.json"
METHODS = ("instructed", "in_context", "unedited")
#: Every top-level key this script writes into ``<name>.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "editing_method", "data", "n_cases", "cases_by_hops", "model", "model_name", "archive", "hparams", "dtype",
    "threads", "shared_memory", "retrieval_gate", "top_k", "question_aggregation", "match_mode", "max_new_tokens",
    "evaluation_config", "methods", "por_nhop_95ci_wilson", "seconds", "total_seconds", "command", "notes",
})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Multi-hop editing on MQuAKE with InstructEd (Por_Nhop, Hop-Acc)")
    p.add_argument("--editing_method", default="InstructEd", help="InstructEd (the only method this script runs)")
    p.add_argument("--hparams_dir", default=None,
                   help="InstructEd editing YAML (hparams/InstructEd/<model>.yaml); required unless --render")
    p.add_argument("--archive", default=None, help="trained prefixes (default: the YAML's archive)")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR), or an MQuAKE file itself")
    p.add_argument("--data", default=None, help=f"MQuAKE file relative to --data_dir (default: {DATA_FILE})")
    p.add_argument("--ds_size", type=int, default=None, help="first N cases (default: all)")
    p.add_argument("--metrics_save_dir", default="./output")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: MQuAKE_<model>)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--shared_memory", action="store_true",
                   help="one memory holding every case's edits (harder) instead of a fresh memory per case")
    p.add_argument("--retrieval_gate", type=float, default=None, help="std gate over the top-k scores (default: the YAML's)")
    p.add_argument("--top_k", type=int, default=None, help="scores the gate looks at (default: the YAML's)")
    p.add_argument("--question_aggregation", default="any", choices=("any", "all", "first"),
                   help="a case counts when any (MQuAKE), all or the first of its questions is answered right")
    p.add_argument("--match_mode", default="contains", choices=("contains", "prefix", "exact"))
    p.add_argument("--max_new_tokens", type=int, default=16,
                   help="greedy answer length (decoding stops at the end of the first line)")
    p.add_argument("--no_single_hops", action="store_true", help="skip Hop-Acc (the single-hop sub-questions)")
    p.add_argument("--model_dir", default=None,
                   help="override model_name: a local Hugging Face folder, or 'embedded' (Gemma-3-270M)")
    p.add_argument("--device", default=None, help="override device: 'cpu', a CUDA index or 'cuda:N'")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no_records", action="store_true", help="do not write <name>_records.json")
    p.add_argument("--records_dir", default=None, help="where <name>_records.json goes (default: --metrics_save_dir)")
    p.add_argument("--notes", default=None,
                   help="a markdown file (what the numbers mean) whose text goes into <name>.json and ends <name>.md")
    p.add_argument("--render", action="store_true",
                   help="only rebuild <metrics_save_dir>/<name>.md from <name>.json (needs --name; with --notes: "
                        "replace the JSON's notes first)")
    args = p.parse_args(argv)
    if args.render and not args.name:
        p.error("--render needs --name (the stem of the saved <name>.json)")
    if not args.render and not args.hparams_dir:
        p.error("the following arguments are required: --hparams_dir")
    return args


def data_file(args: argparse.Namespace) -> Path:
    from instructedit_plugin.data import resolve_data_dir

    if args.data_dir and Path(args.data_dir).is_file():
        return Path(args.data_dir)
    return resolve_data_dir(args.data_dir) / (args.data or DATA_FILE)


def editing_hparams(args: argparse.Namespace, **extra: Any):
    """The editing YAML through ``InstructEdHyperParams.from_hparams`` plus the command-line overrides."""
    from instructedit_plugin.instructed import InstructEdHyperParams

    hp = InstructEdHyperParams.from_hparams(args.hparams_dir)
    overrides: dict[str, Any] = dict(extra)
    if args.model_dir == "embedded":
        from instructedit_plugin.models.embedded import embedded_model_dir

        overrides["model_name"] = str(embedded_model_dir())
    elif args.model_dir:
        overrides["model_name"] = args.model_dir
    if args.device is not None:
        overrides["device"] = int(args.device) if str(args.device).isdigit() else args.device
    elif not torch.cuda.is_available():
        overrides["device"] = "cpu"
    for key in ("archive", "retrieval_gate", "top_k"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if overrides:
        hp = InstructEdHyperParams.from_dict({**hp.to_dict(), **overrides}, source=args.hparams_dir)
    hp.check_ready()
    return hp


def answer_functions(model: Any, tok: Any, hp: Any, args: argparse.Namespace, methods: list[str]) -> tuple[dict, Any]:
    """``{method: answer_fn}`` and the sentence encoder of the instruction memory."""
    from instructedit_plugin.instructed import InstructedEditor
    from instructedit_plugin.instructed.answering import instructed_answer_fn
    from instructedit_plugin.instructed.instructed_main import editing_state

    instructed = InstructedEditor(model, tok, hp).model_with_memory()  # loads the prefixes and the encoder
    answer = instructed_answer_fn(instructed, tok, max_new_tokens=args.max_new_tokens)
    fns: dict[str, Any] = {}
    if "instructed" in methods:
        fns["instructed"] = answer
    if "in_context" in methods:  # the same input layout on the plain model: no prefixes, no re-weighting
        plain = InstructedEditor(model, tok, editing_hparams(args, use_prefixes=False)).model_with_memory()
        fns["in_context"] = instructed_answer_fn(plain, tok, max_new_tokens=args.max_new_tokens)
    if "unedited" in methods:  # no instruction: exactly the base model's greedy answer
        fns["unedited"] = lambda question, instructions: answer(question, [])
    return fns, editing_state(model).encoder


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> list[float] | None:
    """Wilson score interval (95% by default) of a proportion, in percent with one decimal."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(100 * max(0.0, centre - half), 1), round(100 * min(1.0, centre + half), 1)]


def por_nhop_interval(summary: dict) -> list[float] | None:
    """Wilson 95% interval of a method's Por_Nhop: ``por`` percent of ``cases`` cases answered right."""
    cases = int(summary.get("cases") or 0)
    return wilson_interval(round(summary["por"] * cases / 100), cases) if cases and summary.get("por") is not None else None


def render_markdown(out: dict) -> str:
    """``<name>.md`` from ``<name>.json`` alone."""
    def cell(value: Any) -> str:
        return "–" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    def interval(name: str) -> str:
        ci = (out.get("por_nhop_95ci_wilson") or {}).get(name)
        return "–" if ci is None else f"{ci[0]:.1f}–{ci[1]:.1f}"

    lines = [f"# MQuAKE multi-hop editing: {out['model']}", "",
             f"{out['n_cases']} cases of `{Path(out['data']).name}` ({', '.join(f'{n} with {h} hops' for h, n in out['cases_by_hops'].items())}); "
             f"{'one memory with every case' if out['shared_memory'] else 'a fresh instruction memory per case'}, "
             f"std gate {out['retrieval_gate']} over the top {out['top_k']}; a case counts when "
             f"{out['question_aggregation']} of its questions gives the new answer or an alias ({out['match_mode']} match).",
             "", "| method | Por_Nhop | Por_Nhop 95% CI | " + " | ".join(f"Por {h}-hop" for h in out["cases_by_hops"])
             + " | Hop-Acc | question acc | facts / question | retrieval recall | seconds |",
             "|---" * (8 + len(out["cases_by_hops"])) + "|"]
    for name, s in out["methods"].items():
        by_hops = " | ".join(cell(s["por_by_hops"].get(h)) for h in out["cases_by_hops"])
        lines.append(f"| {name} | {cell(s['por'])} | {interval(name)} | {by_hops} | {cell(s['hop_acc'])} | {cell(s['question_acc'])} | "
                     f"{cell(s['mean_facts_per_question'])} | {cell(s['retrieval_recall'])} | {cell(out['seconds'][name])} |")
        lines += paper_figures.mquake_rows(name, len(out["cases_by_hops"]))
    lines += ["", paper_figures.MQUAKE_NOTE]
    lines += ["", f"Por_Nhop 95% CI: Wilson score interval over the {out['n_cases']} cases. "
                  f"Prefixes: `{out['archive']}`. Command: `{out['command']}` "
                  f"({out['total_seconds'] / 60:.1f} min in all, torch threads {out['threads']}, dtype {out['dtype']})."]
    if (out.get("notes") or "").strip():
        lines += ["", out["notes"].strip()]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, name: str, out: dict) -> str:
    """``<name>.json`` and, rendered from it, ``<name>.md``; returns the markdown."""
    unknown = sorted(set(out) - RESULT_KEYS)
    if unknown:
        raise ValueError(f"run_mquake: keys this script does not write: {', '.join(unknown)}")
    from instructedit_plugin.core.durable import atomic_write_text

    data = json.dumps(out, indent=2, ensure_ascii=False, default=str) + "\n"
    text = render_markdown(json.loads(data))
    atomic_write_text(out_dir / f"{name}.json", data)
    atomic_write_text(out_dir / f"{name}.md", text)
    return text


def render_saved(args: argparse.Namespace) -> int:
    """``--render``: rebuild ``<name>.md`` from ``<name>.json`` (``--notes``: replace its notes first)."""
    out_dir = Path(args.metrics_save_dir)
    out = json.loads((out_dir / f"{args.name}.json").read_text(encoding="utf-8"))
    if args.notes:
        notes = Path(args.notes).read_text(encoding="utf-8").strip()
        out["notes"] = notes + "\n" if notes else None
        if out["notes"] is None:
            out.pop("notes")
    write_results(out_dir, args.name, out)
    print(out_dir / f"{args.name}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_saved(args)
    if args.editing_method.lower() != "instructed":
        raise SystemExit(f"run_mquake: --editing_method {args.editing_method!r} is not supported; use InstructEd")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"run_mquake: unknown --methods {unknown}; use a subset of {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()

    from instructedit_plugin.core.devices import resolve_device
    from instructedit_plugin.core.durable import atomic_write_text
    from instructedit_plugin.data import load_mquake
    from instructedit_plugin.data.preflight import check_data_files
    from instructedit_plugin.instructed.memory import InstructionMemory
    from instructedit_plugin.instructed.multihop import evaluate_multihop
    from instructedit_plugin.models.loading import load_causal_lm

    # every file the run reads, before any model is loaded: the MQuAKE cases and the --notes file
    path = data_file(args)
    cases = check_data_files({"--data" if args.data else "MQuAKE file": path}, limit=args.ds_size,
                             loader=load_mquake).popitem()[1].records
    notes = (check_data_files({"--notes": args.notes}, loader=lambda p, limit=None: Path(p).read_text())["--notes"].records
             if args.notes else None)
    if not cases:
        raise SystemExit(f"run_mquake: no cases in {path}")
    hp = editing_hparams(args)
    model, tok = load_causal_lm(hp.model_name, dtype=args.dtype)
    model.to(resolve_device(hp.device)).eval()
    fns, encoder = answer_functions(model, tok, hp, args, methods)

    summaries, records, seconds, config = {}, {}, {}, {}
    for name in methods:
        t0 = time.perf_counter()
        LOG.info("%s: %d cases", name, len(cases))
        result = evaluate_multihop(cases, fns[name], lambda: InstructionMemory(encoder), shared_memory=args.shared_memory,
                                   gate=hp.retrieval_gate, top_k=hp.top_k, question_aggregation=args.question_aggregation,
                                   match_mode=args.match_mode, single_hops=not args.no_single_hops, progress=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
        summaries[name], config = result.summary, result.config
        records[name] = result.to_dict()["records"]
        LOG.info("%s: Por_Nhop %s, Hop-Acc %s (%.0fs)", name, result.summary["por"], result.summary["hop_acc"], seconds[name])

    first = summaries[methods[0]]
    out = {
        "editing_method": "InstructEd", "data": str(path), "n_cases": len(cases), "cases_by_hops": first["cases_by_hops"],
        "model": Path(str(hp.model_name)).name, "model_name": str(hp.model_name), "archive": str(hp.archive),
        "hparams": str(args.hparams_dir), "dtype": args.dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "shared_memory": args.shared_memory, "retrieval_gate": hp.retrieval_gate,
        "top_k": hp.top_k, "question_aggregation": args.question_aggregation, "match_mode": args.match_mode,
        "max_new_tokens": args.max_new_tokens, "evaluation_config": config,
        "methods": {name: {"Por_Nhop": s["por"], "Hop-Acc": s["hop_acc"], **s} for name, s in summaries.items()},
        "por_nhop_95ci_wilson": {name: por_nhop_interval(s) for name, s in summaries.items()},
        "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1),
        "command": "python examples/run_mquake.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if notes is not None and notes.strip():
        out["notes"] = notes.strip() + "\n"
    out_dir = Path(args.metrics_save_dir)
    name = args.name or f"MQuAKE_{out['model']}"
    text = write_results(out_dir, name, out)
    if not args.no_records:
        records_dir = Path(args.records_dir) if args.records_dir else out_dir
        records_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(records_dir / f"{name}_records.json", json.dumps(records, indent=1, default=str) + "\n")
    print(text, end="")
    LOG.info("wrote %s and %s", out_dir / f"{name}.json", out_dir / f"{name}.md")
    return 0


if __name__ == "__main__":
    from instructedit_plugin.cli import run_script

    sys.exit(run_script("run_mquake", main))
