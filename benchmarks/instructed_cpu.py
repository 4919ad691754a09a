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
   call, weights / memory restored after each), summarised with
   :func:`~instructedit_plugin.evaluation.summary.summarize_metrics` (Rel, Gen, Loc, Por, Score, H).
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
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import paper_figures  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    command_line, merged_into, merged_run, merged_runs_lines, notes_lines, read_notes, render_saved, today,
    write_results, setup_logging,
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
    "notes", "merged_runs",  # --notes text; later runs merged in (--latency_only)
})
#: Arguments that say what was run (the others only steer this script).
_UNSAVED_ARGS = ("out", "render", "latency_only", "retime_edits", "notes")


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
# EasyEdit plumbing
# ----------------------------------------------------------------------------------------------
def _edit_kwargs(req: dict, with_subject: bool) -> dict:
    kw = dict(prompts=[req["prompt"]], target_new=[req["target_new"]], ground_truth=[req.get("ground_truth") or "<|endoftext|>"],
              rephrase_prompts=[req["rephrase_prompt"]] if req.get("rephrase_prompt") else None)
    loc = {k: {"prompt": [v["prompt"]], "ground_truth": [v["ground_truth"]]} for k, v in (req.get("locality") or {}).items()}
    por = {k: {"prompt": [v["prompt"]], "ground_truth": [v["ground_truth"]]} for k, v in (req.get("portability") or {}).items()}
    if loc:
        kw["locality_inputs"] = loc
    if por:
        kw["portability_inputs"] = por
    if with_subject:
        kw["subject"] = [req["subject"]]
    return kw


def run_method(editor, requests: list[dict], with_subject: bool, name: str) -> tuple[list[dict], object, list[str]]:
    """One ``BaseEditor.edit`` call per request (weights/memory restored after each)."""
    metrics, errors, edited = [], [], None
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        try:
            out, edited, _ = editor.edit(**_edit_kwargs(req, with_subject), keep_original_weight=True, verbose=False)
            metrics.extend(out)
        except Exception as exc:  # noqa: BLE001 - one failing record must not sink the benchmark
            errors.append(f"record {i}: {type(exc).__name__}: {exc}")
            LOG.warning("%s: record %d failed: %s", name, i, exc)
            if len(errors) <= 2:
                traceback.print_exc()
        if (i + 1) % 10 == 0:
            LOG.info("%s: %d/%d edits (%.0fs)", name, i + 1, len(requests), time.perf_counter() - t0)
    return metrics, edited, errors


# ----------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def median_query_ms(model, tok, texts: list[str], repeats: int = 1) -> float:
    times = []
    for text in texts[:2]:  # warm-up
        model(**tok([text], return_tensors="pt"))
    for _ in range(repeats):
        for text in texts:
            enc = tok([text], return_tensors="pt")
            t0 = time.perf_counter()
            model(**enc)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_latency(model, tok, requests, methods, specs, query_models, edit_ms):
    """Median query time of each method's edited model on ``prompt + ' ' + target_new`` of ``requests``
    as a ratio to the unedited forward, and the median edit time (EasyEdit's per-edit ``time``)."""
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, reset_memory

    texts = [f"{r['prompt']} {r['target_new']}" for r in requests]
    base_ms = median_query_ms(model, tok, texts)
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
        q = median_query_ms(qm, tok, texts)
        reset_memory(model)
        latency[method] = {"edit_ms": round(statistics.median(edit_ms[method]), 2) if edit_ms.get(method) else None,
                           "query_ratio": round(q / base_ms, 3)}
        LOG.info("latency %s: %s", method, latency[method])
    return latency, base_ms, hits


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _fmt(v, nd=1) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v))


def check_targets(out: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met?, figures) for each target of the brief; None: not measured."""
    rows = []
    d, lat = out["datasets"], out["latency"]
    for ds in DATASETS:
        g = d.get(ds, {}).get("instructed_gold")
        if g:
            rows.append((f"{ds}: InstructEd gold Rel >= 95", g["Rel"] is not None and g["Rel"] >= 95, f"Rel {_fmt(g['Rel'])}"))
            rows.append((f"{ds}: InstructEd gold Gen >= 85", g["Gen"] is not None and g["Gen"] >= 85, f"Gen {_fmt(g['Gen'])}"))
        r = d.get(ds, {}).get("instructed_retrieval")
        if r:
            rows.append((f"{ds}: InstructEd retrieval Loc >= 90", r["Loc"] is not None and r["Loc"] >= 90, f"Loc {_fmt(r['Loc'])}"))
        for method in ("instructed_gold", "instructed_retrieval"):
            m = d.get(ds, {}).get(method)
            if not m:
                continue
            for metric in ("Por", "H"):
                others = {o: d[ds][o][metric] for o in ("in_context", "ft", "rome") if o in d[ds] and d[ds][o][metric] is not None}
                ok = m[metric] is not None and all(m[metric] > v for v in others.values())
                rows.append((f"{ds}: {method} {metric} above in-context, FT and ROME", ok,
                             f"{_fmt(m[metric])} vs " + ", ".join(f"{o} {_fmt(v)}" for o, v in others.items())))
    ft_ms = (lat.get("ft") or {}).get("edit_ms")
    for method in ("instructed_gold", "instructed_retrieval"):
        e = (lat.get(method) or {}).get("edit_ms")
        if e is not None and ft_ms:
            rows.append((f"{method}: edit <= 0.01 x FT edit", e <= 0.01 * ft_ms, f"{e:.1f} ms vs FT {ft_ms:.0f} ms ({e / ft_ms:.4f}x)"))
        q = (lat.get(method) or {}).get("query_ratio")
        if q is not None:
            rows.append((f"{method}: edited query <= 1.3 x unedited", q <= 1.3, f"{q:.2f}x"))
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
                    for k, v in rec["sources"].items()) + ".",
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
    lines += ["### Latency", ""]
    if merged_into(out, "latency") or merged_into(out, "base_query_ms"):
        lines += ["Measured (in part) by a later run merged into this file; see *Merged into this file* below.", ""]
    inputs = f" over {out['latency_inputs']} inputs" if out.get("latency_inputs") else ""
    lines += [f"Unedited forward (`prompt + target`, median{inputs}): {out['base_query_ms']:.1f} ms."
              + (f" Retrieval: {out['retrieval_hits']} of the {out['latency_inputs']} inputs open the gate."
                 if out.get("retrieval_hits") is not None and out.get("latency_inputs") else ""), "",
              "| method | median edit (ms) | query / unedited |", "|---|---|---|"]
    for m, row in out["latency"].items():
        lines.append(f"| {m} | {_fmt(row['edit_ms'])} | {_fmt(row['query_ratio'], 2)} |")
    lines += ["", "## Targets", "", "| target | met | figures |", "|---|---|---|"]
    for name, ok, fig in check_targets(out):
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {fig} |")
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()]
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def recipe_block(info: dict) -> dict:
    """What the JSON keeps of ``recipe_info(archive)``."""
    return {"config": info["recipe"], "key": info.get("key"), "steps": info["steps"],
            "planned_steps": info.get("planned_steps"), "stopped_by_budget": bool(info["stopped_by_budget"]),
            "budget_seconds": info["budget_seconds"], "prep_seconds": round(float(info["prep_seconds"]), 1),
            "train_loop_seconds": round(float(info["train_loop_seconds"]), 1), "val_edits": info["val_edits"],
            "best_val_loss": info.get("best_val_loss"), "sources": info["data"]["sources"]}


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
    from instructedit_plugin.evaluation.summary import summarize_metrics
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
        kept = {m: [v["edit_ms"]] for m, v in out["latency"].items() if v.get("edit_ms") is not None}
        latency_requests = [r for ds in DATASETS for r in evaluation[ds][: args.latency_n]]
        retimed = [m for m in args.retime_edits.split(",") if m]
        if "rome" in retimed or not set(retimed) <= set(specs):
            raise SystemExit(f"--retime_edits takes some of {', '.join(m for m in specs if m != 'rome')}")
        for method in retimed:
            times = []
            for ds in DATASETS:
                reset_memory(model)
                requests = evaluation[ds][: args.latency_n]
                metrics, _, _ = run_method(make_editor(specs[method](), model, tok), requests, with_subject=False,
                                           name=f"retime {ds}/{method}")
                times += [float(m.get("time", 0.0)) * 1000 for m in metrics]
            reset_memory(model)
            kept[method] = [statistics.median(times)]
            LOG.info("re-timed %s edits: median %.1f ms over %d edits", method, kept[method][0], len(times))
        latency, base_ms, hits = measure_latency(model, tok, latency_requests, methods, specs, {}, kept)
        out["latency"] = {m: latency[m] for m in METHODS if m in latency}
        out.update(base_query_ms=round(base_ms, 2), latency_inputs=len(latency_requests), retrieval_hits=hits)
        replaced = ([f"latency.{m}.query_ratio" for m in out["latency"] if m != "unedited"]
                    + [f"latency.{m}.edit_ms" for m in retimed] + ["base_query_ms", "latency_inputs", "retrieval_hits"])
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
                metrics, edited, errs = run_method(editor, subset, with_subject=(method == "rome"), name=f"{ds}/{method}")
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
            summary = summarize_metrics(metrics)
            results[ds][method] = {k: (round(summary[k], 2) if summary[k] is not None else None) for k in METRICS}
            results[ds][method]["n"] = len(metrics)
            pre_metrics.setdefault(ds, metrics) if metrics else None
            LOG.info("%s %s: %s (%.0fs)", ds, method, results[ds][method], time.perf_counter() - t0)
        if "unedited" in methods and ds in pre_metrics:
            pre = summarize_metrics(pre_metrics[ds], phase="pre")
            pre["Loc"] = 100.0  # the unedited model agrees with itself
            vals = [pre[k] for k in ("Rel", "Gen", "Loc", "Por") if pre[k] is not None]
            from instructedit_plugin.evaluation.summary import harmonic_mean, score

            pre["Score"], pre["H"] = score(vals), harmonic_mean(vals)
            results[ds]["unedited"] = {k: round(pre[k], 2) for k in METRICS}
            results[ds]["unedited"]["n"] = len(pre_metrics[ds])
        if ds == DATASETS[0] and "instructed_retrieval" in methods:
            pass

    # 3. latency: every timed query is an *edited* query. Retrieval: the memory holds the edits of
    # every timed input (both datasets), so each input retrieves (the gate permitting) and runs with
    # its instruction; gold / in-context: one edit's instruction in front of every input.
    latency_requests = [r for ds in DATASETS for r in evaluation[ds][: args.latency_n]]
    latency, base_ms, hits = measure_latency(model, tok, latency_requests, methods, specs, query_models, edit_ms)

    out = {
        "model": (f"{model_dir} ({args.dtype})" if args.model_dir else "gemma-3-270m (embedded, " + args.dtype + ")"),
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
    }
    md_path = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    print(md_path.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
