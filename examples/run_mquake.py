"""EasyEdit-style example: multi-hop editing on MQuAKE with InstructEd, in the paper's setting by default.

Settings (``--settings``, a comma-separated list; one table row per setting and method):

* ``shared_top_n`` (default, the InstructEd paper's, Sec. 4.2 and the release's ``get_mqT_res``): ONE
  instruction memory holding every evaluated case's edits (one natural sentence per rewrite, ``"Hey
  Jude was performed by Madonna."``); each multi-hop question gets one retrieval, its top-N facts
  (N = the case's hop count) joined into one instruction. No gate at this step, as in the paper and
  the release (``--multihop_gate T``: the std gate on the question's top-k scores only decides whether
  the question gets any facts). Hop-Acc answers each gold sub-question with the instruction retrieved
  for the case's first multi-hop question (the release's rule);
* ``shared_subject_chain`` (this plugin's option, same memory): N facts, hop 1 the question's best
  fact, each next one the fact about the previous fact's new object (the stored edit's ``subject``)
  closest to the question -- retrieval that follows the chain of edited entities;
* ``shared_iterative`` (same memory): N facts, ungated, hop ``k`` queried with the question followed by every
  fact retrieved at hops ``< k`` -- reads only the question and the memory; with ``--retriever FOLDER`` the
  memory's encoder is a retriever fine-tuned for that query on MQuAKE cases disjoint from the evaluated
  ones (``benchmarks/mquake_retrieval.py --train_retriever``,
  :mod:`~instructedit_plugin.instructed.retriever_training`; refused when it was trained on an evaluated case);
* ``shared_chain``: the same memory, one fact per hop through the std gate (the old ``--shared_memory``);
* ``oracle`` ("oracle memory", the old default): a fresh memory per case holding only that case's own
  edits (no distractors: the memory itself says which facts belong to the question), one gated fact per
  hop; Hop-Acc answers each sub-question with its own top-1 retrieved fact.

Retrieval never reads the gold decomposition (``new_single_hops``); only its length (N).

Methods (``--methods``):

* ``instructed`` -- InstructEd: retrieved facts as the instruction, prefixes (``--archive``) and re-weighting;
* ``instructed_multihop`` -- the same with prefixes trained with MQuAKE multi-hop examples too:
  ``--multihop_archive FOLDER`` or ``--train_multihop`` (the :data:`~instructedit_plugin.instructed.recipes.MULTIHOP`
  recipe: the default CPU recipe's edits plus 60 MQuAKE-hard cases after the first 100, 150 steps;
  cached). Refused when the archive's ``recipe.json`` lists an evaluated case among its training cases;
* ``in_context`` -- the same retrieved facts in the same input layout, no prefixes (plain model);
* ``unedited`` -- the model without any instruction.

Scores (every one with a 95% interval): **Por_Nhop** as the paper defines it (Eq. 20: accuracy over
all multi-hop questions, greedy answer contains the new answer or an alias; Wilson over questions);
**Por_Nhop (release)**: the InstructEd release's rule (first question of each case, teacher-forced
token accuracy of the new answer, averaged over cases; percentile bootstrap over cases); **Por any**:
MQuAKE's case-level rule (any of the case's questions right; Wilson over cases); **Hop-Acc** (Eq. 21,
generated answers, Wilson over sub-questions) and Hop-Acc (release, token accuracy); the retrieval
recall of the case's edited facts among those retrieved for its questions.

Writes ``<metrics_save_dir>/<name>.json`` (every row, intervals, configuration, command, timing and,
with ``--notes FILE``, that file's text), ``<name>.md`` (a table, rendered from the JSON alone;
``--render --name NAME`` rebuilds it without running anything) and ``<name>_records.json`` (every
question, retrieved facts and answer; ``--no_records`` skips it). ``--name`` defaults to ``MQuAKE_<model>``.
``--merge A.json B.json ... --name NAME`` combines runs of the same cases (other settings or methods, e.g.
run in parallel) into one ``NAME.json``/``.md``; every part but the first is listed with its command.

Example (CPU, the embedded Gemma-3-270M with the prefixes shipped in the package)::

    python examples/run_mquake.py --hparams_dir hparams/InstructEd/gemma-3-270m.yaml --model_dir embedded \\
        --dtype bfloat16 --archive default --data_dir ../shared/data --ds_size 25 --metrics_save_dir ./output \\
        --settings shared_top_n,shared_subject_chain,oracle

Prefixes are trained with ``examples/run_instructed.py`` or ``instructedit train --hparams
hparams/TRAINING/InstructEd/<model>.yaml --train FILE``; ``--archive`` (or ``archive:`` in the
YAML) names them.
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

from benchmarks import results_io  # noqa: E402
from benchmarks.results_io import bootstrap_ci, merged_run, merged_runs_lines, notes_lines  # noqa: E402
from benchmarks import paper_figures  # noqa: E402  (the paper's figures quoted under ours)

LOG = logging.getLogger("run_mquake")

DATA_FILE = "mquake/MQuAKE-hard.json"
METHODS = ("instructed", "instructed_multihop", "in_context", "unedited")
DEFAULT_METHODS = ("instructed", "in_context", "unedited")
#: setting -> (one memory for all cases, retrieval procedure, where Hop-Acc's instruction comes from, label)
SETTINGS: dict[str, tuple[bool, str, str, str]] = {
    "shared_top_n": (True, "top_n", "question", "paper: one memory, top-N facts per question"),
    "shared_subject_chain": (True, "subject_chain", "question", "one memory, subject-chained N facts (option)"),
    "shared_iterative": (True, "iterative", "question",
                         "one memory, N facts, hop k queried with the question + the facts retrieved so far"),
    "shared_chain": (True, "chain", "question", "one memory, one gated fact per hop"),
    "oracle": (False, "chain", "own", "oracle memory: per case, its own edits only"),
}
BOOTSTRAP_RESAMPLES = 2000
#: Every top-level key this script writes into ``<name>.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "editing_method", "data", "n_cases", "cases_by_hops", "model", "model_name", "archive", "multihop_archive",
    "multihop_training", "hparams", "dtype", "threads", "settings", "retrieval_gate", "top_k", "multihop_gate",
    "question_aggregation", "match_mode", "max_new_tokens", "evaluation_config", "results", "ci95", "seconds",
    "total_seconds", "command", "notes", "merged_runs",
})
#: What the parts of a ``--merge`` must share (the same cases, model and scoring).
MERGE_SAME = ("data", "n_cases", "cases_by_hops", "model_name", "dtype", "max_new_tokens", "match_mode",
              "question_aggregation", "hparams", "archive", "retrieval_gate", "top_k", "multihop_gate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Multi-hop editing on MQuAKE with InstructEd (Por_Nhop, Hop-Acc)")
    p.add_argument("--editing_method", default="InstructEd", help="InstructEd (the only method this script runs)")
    p.add_argument("--hparams_dir", default=None,
                   help="InstructEd editing YAML (hparams/InstructEd/<model>.yaml); required unless --render")
    p.add_argument("--archive", default=None, help="trained prefixes (default: the YAML's archive)")
    p.add_argument("--multihop_archive", default=None,
                   help="prefixes trained with MQuAKE multi-hop examples too (method instructed_multihop)")
    p.add_argument("--train_multihop", action="store_true",
                   help="train (or take from the cache) the 'multihop' CPU recipe's prefixes for instructed_multihop")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR), or an MQuAKE file itself")
    p.add_argument("--data", default=None, help=f"MQuAKE file relative to --data_dir (default: {DATA_FILE})")
    p.add_argument("--ds_size", type=int, default=None, help="first N cases (default: all)")
    p.add_argument("--metrics_save_dir", default="./output")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: MQuAKE_<model>)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(METHODS) + " (default: " + ",".join(DEFAULT_METHODS)
                   + ", plus instructed_multihop with --multihop_archive/--train_multihop)")
    p.add_argument("--settings", default="shared_top_n",
                   help="comma-separated subset of " + ",".join(SETTINGS) + " (default: shared_top_n, the paper's)")
    p.add_argument("--retriever", default=None,
                   help="the instruction memory's encoder for retrieval: a retriever archive (benchmarks/mquake_retrieval.py "
                        "--train_retriever); default: the YAML's encoder. Refused when trained on an evaluated case")
    p.add_argument("--multihop_gate", type=float, default=None,
                   help="shared_top_n: a question whose std gate over its top-k scores stays shut gets no facts "
                        "(default: off, as in the paper and the release)")
    p.add_argument("--retrieval_gate", type=float, default=None,
                   help="std gate of the per-hop (chain) retrieval (default: the YAML's)")
    p.add_argument("--top_k", type=int, default=None, help="scores the gate looks at (default: the YAML's)")
    p.add_argument("--question_aggregation", default="any", choices=("any", "all", "first"),
                   help="the case-level column: a case counts when any (MQuAKE), all or the first of its questions is right")
    p.add_argument("--match_mode", default="contains", choices=("contains", "prefix", "exact"))
    p.add_argument("--max_new_tokens", type=int, default=16,
                   help="greedy answer length (decoding stops at the end of the first line)")
    p.add_argument("--no_single_hops", action="store_true", help="skip Hop-Acc (the single-hop sub-questions)")
    p.add_argument("--no_release_scores", action="store_true",
                   help="skip the release's teacher-forced token accuracy (one forward pass per scored question)")
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
    p.add_argument("--merge", nargs="+", default=None, metavar="PART_JSON",
                   help="only combine <name>.json files this script wrote for the same cases (other settings or "
                        "methods) into <metrics_save_dir>/<name>.json and .md (needs --name; no model is loaded)")
    args = p.parse_args(argv)
    if args.merge and not args.name:
        p.error("--merge needs --name (the stem of the combined <name>.json)")
    if args.render and not args.name:
        p.error("--render needs --name (the stem of the saved <name>.json)")
    if not args.render and not args.merge and not args.hparams_dir:
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
    for key in ("archive", "retrieval_gate", "top_k"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides.update(extra)
    if overrides:
        hp = InstructEdHyperParams.from_dict({**hp.to_dict(), **overrides}, source=args.hparams_dir)
    hp.check_ready()
    return hp


def multihop_prefixes(args: argparse.Namespace, cases: list, model_name: str) -> tuple[str, dict | None]:
    """The ``instructed_multihop`` archive and what it was trained on; refuses one trained on an evaluated case."""
    from instructedit_plugin.instructed.multihop_training import check_disjoint
    from instructedit_plugin.instructed.recipes import MULTIHOP, recipe_info, train_embedded_prefixes

    if args.multihop_archive:
        archive = args.multihop_archive
    else:
        archive = str(train_embedded_prefixes(config=MULTIHOP, data_dir=args.data_dir if args.data_dir and
                                              Path(args.data_dir).is_dir() else None, model_dir=model_name,
                                              budget_minutes=120.0))
    try:
        info = recipe_info(archive)
    except Exception:  # noqa: BLE001 - not a recipe's archive: nothing recorded to check against
        LOG.warning("%s has no recipe.json: cannot check that its training cases are not evaluated here", archive)
        return archive, None
    multihop = (info.get("data") or {}).get("multihop")
    if multihop:
        check_disjoint(multihop.get("case_ids") or [], cases, what=f"the prefixes {archive}")
    return archive, multihop and {k: v for k, v in multihop.items() if k != "case_ids"} | {
        "steps": info.get("steps"), "train_edits": info.get("train_edits"), "n_case_ids": len(multihop.get("case_ids") or [])}


def answer_functions(model: Any, tok: Any, hp: Any, args: argparse.Namespace, methods: list[str],
                     multihop_archive: str | None) -> tuple[dict, Any]:
    """``{method: (answer_fn, score_fn)}`` and the sentence encoder of the instruction memory."""
    import functools

    from instructedit_plugin.instructed import InstructedEditor
    from instructedit_plugin.instructed.answering import instructed_answer_fn, instructed_token_accuracy_fn
    from instructedit_plugin.instructed.instructed_main import editing_state

    def pair(lm: Any) -> tuple[Any, Any]:
        return (instructed_answer_fn(lm, tok, max_new_tokens=args.max_new_tokens),
                None if args.no_release_scores else instructed_token_accuracy_fn(lm, tok))

    instructed = InstructedEditor(model, tok, hp).model_with_memory()  # loads the prefixes and the encoder
    fns: dict[str, Any] = {}
    answer, score = pair(instructed)
    if "instructed" in methods:
        fns["instructed"] = (answer, score)
    if "instructed_multihop" in methods:
        lm = InstructedEditor(model, tok, editing_hparams(args, archive=multihop_archive)).model_with_memory()
        fns["instructed_multihop"] = pair(lm)
    if "in_context" in methods:  # the same input layout on the plain model: no prefixes, no re-weighting
        plain = InstructedEditor(model, tok, editing_hparams(args, use_prefixes=False)).model_with_memory()
        fns["in_context"] = pair(plain)
    if "unedited" in methods:  # no instruction: the base model's answer, the same whatever was retrieved
        bare = functools.lru_cache(maxsize=None)(lambda question: answer(question, []))
        bare_score = None if score is None else functools.lru_cache(maxsize=None)(lambda q, a: score(q, [], a))
        fns["unedited"] = (lambda question, instructions: bare(question),
                           None if score is None else (lambda question, instructions, a: bare_score(question, a)))
    return fns, editing_state(model).encoder


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """Wilson score 95% interval of a proportion (scipy's ``binomtest``), in percent with one decimal."""
    from scipy.stats import binomtest

    if n <= 0:
        return None
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(100 * ci.low, 1), round(100 * ci.high, 1)]


def bootstrap_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean of per-case ``values`` (in [0, 1]), in percent with one decimal
    (:func:`benchmarks.results_io.bootstrap_ci`, the benchmarks' one definition; None without values). Results
    written before it replaced this script's own stdlib-``random`` bootstrap (order statistics of the sorted
    resampled means) hold that one's bounds; other random draws: a rerun's bounds may differ by up to about 2 points
    at 25 cases (median 0.7 over simulated rows)."""
    if not values:
        return None
    low, high = bootstrap_ci(values, resamples, seed)
    return [round(100 * low, 1), round(100 * high, 1)]


def row_intervals(summary: dict, release_by_case: list[float]) -> dict[str, list[float] | None]:
    """The 95% intervals of one row: Wilson for the counts, bootstrap over cases for the release's token accuracy."""
    return {
        "Por_Nhop": wilson_interval(summary["questions_correct"], summary["questions"]),
        "Por_Nhop_release": bootstrap_interval(release_by_case),
        "Por_any": wilson_interval(summary["cases_correct"], summary["cases"]),
        "Hop-Acc": wilson_interval(summary["single_hops_correct"], summary["single_hop_questions"]),
    }


def shown_path(path: str) -> str:
    """A prefix folder as the report shows it: one shipped inside a checkout of this package from the
    package folder on (``instructedit_plugin/assets/...``, the same in every clone), any other folder as given."""
    marker = "instructedit_plugin/assets/"
    return path[path.index(marker):] if marker in str(path) else path


def shown_retriever(folder: str | None) -> str | None:
    """A retriever archive as the report shows it: under the plugin cache from there on, any other folder as given."""
    if folder is None:
        return None
    from instructedit_plugin.models.cache import cache_dir

    try:
        return "<plugin cache>/" + Path(folder).resolve().relative_to(cache_dir().resolve()).as_posix()
    except ValueError:
        return folder


def render_markdown(out: dict) -> str:
    """``<name>.md`` from ``<name>.json`` alone."""
    def cell(value: Any) -> str:
        return "–" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    def ci(value: Any) -> str:
        return "–" if not value else f"{value[0]:.1f}–{value[1]:.1f}"

    hops = ", ".join(f"{n} with {h} hops" for h, n in out["cases_by_hops"].items())
    lines = [f"# MQuAKE multi-hop editing: {out['model']}", "",
             f"{out['n_cases']} cases of `{Path(out['data']).name}` ({hops}). Por_Nhop: the paper's (Eq. 20, every "
             f"multi-hop question, the greedy answer contains the new answer or an alias, {out['match_mode']} match); "
             "release: the InstructEd release's rule (first question per case, teacher-forced token accuracy); "
             f"case ({out['question_aggregation']}): a case counts when {out['question_aggregation']} of its questions "
             "is right (MQuAKE). 95% intervals in brackets (Wilson; release: bootstrap over cases).", "",
             "| setting | method | Por_Nhop | Por_Nhop (release) | Por case | Hop-Acc | Hop-Acc (release) | "
             "facts / question | retrieval recall | seconds |", "|---" * 10 + "|"]
    for setting, rows in out["results"].items():
        for name, s in rows.items():
            c = out["ci95"][setting][name]
            lines.append(
                f"| {setting} | {name} | {cell(s['Por_Nhop'])} [{ci(c['Por_Nhop'])}] | "
                f"{cell(s['por_release'])} [{ci(c['Por_Nhop_release'])}] | {cell(s['por'])} [{ci(c['Por_any'])}] | "
                f"{cell(s['hop_acc'])} [{ci(c['Hop-Acc'])}] | {cell(s['hop_acc_release'])} | "
                f"{cell(s['mean_facts_per_question'])} | {cell(s['retrieval_recall'])} | {cell(out['seconds'][setting][name])} |")
            if setting == "shared_top_n":  # the paper's setting: its figure beside ours
                lines += paper_figures.mquake_rows(name)
    lines += ["", paper_figures.MQUAKE_NOTE]
    retrievers = {k: (out["evaluation_config"].get(k) or {}).get("retriever") for k in out["settings"]}
    lines += ["", "Settings: " + "; ".join(f"`{k}` = {SETTINGS[k][3] if k in SETTINGS else k}"
                                          + (f" (retriever: `{retrievers[k]}`)" if retrievers.get(k) else "")
                                          for k in out["settings"])
              + f". Multi-hop gate: {out['multihop_gate']}; per-hop (chain) gate {out['retrieval_gate']} over the top "
              f"{out['top_k']}.", "",
              f"Prefixes: `{shown_path(out['archive'])}`" + (f"; instructed_multihop: `{shown_path(out['multihop_archive'])}`"
                                                  if out.get("multihop_archive") else "") + ".", "",
              f"Command: `{out['command']}` ({out['total_seconds'] / 60:.1f} min in all, torch threads "
              f"{out['threads']}, dtype {out['dtype']})."]
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, name: str, out: dict) -> str:
    """``<name>.json`` and, rendered from it, ``<name>.md`` (:func:`benchmarks.results_io.write_results`); returns
    the markdown."""
    return results_io.write_results(out_dir / f"{name}.json", out, render_markdown, RESULT_KEYS).read_text(encoding="utf-8")


def render_saved(args: argparse.Namespace) -> int:
    """``--render``: rebuild ``<name>.md`` from ``<name>.json`` (``--notes``: replace its notes first;
    :func:`benchmarks.results_io.render_saved`)."""
    print(results_io.render_saved(Path(args.metrics_save_dir) / f"{args.name}.json", render_markdown, RESULT_KEYS,
                                  notes=args.notes))
    return 0


def _merge_key(out: dict, key: str) -> Any:
    """What ``--merge`` compares of ``key``: the prefixes shipped in the package as :func:`shown_path` shows them
    (the same asset from any checkout), everything else as saved."""
    value = out.get(key)
    return shown_path(value) if key == "archive" and isinstance(value, str) else value


def merge_saved(args: argparse.Namespace) -> int:
    """``--merge``: one ``<name>.json`` from parts this script wrote for the same cases; the first part's command
    stays ``command``, every other part is a ``merged_runs`` entry naming its command and rows."""
    parts = [(path, json.loads(Path(path).read_text(encoding="utf-8"))) for path in args.merge]
    out = json.loads(json.dumps(parts[0][1]))
    out.pop("notes", None)
    for path, part in parts[1:]:
        differ = [key for key in MERGE_SAME if _merge_key(part, key) != _merge_key(out, key)]
        if differ:
            raise SystemExit(f"run_mquake: --merge: {path} differs from {parts[0][0]} in {', '.join(differ)}. "
                             "Fix: merge only runs of the same cases, model and scoring")
        rows = []
        for setting in part["settings"]:
            if setting not in out["settings"]:
                out["settings"].append(setting)
            for name in part["results"][setting]:
                if name in out["results"].get(setting, {}):
                    raise SystemExit(f"run_mquake: --merge: {setting}/{name} is in two parts. Fix: merge each row once")
                rows.append(f"results.{setting}.{name}")
            for key in ("results", "ci95", "seconds"):
                out[key].setdefault(setting, {}).update(part[key][setting])
            out["evaluation_config"][setting] = part["evaluation_config"][setting]
        if part.get("multihop_archive"):
            out["multihop_archive"], out["multihop_training"] = part["multihop_archive"], part.get("multihop_training")
        out["total_seconds"] = round(out["total_seconds"] + part["total_seconds"], 1)
        out.setdefault("merged_runs", []).append(merged_run(part["command"], rows))
    if args.notes:
        notes = Path(args.notes).read_text(encoding="utf-8").strip()
        if notes:
            out["notes"] = notes + "\n"
    text = write_results(Path(args.metrics_save_dir), args.name, out)
    print(text, end="")
    return 0


def _choices(text: str | None, allowed: Any, default: Any, flag: str) -> list[str]:
    chosen = [m.strip() for m in (text or ",".join(default)).split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"run_mquake: unknown {flag} {unknown}; use a subset of {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_saved(args)
    if args.merge:
        return merge_saved(args)
    if args.editing_method.lower() != "instructed":
        raise SystemExit(f"run_mquake: --editing_method {args.editing_method!r} is not supported; use InstructEd")
    multihop = bool(args.multihop_archive or args.train_multihop)
    methods = _choices(args.methods, METHODS, DEFAULT_METHODS[:1] + (("instructed_multihop",) if multihop else ())
                       + DEFAULT_METHODS[1:], "--methods")
    if "instructed_multihop" in methods and not multihop:
        raise SystemExit("run_mquake: --methods instructed_multihop needs its prefixes. Fix: pass --multihop_archive "
                         "FOLDER or --train_multihop")
    settings = _choices(args.settings, SETTINGS, ("shared_top_n",), "--settings")
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
    retriever = None
    if args.retriever:  # refused before any model is loaded when it was trained on an evaluated case
        from instructedit_plugin.instructed.retriever_training import check_retriever_disjoint

        check_retriever_disjoint(args.retriever, cases)
        retriever = str(Path(args.retriever).resolve())
    hp = editing_hparams(args)
    multihop_archive, multihop_training = (multihop_prefixes(args, cases, str(hp.model_name))
                                           if "instructed_multihop" in methods else (None, None))
    model, tok = load_causal_lm(hp.model_name, dtype=args.dtype)
    model.to(resolve_device(hp.device)).eval()
    fns, encoder = answer_functions(model, tok, hp, args, methods, multihop_archive)
    if retriever is not None:
        from instructedit_plugin.instructed.encoder import SentenceEncoder

        encoder = SentenceEncoder(retriever)  # the memory's encoder; the model's own stays as it is

    results: dict[str, dict] = {}
    ci95: dict[str, dict] = {}
    records: dict[str, dict] = {}
    seconds: dict[str, dict] = {}
    config: dict[str, Any] = {}
    caches: dict[str, dict] = {name: {} for name in methods}  # identical (question, facts) answered once per method
    for setting in settings:
        shared, retrieval, hop_instructions, _ = SETTINGS[setting]
        results[setting], ci95[setting], records[setting], seconds[setting] = {}, {}, {}, {}
        for name in methods:
            t0 = time.perf_counter()
            LOG.info("%s / %s: %d cases", setting, name, len(cases))
            answer, score = fns[name]
            result = evaluate_multihop(cases, answer, lambda: InstructionMemory(encoder), shared_memory=shared,
                                       gate=hp.retrieval_gate, top_k=hp.top_k, retrieval=retrieval,
                                       multihop_gate=args.multihop_gate, hop_instructions=hop_instructions,
                                       score_fn=score, answer_cache=caches[name],
                                       question_aggregation=args.question_aggregation, match_mode=args.match_mode,
                                       single_hops=not args.no_single_hops, progress=True)
            seconds[setting][name] = round(time.perf_counter() - t0, 1)
            s = result.summary
            results[setting][name] = {"Por_Nhop": s["por_paper"], "Hop-Acc": s["hop_acc"], **s}
            ci95[setting][name] = row_intervals(s, [r.release_acc for r in result.records if r.release_acc is not None])
            config[setting] = {**result.config, "retriever": shown_retriever(retriever)}
            records[setting][name] = result.to_dict()["records"]
            LOG.info("%s / %s: Por_Nhop %s (release %s, case %s), Hop-Acc %s, recall %s (%.0fs)", setting, name,
                     s["por_paper"], s["por_release"], s["por"], s["hop_acc"], s["retrieval_recall"],
                     seconds[setting][name])

    first = results[settings[0]][methods[0]]
    out = {
        "editing_method": "InstructEd", "data": str(path), "n_cases": len(cases), "cases_by_hops": first["cases_by_hops"],
        "model": Path(str(hp.model_name)).name, "model_name": str(hp.model_name), "archive": str(hp.archive),
        "multihop_archive": multihop_archive, "multihop_training": multihop_training,
        "hparams": str(args.hparams_dir), "dtype": args.dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "settings": settings, "retrieval_gate": hp.retrieval_gate,
        "top_k": hp.top_k, "multihop_gate": args.multihop_gate, "question_aggregation": args.question_aggregation,
        "match_mode": args.match_mode, "max_new_tokens": args.max_new_tokens, "evaluation_config": config,
        "results": results, "ci95": ci95, "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1),
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
