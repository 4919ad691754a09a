"""KnowEdit section of the InstructEd CPU benchmark (``python benchmarks/instructed_cpu.py --knowedit ...``).

KnowEdit (EasyEdit's standard benchmark) asks its locality questions about the *same subject* under
another relation; issue #14 item 4. On the first ``--limit`` records of KnowEdit's ZsRE
(``zsre/ZsRE-test-all.json``), WikiData-CounterFact (``counterfact/test_cf-generate-10.jsonl``) and
WikiData-Recent (``recent/recent_train.json``: KnowEdit's recent test file is not available offline; the
``knowedit`` recipe never trains on these records) it edits with

* ``unedited`` (pre-edit metrics; Loc 100 by definition), EasyEdit's ``ft`` and ``rome``
  (``hparams/FT|ROME/gemma-3-270m.yaml``; ROME in float32, ``mom2_adjustment: false``);
* ``in_context``: the instruction in front of the question, no prefixes;
* InstructEd variants ``<source>_<prefixes>_<similarity>``: ``gold`` (each input its own edit's
  instruction) or ``retrieval`` (a memory holding every evaluated edit of the file, std gate), with the
  ``shipped`` prefixes (the demo's, trained by the default recipe with the paper's cosine) or the
  ``knowedit`` ones (recipe :data:`~instructedit_plugin.instructed.recipes.KNOWEDIT`: KnowEdit training
  files, same-subject other-relation locality examples, ``subject_masked`` similarity), and the
  similarity ``cosine`` (the paper's) or ``subject_masked`` (:mod:`instructedit_plugin.instructed.similarity`);

every method through EasyEdit's ``BaseEditor.edit`` + ``compute_edit_quality``, one edit per call, the
request's ``subject`` passed to every method (as EasyEdit's KnowEdit script does). Each figure carries a
95% bootstrap interval over records (``BOOTSTRAP`` resamples, seed 0; H's interval is H of the resampled
means). Writes ``benchmarks/results/instructed_knowedit.json`` and ``.md`` (rendered from the JSON alone);
``--merge`` adds the rows of a later run to the saved file and records the command in ``merged_runs``.
"""
from __future__ import annotations

import argparse
import functools
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.easyedit_calls import run_edits  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    command_line, edit_figures, figures_with_ci, merged_run, merged_runs_lines, notes_lines, read_notes, render_saved, today, write_results, setup_logging,
)

LOG = logging.getLogger("instructed_knowedit")
SCRIPT = "benchmarks/instructed_cpu.py --knowedit"
FILES = {"zsre": "zsre/ZsRE-test-all.json", "wiki_counterfact": "counterfact/test_cf-generate-10.jsonl",
         "wiki_recent": "recent/recent_train.json"}
BASELINES = ("unedited", "in_context", "ft", "rome")
INSTRUCTED = tuple(f"{src}_{pre}_{sim}{gate}" for src in ("gold", "retrieval") for pre in ("shipped", "knowedit")
                   for sim in ("cosine", "subject_masked") for gate in ("", "_gate"))
METHODS = BASELINES + INSTRUCTED
#: run in this order: the cheap rows first, ROME (minutes per edit on a shared CPU) last
DEFAULT_METHODS = ("unedited", "in_context", "gold_shipped_cosine", "gold_shipped_cosine_gate",
                   "retrieval_shipped_cosine", "retrieval_shipped_cosine_gate", "gold_shipped_subject_masked", "ft", "rome")
#: relation-gate calibration requests: KnowEdit training records never evaluated (recent: after the first 100)
CALIBRATION = (("counterfact/train_cf.json", 0, 150), ("recent/recent_train.json", 100, 150))
METRICS = ("Rel", "Gen", "Loc", "Por")
BOOTSTRAP = 2000
RESULT_KEYS = frozenset({"model", "date", "command", "args", "wall_minutes", "easyedit", "files", "recipe", "relation_gate",
                         "datasets", "errors", "complete", "notes", "merged_runs"})
_UNSAVED_ARGS = ("out", "render", "notes", "merge", "knowedit", "resummarize")


def easyedit_flavour(info: Any) -> str:
    """What the JSON records of the EasyEdit that ran FT, ROME and the metrics (``pypi`` or ``main``)."""
    return info.flavour


def check_same_easyedit(saved: dict, easyedit: str, out_path: Path) -> None:
    """A merge must not mix rows from two EasyEdit flavours (their FT and metrics differ): refuse it."""
    from instructedit_plugin.errors import PluginError

    recorded = saved.get("easyedit")
    if recorded is not None and recorded != easyedit:
        raise PluginError(
            f"--merge: {out_path} was measured with EasyEdit {recorded}, this run imports EasyEdit {easyedit}. "
            f"Fix: {'unset EASYEDIT_SRC' if recorded == 'pypi' else 'set EASYEDIT_SRC to the EasyEdit main clone'} "
            "and run again, or write to another --out")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--knowedit", action="store_true", help="(the flag of instructed_cpu.py that leads here)")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--limit", type=int, default=20, help="first N records of each KnowEdit file")
    p.add_argument("--rome_limit", type=int, default=None,
                   help="ROME on the first N of them only (minutes per edit on a shared CPU); default --limit. The "
                        "targets compare with ROME on its records")
    p.add_argument("--files", default=",".join(FILES), help="comma-separated subset of " + ",".join(FILES))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the knowedit recipe (default: its own)")
    p.add_argument("--knowedit_archive", default=None, help="use these prefixes instead of the knowedit recipe's")
    p.add_argument("--model_dir", default=None, help="another local base model folder (tests use tiny models)")
    p.add_argument("--shipped_archive", default="default", help="the 'shipped' prefixes (default: the package's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrieval_gate", type=float, default=0.1)
    p.add_argument("--merge", action="store_true", help="add this run's rows to the saved results (merged_runs)")
    p.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    p.add_argument("--resummarize", action="store_true",
                   help="only recompute every saved row's figures and intervals from its stored per-record values "
                        "(after a change to summarize()); recorded in merged_runs")
    p.add_argument("--notes", default=None, help="markdown file whose text ends the .md (benchmarks/notes/...)")
    p.add_argument("--out", default=None, help="default benchmarks/results/instructed_knowedit_<files>.json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / f"instructed_knowedit_{'_'.join(args.files.split(','))}.json")
    for name, allowed in (("files", FILES), ("methods", METHODS)):
        bad = [x for x in getattr(args, name).split(",") if x and x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}. Fix: use some of {', '.join(allowed)}")
    return args


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------
def summarize(records: list[list[float | None]], resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Means (percent, one decimal) of Rel/Gen/Loc/Por over records (per record ``[Rel, Gen, Loc, Por]`` in [0, 1],
    None: not measured), H of them, and 95% percentile-bootstrap intervals
    (:func:`benchmarks.results_io.edit_figures` on :func:`benchmarks.results_io.figures_with_ci`'s resamples; H's
    interval is H of each resample's means, over the resamples that hold every metric the records measure: a metric
    measured on few records (KnowEdit's portability questions on 4 of 20 WikiData-Recent records) is missing from some
    resamples, whose H of the other metrics would be another figure). ``resamples=0``: no intervals."""
    rows = [dict(zip(METRICS, r)) for r in records]
    point = edit_figures(rows, scale=1.0)  # fractions, shown in percent: rounded as the committed files were
    measured = [m for m in METRICS if point[m] is not None]
    point["H"] = point["H"] if measured else None
    keys = (*METRICS, "H")
    out = {k: (round(100 * point[k], 1) if point[k] is not None else None) for k in keys}
    if not records or resamples <= 0:
        return {**out, "ci": {}, "n": len(records)}
    figures = functools.partial(edit_figures, scale=1.0, required=measured)
    with_ci = figures_with_ci(rows, figures, resamples, seed)
    ci = {k: [round(100 * with_ci[k][1], 1), round(100 * with_ci[k][2], 1)] for k in keys if with_ci[k] is not None}
    return {**out, "ci": ci, "n": len(records)}


def resummarize(out: dict, command: str) -> dict:
    """``out`` with every row's figures and intervals recomputed by :func:`summarize` from the row's stored
    per-record values (nothing re-run); the rows whose figures changed are recorded in ``merged_runs``."""
    out = json.loads(json.dumps(out))
    changed = []
    for ds, rows in out["datasets"].items():
        for method, row in rows.items():
            fresh = dict(summarize(row["records"]), records=row["records"])
            if fresh != row:
                rows[method] = fresh
                changed.append(f"datasets.{ds}.{method}")
    if changed:
        out.setdefault("merged_runs", []).append(merged_run(
            command, changed, note="Figures and intervals recomputed from the rows' stored per-record values "
                                   "(nothing re-run)."))
    return out


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run_method(editor, requests, name: str) -> tuple[list[list], list[list], list[str]]:
    """``(post rows, pre rows, errors)``: per record [Rel, Gen, Loc, Por] in [0, 1] (None: not measured); every
    request with its ``subject`` (as EasyEdit's KnowEdit script passes it)."""
    from instructedit_plugin.evaluation.summary import edit_metrics

    metrics, _, errors = run_edits(editor, requests, name, with_subject=True, log=LOG)
    post, pre = [], []
    for m in metrics:
        row = edit_metrics(m["post"], m.get("pre"))
        post.append([row[k] for k in METRICS])
        before = edit_metrics(m.get("pre") or {})
        pre.append([before["Rel"], before["Gen"], 1.0 if row["Loc"] is not None else None, before["Por"]])
    return post, pre, errors


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None
    command = command_line(SCRIPT.split()[0], argv)
    if args.resummarize:
        out = resummarize(json.loads(Path(args.out).read_text(encoding="utf-8")), command)
        print(write_results(args.out, out, render_markdown, RESULT_KEYS, notes).read_text(encoding="utf-8"), end="")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    setup_logging()
    started = time.perf_counter()

    import instructedit_plugin
    import instructedit_plugin.instructed  # noqa: F401 - registers InstructEd

    easyedit = easyedit_flavour(instructedit_plugin.register())
    from easyeditor import FTHyperParams, ROMEHyperParams

    from instructedit_plugin.compat import load_easyedit_hparams, make_editor
    from instructedit_plugin.data import load_requests, resolve_data_dir
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, reset_memory
    from instructedit_plugin.instructed.recipes import KNOWEDIT, recipe_info, train_embedded_prefixes
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm

    methods = [m for m in args.methods.split(",") if m]
    files = [f for f in args.files.split(",") if f]
    data_dir = resolve_data_dir(args.data_dir)
    model_dir = args.model_dir or str(embedded_model_dir())
    archives = {"shipped": args.shipped_archive}
    recipe = None
    if any("_knowedit_" in m for m in methods):
        archive = args.knowedit_archive or str(train_embedded_prefixes(
            config=KNOWEDIT, steps=args.steps, data_dir=data_dir, dtype=args.dtype, model_dir=args.model_dir))
        archives["knowedit"] = archive
        info = recipe_info(archive) if not args.knowedit_archive else None
        if info is not None:
            recipe = {"config": info["recipe"], "key": info.get("key"), "steps": info["steps"],
                      "stopped_by_budget": bool(info["stopped_by_budget"]), "train_edits": info["train_edits"],
                      "sources": info["data"]["sources"], "train_seconds": round(float(info["train_seconds"]), 1),
                      "edit_examples": info.get("edit_examples"), "unmodified_examples": info.get("unmodified_examples")}

    gate_info = None
    out_path = Path(args.out)
    saved_gate = (json.loads(out_path.read_text(encoding="utf-8")).get("relation_gate")
                  if args.merge and out_path.is_file() else None)
    if saved_gate and any(m.endswith("_gate") for m in methods):
        gate_info = saved_gate  # --merge: the rows of one file share one calibration (the saved one)
        LOG.info("relation gate from %s: %s", out_path, gate_info)
    elif any(m.endswith("_gate") for m in methods):  # the threshold, from held-out KnowEdit training records
        from instructedit_plugin.instructed.lm import load_encoder
        from instructedit_plugin.instructed.similarity import calibrate_relation_gate

        calibration = [r for rel, skip, count in CALIBRATION for r in list(load_requests(data_dir / rel))[skip:skip + count]]
        gate_info = dict(calibrate_relation_gate(load_encoder("default"), calibration,
                                                 locality_keys=["Relation_Specificity"]),
                         calibration=[f"{rel} records {skip}-{skip + count - 1}" for rel, skip, count in CALIBRATION])
        LOG.info("relation gate: %s", gate_info)

    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    ft_hp = load_easyedit_hparams(FTHyperParams, ROOT / "hparams/FT/gemma-3-270m.yaml", model_name=model_dir)
    rome_hp = load_easyedit_hparams(ROMEHyperParams, ROOT / "hparams/ROME/gemma-3-270m.yaml", model_name=model_dir)

    def hparams(method: str):
        if method in ("ft", "unedited"):
            return ft_hp
        if method == "rome":
            return rome_hp
        common = dict(alg_name="InstructEd", model_name=model_dir, device="cpu", max_length=40,
                      retrieval_gate=args.retrieval_gate)
        if method == "in_context":
            return InstructEdHyperParams.from_dict(dict(common, archive=archives["shipped"], use_prefixes=False))
        gate = method.endswith("_gate")
        source, prefixes, similarity = method.removesuffix("_gate").split("_", 2)
        return InstructEdHyperParams.from_dict(dict(common, archive=archives[prefixes], similarity=similarity,
                                                    instruction_source=source,
                                                    relation_gate=gate_info["threshold"] if gate else None))

    results: dict = {}
    errors: dict = {}
    out_path = Path(args.out)
    saved_args = {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS}
    base_out = json.loads(out_path.read_text(encoding="utf-8")) if args.merge and out_path.is_file() else None
    if base_out is not None:
        check_same_easyedit(base_out, easyedit, out_path)

    def save(complete: bool) -> Path:
        """Write what is measured so far (after every method: a stopped run keeps its finished rows)."""
        if base_out is not None:
            out = json.loads(json.dumps(base_out))
            keys = []
            for ds, rows in results.items():
                merged = dict(out["datasets"].get(ds, {}))
                merged.update(rows)
                out["datasets"][ds] = {m: merged[m] for m in METHODS if m in merged}
                keys += [f"datasets.{ds}.{m}" for m in rows]
            out["errors"].update(errors)
            for key, value in (("recipe", recipe), ("relation_gate", gate_info), ("easyedit", easyedit)):
                if value is not None and value != out.get(key):
                    out[key] = value
                    keys.append(key)
            out.setdefault("merged_runs", []).append(merged_run(command, keys))
        else:
            out = {"model": (f"{model_dir} ({args.dtype})" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype})"),
                   "date": today(), "command": command, "args": saved_args,
                   "wall_minutes": round((time.perf_counter() - started) / 60, 1), "complete": complete,
                   "easyedit": easyedit,
                   "files": {ds: FILES[ds] for ds in files}, "recipe": recipe, "relation_gate": gate_info,
                   "datasets": {ds: {m: rows[m] for m in METHODS if m in rows} for ds, rows in results.items()},
                   "errors": errors}
        return write_results(out_path, out, render_markdown, RESULT_KEYS, notes)

    for ds in files:
        requests = [dict(r) for r in load_requests(data_dir / FILES[ds], limit=args.limit)]
        for r in requests:
            r.pop("generate_prompts", None)
        results[ds] = {}
        pre_rows = None
        for method in methods:
            if method == "unedited":
                continue
            t0 = time.perf_counter()
            hp = hparams(method)
            editor = make_editor(hp, model, tok)
            reset_memory(model)
            if method.startswith("retrieval_"):  # the memory holds every evaluated edit of this file
                apply_instructed_to_model(model, tok, [dict(r) for r in requests], hp, keep_original_weight=False)
            float_run = method == "rome" and model.dtype != torch.float32
            model_dtype = model.dtype
            if float_run:  # EasyEdit's ROME mixes its float32 vectors with the model's dtype
                model.float()
            try:
                subset = requests[: args.rome_limit] if method == "rome" and args.rome_limit else requests
                post, pre, errs = run_method(editor, subset, f"{ds}/{method}")
            finally:
                if float_run:
                    model.to(model_dtype)
                reset_memory(model)
            results[ds][method] = dict(summarize(post), records=[[None if v is None else round(v, 4) for v in r]
                                                                 for r in post])
            if pre_rows is None and pre and len(pre) == len(requests):
                pre_rows = pre
                if "unedited" in methods:
                    results[ds]["unedited"] = dict(summarize(pre_rows), records=[
                        [None if v is None else round(v, 4) for v in r] for r in pre_rows])
            if errs:
                errors[f"{ds}/{method}"] = errs[:5] + ([f"... {len(errs) - 5} more"] if len(errs) > 5 else [])
            LOG.info("%s %s: %s (%.0fs)", ds, method, {k: results[ds][method][k] for k in METRICS + ("H",)},
                     time.perf_counter() - t0)
            save(complete=False)
    md_path = save(complete=True)
    print(md_path.read_text(encoding="utf-8"), end="")
    return 0


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    ci = (row.get("ci") or {}).get(key)
    return f"{v:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{v:.1f}"


def check_targets(out: dict) -> list[tuple[str, bool, str]]:
    """(target, met?, figures): #14 item 4 for each file and InstructEd row (Loc >= 80, Rel >= 90, H above FT
    and ROME)."""
    rows = []
    for ds, methods in out["datasets"].items():
        for m, r in methods.items():
            if m in BASELINES:
                continue
            compared = []  # (baseline, its H, this row's H on the baseline's records: the first n)
            for o in ("ft", "rome"):
                if o in methods and methods[o]["H"] is not None:
                    n = methods[o]["n"]
                    own = r["H"] if n >= r["n"] else summarize(r["records"][:n], resamples=0)["H"]
                    compared.append((o, methods[o]["H"], own, n))
            ok = (r["Loc"] is not None and r["Loc"] >= 80 and r["Rel"] is not None and r["Rel"] >= 90
                  and len(compared) == 2 and all(own > h for _, h, own, _ in compared))
            rows.append((f"{ds}: {m}", ok, f"Rel {r['Rel']}, Loc {r['Loc']}; H " + ", ".join(
                f"{own} vs {o} {h}" + ("" if n >= r["n"] else f" (first {n} records)") for o, h, own, n in compared)))
    return rows


def render_markdown(out: dict) -> str:
    """``instructed_knowedit.md`` from ``instructed_knowedit.json`` alone."""
    args = out["args"]
    lines = [
        "# InstructEd on KnowEdit (CPU, embedded Gemma-3-270M)",
        "",
        "Produced by `benchmarks/instructed_cpu.py --knowedit` (module `benchmarks/instructed_knowedit.py`): EasyEdit",
        "`BaseEditor.edit` + `compute_edit_quality`, one edit per call, weights / memory restored afterwards; percent,",
        f"each with its 95% bootstrap interval over records ({BOOTSTRAP} resamples; H's interval is H of the resampled",
        "means). Rel = rewrite_acc, Gen = rephrase_acc, Loc = locality (KnowEdit's same-subject Relation_Specificity",
        "and Forgetfulness questions, token agreement with the unedited model), Por = portability; H = harmonic mean of",
        "the measured ones. Rendered from `instructed_knowedit.json` (`--knowedit --render`).",
        "",
        "## Configuration",
        "",
        f"* Command: `{out['command']}` ({out['date']}); model {out['model']}, torch threads {args['threads']}"
        + (f"; wall time {out['wall_minutes']:.1f} min." if out.get("wall_minutes") is not None else "."),
        *([f"* EasyEdit (FT, ROME, metrics): {out['easyedit']}; every merged run used the same."] if out.get("easyedit") else []),
        f"* Records: the first {args['limit']} of " + ", ".join(f"`{f}` ({ds})" for ds, f in out["files"].items())
        + "; `recent_train.json` stands in for KnowEdit's recent test file (not available offline).",
        "* Rows `<source>_<prefixes>_<similarity>`: `gold` = each input its own edit's instruction, `retrieval` = a memory"
        f" of every evaluated edit of the file (std gate {args['retrieval_gate']} over the top 5); `shipped` = the"
        " demo's prefixes (default recipe, paper cosine), `knowedit` = the `knowedit` recipe's; `cosine` = the"
        " paper's similarity, `subject_masked` = the edit's subject removed from question and instruction first.",
    ]
    rec = out.get("recipe")
    if rec:
        cfg = rec["config"]
        lines.append(
            f"* `knowedit` prefixes: recipe `{cfg['name']}`, step {rec['steps']} of {cfg['steps']}"
            + (" (STOPPED BY THE SAFETY CAP)" if rec["stopped_by_budget"] else "")
            + f", {rec['train_edits']} training edits ("
            + ", ".join(f"{k} {v['taken']} from `{v['file']}`" for k, v in rec["sources"].items())
            + f"), up to {cfg['max_locality']} locality prompts per edit, similarity `{cfg['similarity']}`, "
            f"{rec.get('edit_examples')} edit + {rec.get('unmodified_examples')} unmodified examples, "
            f"{rec['train_seconds']:.0f} s.")
    gate = out.get("relation_gate")
    if gate:
        lines.append(
            f"* `_gate` rows: relation gate at **{gate['threshold']}** (the subject-masked similarity of question and "
            f"edit below which an input is answered without its instruction), calibrated on "
            + "; ".join(f"`{c}`" for c in gate["calibration"])
            + f" (balanced accuracy {gate['balanced_accuracy']}: keeps {100 * gate['kept_own']:.1f}% of "
            f"{gate['n_own']} own questions, blocks {100 * gate['blocked_locality']:.1f}% of {gate['n_locality']} "
            "Relation_Specificity questions).")
    if args.get("rome_limit"):
        lines.append(f"* ROME on the first {args['rome_limit']} records only (minutes per edit on the shared CPU).")
    lines += ["* ROME: float32, `mom2_adjustment: false` (no Wikipedia statistics offline)."]
    if out.get("complete") is False:
        lines.append("* **Incomplete run**: the rows below are those measured before it stopped.")
    lines += ["", "## Results", ""]
    for ds, methods in out["datasets"].items():
        lines += [f"### {ds}", "", "| method | n | Rel | Gen | Loc | Por | H |", "|---|---|---|---|---|---|---|"]
        for m, r in methods.items():
            lines.append(f"| {m} | {r['n']} | " + " | ".join(_cell(r, k) for k in METRICS + ("H",)) + " |")
        lines.append("")
    lines += ["## Targets (#14 item 4: Loc >= 80, Rel >= 90, H above FT and ROME)", "",
              "| file: row | met | figures |", "|---|---|---|"]
    for name, ok, fig in check_targets(out):
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {fig} |")
    if out.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()]
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
