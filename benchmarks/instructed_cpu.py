"""CPU benchmark: InstructEd on the embedded Gemma-3-270M against in-context instructions, FT and ROME.

1. Trains (or takes from the cache) InstructEd prefixes with
   :func:`instructedit_plugin.instructed.recipes.train_embedded_prefixes`: by default the paper's protocol,
   recipe ``benchmark-cf`` (CounterFact only, so ZsRE is unseen); ``--recipe benchmark-cf-zsre`` is the
   earlier recipe that also trains on ZsRE ``_ins`` records (a labelled option, reported beside);
   ``--recipe benchmark-cf-long`` the longer step-count recipe (#15 item 5).
2. Edits the first ``--limit`` (default 100) records of
   ``instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json`` and of
   ``zsre/zsre_mend_eval_portability_gpt4.json`` (never trained on; with the default recipe no ZsRE record is) with

   * ``unedited`` -- EasyEdit's pre-edit metrics (Loc is 100 by definition);
   * ``in_context`` -- the edit's instruction in front of the input, same template, *no* prefixes
     and no re-weighting (plain frozen model);
   * ``instructed_gold`` -- InstructEd with each input's own edit instruction;
   * ``instructed_retrieval`` -- InstructEd retrieving from an instruction memory that holds *all*
     evaluated edits of the dataset (sequential setting), std gate;
   * ``ft`` / ``rome`` -- EasyEdit's own FT and ROME (``hparams/FT|ROME/gemma-3-270m.yaml``) on the
     same in-memory model (ROME with ``mom2_adjustment: false``: no Wikipedia statistics offline);

   every method through EasyEdit's ``BaseEditor.edit`` and ``compute_edit_quality`` (one edit per
   call, weights / memory restored after each); each edit's Rel, Gen, Loc, Por
   (:func:`~instructedit_plugin.evaluation.summary.edit_metrics`) averaged over the records, with Score and H.
3. Latency: median edit time (EasyEdit's own per-edit ``time``) and median query time of the
   edited model on ``prompt + ' ' + target_new`` inputs, as a ratio to the unedited forward pass.

Writes ``benchmarks/results/instructed_cpu.json`` (everything the report shows, the command and,
with ``--notes``, the notes file's text) and ``.md``, rendered from the JSON alone (see
``benchmarks/results_io.py``). Run from the repository root::

    nohup python benchmarks/instructed_cpu.py --data_dir ../shared/data --limit 50 \
        --notes benchmarks/notes/instructed_cpu.md > logs/instructed_cpu.log 2>&1 &
    python benchmarks/instructed_cpu.py --render                  # rebuild the .md from the .json
    python benchmarks/instructed_cpu.py --render --notes FILE     # replace the notes, then rebuild

``--knowedit`` runs the KnowEdit section instead (``benchmarks/instructed_knowedit.py``: KnowEdit's ZsRE,
WikiData-CounterFact and -Recent with FT and ROME on the same records; its own options and result file)::

    nohup python benchmarks/instructed_cpu.py --knowedit --limit 20 > logs/knowedit.log 2>&1 &

``--latency_only`` re-measures the latency block of the saved results and records itself in the
JSON's ``merged_runs`` (the markdown says which figures it replaced).

``--merge FILE`` takes the rows of every method that ``--methods`` leaves out from an earlier result of this
script (e.g. the recipe-independent baselines of the committed file when only the InstructEd rows are re-run
with another ``--recipe``), with their per-record values and latency where that file has them; each merged
key is recorded in ``merged_runs`` with the command that produced it. Files of other record limits, another
model or (for InstructEd rows) other prefixes are refused.

Every figure of a row evaluated by the run carries its 95% percentile-bootstrap interval over the records
(``benchmarks.results_io.figures_with_ci``: Score and H recomputed on each resample); the per-record
Rel/Gen/Loc/Por are kept in the JSON (``records``), so the intervals can be recomputed. Latency: the median
edit time's and the query ratio's intervals resample the timed edits / inputs (inputs in pairs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import paper_figures  # noqa: E402
from benchmarks.easyedit_calls import run_edits  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    command_line, figures_with_ci, merged_into, merged_run, merged_runs_lines, notes_lines, ratio_interval, read_notes,
    record_values, render_saved, summarize_with_intervals, today, write_results, setup_logging,
)

LOG = logging.getLogger("instructed_cpu")
METHODS = ("unedited", "in_context", "instructed_gold", "instructed_retrieval", "ft", "rome")
METRICS = ("Rel", "Gen", "Loc", "Por", "Score", "H")
DATASETS = ("counterfact", "zsre")
SCRIPT = "benchmarks/instructed_cpu.py"
#: Every top-level key this script writes into ``instructed_cpu.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "model", "train_edits", "train_seconds", "datasets", "latency",  # the figures
    "date", "command", "args", "wall_minutes",  # the run
    "recipe",  # the prefixes: recipe config, steps, timing, training sources
    "n_evaluated", "errors", "base_query_ms", "latency_inputs", "retrieval_hits",  # evaluation details
    "records",  # per-record Rel/Gen/Loc/Por in [0, 1] of each evaluated row (the intervals' source)
    "notes", "merged_runs",  # --notes text; runs merged in (--latency_only, --merge)
})
#: Arguments that say what was run (the others only steer this script).
_UNSAVED_ARGS = ("out", "render", "latency_only", "retime_edits", "notes")
#: Methods whose rows depend on the InstructEd prefixes (merged only from a run with the same prefixes).
PREFIX_METHODS = ("instructed_gold", "instructed_retrieval")
#: ``--merge`` refuses a file whose value of one of these differs from the run's (rows must be comparable).
MERGE_MUST_MATCH = ("limit", "baseline_limit", "dtype")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--budget_minutes", type=float, default=None,
                   help="wall-clock safety cap of the prefix-training recipe (default: the recipe's; it never "
                        "changes what is trained: the recipe trains a fixed number of steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the recipe (default: the recipe's)")
    p.add_argument("--n_train", type=int, default=None, help="training edits (default: the recipe's)")
    p.add_argument("--recipe", default="benchmark-cf", choices=("benchmark-cf", "benchmark-cf-zsre", "benchmark-cf-long"),
                   help="prefix-training recipe: benchmark-cf (default, the paper's protocol: CounterFact only, ZsRE "
                        "unseen), benchmark-cf-zsre (also trains on ZsRE _ins records: ZsRE in distribution) or "
                        "benchmark-cf-long (benchmark-cf with 600 steps on 480 training edits)")
    p.add_argument("--quick", action="store_true", help="use the short quick recipe (the recipe's data, QUICK's size)")
    p.add_argument("--limit", type=int, default=100, help="first N records of each evaluation file")
    p.add_argument("--baseline_limit", type=int, default=None,
                   help="first N records for ft/rome only (their edits cost seconds each on CPU); default: --limit")
    p.add_argument("--archive", default=None, help="use these trained prefixes instead of running the recipe")
    p.add_argument("--model_dir", default=None,
                   help="another local base model folder instead of the embedded Gemma-3-270M (tests use tiny models)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine 2 threads ran 8x slower, spinning against other jobs)")
    p.add_argument("--retrieval_gate", type=float, default=0.1)
    p.add_argument("--latency_n", type=int, default=20, help="query-latency inputs per dataset")
    p.add_argument("--merge", default=None,
                   help="an earlier result JSON of this script: the rows of every method --methods leaves out are "
                        "taken from it (same --limit / --baseline_limit / model required; InstructEd rows also the "
                        "same prefixes), each merged key recorded with the command that produced it")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of every 95%% interval")
    p.add_argument("--latency_only", action="store_true",
                   help="re-measure only the latency block of the saved results (recipe from the cache)")
    p.add_argument("--retime_edits", default="",
                   help="with --latency_only: comma-separated methods (not rome) whose median edit time is re-measured on "
                        "the latency inputs (EasyEdit's per-edit time), e.g. when the first run shared the CPU")
    p.add_argument("--render", action="store_true",
                   help="only rebuild the .md from the saved .json (with --notes: replace the JSON's notes first)")
    p.add_argument("--notes", default=None,
                   help="markdown file whose text goes into the JSON as the run's notes and ends the .md "
                        "(e.g. benchmarks/notes/instructed_cpu.md)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructed_cpu.json"))
    p.add_argument("--knowedit", action="store_true",
                   help="run the KnowEdit section instead (benchmarks/instructed_knowedit.py; see its --help)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def paired_query_times_ms(base, edited, tok, texts: list[str]) -> tuple[list[float], list[float]]:
    """Forward times (ms) of ``base`` and ``edited`` on each of ``texts``, the two forwards of an input timed
    back to back (after two warm-up inputs), so that a change of the machine's load between inputs falls on
    both alike."""
    for text in texts[:2]:  # warm-up
        base(**tok([text], return_tensors="pt"))
        edited(**tok([text], return_tensors="pt"))
    base_ms, edited_ms = [], []
    for text in texts:
        enc = tok([text], return_tensors="pt")
        for model, times in ((base, base_ms), (edited, edited_ms)):
            t0 = time.perf_counter()
            model(**enc)
            times.append((time.perf_counter() - t0) * 1000)
    return base_ms, edited_ms


def median_edit_ms(times: list[float], resamples: int) -> tuple[float | None, list[float] | None]:
    """Median edit time (ms) and its 95% bootstrap interval over the timed edits (None, None without edits)."""
    if not times:
        return None, None
    fig = figures_with_ci(times, lambda rows: {"median": statistics.median(rows)}, resamples, digits=2)["median"]
    return fig[0], fig[1:]


def measure_latency(model, tok, requests, methods, specs, query_models, edit_ms, resamples: int = 2000):
    """Median query time of each method's edited model on ``prompt + ' ' + target_new`` of ``requests``
    as a ratio to the unedited forward of the same inputs (timed back to back with it,
    :func:`paired_query_times_ms`), and the median edit time (EasyEdit's per-edit ``time``), each with its
    95% bootstrap interval (``query_ratio_ci``: the timed inputs resampled in pairs). Returns the latency
    block, the median of every unedited forward timed, and the retrieval hits."""
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, reset_memory

    texts = [f"{r['prompt']} {r['target_new']}" for r in requests]
    all_base: list[float] = []
    latency = {"unedited": {"edit_ms": 0.0, "query_ratio": 1.0}}
    hits = None
    for method in methods:
        if method == "unedited":
            continue
        if method in ("in_context", "instructed_gold", "instructed_retrieval"):
            reset_memory(model)
            batch = [dict(r) for r in requests] if method == "instructed_retrieval" else [dict(requests[0])]
            qm, _ = apply_instructed_to_model(model, tok, batch, specs[method](), keep_original_weight=False)
            if method == "instructed_retrieval":
                state = editing_state(model)
                hits = sum(state.memory.select(r["prompt"], gate=qm.provider.gate, top_k=qm.provider.top_k) is not None
                           for r in requests)
        else:
            qm = query_models.get(method, model)  # FT / ROME: the (restored) model itself, same architecture
        base_times, times = paired_query_times_ms(model, qm, tok, texts)
        all_base += base_times
        reset_memory(model)
        edit, edit_ci = median_edit_ms(edit_ms.get(method) or [], resamples)
        ratio = ratio_interval(base_times, times, resamples)
        latency[method] = {"edit_ms": edit, "query_ratio": ratio[0], "edit_ms_ci": edit_ci, "query_ratio_ci": ratio[1:]}
        LOG.info("latency %s: %s", method, latency[method])
    if not all_base:  # nothing but the unedited model: time it alone
        all_base = paired_query_times_ms(model, model, tok, texts)[0]
    return latency, statistics.median(all_base), hits


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _point(v) -> float | None:
    """A figure's value: a cell is ``[value, low, high]`` (evaluated by the run) or a bare value (merged from a
    run that kept no per-record values)."""
    return v[0] if isinstance(v, list) else v


def _fmt(v, nd=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return f"{v[0]:.{nd}f} [{v[1]:.{nd}f}, {v[2]:.{nd}f}]"
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def _with_ci(value, ci) -> list[float] | float | None:
    """``[value, low, high]`` when the interval is known, else the bare value."""
    return [value, *ci] if value is not None and ci else value


def check_targets(out: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met?, figures) for each target of the brief (met on the point estimate; the figures show its
    95% interval where the row has one)."""
    rows = []
    d, lat = out["datasets"], out["latency"]
    for ds in DATASETS:
        g = d.get(ds, {}).get("instructed_gold")
        if g:
            for metric, bound in (("Rel", 95), ("Gen", 85)):
                v = _point(g[metric])
                rows.append((f"{ds}: InstructEd gold {metric} >= {bound}", v is not None and v >= bound,
                             f"{metric} {_fmt(g[metric])}"))
        r = d.get(ds, {}).get("instructed_retrieval")
        if r:
            v = _point(r["Loc"])
            rows.append((f"{ds}: InstructEd retrieval Loc >= 90", v is not None and v >= 90, f"Loc {_fmt(r['Loc'])}"))
        for method in PREFIX_METHODS:
            m = d.get(ds, {}).get(method)
            if not m:
                continue
            for metric in ("Por", "H"):
                others = {o: d[ds][o][metric] for o in ("in_context", "ft", "rome")
                          if o in d[ds] and d[ds][o][metric] is not None}
                ok = m[metric] is not None and all(_point(m[metric]) > _point(v) for v in others.values())
                rows.append((f"{ds}: {method} {metric} above in-context, FT and ROME", ok,
                             f"{_fmt(m[metric])} vs " + ", ".join(f"{o} {_fmt(v)}" for o, v in others.items())))
    ft_ms = (lat.get("ft") or {}).get("edit_ms")
    for method in PREFIX_METHODS:
        e = (lat.get(method) or {}).get("edit_ms")
        if e is not None and ft_ms:
            rows.append((f"{method}: edit <= 0.01 x FT edit", e <= 0.01 * ft_ms, f"{e:.1f} ms vs FT {ft_ms:.0f} ms ({e / ft_ms:.4f}x)"))
        q = (lat.get(method) or {}).get("query_ratio")
        if q is not None:
            ci = (lat.get(method) or {}).get("query_ratio_ci")
            rows.append((f"{method}: edited query <= 1.3 x unedited", q <= 1.3,
                         f"{q:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")))
    return rows


def _prefix_training_line(out: dict) -> str:
    rec = out["recipe"]
    cfg = rec["config"]
    if rec.get("planned_steps") is not None:  # a fixed number of steps; the wall clock is only a safety cap
        head = (f"**{rec['planned_steps']} steps** (safety cap {rec['budget_seconds'] / 60:.1f} min for the whole call)")
        stop = "stopped by the safety cap" if rec["stopped_by_budget"] else "schedule completed"
    else:  # recipes before the fixed-step schedule: the budget set the number of steps
        head = f"CPU budget **{rec['budget_seconds'] / 60:.1f} min** for the whole call"
        stop = "stopped by the budget" if rec["stopped_by_budget"] else "schedule completed"
    layers = ("the middle third of the layers" if cfg.get("prefix_layers") is None
              else "layers " + ", ".join(str(i) for i in cfg["prefix_layers"]))
    return (f"* Prefix training (`train_embedded_prefixes`, recipe `{cfg['name']}`): {head}; "
            f"used {out['train_seconds']:.0f} s ({rec['prep_seconds']:.0f} s loading + unedited-model labels + similarities, "
            f"{rec['train_loop_seconds']:.0f} s of optimisation); reached **step {rec['steps']}** ({stop}), "
            f"batch {cfg['batch_size']} edit + {cfg['unmodified_batch_size']} unmodified examples, lr {cfg['lr']}, "
            f"prefix length {cfg['prefix_len']} on {layers}, {cfg['dtype']}.")


def current_merged_runs(runs: list[dict]) -> list[dict]:
    """``merged_runs`` as the markdown lists them: each entry with only the keys no later entry replaced (the JSON
    keeps the whole history); entries left with no key are left out."""
    out = []
    for i, run in enumerate(runs):
        later = [k for r in runs[i + 1:] for k in r.get("keys", [])]
        keys = [k for k in run.get("keys", []) if not any(k == k2 or k.startswith(k2 + ".") for k2 in later)]
        if keys:
            out.append(dict(run, keys=keys))
    return out


def render_markdown(out: dict) -> str:
    """``instructed_cpu.md`` from ``instructed_cpu.json`` alone."""
    rec = out["recipe"]
    args = out["args"]
    wall = f"; wall time of the whole run: {out['wall_minutes']:.1f} min" if out.get("wall_minutes") is not None else ""
    lines = [
        "# InstructEd on CPU: embedded Gemma-3-270M",
        "",
        "Produced by `benchmarks/instructed_cpu.py` (numbers in percent; EasyEdit `BaseEditor.edit` + `compute_edit_quality`,",
        "one edit per call with weights / memory restored afterwards; Rel = rewrite_acc, Gen = rephrase_acc, Loc = locality,",
        "Por = the GPT-4 one-hop portability question; Score = mean, H = harmonic mean of the four).",
        "Rendered from `instructed_cpu.json` (`python benchmarks/instructed_cpu.py --render`).",
    ]
    if args.get("bootstrap"):
        lines.append(f"Each figure of a row this run evaluated: the mean over the records and its 95% percentile-bootstrap "
                     f"interval ({args['bootstrap']} resamples of the records; Score and H recomputed on each resample).")
    lines += [
        "",
        "## Configuration",
        "",
    ]
    if out.get("command"):
        lines.append(f"* Command: `{out['command']}`" + (f" ({out['date']})." if out.get("date") else "."))
    lines += [
        f"* Model: {out['model']}; torch threads: {args['threads']}{wall}.",
        _prefix_training_line(out),
        f"* Training data: {out['train_edits']} edits (+{rec['val_edits']} validation): "
        + ", ".join(f"{k} {v['taken']} (`{v['file']}`, first {v['skipped_first']} records skipped, "
                    f"{v['excluded_eval_overlap']} excluded for sharing a case id / subject / question with the evaluation records)"
                    for k, v in rec["sources"].items()) + "."
        + ("" if any(k.startswith("zsre") for k in rec["sources"])
           else " No ZsRE record is trained on: ZsRE is out of distribution, as in the paper."),
        f"* Evaluation: the first **{args['limit']}** records of `counterfact_portability_gpt4_ins.json` and of "
        f"`zsre_mend_eval_portability_gpt4.json`" + (f"; FT and ROME on the first {args['baseline_limit']} of them"
                                                      if args.get("baseline_limit") else "") + ".",
        f"* Retrieval: the memory holds all evaluated edits of the dataset (sequential setting); std gate {args['retrieval_gate']} over the top 5.",
        "* ROME: `mom2_adjustment: false` -- the covariance statistics need Wikipedia, not available offline.",
        "",
        "## Results",
        "",
    ]
    n = out.get("n_evaluated") or {}
    for ds in DATASETS:
        lines += [f"### {ds}", "", "| method | n | Rel | Gen | Loc | Por | Score | H |", "|---|---|---|---|---|---|---|---|"]
        for m, row in out["datasets"].get(ds, {}).items():
            lines.append(f"| {m} | {n.get(ds, {}).get(m, '')} | " + " | ".join(_fmt(row[k]) for k in METRICS) + " |")
            lines += paper_figures.reference_rows(ds, paper_figures.PAPER_NAMES.get(m, ""), extra_cells=1)
        lines += ["", paper_figures.REFERENCE_NOTE, ""]
    bare = [f"{ds}/{m}" for ds in DATASETS for m, row in out["datasets"].get(ds, {}).items()
            if any(row[k] is not None and not isinstance(row[k], list) for k in METRICS)]
    if bare and any(isinstance(row[k], list) for rows in out["datasets"].values() for row in rows.values() for k in METRICS):
        lines += ["Rows without an interval (" + ", ".join(bare) + ") come from a run merged into this file that kept no "
                  "per-record values; see *Merged into this file*.", ""]
    lines += ["### Latency", ""]
    if merged_into(out, "latency") or merged_into(out, "base_query_ms"):
        lines += ["Measured (in part) by another run merged into this file (each ratio is to that run's own unedited "
                  "forward); see *Merged into this file* below.", ""]
    inputs = f" over {out['latency_inputs']} inputs" if out.get("latency_inputs") else ""
    lines += [f"Unedited forward (`prompt + target`, median{inputs}): {out['base_query_ms']:.1f} ms."
              + (f" Retrieval: {out['retrieval_hits']} of the {out['latency_inputs']} inputs open the gate."
                 if out.get("retrieval_hits") is not None and out.get("latency_inputs") else ""), "",
              "| method | median edit (ms) | query / unedited |", "|---|---|---|"]
    for m, row in out["latency"].items():
        lines.append(f"| {m} | {_fmt(_with_ci(row['edit_ms'], row.get('edit_ms_ci')))} | "
                     f"{_fmt(_with_ci(row['query_ratio'], row.get('query_ratio_ci')), 2)} |")
    lines += ["", "## Targets", "", "| target | met | figures |", "|---|---|---|"]
    for name, ok, fig in check_targets(out):
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {fig} |")
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()]
    lines += merged_runs_lines({"merged_runs": current_merged_runs(out.get("merged_runs") or [])})
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def recipe_block(info: dict) -> dict:
    """What the JSON keeps of ``recipe_info(archive)``."""
    return {"config": info["recipe"], "key": info.get("key"), "steps": info["steps"],
            "planned_steps": info.get("planned_steps"), "stopped_by_budget": bool(info["stopped_by_budget"]),
            "budget_seconds": info["budget_seconds"], "prep_seconds": round(float(info["prep_seconds"]), 1),
            "train_loop_seconds": round(float(info["train_loop_seconds"]), 1), "val_edits": info["val_edits"],
            "best_val_loss": info.get("best_val_loss"), "sources": info["data"]["sources"]}


def _stored(rows: list[dict]) -> list[dict]:
    """Per-record values as the JSON keeps them (6 decimals): the intervals are computed from these, so they
    can be recomputed from the file."""
    return [{k: (None if v is None else round(float(v), 6)) for k, v in r.items()} for r in rows]


# ----------------------------------------------------------------------------------------------
# --merge: rows of methods this run leaves out, from an earlier result
# ----------------------------------------------------------------------------------------------
def read_merge_source(path: str | Path, args: argparse.Namespace, model: str) -> dict:
    """The result JSON ``--merge`` names, checked against this run before any work: the same record limits,
    dtype and model (rows of different records or models must not share a table)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--merge {path}: no such file. Fix: name an earlier result JSON of this script, e.g. "
                         "benchmarks/results/instructed_cpu.json")
    source = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(source.get("datasets"), dict) or not isinstance(source.get("args"), dict):
        raise SystemExit(f"--merge {path}: not a result of {SCRIPT} (no 'datasets' / 'args'). "
                         f"Fix: name a JSON that {SCRIPT} wrote")
    theirs = source["args"]
    for field in MERGE_MUST_MATCH:
        if theirs.get(field) != getattr(args, field):
            raise SystemExit(f"--merge {path}: its --{field} is {theirs.get(field)!r}, this run's is "
                             f"{getattr(args, field)!r}; rows of different record limits / dtypes must not share a table. "
                             f"Fix: run with --{field} {theirs.get(field)} (or re-run the merged methods with this --{field})")
    if source.get("model") != model:
        raise SystemExit(f"--merge {path}: its model is {source.get('model')!r}, this run's is {model!r}. "
                         "Fix: merge a result of the same model (--model_dir / --dtype)")
    return source


def _producer(source: dict, key: str) -> tuple[str, str | None, str | None]:
    """(command, date, note) of the run that produced ``key`` of ``source``: the last of its ``merged_runs``
    that replaced the key or a key above it, else the source's own run."""
    for run in reversed(source.get("merged_runs") or []):
        if any(key == k or key.startswith(k + ".") for k in run.get("keys", [])):
            return run["command"], run.get("date"), run.get("note")
    return source["command"], source.get("date"), None


def merge_methods(out: dict, source: dict, source_path: str | Path, methods: list[str]) -> list[str]:
    """Copy into ``out`` the rows of ``source`` (a result of this script) for every method of METHODS that
    ``methods`` (this run's) leaves out: tables, record counts, per-record values, latency and errors; the
    InstructEd rows only when the source used the same prefixes. Appends one ``merged_runs`` entry per
    command that produced the copied keys (tracing keys the source itself had merged back to their run);
    returns the merged methods."""
    taken = [m for m in METHODS if m not in methods and any(m in rows for rows in source["datasets"].values())]
    if not taken:
        return []
    prefixes = [m for m in taken if m in PREFIX_METHODS]
    their_key, our_key = (source.get("recipe") or {}).get("key"), out["recipe"].get("key")
    if prefixes and (their_key is None or their_key != our_key):
        raise SystemExit(f"--merge {source_path}: its {', '.join(prefixes)} rows come from other prefixes (recipe key "
                         f"{their_key!r}, this run's {our_key!r}). Fix: add {','.join(prefixes)} to --methods so this "
                         "run evaluates them")
    keys: list[str] = []
    for ds in DATASETS:
        for m in taken:
            if m not in source["datasets"].get(ds, {}):
                continue
            out["datasets"].setdefault(ds, {})[m] = source["datasets"][ds][m]
            keys.append(f"datasets.{ds}.{m}")
            n = (source.get("n_evaluated") or {}).get(ds, {}).get(m)
            if n is not None:
                out["n_evaluated"].setdefault(ds, {})[m] = n
                keys.append(f"n_evaluated.{ds}.{m}")
            rec = (source.get("records") or {}).get(ds, {}).get(m)
            if rec is not None:
                out.setdefault("records", {}).setdefault(ds, {})[m] = rec
                keys.append(f"records.{ds}.{m}")
    for m in taken:
        for field, value in ((source.get("latency") or {}).get(m) or {}).items():
            out["latency"].setdefault(m, {})[field] = value
            if m != "unedited":
                keys.append(f"latency.{m}.{field}")
        if (source.get("errors") or {}).get(m):
            out["errors"][m] = source["errors"][m]
            keys.append(f"errors.{m}")
    # tables in METHODS order, whatever ran first
    out["datasets"] = {ds: {m: rows[m] for m in METHODS if m in rows} for ds, rows in out["datasets"].items()}
    out["n_evaluated"] = {ds: {m: rows[m] for m in METHODS if m in rows} for ds, rows in out["n_evaluated"].items()}
    out["latency"] = {m: out["latency"][m] for m in METHODS if m in out["latency"]}
    by_run: dict[tuple, list[str]] = {}
    for key in keys:
        by_run.setdefault(_producer(source, key), []).append(key)
    for (command, date, note), run_keys in by_run.items():
        taken_by = f"Taken by `--merge {source_path}`."
        entry = merged_run(command, run_keys, note=f"{taken_by} {note}" if note else taken_by)
        entry["date"] = date  # the producing run's date (None: not recorded), not the merge's
        out.setdefault("merged_runs", []).append(entry)
    return taken


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    if "--knowedit" in (sys.argv[1:] if argv is None else list(argv)):  # the KnowEdit section, its own options
        from benchmarks.instructed_knowedit import main as knowedit_main

        return knowedit_main(argv)
    args = parse_args(argv)
    if args.render:  # rebuild the .md from the saved .json alone (--notes: replace its notes first)
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None  # a missing notes file fails before any work
    model_name = f"{args.model_dir} ({args.dtype})" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype})"
    merge_source = read_merge_source(args.merge, args, model_name) if args.merge else None  # fails before any work
    command = command_line(SCRIPT, argv)
    torch.set_num_threads(args.threads)
    setup_logging()
    started = time.perf_counter()

    import instructedit_plugin
    import instructedit_plugin.instructed  # noqa: F401 - registers InstructEd

    instructedit_plugin.register()
    from easyeditor import FTHyperParams, ROMEHyperParams

    from instructedit_plugin.compat import load_easyedit_hparams, make_editor
    from instructedit_plugin.data import resolve_data_dir
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, reset_memory
    from instructedit_plugin.instructed.recipes import (
        QUICK, RECIPES, evaluation_records, recipe_info, train_embedded_prefixes,
    )
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm

    methods = [m for m in args.methods.split(",") if m]
    data_dir = resolve_data_dir(args.data_dir)
    model_dir = args.model_dir or str(embedded_model_dir())

    # 1. prefixes
    recipe = RECIPES[args.recipe]
    if args.quick:  # QUICK's size and schedule on the recipe's training files and evaluation set
        recipe = dataclasses.replace(QUICK, name=f"{recipe.name}-quick", sources=recipe.sources,
                                     evaluation=recipe.evaluation)
    print(f"InstructEd prefix training: recipe {recipe.name!r}, {args.steps or recipe.steps} steps "
          f"({args.threads} threads, {args.dtype})", flush=True)
    recipe_kwargs = dict(config=recipe, budget_minutes=args.budget_minutes, steps=args.steps, n_train=args.n_train,
                         data_dir=data_dir, dtype=args.dtype, model_dir=args.model_dir)
    archive = Path(args.archive) if args.archive else train_embedded_prefixes(**recipe_kwargs)
    info = recipe_info(archive)
    print(f"prefixes: {archive} ({info['train_edits']} training edits, step {info['steps']} of {info['planned_steps']}, "
          f"{info['train_seconds']:.0f}s{', STOPPED BY THE SAFETY CAP' if info['stopped_by_budget'] else ''})", flush=True)

    # 2. model, data
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    evaluation = evaluation_records(data_dir, limit=args.limit)

    def ins_hparams(cls=InstructEdHyperParams, **kw):
        return cls.from_dict(dict(alg_name=cls.ALG_NAME, model_name=model_dir, archive=str(archive), device="cpu",
                                  max_length=40, retrieval_gate=args.retrieval_gate, **kw))

    results: dict = {"counterfact": {}, "zsre": {}}
    edit_ms: dict[str, list[float]] = {m: [] for m in methods}
    query_models: dict[str, object] = {}
    errors: dict[str, list[str]] = {}
    pre_metrics: dict[str, list] = {}
    records: dict[str, dict[str, list]] = {ds: {} for ds in DATASETS}
    ft_hp = load_easyedit_hparams(FTHyperParams, ROOT / "hparams/FT/gemma-3-270m.yaml", model_name=model_dir)
    rome_hp = load_easyedit_hparams(ROMEHyperParams, ROOT / "hparams/ROME/gemma-3-270m.yaml", model_name=model_dir)
    specs = {
        "in_context": lambda: ins_hparams(use_prefixes=False),  # the instruction in context, no prefixes
        "instructed_gold": lambda: ins_hparams(instruction_source="gold"),
        "instructed_retrieval": lambda: ins_hparams(instruction_source="retrieval"),
        "ft": lambda: ft_hp,
        "rome": lambda: rome_hp,
    }
    if args.latency_only:  # re-measure the latency block of saved results (edit times kept), marked as merged
        out_path = Path(args.out)
        out = json.loads(out_path.read_text())
        saved = {m: dict(v) for m, v in out["latency"].items()}
        kept = {m: [v["edit_ms"]] for m, v in saved.items() if v.get("edit_ms") is not None}
        latency_requests = [r for ds in DATASETS for r in evaluation[ds][: args.latency_n]]
        retimed = [m for m in args.retime_edits.split(",") if m]
        if "rome" in retimed or not set(retimed) <= set(specs):
            raise SystemExit(f"--retime_edits takes some of {', '.join(m for m in specs if m != 'rome')}")
        for method in retimed:
            times = []
            for ds in DATASETS:
                reset_memory(model)
                requests = evaluation[ds][: args.latency_n]
                metrics, _, _ = run_edits(make_editor(specs[method](), model, tok), requests,
                                           f"retime {ds}/{method}", log=LOG)
                times += [float(m.get("time", 0.0)) * 1000 for m in metrics]
            reset_memory(model)
            kept[method] = times
            LOG.info("re-timed %s edits: median %.1f ms over %d edits", method, statistics.median(times), len(times))
        latency, base_ms, hits = measure_latency(model, tok, latency_requests, methods, specs, {}, kept, args.bootstrap)
        for m, row in latency.items():  # edit times not re-timed stay the saved ones (with their interval, if any)
            if m not in retimed and m in saved and m != "unedited":
                row["edit_ms"], row["edit_ms_ci"] = saved[m].get("edit_ms"), saved[m].get("edit_ms_ci")
        # methods not measured here (not in --methods) keep their saved figures
        out["latency"] = {m: latency[m] if m in latency else saved[m] for m in METHODS if m in latency or m in saved}
        out.update(base_query_ms=round(base_ms, 2), latency_inputs=len(latency_requests), retrieval_hits=hits)
        replaced = ([f"latency.{m}.{f}" for m in latency if m != "unedited" for f in ("query_ratio", "query_ratio_ci")]
                    + [f"latency.{m}.{f}" for m in retimed for f in ("edit_ms", "edit_ms_ci")]
                    + ["base_query_ms", "latency_inputs", "retrieval_hits"])
        out.setdefault("merged_runs", []).append(merged_run(command, replaced))
        if notes is not None:
            out["notes"] = notes
        write_results(out_path, out, render_markdown, RESULT_KEYS)
        print(json.dumps(out["latency"], indent=2), f"retrieval hits {hits}/{len(latency_requests)}")
        return 0
    latency_texts: list[str] = []
    for ds in DATASETS:
        requests = evaluation[ds]
        latency_texts += [f"{r['prompt']} {r['target_new']}" for r in requests[: args.latency_n]]
        for method in methods:
            if method == "unedited":
                continue
            t0 = time.perf_counter()
            hp = specs[method]()
            editor = make_editor(hp, model, tok)
            if method == "instructed_retrieval":  # the memory holds every evaluated edit of this dataset
                reset_memory(model)
                apply_instructed_to_model(model, tok, [dict(r) for r in requests], hp, keep_original_weight=False)
            subset = requests[: args.baseline_limit] if method in ("ft", "rome") and args.baseline_limit else requests
            if method == "rome" and model.dtype != torch.float32:
                # EasyEdit's ROME multiplies its float32 right vector with keys in the model's dtype
                # (fails in bfloat16): run it in float32; bf16 -> fp32 -> bf16 is lossless.
                model_dtype = model.dtype
                model.float()
            else:
                model_dtype = None
            try:
                metrics, edited, errs = run_edits(editor, subset, f"{ds}/{method}", with_subject=(method == "rome"), log=LOG)
            finally:
                if model_dtype is not None:
                    model.to(model_dtype)
            if method == "instructed_retrieval":
                query_models[method] = edited  # retrieves from the full memory
            elif edited is not None and method not in query_models:
                query_models[method] = edited
            if method == "instructed_retrieval":
                pass  # memory kept until the latency measurement below
            else:
                reset_memory(model)
            errors.setdefault(method, []).extend(f"{ds} {e}" for e in errs)
            edit_ms[method] += [float(m.get("time", 0.0)) * 1000 for m in metrics]
            records[ds][method] = _stored(record_values(metrics))
            results[ds][method] = dict(summarize_with_intervals(records[ds][method], args.bootstrap), n=len(metrics))
            pre_metrics.setdefault(ds, metrics) if metrics else None
            LOG.info("%s %s: %s (%.0fs)", ds, method, results[ds][method], time.perf_counter() - t0)
        if "unedited" in methods and ds in pre_metrics:  # EasyEdit's pre-edit metrics; Loc 100: the model agrees with itself
            rows = _stored([dict(r, Loc=1.0) for r in record_values([{"post": m.get("pre", {})} for m in pre_metrics[ds]])])
            records[ds]["unedited"] = rows
            results[ds]["unedited"] = dict(summarize_with_intervals(rows, args.bootstrap), n=len(rows))

    # 3. latency: every timed query is an *edited* query. Retrieval: the memory holds the edits of
    # every timed input (both datasets), so each input retrieves (the gate permitting) and runs with
    # its instruction; gold / in-context: one edit's instruction in front of every input.
    latency_requests = [r for ds in DATASETS for r in evaluation[ds][: args.latency_n]]
    latency, base_ms, hits = measure_latency(model, tok, latency_requests, methods, specs, query_models, edit_ms,
                                             args.bootstrap)

    out = {
        "model": model_name,
        "train_edits": int(info["train_edits"]),
        "train_seconds": round(float(info["train_seconds"]), 1),
        "datasets": {ds: {m: {k: results[ds][m][k] for k in METRICS} for m in METHODS if m in results[ds]} for ds in DATASETS},
        "latency": {m: latency[m] for m in METHODS if m in latency},
        "date": today(),
        "command": command,
        "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS},
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "recipe": recipe_block(info),
        "n_evaluated": {ds: {m: results[ds][m].get("n") for m in METHODS if m in results[ds]} for ds in DATASETS},
        "errors": {m: e[:5] + ([f"... {len(e) - 5} more"] if len(e) > 5 else []) for m, e in errors.items() if e},
        "base_query_ms": round(base_ms, 2), "latency_inputs": len(latency_requests), "retrieval_hits": hits,
        "records": {ds: {m: records[ds][m] for m in METHODS if m in records[ds]} for ds in DATASETS},
    }
    if merge_source is not None:
        merged = merge_methods(out, merge_source, args.merge, methods)
        LOG.info("merged from %s: %s", args.merge, ", ".join(merged) or "nothing")
    md_path = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    print(md_path.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
