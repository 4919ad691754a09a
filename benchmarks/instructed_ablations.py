"""InstructEd ablations and query cost on the embedded Gemma-3-270M (issue #15 items 1-3), paper Table 4 beside.

Every variant trains its own prefixes with the same number of optimizer steps (``--steps``, default
150) from the same recipe data, then edits the *same* records: the first ``--limit`` (default 50)
records of ``counterfact_portability_gpt4_ins.json`` and of ``zsre_mend_eval_portability_gpt4.json``,
one edit per ``BaseEditor.edit`` call with each input's own (gold) instruction. Variants
(:data:`VARIANTS`):

* ``paper`` -- the paper's protocol: the CounterFact-only recipe (:data:`~.recipes.BENCHMARK`; ZsRE is
  never trained on), re-weighting mode ``paper``, prefixes on the middle third of the layers;
* ``cf_zsre`` -- the earlier benchmark recipe, which also trains on ZsRE ``_ins`` records (ZsRE in
  distribution), everything else as ``paper``;
* ``none_trained`` / ``none_eval`` -- no re-weighting (Table 4 "w/o re-weight": "remove *sim* in
  Eq. 15 and use the original attention weights"): prefixes trained without it, and, for reference,
  the ``paper`` prefixes evaluated without it;
* ``pre_softmax`` -- Eqs. 11/15 read literally (the prefix / instruction scores scaled before the softmax);
* ``last_third`` -- prefixes on the last third of the layers instead of the middle third (Table 4 "L:20-30");
* ``question_rows`` / ``question_rows_eval`` -- re-weighting on the question and answer rows only, so
  the instruction's keys/values do not depend on the question and are cached per instruction
  (``instruction_cache``): prefixes trained in that mode, and the ``paper`` prefixes evaluated in it;
* ``question_only_eval`` -- **not in the paper** (a labelled option for #15 item 3's query cost): the ``paper``
  prefixes evaluated with the re-weighting from the question's first token on, so the template's tail is cached
  with the instruction and a query runs over its own tokens only.

Each figure carries a 95% bootstrap interval over the records (``--bootstrap`` resamples, seeded).
Query cost (``--latency_variants``): median forward of ``prompt + ' ' + target_new`` over the first
``--latency_n`` records of each file (40 inputs by default), edited model / unedited model, exactly
as ``benchmarks/instructed_cpu.py`` measures it (gold: one edit's instruction in front of every input;
retrieval: the memory holds the edits of all timed inputs); the interval is a bootstrap over the
inputs of the ratio of medians. Beside it, the sentence encoder's own share: encoding one question
alone, timed back to back with the unedited forward of the same input.

Every query-cost row also carries the process's CPU time per forward (``time.process_time``: every thread,
so a worker thread's work counts) as a second ratio. ``question_rows`` variants add the query-cost options:
``sim_overlap`` (the question's encoding in a worker thread beside the forward; bit-identical outputs, wall
clock only) and ``encoder_dtype: bfloat16`` (a cheaper sentence encoder, not the paper's), alone and together;
beside them the bfloat16 encoder's deviation from float32 in ``sim`` over the evaluated records' question /
instruction pairs. ``--encoder_backends torch,onnx`` adds, for every timed variant, gold and retrieval rows with
``encoder_backend: onnx`` (the paper's float32 encoder run by ONNX Runtime: the same function) and its deviation in
``sim``. ``--merge`` adds this run's variants and query-cost rows to the saved results (the earlier
rows are kept, numbered by run) and records the command in ``merged_runs``.

Writes ``benchmarks/results/instructed_ablations.json`` and ``.md`` (rendered from the JSON alone,
``--render``). Run from the repository root::

    nohup nice -n 5 python benchmarks/instructed_ablations.py --data_dir ../shared/data \\
        > logs/instructed_ablations.log 2>&1 &
    python benchmarks/instructed_ablations.py --train_only     # only train (or fetch) every variant's prefixes
    python benchmarks/instructed_ablations.py --render
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.instructed_latency import measure_query_cost, query_cost_lines, sim_deviation  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    EDIT_METRICS, command_line, edit_figures, merged_run, merged_runs_lines, notes_lines, read_notes, record_values,
    render_saved, rendered_from, setup_logging, summarize_with_intervals, today, write_results,
)

LOG = logging.getLogger("instructed_ablations")
SCRIPT = "benchmarks/instructed_ablations.py"
DATASETS = ("counterfact", "zsre")
METRICS = EDIT_METRICS
#: The evaluation file of each dataset (as the report names it).
EVALUATED_FILES = {"counterfact": "counterfact_portability_gpt4_ins.json", "zsre": "zsre_mend_eval_portability_gpt4.json"}
#: #15 item 5: the CounterFact gold Gen the longer step-count recipe (variant ``long``) must reach.
LONG_GEN_TARGET = 85.0
TITLE = "InstructEd ablations and query cost (embedded Gemma-3-270M, CPU)"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the ablation table: which prefixes (recipe + overrides) and how they are evaluated."""

    label: str
    recipe: str  # key of instructedit_plugin.instructed.recipes.RECIPES
    train: tuple[tuple[str, Any], ...] = ()  # RecipeConfig fields replaced for training
    prefixes_of: str | None = None  # evaluate another variant's prefixes (eval-time ablation)
    reweight_mode: str = "paper"  # the mode the evaluation uses
    paper_row: str | None = None  # the paper's Table 4 row that measures the same change
    own_steps: bool = False  # train the recipe's own steps and training edits, not --steps / --n_train
    editing: tuple[tuple[str, Any], ...] = ()  # InstructEdHyperParams fields replaced for the evaluation


VARIANTS: dict[str, Variant] = {
    "paper": Variant("paper protocol: CounterFact-only recipe, re-weighting `paper`, middle third", "benchmark-cf",
                     paper_row="InstructEd"),
    "cf_zsre": Variant("CounterFact + ZsRE recipe (ZsRE in distribution), otherwise as `paper`", "benchmark-cf-zsre"),
    "none_trained": Variant("w/o re-weight, trained without it (`none`)", "benchmark-cf",
                            train=(("reweight_mode", "none"),), reweight_mode="none", paper_row="w/o re-weight"),
    "none_eval": Variant("w/o re-weight at evaluation only (`paper` prefixes, `none`)", "benchmark-cf",
                         prefixes_of="paper", reweight_mode="none", paper_row="w/o re-weight"),
    "pre_softmax": Variant("Eqs. 11/15 literally: scores scaled before the softmax (`pre_softmax`)", "benchmark-cf",
                           train=(("reweight_mode", "pre_softmax"),), reweight_mode="pre_softmax"),
    "pre_softmax_eval": Variant("`paper` prefixes evaluated with `pre_softmax`", "benchmark-cf", prefixes_of="paper",
                                reweight_mode="pre_softmax"),
    "last_third": Variant("prefixes on the last third of the layers", "benchmark-cf",
                          train=(("prefix_layers", "last"),), paper_row="w L:20-30"),
    "question_rows": Variant("question/answer rows only, instruction keys/values cached (`question_rows`)",
                             "benchmark-cf", train=(("reweight_mode", "question_rows"),), reweight_mode="question_rows"),
    "question_rows_eval": Variant("`paper` prefixes evaluated in `question_rows`", "benchmark-cf", prefixes_of="paper",
                                  reweight_mode="question_rows"),
    "question_rows_eval_bf16": Variant("`question_rows_eval` with the sentence encoder in bfloat16 (an option for #15 "
                                       "item 3's query cost, not the paper's encoder)", "benchmark-cf",
                                       prefixes_of="paper", reweight_mode="question_rows",
                                       editing=(("encoder_dtype", "bfloat16"),)),
    "question_only_eval": Variant("`paper` prefixes evaluated in `question_only` (NOT in the paper: only the question's "
                                  "rows re-weighted, the whole template prefix cached; an option for #15 item 3)",
                                  "benchmark-cf", prefixes_of="paper", reweight_mode="question_only"),
    "question_only_eval_onnx": Variant("`question_only_eval` with the paper's float32 sentence encoder run by ONNX Runtime "
                                       "(`encoder_backend: onnx`: the same function, an option for #15 item 3's query "
                                       "cost; needs the onnx extra)", "benchmark-cf", prefixes_of="paper",
                                       reweight_mode="question_only", editing=(("encoder_backend", "onnx"),)),
    "long": Variant("longer step-count recipe (#15 item 5): `paper` with the recipe's own steps and edits",
                    "benchmark-cf-long", own_steps=True, paper_row="InstructEd"),
}
#: What a run without ``--variants`` evaluates: every ablation of Table 4 (not the longer recipe, which is
#: no ablation and trains four times as long, nor the onnx runtime's row, which needs an optional extra).
DEFAULT_VARIANTS = tuple(n for n, v in VARIANTS.items() if not v.own_steps and "encoder_backend" not in dict(v.editing))
#: The order trainings run in (one at a time): what item 3 and the recipe comparison need first.
TRAIN_ORDER = ("paper", "question_rows", "none_trained", "last_third", "pre_softmax", "cf_zsre", "long")
#: Paper Table 4 (Han et al. 2024, "Results of ablation experiments"): Rel, Gen, Loc, Por, Score, H in %,
#: LLaMA-1 / LLaMA-2 7B, prefixes on layers 10-20 unless the row says otherwise ("w L:20-30": layers 20-30).
PAPER_TABLE4: dict[str, dict[str, dict[str, tuple[float, ...]]]] = {
    "LLaMA-1": {
        "InstructEd": {"counterfact": (98.01, 97.59, 76.46, 62.43, 83.62, 80.73), "zsre": (98.16, 98.24, 80.73, 67.72, 86.21, 84.17)},
        "w/o re-weight": {"counterfact": (99.52, 100.00, 24.73, 74.62, 74.72, 54.14), "zsre": (99.38, 97.02, 61.80, 69.87, 82.02, 78.64)},
        "w L:20-30": {"counterfact": (98.40, 89.19, 44.70, 50.76, 70.76, 63.05), "zsre": (98.97, 97.44, 33.15, 65.02, 73.64, 60.69)},
        "w FFN": {"counterfact": (99.60, 98.74, 35.79, 69.82, 75.99, 64.07), "zsre": (99.73, 99.18, 56.64, 70.13, 81.42, 76.88)},
    },
    "LLaMA-2": {
        "InstructEd": {"counterfact": (98.77, 98.32, 77.74, 65.85, 85.17, 82.74), "zsre": (98.70, 98.29, 75.57, 70.02, 85.65, 83.65)},
        "w/o re-weight": {"counterfact": (95.34, 99.66, 35.26, 69.41, 74.92, 63.20), "zsre": (98.85, 97.65, 56.08, 70.19, 80.69, 76.28)},
        "w L:20-30": {"counterfact": (98.04, 92.75, 55.09, 55.82, 75.42, 70.11), "zsre": (97.03, 95.44, 33.24, 66.16, 72.96, 60.62)},
        "w FFN": {"counterfact": (98.26, 99.56, 34.16, 58.19, 72.54, 59.99), "zsre": (93.73, 93.28, 36.28, 46.65, 67.49, 56.83)},
    },
}
#: Arguments that say what was run (the others only steer this script).
_UNSAVED_ARGS = ("out", "render", "notes", "train_only", "merge", "backends")
RESULT_KEYS = frozenset({"model", "date", "command", "args", "wall_minutes", "variants", "recipes", "datasets",
                         "latency", "paper_table4", "errors", "notes", "merged_runs"})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every variant's prefix training")
    p.add_argument("--n_train", type=int, default=None, help="training edits (default: the recipe's)")
    p.add_argument("--budget_minutes", type=float, default=None, help="wall-clock safety cap of each training "
                                                                        "(never changes what is trained)")
    p.add_argument("--limit", type=int, default=50, help="first N records of each evaluation file")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS) + " (default: all but long)")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="comma-separated subset of " + ",".join(DATASETS) + " to evaluate (default: both)")
    p.add_argument("--title", default=TITLE, help="the report's heading")
    p.add_argument("--latency_variants", default="paper,question_rows",
                   help="variants whose query cost is measured (gold and retrieval); '' for none")
    p.add_argument("--latency_n", type=int, default=20, help="query-latency inputs per dataset")
    p.add_argument("--encoder_backends", default="torch",
                   help="sentence-encoder runtimes timed: torch, or torch,onnx (adds gold and retrieval rows with "
                        "`encoder_backend: onnx`, the paper's float32 encoder run by ONNX Runtime; needs the onnx extra)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each 95%% interval")
    p.add_argument("--model_dir", default=None, help="another local base model (tests use tiny models)")
    p.add_argument("--cache_dir", default=None, help="recipe cache root (default: the plugin cache)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrieval_gate", type=float, default=0.1)
    p.add_argument("--train_only", action="store_true", help="only train (or fetch from the cache) the prefixes")
    p.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    p.add_argument("--notes", default=None, help="markdown file whose text ends the report")
    p.add_argument("--merge", action="store_true", help="add this run's variants and query-cost rows to the saved "
                                                        "results at --out (earlier rows kept) instead of replacing them")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructed_ablations.json"))
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") + args.latency_variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"--variants / --latency_variants: unknown {', '.join(unknown)}. Fix: use some of {', '.join(VARIANTS)}")
    bad = [d for d in args.datasets.split(",") if d not in DATASETS]
    if bad or not args.datasets:
        p.error(f"--datasets: unknown {', '.join(bad) or '(none given)'}. Fix: use some of {', '.join(DATASETS)}")
    from instructedit_plugin.instructed.encoder import ENCODER_BACKENDS

    backends = tuple(args.encoder_backends.split(","))
    if backends[0] != "torch" or any(b not in ENCODER_BACKENDS for b in backends):
        p.error(f"--encoder_backends: {args.encoder_backends!r}. Fix: torch, or torch followed by some of "
                f"{', '.join(ENCODER_BACKENDS[1:])} (e.g. torch,onnx)")
    onnx_variants = [v for v in args.variants.split(",") + args.latency_variants.split(",")
                     if v and dict(VARIANTS[v].editing).get("encoder_backend") == "onnx"]
    if "onnx" in backends or onnx_variants:
        from instructedit_plugin.instructed.onnx_encoder import check_onnx_available

        try:
            check_onnx_available()
        except ValueError as exc:
            p.error(f"{'--encoder_backends onnx' if 'onnx' in backends else ', '.join(onnx_variants)}: {exc}")
    args.backends = backends
    return args


def _datasets(args) -> list[str]:
    """The evaluated datasets (``--datasets``) in :data:`DATASETS` order."""
    chosen = set(args.datasets.split(","))
    return [d for d in DATASETS if d in chosen]


def _selected(args) -> list[str]:
    chosen = {v for v in args.variants.split(",") if v}
    chosen |= {v for v in args.latency_variants.split(",") if v}
    return [v for v in VARIANTS if v in chosen]


def trained_variants(names) -> list[str]:
    """The variants whose prefixes must be trained (in :data:`TRAIN_ORDER`) for ``names``."""
    need = {VARIANTS[n].prefixes_of or n for n in names}
    return [n for n in TRAIN_ORDER if n in need] + sorted(need - set(TRAIN_ORDER))


def train_variant(name: str, args) -> Path:
    """The archive of ``name``'s prefixes (trained now, or from the recipe cache)."""
    from instructedit_plugin.instructed.recipes import RECIPES, train_embedded_prefixes

    variant = VARIANTS[name]
    steps, n_train = (None, None) if variant.own_steps else (args.steps, args.n_train)  # None: the recipe's own
    return train_embedded_prefixes(config=RECIPES[variant.recipe], steps=steps, n_train=n_train,
                                   budget_minutes=args.budget_minutes, data_dir=args.data_dir, dtype=args.dtype,
                                   model_dir=args.model_dir, cache_dir=args.cache_dir, **dict(variant.train))


# ----------------------------------------------------------------------------------------------
# Evaluation (one variant at a time; each variant's per-record metrics are cached beside its prefixes)
# ----------------------------------------------------------------------------------------------
def _eval_cache_file(archive: Path, variant: Variant, args, data_dir: Path) -> Path:
    from instructedit_plugin.models.cache import content_key

    spec = {"archive": str(archive), "mode": variant.reweight_mode, "limit": args.limit,
            "data": str(data_dir), "gate": args.retrieval_gate, "dtype": args.dtype, "version": 1}
    if _datasets(args) != list(DATASETS):  # a subset: its own file (runs of both keep the keys they had)
        spec["datasets"] = _datasets(args)
    if variant.editing:  # evaluation-time hparams (variants without any keep the keys they had)
        spec["editing"] = dict(variant.editing)
    key = content_key(spec, length=12)
    return archive.parent.parent / f"ablation_eval_{key}.json"


def evaluate_variant(name: str, archive: Path, model, tok, evaluation, args, data_dir: Path, model_dir: str) -> dict:
    """``{dataset: {"records": [...], "pre": [...], "errors": [...]}}`` for one variant (cached)."""
    import json

    from benchmarks.easyedit_calls import run_edits
    from instructedit_plugin.compat import make_editor
    from instructedit_plugin.core import durable
    from instructedit_plugin.instructed.instructed_main import reset_memory

    variant = VARIANTS[name]
    cache = _eval_cache_file(archive, variant, args, data_dir)
    if cache.is_file():
        LOG.info("%s: evaluation from %s", name, cache)
        return json.loads(cache.read_text())
    out = {}
    for ds in _datasets(args):
        t0 = time.perf_counter()
        reset_memory(model)
        editor = make_editor(_hparams(archive, model_dir, args, reweight_mode=variant.reweight_mode,
                                      **dict(variant.editing)), model, tok)
        metrics, _, errors = run_edits(editor, evaluation[ds], f"{ds}/{name}", log=LOG)
        reset_memory(model)
        out[ds] = {"records": record_values(metrics),
                   "pre": record_values([{"post": m.get("pre", {})} for m in metrics]), "errors": errors,
                   "seconds": round(time.perf_counter() - t0, 1)}
        LOG.info("%s %s: %s (%.0fs)", ds, name, edit_figures(out[ds]["records"]), out[ds]["seconds"])
    durable.atomic_write_json(cache, out)
    return out


def _hparams(archive: Path, model_dir: str, args, **kw):
    from instructedit_plugin.instructed import InstructEdHyperParams

    cls = InstructEdHyperParams
    return cls.from_dict(dict(alg_name=cls.ALG_NAME, model_name=model_dir, archive=str(archive), device="cpu",
                              max_length=40, retrieval_gate=args.retrieval_gate, **kw))


def evaluate(args, archives: dict) -> int:
    from instructedit_plugin.data import resolve_data_dir
    from instructedit_plugin.instructed.recipes import RECIPES, evaluation_records, recipe_info
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm
    import instructedit_plugin
    import instructedit_plugin.instructed  # noqa: F401 - registers InstructEd

    instructedit_plugin.register()
    started = time.perf_counter()
    notes = read_notes(args.notes) if args.notes else None
    data_dir = resolve_data_dir(args.data_dir)
    model_dir = args.model_dir or str(embedded_model_dir())
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    evaluation = evaluation_records(data_dir, limit=args.limit)
    datasets: dict = {ds: {} for ds in _datasets(args)}
    errors: dict = {}
    unedited_pre: dict = {}
    for name in [v for v in args.variants.split(",") if v]:
        archive = archives.get(VARIANTS[name].prefixes_of or name)
        if archive is None:
            errors[name] = ["no prefixes (training failed)"]
            continue
        result = evaluate_variant(name, archive, model, tok, evaluation, args, data_dir, model_dir)
        for ds in _datasets(args):
            datasets[ds][name] = dict(summarize_with_intervals(result[ds]["records"], args.bootstrap),
                                      n=len(result[ds]["records"]))
            unedited_pre.setdefault(ds, result[ds]["pre"])
            if result[ds]["errors"]:
                errors.setdefault(name, []).extend(f"{ds} {e}" for e in result[ds]["errors"][:5])
    for ds, pre in unedited_pre.items():  # the unedited model (EasyEdit's pre-edit metrics; Loc 100 by definition)
        rows = [dict(r, Loc=1.0) for r in pre]
        datasets[ds] = {"unedited": dict(summarize_with_intervals(rows, args.bootstrap), n=len(rows)), **datasets[ds]}
    latency_requests = [r for ds in _datasets(args) for r in evaluation[ds][: args.latency_n]]
    targets = [(n, VARIANTS[n], archives[VARIANTS[n].prefixes_of or n]) for n in args.latency_variants.split(",")
               if n and (VARIANTS[n].prefixes_of or n) in archives]
    latency = measure_query_cost(targets, model, tok, latency_requests,
                                 lambda archive, **kw: _hparams(archive, model_dir, args, **kw), args.bootstrap,
                                 backends=args.backends)
    evaluated = [n for n in args.variants.split(",") if n]
    if any(r["encoder_dtype"] != "float32" for r in latency["rows"]) or any(
            dict(VARIANTS[n].editing).get("encoder_dtype", "float32") != "float32" for n in evaluated):
        latency["sim_deviation"] = sim_deviation([r for ds in _datasets(args) for r in evaluation[ds]], args.bootstrap)
    if any(r.get("encoder_backend", "torch") == "onnx" for r in latency["rows"]) or any(
            dict(VARIANTS[n].editing).get("encoder_backend") == "onnx" for n in evaluated):
        latency["sim_deviation_onnx"] = sim_deviation([r for ds in _datasets(args) for r in evaluation[ds]],
                                                      args.bootstrap, dtype="float32", backend="onnx")
    recipes = {}
    for name, archive in archives.items():
        info = recipe_info(archive)
        recipes[name] = {"recipe": info["recipe"]["name"], "key": info.get("key"), "steps": info["steps"],
                         "planned_steps": info.get("planned_steps"), "stopped_by_budget": bool(info["stopped_by_budget"]),
                         "train_edits": info["train_edits"], "val_edits": info["val_edits"],
                         "reweight_mode": info["recipe"]["reweight_mode"], "prefix_layers": _layers_of(archive),
                         "train_seconds": round(float(info["train_seconds"]), 1),
                         "sources": {k: v["taken"] for k, v in info["data"]["sources"].items()}}
    out = {
        "model": f"{model_dir} ({args.dtype})" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype})",
        "date": today(), "command": command_line(SCRIPT, _argv),
        "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS},
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "variants": {n: {"label": v.label, "recipe": RECIPES[v.recipe].name, "train": dict(v.train),
                         "prefixes_of": v.prefixes_of, "reweight_mode": v.reweight_mode, "paper_row": v.paper_row,
                         "own_steps": v.own_steps, "editing": dict(v.editing)}
                     for n, v in VARIANTS.items() if n in _selected(args)},
        "recipes": recipes, "datasets": datasets, "latency": latency,
        "paper_table4": {m: {row: {ds: list(vals) for ds, vals in by_ds.items()} for row, by_ds in rows.items()}
                         for m, rows in PAPER_TABLE4.items()},
        "errors": errors,
    }
    if args.merge:
        out = merge_into_saved(Path(args.out), out)
    md = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    print(md.read_text(), end="")
    return 0


def merge_into_saved(path: Path, new: dict) -> dict:
    """``--merge``: the saved results at ``path`` with ``new``'s variants, recipes and quality rows added (a variant
    evaluated again replaces its rows) and ``new``'s query-cost rows appended after the saved ones, every row
    numbered by its run (the saved run is 1); ``new``'s own configuration is recorded in ``merged_runs``."""
    import json

    out = json.loads(path.read_text())
    run = len(out.get("merged_runs") or []) + 2
    keys = []
    for name, spec in new["variants"].items():
        if name not in out["variants"]:
            out["variants"][name] = spec
            keys.append(f"variants.{name}")
    for name, rec in new["recipes"].items():
        out["recipes"].setdefault(name, rec)
    for ds, rows in new["datasets"].items():
        for name, row in rows.items():
            if name != "unedited":
                out["datasets"].setdefault(ds, {})[name] = row
                keys.append(f"datasets.{ds}.{name}")
    lat, added = out["latency"], new["latency"]
    for row in lat["rows"]:
        row.setdefault("run", 1)
    lat["rows"] += [dict(r, run=run) for r in added["rows"]]
    if added["rows"]:
        keys.append(f"latency.rows (run {run})")
    runs = lat.setdefault("runs", {})
    runs[str(run)] = {k: v for k, v in added.items() if k != "rows"}
    keys.append(f"latency.runs.{run}")
    for name, errs in new["errors"].items():
        out["errors"][name] = errs
    note = (f"run {run}: variants {', '.join(new['variants']) or 'none'}; {new['wall_minutes']:.1f} min; "
            f"{new['args']['limit']} records, {added['inputs']} query-cost inputs; {new['date']}")
    out.setdefault("merged_runs", []).append(merged_run(new["command"], keys, note, new["date"]))
    return out


def _layers_of(archive: Path) -> list[int]:
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    return list(load_checkpoint(archive).bank.layers)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"


def render_markdown(out: dict) -> str:
    """``instructed_ablations.md`` from ``instructed_ablations.json`` alone."""
    args = out["args"]
    own = ", ".join(f"`{n}`" for n, v in out["variants"].items() if v.get("own_steps"))
    evaluated = [ds for ds in DATASETS if out["datasets"].get(ds)]
    out_arg = shlex.split(out["command"]) if "--out" in out["command"] else []
    out_path = Path(out_arg[out_arg.index("--out") + 1]) if "--out" in out_arg else None  # a run's own result file
    result_file = out_path.name if out_path else "instructed_ablations.json"
    render_out = f" --out benchmarks/results/{result_file}" if out_path else ""
    lines = [
        f"# {args.get('title', TITLE)}",
        "",
        f"Generated {out['date']} by `{SCRIPT}`; {rendered_from(SCRIPT, result_file, render_out)}. "
        "Every figure: mean over the records and its 95% bootstrap interval "
        f"({args['bootstrap']} resamples of the records).",
        "",
        "## Configuration",
        "",
        f"* Command: `{out['command']}`.",
        f"* Model: {out['model']}; torch threads {args['threads']}; wall time of the evaluation run "
        f"{out['wall_minutes']:.1f} min.",
        f"* Every variant's prefixes: **{args['steps']} optimizer steps** of the named recipe (batch 6 edit + 6 "
        "unmodified examples, lr 0.01, 5 prefixes per layer, bfloat16), the same seed and data; only the named "
        "setting differs" + (f"; {own} train their recipe's own steps and training edits (the steps and "
                             "training-edits columns)." if own else "."),
        f"* Evaluation: the first **{args['limit']}** records of "
        + " and of ".join(f"`{EVALUATED_FILES[ds]}`" for ds in evaluated)
        + ", one edit per `BaseEditor.edit` call with the input's own (gold) "
        "instruction; Rel = rewrite_acc, Gen = rephrase_acc, Loc = locality, Por = one-hop portability; Score = "
        "mean, H = harmonic mean of the four.",
        "",
        "| variant | what | recipe | trained re-weighting | prefix layers | evaluated re-weighting | steps | training edits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in out["variants"].items():
        rec = out["recipes"].get(v["prefixes_of"] or name)
        if rec is None:
            lines.append(f"| {name} | {v['label']} | {v['recipe']} | – | – | {v['reweight_mode']} | – | – |")
            continue
        sources = ", ".join(f"{k} {n}" for k, n in rec["sources"].items())
        lines.append(f"| {name} | {v['label']} | {rec['recipe']} | {rec['reweight_mode']} | "
                     f"{rec['prefix_layers'][0]}-{rec['prefix_layers'][-1]} | {v['reweight_mode']} | "
                     f"{rec['steps']}{' (capped)' if rec['stopped_by_budget'] else ''} | {rec['train_edits']} ({sources}) |")
    lines += ["", "## Quality", ""]
    for ds in evaluated:
        lines += [f"### {ds}", "", "| variant | n | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for name, row in out["datasets"].get(ds, {}).items():
            lines.append(f"| {name} | {row['n']} | " + " | ".join(_cell(row[k]) for k in METRICS) + " |")
        lines.append("")
    lines += ["### Paper Table 4 (Han et al. 2024), the same changes on LLaMA (%)", "",
              "Quoted from the paper's Table 4 (prefixes on layers 10-20 of 32; 'w L:20-30': layers 20-30; the "
              "paper's 'w FFN' row has no counterpart here). Our rows that measure the same change: "
              + "; ".join(f"`{n}` ~ '{v['paper_row']}'" for n, v in out["variants"].items() if v.get("paper_row")) + ".", "",
              "| model | row | CF Rel | CF Gen | CF Loc | CF Por | CF Score | CF H | ZsRE Rel | ZsRE Gen | ZsRE Loc | ZsRE Por | ZsRE Score | ZsRE H |",
              "|---|---|" + "---|" * 12]
    for model, rows in out["paper_table4"].items():
        for row, by_ds in rows.items():
            lines.append(f"| {model} | {row} | " + " | ".join(f"{x:.2f}" for ds in DATASETS for x in by_ds[ds]) + " |")
    lat = out["latency"]
    if not lat["rows"]:
        lines += ["", "## Query cost", "", "Not measured in this run (`--latency_variants` named none)."]
    else:
        lines += query_cost_lines(out)
    long_gen = (out["datasets"].get("counterfact", {}).get("long") or {}).get("Gen")
    if long_gen:  # #15 item 5: the longer step-count recipe's CounterFact gold Gen
        lines += ["", "## Target of the longer recipe", "", "| target | met | figures |", "|---|---|---|",
                  f"| `long` CounterFact gold Gen >= {LONG_GEN_TARGET:g} | {'yes' if long_gen[0] >= LONG_GEN_TARGET else 'no'} "
                  f"| {_cell(long_gen)} (n {out['datasets']['counterfact']['long']['n']}) |"]
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()]
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


_argv = None


def main(argv=None) -> int:
    global _argv
    _argv = argv
    args = parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    if args.merge and not Path(args.out).is_file():
        raise SystemExit(f"--merge: {args.out} does not exist. Fix: run without --merge first, or pass the --out of a "
                         "saved run")
    import torch

    torch.set_num_threads(args.threads)
    setup_logging()
    archives = {}
    for name in trained_variants(_selected(args)):
        t0 = time.perf_counter()
        try:
            archives[name] = train_variant(name, args)
        except Exception:  # noqa: BLE001 - one failing variant must not stop the others
            LOG.exception("training %s failed", name)
            continue
        LOG.info("prefixes of %s: %s (%.0fs)", name, archives[name], time.perf_counter() - t0)
    if args.train_only:
        return 0
    return evaluate(args, archives)


if __name__ == "__main__":
    raise SystemExit(main())
