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
  (``instruction_cache``): prefixes trained in that mode, and the ``paper`` prefixes evaluated in it.

Each figure carries a 95% bootstrap interval over the records (``--bootstrap`` resamples, seeded).
Query cost (``--latency_variants``): median forward of ``prompt + ' ' + target_new`` over the first
``--latency_n`` records of each file (40 inputs by default), edited model / unedited model, exactly
as ``benchmarks/instructed_cpu.py`` measures it (gold: one edit's instruction in front of every input;
retrieval: the memory holds the edits of all timed inputs); the interval is a bootstrap over the
inputs of the ratio of medians. Beside it, the sentence encoder's own share: encoding one question
alone, timed back to back with the unedited forward of the same input.

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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import (  # noqa: E402
    command_line, figures_with_ci, notes_lines, read_notes, render_saved, setup_logging, today, write_results,
)

LOG = logging.getLogger("instructed_ablations")
SCRIPT = "benchmarks/instructed_ablations.py"
DATASETS = ("counterfact", "zsre")
METRICS = ("Rel", "Gen", "Loc", "Por", "Score", "H")
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
    "long": Variant("longer step-count recipe (#15 item 5): `paper` with the recipe's own steps and edits",
                    "benchmark-cf-long", own_steps=True, paper_row="InstructEd"),
}
#: What a run without ``--variants`` evaluates: every ablation of Table 4 (not the longer recipe, which is
#: no ablation and trains four times as long).
DEFAULT_VARIANTS = tuple(n for n, v in VARIANTS.items() if not v.own_steps)
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
_UNSAVED_ARGS = ("out", "render", "notes", "train_only")
RESULT_KEYS = frozenset({"model", "date", "command", "args", "wall_minutes", "variants", "recipes", "datasets",
                         "latency", "paper_table4", "errors", "notes"})


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
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each 95%% interval")
    p.add_argument("--model_dir", default=None, help="another local base model (tests use tiny models)")
    p.add_argument("--cache_dir", default=None, help="recipe cache root (default: the plugin cache)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrieval_gate", type=float, default=0.1)
    p.add_argument("--train_only", action="store_true", help="only train (or fetch from the cache) the prefixes")
    p.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    p.add_argument("--notes", default=None, help="markdown file whose text ends the report")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructed_ablations.json"))
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") + args.latency_variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"--variants / --latency_variants: unknown {', '.join(unknown)}. Fix: use some of {', '.join(VARIANTS)}")
    bad = [d for d in args.datasets.split(",") if d not in DATASETS]
    if bad or not args.datasets:
        p.error(f"--datasets: unknown {', '.join(bad) or '(none given)'}. Fix: use some of {', '.join(DATASETS)}")
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
# Intervals
# ----------------------------------------------------------------------------------------------
def record_values(metrics: list[dict]) -> list[dict[str, float | None]]:
    """Rel/Gen/Loc/Por in [0, 1] of each edit (EasyEdit's per-edit metrics), None where not measured."""
    from instructedit_plugin.evaluation.summary import edit_metrics

    return [edit_metrics(m.get("post", {}) or {}, m.get("pre")) for m in metrics]


def _summary(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    from instructedit_plugin.evaluation.summary import harmonic_mean, score

    out: dict[str, float | None] = {}
    for k in METRICS[:4]:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = 100.0 * sum(vals) / len(vals) if vals else None
    measured = [out[k] for k in METRICS[:4] if out[k] is not None]
    out["Score"], out["H"] = score(measured), harmonic_mean(measured)
    return out


def summarize_with_intervals(rows: list[dict[str, float | None]], resamples: int, seed: int = 0) -> dict:
    """``{metric: [value, low, high]}`` in %: the mean over records and its 95% percentile-bootstrap interval
    (:func:`benchmarks.results_io.figures_with_ci`: Score and H recomputed on each resample)."""
    if not rows:
        point = _summary(rows)
        return {k: None if point[k] is None else [round(point[k], 2)] * 3 for k in METRICS}
    return figures_with_ci(rows, _summary, resamples, seed, digits=2)


def ratio_interval(base: list[float], edited: list[float], resamples: int, seed: int = 0) -> list[float]:
    """``[median(edited) / median(base), low, high]``: the query-cost ratio and its 95% bootstrap interval
    (the timed inputs resampled in pairs, :func:`benchmarks.results_io.figures_with_ci`)."""
    def ratio(pairs):
        return {"ratio": statistics.median(e for _, e in pairs) / statistics.median(b for b, _ in pairs)}

    return figures_with_ci(list(zip(base, edited)), ratio, resamples, seed, digits=3)["ratio"]


# ----------------------------------------------------------------------------------------------
# Evaluation (one variant at a time; each variant's per-record metrics are cached beside its prefixes)
# ----------------------------------------------------------------------------------------------
def _eval_cache_file(archive: Path, variant: Variant, args, data_dir: Path) -> Path:
    from instructedit_plugin.models.cache import content_key

    spec = {"archive": str(archive), "mode": variant.reweight_mode, "limit": args.limit,
            "data": str(data_dir), "gate": args.retrieval_gate, "dtype": args.dtype, "version": 1}
    if _datasets(args) != list(DATASETS):  # a subset: its own file (runs of both keep the keys they had)
        spec["datasets"] = _datasets(args)
    key = content_key(spec, length=12)
    return archive.parent.parent / f"ablation_eval_{key}.json"


def evaluate_variant(name: str, archive: Path, model, tok, evaluation, args, data_dir: Path, model_dir: str) -> dict:
    """``{dataset: {"records": [...], "pre": [...], "errors": [...]}}`` for one variant (cached)."""
    import json

    from benchmarks.instructed_cpu import run_method
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
        editor = make_editor(_hparams(archive, model_dir, args, reweight_mode=variant.reweight_mode), model, tok)
        metrics, _, errors = run_method(editor, evaluation[ds], with_subject=False, name=f"{ds}/{name}")
        reset_memory(model)
        out[ds] = {"records": record_values(metrics),
                   "pre": record_values([{"post": m.get("pre", {})} for m in metrics]), "errors": errors,
                   "seconds": round(time.perf_counter() - t0, 1)}
        LOG.info("%s %s: %s (%.0fs)", ds, name, _summary(out[ds]["records"]), out[ds]["seconds"])
    durable.atomic_write_json(cache, out)
    return out


def _hparams(archive: Path, model_dir: str, args, **kw):
    from instructedit_plugin.instructed import InstructEdHyperParams

    cls = InstructEdHyperParams
    return cls.from_dict(dict(alg_name=cls.ALG_NAME, model_name=model_dir, archive=str(archive), device="cpu",
                              max_length=40, retrieval_gate=args.retrieval_gate, **kw))


def _forward_ms(model, tok, text: str) -> float:
    enc = tok([text], return_tensors="pt")
    t0 = time.perf_counter()
    model(**enc)
    return (time.perf_counter() - t0) * 1000


def measure_query_cost(archives: dict, model, tok, requests: list[dict], args, model_dir: str) -> dict:
    """Query / unedited ratios (gold and retrieval) of ``--latency_variants``, plus ``paper`` without the
    instruction-embedding cache; each input's edited and unedited forwards are timed back to back."""
    import torch

    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, reset_memory

    texts = [f"{r['prompt']} {r['target_new']}" for r in requests]
    rows = []
    encoder_share = None
    for name in [v for v in args.latency_variants.split(",") if v]:
        variant = VARIANTS[name]
        archive = archives.get(variant.prefixes_of or name)
        if archive is None:
            continue
        settings = [("gold", {}, False), ("retrieval", {}, False)]
        if variant.reweight_mode == "question_rows":  # instruction keys/values computed at edit time
            settings = [(s, {"warm_instruction_cache": True}, False) for s, _, _ in settings]
        # diagnostic: gold with each input's sim computed before its timer starts -- the forward's own share
        settings.append(("gold", dict(settings[0][1]), True))
        if name == "paper":
            settings += [(s, {"embedding_cache": 0}, False) for s in ("gold", "retrieval")]
        for source, extra, sim_outside in settings:
            hp = _hparams(archive, model_dir, args, reweight_mode=variant.reweight_mode, instruction_source=source, **extra)
            reset_memory(model)
            edit_ms = []
            for r in requests:  # one edit at a time: the edit cost (memory + warm caches)
                t0 = time.perf_counter()
                apply_instructed_to_model(model, tok, [dict(r)], hp, keep_original_weight=False)
                edit_ms.append((time.perf_counter() - t0) * 1000)
                reset_memory(model)
            batch = [dict(r) for r in requests] if source == "retrieval" else [dict(requests[0])]
            qm, _ = apply_instructed_to_model(model, tok, batch, hp, keep_original_weight=False)
            hits = None
            if source == "retrieval":
                state = editing_state(model)
                hits = sum(state.memory.select(r["prompt"], gate=qm.provider.gate, top_k=qm.provider.top_k) is not None
                           for r in requests)
            base, edited = [], []
            with torch.no_grad():
                sims = [_sim_of(qm, tok, text) for text in texts] if sim_outside else None
                if sims is not None:  # the precomputed sim gives the forward's own logits, bit for bit
                    want = qm(**tok([texts[0]], return_tensors="pt")).logits
                    qm.__dict__["similarities"] = lambda *a, **k: sims[0]
                    if not torch.equal(qm(**tok([texts[0]], return_tensors="pt")).logits, want):
                        raise RuntimeError("a precomputed sim changed the instructed logits; the diagnostic row "
                                           "would not time the same forward")
                for text in texts[:2]:  # warm-up
                    model(**tok([text], return_tensors="pt"))
                    qm(**tok([text], return_tensors="pt"))
                for i, text in enumerate(texts):
                    if sims is not None:  # an instance attribute shadows the method for this input's forward
                        qm.__dict__["similarities"] = lambda *a, _sim=sims[i], **k: _sim
                    base.append(_forward_ms(model, tok, text))
                    edited.append(_forward_ms(qm, tok, text))
                qm.__dict__.pop("similarities", None)
            if encoder_share is None:  # once: what encoding one question costs beside an unedited forward
                encoder_share = _encoder_share(model, tok, editing_state(model).encoder, requests, texts, args)
            reset_memory(model)
            cache = qm.embedding_cache
            rows.append({"variant": name, "source": source, "reweight_mode": variant.reweight_mode,
                         "embedding_cache": extra.get("embedding_cache", 4096),
                         "warm_instruction_cache": bool(extra.get("warm_instruction_cache")),
                         "sim_outside_timer": sim_outside,
                         "query_ratio": ratio_interval(base, edited, args.bootstrap),
                         "base_ms": round(statistics.median(base), 2), "query_ms": round(statistics.median(edited), 2),
                         "edit_ms": round(statistics.median(edit_ms), 2), "retrieval_hits": hits,
                         "embedding_cache_hits": None if cache is None else cache.hits})
            LOG.info("query cost %s", rows[-1])
    return {"inputs": len(texts), "rows": rows, "encoder": encoder_share}


def _sim_of(qm, tok, text: str):
    """``sim`` of ``text``'s instructed input, as the wrapper computes it in a forward."""
    enc = tok([text], return_tensors="pt")
    selection = qm.select(qm._rows(enc["input_ids"], enc["attention_mask"]))[0]
    return qm.similarities([selection.question], [selection.instruction], [selection.subject], [selection.encoded])


def _encoder_share(model, tok, encoder, requests: list[dict], texts: list[str], args) -> dict:
    """The sentence encoder's own cost: ``encoder.encode([prompt])`` (what ``sim`` needs per query: the question
    alone) timed back to back with the unedited forward of the same input, same threads; ratio with interval."""
    import torch

    base, encode = [], []
    with torch.no_grad():
        for r, text in zip(requests[:2], texts[:2]):  # warm-up
            encoder.encode([r["prompt"]])
            model(**tok([text], return_tensors="pt"))
        for r, text in zip(requests, texts):
            base.append(_forward_ms(model, tok, text))
            t0 = time.perf_counter()
            encoder.encode([r["prompt"]])
            encode.append((time.perf_counter() - t0) * 1000)
    out = {"encode_ms": round(statistics.median(encode), 2), "base_ms": round(statistics.median(base), 2),
           "ratio": ratio_interval(base, encode, args.bootstrap)}
    LOG.info("question encoding alone: %s", out)
    return out


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
    latency = measure_query_cost(archives, model, tok, latency_requests, args, model_dir)
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
                         "own_steps": v.own_steps}
                     for n, v in VARIANTS.items() if n in _selected(args)},
        "recipes": recipes, "datasets": datasets, "latency": latency,
        "paper_table4": {m: {row: {ds: list(vals) for ds, vals in by_ds.items()} for row, by_ds in rows.items()}
                         for m, rows in PAPER_TABLE4.items()},
        "errors": errors,
    }
    md = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    print(md.read_text(), end="")
    return 0


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
        f"Generated {out['date']} by `{SCRIPT}`; rendered from `{result_file}` "
        f"(`python {SCRIPT} --render{render_out}`). Every figure: mean over the records and its 95% bootstrap interval "
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
        lines += ["", "## Query cost", "",
                  f"Median forward of `prompt + ' ' + target_new` over {lat['inputs']} inputs (the first {args['latency_n']} "
                  "records of each file), edited model / unedited model, each input's two forwards timed back to back; "
                  "interval: bootstrap over the inputs. Gold: one edit's instruction in front of every input; retrieval: "
                  "the memory holds the edits of all timed inputs. Edit: median time of one `apply_instructed_to_model` "
                  "call (memory insert, and in `question_rows` with `warm_instruction_cache` the instruction's keys/values). "
                  "Rows with *sim* 'before timer' are a diagnostic: each input's `sim` is computed before its timer starts, "
                  "so they show the instructed forward's own cost without the sentence encoder.", "",
                  "| variant | source | re-weighting | embedding cache | instruction K/V at edit | sim | unedited ms | edited ms | "
                  "query / unedited | edit ms | retrieval hits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            q = r["query_ratio"]
            lines.append(f"| {r['variant']} | {r['source']} | {r['reweight_mode']} | {'on' if r['embedding_cache'] else 'off'} | "
                         f"{'yes' if r['warm_instruction_cache'] else 'no'} | "
                         f"{'before timer' if r.get('sim_outside_timer') else 'timed'} | {r['base_ms']:.1f} | {r['query_ms']:.1f} | "
                         f"{q[0]:.2f} [{q[1]:.2f}, {q[2]:.2f}] | {r['edit_ms']:.1f} | "
                         f"{'–' if r['retrieval_hits'] is None else r['retrieval_hits']} |")
        share = lat.get("encoder")
        if share:
            e = share["ratio"]
            lines += ["", f"Question encoding alone (`encoder.encode([prompt])`, which every re-weighting mode needs for "
                      f"`sim`; in retrieval the memory search's encoding is reused, so one per query): median "
                      f"{share['encode_ms']:.1f} ms beside the unedited forward's {share['base_ms']:.1f} ms, "
                      f"**{e[0]:.3f}x [{e[1]:.3f}, {e[2]:.3f}]** of it, timed back to back on the same inputs and threads."]
        lines += ["", "## Targets", "", "| target | met | figures |", "|---|---|---|"]
        for r in lat["rows"]:
            if r["reweight_mode"] == "question_rows" and r["embedding_cache"] and not r.get("sim_outside_timer"):
                q = r["query_ratio"]
                lines.append(f"| {r['variant']} {r['source']}: query <= 1.1 x unedited | {'yes' if q[0] <= 1.1 else 'no'} | "
                             f"{q[0]:.2f}x [{q[1]:.2f}, {q[2]:.2f}] |")
        if share:
            e = share["ratio"]
            lines.append(f"| floor of any mode with `sim`: 1 + question encoding <= 1.1 | {'yes' if 1 + e[0] <= 1.1 else 'no'} | "
                         f"1 + {e[0]:.3f} [{e[1]:.3f}, {e[2]:.3f}] |")
    long_gen = (out["datasets"].get("counterfact", {}).get("long") or {}).get("Gen")
    if long_gen:  # #15 item 5: the longer step-count recipe's CounterFact gold Gen
        lines += ["", "## Target of the longer recipe", "", "| target | met | figures |", "|---|---|---|",
                  f"| `long` CounterFact gold Gen >= {LONG_GEN_TARGET:g} | {'yes' if long_gen[0] >= LONG_GEN_TARGET else 'no'} "
                  f"| {_cell(long_gen)} (n {out['datasets']['counterfact']['long']['n']}) |"]
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()]
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
