"""CPU benchmark: InstructEdit vs MEND without instructions on the embedded Gemma-3-270M.

Trains, on the same data with the same editor network and trainer
(:class:`~instructedit_plugin.instructedit.trainer.InstructEditTrainer` with ``answer_logits=True``):

* ``instructedit``: multi-task (counterfact, recent, convsent), instruction-prefixed inputs;
* ``mend_multitask``: the same tasks, instructions switched off (plain multi-task MEND);
* ``mend_single_task``: CounterFact only, no instructions (skipped with ``--no_single_task``);

under one of two protocols (``--protocol``):

* ``paper`` (default), InstructEdit's as EasyEdit runs it: the paper's GPT-4 task descriptions
  (``<data>/instructedit/easyedit_task_descriptions.json``, 10 per task, the 10th held out),
  metrics on *instructed* inputs (the instruction before the edit prompt, the rephrase and the
  portability questions; locality plain) with the plain-input scores reported beside, no extra
  loss on the plain prompt (``raw_edit_loss: false``), tasks mixed by records with ConvSent
  subsampled (``--convsent_subsample``), ConvSent edits in both directions (records alternate
  positive/negative) with EasyEdit's sentiment ES and Fluency (n-gram entropy of a greedy reply);
* ``plugin``, the earlier setting, kept as a labelled option: the shipped descriptions, plain
  metric inputs, ``raw_edit_loss: true``, tasks drawn uniformly, ConvSent positive only, no Fluency.

Every switch can also be set on its own (``--instructions``, ``--metric_inputs``,
``--raw_edit_loss``, ``--task_mixing``, ``--convsent_subsample``, ``--convsent_direction``,
``--fluency_tokens``); the JSON records the settings used (``protocol``).

``--tasks`` names the test tasks to evaluate and their order; the result files are rewritten after
each task (a partial file lists ``evaluated_tasks``), so a run stopped early keeps what it finished.
``--merge_from PART.json`` runs nothing: it adds the tasks of a saved part (the same command with
``--tasks`` naming the missing tasks and another ``--out``) to the saved ``--out`` file, after checking
that both were made with the same settings (:func:`merge_results`; the part's command and the keys it
set are recorded in ``merged_runs``).

All editors train for the same number of steps: InstructEdit trains for half of
``--budget_minutes`` (its steps are the most expensive: the instruction makes
the inputs 3-4x longer), the baselines for the same step count. Then it edits
the first ``--n_test`` records of each test file (CounterFact: KnowEdit
``test_cf``; Recent: a seeded hold-out split of ``recent_train``, never trained
on; ConvSent: ``blender_test``; hold-out ZsRE: ``zsre_mend_eval_portability_gpt4``)
and writes ``benchmarks/results/instructedit_cpu.json`` (everything the report shows, the command
and, with ``--notes``, the notes file's text) and ``.md``, rendered from the JSON alone (see
``benchmarks/results_io.py``). Every figure (Rel/Gen/Loc/Por/Score of every table, the ConvSent
sentiment and Fluency figures, the median edit latency and the InstructEdit/MEND latency ratio) carries
a 95% percentile-bootstrap interval over the edited records (``--bootstrap`` resamples, seeded by
``--seed``; :func:`benchmarks.results_io.figures_with_ci`); the per-edit values they are computed from
are kept in the JSON (``records``, ``edit_ms_per_edit``), so :func:`cell_from_columns` recomputes each
cell from them alone.

Run from the repository root::

    python benchmarks/instructedit_cpu.py --data_dir ../shared/data --notes benchmarks/notes/instructedit_cpu.md
    python benchmarks/instructedit_cpu.py --data_dir ../shared/data --budget_minutes 3 --n_test 10   # quick
    python benchmarks/instructedit_cpu.py --render      # rebuild the .md from the .json (--notes FILE: new notes)
    python benchmarks/instructedit_cpu.py --merge_from part.json --out benchmarks/results/instructedit_cpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import paper_figures  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    DEFAULT_RESAMPLES, bootstrap_ci, command_line, edit_figures, figures_with_ci, merged_run, merged_runs_lines, notes_lines,
    produced_by, read_notes, render_saved, today, write_results,
)

LOG = logging.getLogger("instructedit_cpu")
HOLDOUT_TASK = "zsre_holdout"  # instructedit_plugin.instructedit.evaluate.HOLDOUT_TASK (checked in main)
TASK_ORDER = ("counterfact", "recent", "convsent", HOLDOUT_TASK)
METRICS = ("Rel", "Gen", "Loc", "Por")
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "gemma-3-270m.yaml"
SCRIPT = "benchmarks/instructedit_cpu.py"
#: Every top-level key this script writes into ``instructedit_cpu.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "model", "train_steps", "train_seconds", "tasks", "unseen_instruction", "latency",  # the figures
    "n_edits", "method_notes",  # records edited per task; what the metrics mean (from evaluate_instructedit)
    "date", "command", "args", "inner_params", "runs", "train_records", "test_records",  # the run
    "eval_seconds", "wall_seconds", "protocol",  # the protocol's settings
    "tasks_plain_inputs", "unseen_instruction_plain_inputs",  # instructed methods scored on plain inputs beside
    "notes", "merged_runs",  # --notes text; other sources merged in
    "records", "edit_ms_per_edit", "latency_ratio",  # per-edit values every interval is computed from
    "evaluated_tasks",  # the tasks evaluated so far, in evaluation order (absent: every test task)
})
_UNSAVED_ARGS = ("out", "render", "notes", "work_dir", "merge_from")
#: --protocol -> the settings it stands for (each may be overridden by its own option)
PROTOCOLS = {
    "paper": {"instructions": "easyedit", "metric_inputs": "instructed,plain", "raw_edit_loss": False,
              "task_mixing": "records", "convsent_subsample": 1427, "convsent_direction": "both", "fluency_tokens": 32},
    "plugin": {"instructions": "plugin", "metric_inputs": "plain", "raw_edit_loss": True,
               "task_mixing": "uniform", "convsent_subsample": None, "convsent_direction": "positive", "fluency_tokens": 0},
}
SECTIONS = (("tasks", "Seen instruction / baselines"), ("unseen_instruction", "Unseen (held-back) instruction"),
            ("tasks_plain_inputs", "Seen instruction, scored on plain inputs (beside the paper's instructed inputs)"),
            ("unseen_instruction_plain_inputs", "Unseen instruction, scored on plain inputs"))
#: sections the paper's figures are quoted in (it scores instructed inputs only, never the plain-input sections)
PAPER_SECTIONS = ("tasks", "unseen_instruction")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def protocol_settings(args: argparse.Namespace) -> dict:
    """The protocol's settings with the options given on the command line in their place."""
    settings = dict(PROTOCOLS[args.protocol])
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["convsent_subsample"] == 0:
        settings["convsent_subsample"] = None
    settings["metric_inputs"] = [s.strip() for s in str(settings["metric_inputs"]).split(",") if s.strip()]
    return {"name": args.protocol, **settings}


def add_editor_arguments(p: argparse.ArgumentParser, *, max_pairs: int, layers: str, cedit: float, cloc: float,
                         layers_help: str = "decoder layers whose MLP up/down projections are edited") -> None:
    """The editor and run options every InstructEdit benchmark shares (this one and ``instructedit_analyses.py``);
    each names its own defaults for the edited layers and the loss weights (those of its committed results)."""
    p.add_argument("--max_pairs", type=int, default=max_pairs, help="locality/portability prompts scored per key and record")
    p.add_argument("--layers", default=layers, help=layers_help)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--edit_lr", type=float, default=1e-6)
    p.add_argument("--lr_lr", type=float, default=1e-6)
    p.add_argument("--cedit", type=float, default=cedit, help="weight of the edit loss")
    p.add_argument("--cloc", type=float, default=cloc, help="weight of the locality (KL) loss")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--budget_minutes", type=float, default=15.0, help="CPU training budget for all editors together")
    p.add_argument("--max_iters", type=int, default=None,
                   help="train every editor exactly this many steps (reproducible under load; replaces --budget_minutes)")
    p.add_argument("--n_test", type=int, default=100, help="records per test file (first N)")
    p.add_argument("--n_train", type=int, default=2000, help="at most this many training records per task")
    # the locality settings of #13 item 5 (results/instructedit_cpu.md); until then 16,17 / cedit 1.0 (instructedit_cpu_cedit1.md)
    add_editor_arguments(p, max_pairs=4, layers="17", cedit=0.1, cloc=1.0)
    p.add_argument("--no_single_task", action="store_true", help="skip the single-task MEND baseline")
    p.add_argument("--protocol", default="paper", choices=sorted(PROTOCOLS),
                   help="paper: InstructEdit's protocol as EasyEdit runs it; plugin: the earlier setting (see the docstring)")
    p.add_argument("--instructions", default=None, help="instruction library: easyedit, plugin or a path (default: protocol's)")
    p.add_argument("--metric_inputs", default=None,
                   help="comma-separated: instructed, plain; the first is the main table (default: protocol's)")
    p.add_argument("--raw_edit_loss", type=_bool, default=None, help="true/false (default: protocol's)")
    p.add_argument("--task_mixing", default=None, choices=("records", "uniform"), help="(default: protocol's)")
    p.add_argument("--convsent_subsample", type=int, default=None,
                   help="ConvSent training records kept (0: all; default: protocol's)")
    p.add_argument("--convsent_direction", default=None, choices=("both", "positive", "negative"),
                   help="(default: protocol's)")
    p.add_argument("--fluency_tokens", type=int, default=None,
                   help="ConvSent reply length for Fluency (0: none; default: protocol's)")
    p.add_argument("--work_dir", default=None,
                   help="editor checkpoints (default: a fresh temporary folder, outside the repository)")
    p.add_argument("--tasks", default=",".join(TASK_ORDER),
                   help="test tasks to evaluate, in this order; the result files are rewritten after each task, so a "
                        "run stopped early keeps the tasks it finished (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructedit_cpu.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of every 95%% interval (records resampled, seeded by --seed)")
    p.add_argument("--model_dir", default=None,
                   help="another local base model folder instead of the embedded Gemma-3-270M (tests use tiny models)")
    p.add_argument("--render", action="store_true",
                   help="only rebuild the .md from the saved .json (with --notes: replace the JSON's notes first)")
    p.add_argument("--notes", default=None,
                   help="markdown file whose text goes into the JSON as the run's notes and ends the .md "
                        "(e.g. benchmarks/notes/instructedit_cpu.md)")
    p.add_argument("--merge_from", default=None, metavar="PART_JSON",
                   help="run nothing: add the tasks of this saved part (same settings, other --tasks) to the saved "
                        "--out file and rebuild its .md (with --notes: replace its notes too)")
    args = p.parse_args(argv)
    if args.merge_from and args.render:
        p.error("--merge_from and --render: both only rewrite the saved --out file. Fix: pass one of them "
                "(--merge_from also rebuilds the .md)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASK_ORDER))
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        p.error(f"--tasks {args.tasks!r}: unknown or repeated tasks {unknown or tasks}. "
                f"Fix: name each of {', '.join(TASK_ORDER)} at most once, comma-separated")
    args.tasks = ",".join(tasks)
    return args


# ----------------------------------------------------------------------------------------------
# Per-edit values and their 95% bootstrap intervals
# ----------------------------------------------------------------------------------------------
#: ConvSent figures: success / flipped / ES in percent (per edit 0 or 100, ES 0-100), margins and Fluency as measured
SENTIMENT_FIGURES = ("success_pre", "success_post", "margin_pre", "margin_post", "flipped", "es",
                     "fluency_pre", "fluency_post")
_PERCENT_SENTIMENT = {"success_pre", "success_post", "flipped", "es"}


def _rounded(value, scale: float = 1.0):
    return None if value is None else round(scale * float(value), 4)


def record_columns(values: list[dict]) -> dict:
    """The JSON's per-edit values of one cell (``records.<section>.<task>.<method>``) from
    :func:`~instructedit_plugin.instructedit.evaluate.record_values` of each edit, in edit order:
    ``{"Rel": [...], "Gen", "Loc", "Por"}`` in percent (None: not measured for that edit) and, for
    ConvSent, ``{"sentiment": {figure: [...]}}`` (``SENTIMENT_FIGURES``)."""
    cols: dict = {m: [_rounded(v[m], 100.0) for v in values] for m in METRICS}
    if any(v.get("sentiment") for v in values):
        cols["sentiment"] = {k: [_rounded((v.get("sentiment") or {}).get(k), 100.0 if k in _PERCENT_SENTIMENT else 1.0)
                                 for v in values] for k in SENTIMENT_FIGURES}
    return cols


def _means(rows: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = math.fsum(vals) / len(vals) if vals else None
    return out


def metric_figures(rows: list[dict]) -> dict:
    """Rel/Gen/Loc/Por: means over the edits that measured them (as the records hold them, ``math.fsum``); Score: the
    mean of those means, negatives as 0 (:func:`benchmarks.results_io.edit_figures`, which adds H)."""
    return edit_figures(rows, summation=math.fsum, scale=1.0)


def cell_from_columns(cols: dict, n_boot: int, seed: int) -> dict:
    """A results cell from its per-edit values alone (``record_columns``): each figure with its 95% bootstrap
    interval over the edits (:func:`benchmarks.results_io.figures_with_ci`; Score recomputed from each
    resample's means). ``{"Rel", "Gen", "Loc", "Por", "Score", "ci": {figure: [low, high]}, "n"[, "sentiment"]}``."""
    rows = [dict(zip(METRICS, vals)) for vals in zip(*(cols[m] for m in METRICS))]
    figs = figures_with_ci(rows, metric_figures, n_boot, seed, digits=2) if rows else {}
    cell: dict = {m: (figs[m][0] if figs.get(m) else None) for m in (*METRICS, "Score")}
    cell["ci"] = {m: figs[m][1:] for m in (*METRICS, "Score") if figs.get(m)}
    cell["n"] = len(rows)
    if cols.get("sentiment"):
        sent_rows = [dict(zip(SENTIMENT_FIGURES, vals)) for vals in zip(*(cols["sentiment"][k] for k in SENTIMENT_FIGURES))]
        sent_rows = [r for r in sent_rows if r["success_pre"] is not None]  # scored before and after the edit
        sfigs = figures_with_ci(sent_rows, lambda rs: _means(rs, SENTIMENT_FIGURES), n_boot, seed, digits=4) if sent_rows else {}
        cell["sentiment"] = {k: (sfigs[k][0] if sfigs.get(k) else None) for k in SENTIMENT_FIGURES}
        cell["sentiment"]["ci"] = {k: sfigs[k][1:] for k in SENTIMENT_FIGURES if sfigs.get(k)}
        cell["sentiment"]["n_edits"] = len(sent_rows)
    return cell


def latency_figures(edit_ms: dict, n_boot: int, seed: int) -> tuple[dict, dict | None]:
    """``({method: {"edit_ms": median, "ci": {"edit_ms": [low, high]}, "n"}}, {"instructedit/mend_multitask": ratio})``: median edit
    latency with its 95% bootstrap interval, and the ratio of the medians ``[ratio, low, high]`` with the edits
    resampled in pairs (both methods edit the same records in the same order)."""
    import statistics

    latency = {}
    for method, ms in edit_ms.items():
        if ms:
            lo, hi = bootstrap_ci(ms, n_boot, seed, statistic=statistics.median)
            latency[method] = {"edit_ms": round(statistics.median(ms), 2), "ci": {"edit_ms": [round(lo, 2), round(hi, 2)]},
                               "n": len(ms)}
    ie, mm = edit_ms.get("instructedit") or [], edit_ms.get("mend_multitask") or []
    ratio = None
    if ie and len(ie) == len(mm):
        def median_ratio(pairs):
            return {"ratio": statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)}

        ratio = {"instructedit/mend_multitask": figures_with_ci(list(zip(ie, mm)), median_ratio, n_boot, seed, digits=3)["ratio"]}
    return latency, ratio


# ----------------------------------------------------------------------------------------------
# Merging a saved part (--merge_from)
# ----------------------------------------------------------------------------------------------
class MergeError(ValueError):
    """A part that cannot be merged into a saved result (other settings, a task both hold, no per-edit values)."""


#: saved settings a part may differ in: which tasks it evaluated, and where it read the (same) data from
MERGE_FREE_ARGS = ("tasks", "data_dir")
#: run-level keys that must agree, besides ``args``: the same editors, trained on the same records, the same tests
MERGE_SAME_KEYS = ("model", "protocol", "inner_params", "train_steps", "train_records", "test_records")
#: the per-task blocks a part brings: the figure sections and their per-edit values
_TASK_SECTIONS = tuple(section for section, _ in SECTIONS)


def evaluated_tasks(out: dict) -> list[str]:
    """The tasks a saved result evaluated, in evaluation order (a whole run: ``TASK_ORDER``)."""
    return list(out.get("evaluated_tasks") or [t for t in TASK_ORDER if t in (out.get("n_edits") or {})])


def merge_mismatches(base: dict, part: dict) -> list[str]:
    """``'<field>: <base value> here, <part value> in the part'`` for every setting the two runs do not share
    (``args`` other than ``MERGE_FREE_ARGS``, compared where both record them, and ``MERGE_SAME_KEYS``)."""
    diffs = []
    base_args, part_args = base.get("args") or {}, part.get("args") or {}
    for key in base_args:
        if key in part_args and key not in MERGE_FREE_ARGS and base_args[key] != part_args[key]:
            diffs.append(f"args.{key}: {base_args[key]!r} here, {part_args[key]!r} in the part")
    for key in MERGE_SAME_KEYS:
        if base.get(key) != part.get(key):
            diffs.append(f"{key}: {base.get(key)!r} here, {part.get(key)!r} in the part")
    return diffs


def merge_results(base: dict, part: dict, *, base_name: str = "the saved file", part_name: str = "the part",
                  merged_by: str | None = None) -> dict:
    """``base`` (a saved result of this script) with the tasks ``part`` evaluated added: their cells of every
    section and their per-edit values (``records``), ``n_edits``, the evaluation order, and the part's edit
    latencies appended to the saved ones (median latencies and their ratio recomputed with the saved run's
    ``--bootstrap`` / ``--seed``). The configuration (command, args, training and evaluation times, notes)
    stays ``base``'s; ``merged_runs`` gains the part's command, the keys it set and its date.

    Raises :class:`MergeError` when the two runs differ in a setting (:func:`merge_mismatches`: other
    editors, protocol, records or interval settings), when both evaluated a task, or when either lacks
    the per-edit values a merged interval is computed from."""
    for name, out in ((base_name, base), (part_name, part)):
        if not out.get("records") or not out.get("edit_ms_per_edit"):
            raise MergeError(f"{name}: no per-edit values (`records`, `edit_ms_per_edit`), so merged intervals cannot "
                             "be computed. Fix: merge results written by this script since it keeps per-edit values")
    diffs = merge_mismatches(base, part)
    if diffs:
        raise MergeError(f"{part_name} was not made with the settings of {base_name}: " + "; ".join(diffs)
                         + f". Fix: re-run the part with the saved command (`{base.get('command')}`), changing only "
                         "--tasks and --out")
    base_tasks, part_tasks = evaluated_tasks(base), evaluated_tasks(part)
    both = [t for t in part_tasks if t in base_tasks]
    if both:
        raise MergeError(f"{part_name}: tasks {', '.join(both)} are already in {base_name} (evaluated: "
                         f"{', '.join(base_tasks)}). Fix: merge a part whose --tasks names only tasks the saved file "
                         f"lacks ({', '.join(t for t in TASK_ORDER if t not in base_tasks) or 'none'})")
    if sorted(part["edit_ms_per_edit"]) != sorted(base["edit_ms_per_edit"]):
        raise MergeError(f"{part_name} edited with methods {sorted(part['edit_ms_per_edit'])}, {base_name} with "
                         f"{sorted(base['edit_ms_per_edit'])}. Fix: pass --no_single_task to both runs or to neither")

    out = json.loads(json.dumps(base))
    keys: list[str] = []
    for section in _TASK_SECTIONS:
        for block, prefix in ((out, section), (out.setdefault("records", {}), f"records.{section}")):
            source = part if block is out else part["records"]
            added = {t: v for t, v in (source.get(section) or {}).items() if t in part_tasks}
            if added:
                merged = {**(block.get(section) or {}), **added}
                block[section] = {t: merged[t] for t in TASK_ORDER if t in merged}
                keys += [f"{prefix}.{t}" for t in added]
    n_edits = {**out.get("n_edits", {}), **{t: part["n_edits"][t] for t in part_tasks}}
    out["n_edits"] = {t: n_edits[t] for t in TASK_ORDER if t in n_edits}
    keys += [f"n_edits.{t}" for t in part_tasks]
    order = base_tasks + part_tasks
    out.pop("evaluated_tasks", None)
    if order != list(TASK_ORDER):
        out["evaluated_tasks"] = order
    keys.append("evaluated_tasks")
    out["edit_ms_per_edit"] = {m: ms + part["edit_ms_per_edit"][m] for m, ms in out["edit_ms_per_edit"].items()}
    latency, ratio = latency_figures(out["edit_ms_per_edit"], out["args"]["bootstrap"], out["args"]["seed"])
    out["latency"] = latency
    out.pop("latency_ratio", None)
    if ratio:
        out["latency_ratio"] = ratio
    keys += ["edit_ms_per_edit", "latency"] + (["latency_ratio"] if ratio else [])
    added_notes = {k: v for k, v in (part.get("method_notes") or {}).items() if k not in (out.get("method_notes") or {})}
    if added_notes:
        out["method_notes"] = {**(out.get("method_notes") or {}), **added_notes}
        keys += [f"method_notes.{k}" for k in added_notes]
    trained = "; ".join(f"{name} {r['steps']} steps in {r['wall_s']:.0f} s" for name, r in part["runs"].items())
    note = (f"Tasks {', '.join(part_tasks)} evaluated by this separate run of the same settings, which trained its own "
            f"editors with the same seed ({trained}) and evaluated in {part['eval_seconds']:.0f} s; its edit latencies "
            "are appended to this run's before the medians are taken."
            + (f" Merged with `{merged_by}`." if merged_by else ""))
    out["merged_runs"] = [*(out.get("merged_runs") or []), merged_run(part["command"], keys, note=note, date=part.get("date"))]
    return out


# ----------------------------------------------------------------------------------------------
# Report (from the JSON alone)
# ----------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _score(cell: dict) -> float | None:
    """InstructEd's Score: as stored (with its interval), else the mean of the measured metrics of a cell
    (results written before the intervals)."""
    if "Score" in cell:
        return cell["Score"]
    values = [max(float(cell[m]), 0.0) for m in METRICS if cell.get(m) is not None]
    return sum(values) / len(values) if values else None


def _with_ci(block: dict, key: str, digits: int = 2, value=None) -> str:
    """``value [low, high]`` when ``block["ci"]`` holds the figure's 95% interval, else the value alone."""
    value = block.get(key) if value is None else value
    ci = (block.get("ci") or {}).get(key)
    if value is None or not ci:
        return _fmt(value, digits)
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _ci_text(block: dict, key: str, digits: int = 1) -> str:
    ci = (block.get("ci") or {}).get(key)
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def targets(out: dict) -> list[str]:
    """One line per target of issue #13 item 5, with its figures and 95% intervals where the JSON has them;
    met / missed is decided on the point estimates."""
    tasks = out["tasks"]
    both = [t for t in TASK_ORDER if "instructedit" in tasks.get(t, {}) and "mend_multitask" in tasks.get(t, {})]

    def pair(t, m):
        ie, mm = tasks[t]["instructedit"], tasks[t]["mend_multitask"]
        a, b = (_score(ie), _score(mm)) if m == "Score" else (ie.get(m), mm.get(m))
        return a, b, f"{t} {_fmt(a)}{_ci_text(ie, m)} vs {_fmt(b)}{_ci_text(mm, m)}"

    def line(label, m, ok):
        rows = [pair(t, m) for t in both]
        rows = [r for r in rows if r[0] is not None and r[1] is not None]
        met = all(ok(a, b) for a, b, _ in rows)
        return f"- {label}: " + "; ".join(text for _, _, text in rows) + f": {'met' if met else 'missed'}"

    gaps = {t: (tasks[t]["instructedit"]["Rel"] - out["unseen_instruction"][t]["instructedit"]["Rel"])
            for t in TASK_ORDER if t in tasks and t in (out.get("unseen_instruction") or {})}
    lat = out.get("latency") or {}
    lines = [
        line("Score, InstructEdit vs multi-task MEND (target >=, every task)", "Score", lambda a, b: a >= b),
        line("Loc (target within 5 points of MEND, every task)", "Loc", lambda a, b: a >= b - 5),
        line("Rel (target not below MEND)", "Rel", lambda a, b: a >= b),
        line("Gen (target not below MEND)", "Gen", lambda a, b: a >= b),
        "- seen minus unseen instruction Rel: " + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items())
        + f" (target within 5): {'met' if all(abs(g) <= 5 for g in gaps.values()) else 'missed'}",
    ]
    if "instructedit" in lat and "mend_multitask" in lat:
        ratio = (out.get("latency_ratio") or {}).get("instructedit/mend_multitask")
        value = ratio[0] if ratio else lat["instructedit"]["edit_ms"] / lat["mend_multitask"]["edit_ms"]
        ci = f" [{ratio[1]:.2f}, {ratio[2]:.2f}]" if ratio else ""
        lines.append(f"- edit latency InstructEdit / MEND (medians): {value:.2f}x{ci} (target <= 1.1x): "
                     f"{'met' if value <= 1.1 else 'missed'}")
    return lines


def render_markdown(out: dict) -> str:
    """``instructedit_cpu.md`` from ``instructedit_cpu.json`` alone."""
    args, n = out["args"], out.get("n_edits") or {}
    lines = ["# InstructEdit CPU benchmark (Gemma-3-270M)", "",
             produced_by(SCRIPT, "instructedit_cpu.json") + " Rel / Gen / Loc / Por in percent as the JSON stores them; "
             "Score = their mean; n = edited records per task."
             + (f" [low, high]: 95% percentile-bootstrap interval over the edited records ({args['bootstrap']} "
                "resamples, seeded; per-edit values in the JSON's `records`)." if out.get("records") else ""), ""]
    if out.get("protocol"):
        proto = out["protocol"]
        lines += [f"Protocol `{proto['name']}`: " + ", ".join(f"{k} {v}" for k, v in proto.items() if k != "name") + ".", ""]
    for section, heading in SECTIONS:
        if not out.get(section):
            continue
        lines += [f"## {heading}", "", "| task | method | Rel | Gen | Loc | Por | Score | n |", "|---|---|---|---|---|---|---|---|"]
        for task, per_method in out[section].items():
            for method, cell in per_method.items():
                lines.append(f"| {task} | {method} | " + " | ".join(_with_ci(cell, m) for m in METRICS)
                             + f" | {_with_ci(cell, 'Score', value=_score(cell))} | {cell.get('n', n.get(task, ''))} |")
                if section in PAPER_SECTIONS:
                    lines += paper_figures.instructedit_rows(task, method, unseen=section == "unseen_instruction")
        lines += ["", paper_figures.INSTRUCTEDIT_NOTE, ""] if section in PAPER_SECTIONS else [""]
    sent = [(section, method, cell["sentiment"]) for section, _ in SECTIONS
            for per_method in (out.get(section) or {}).values() for method, cell in per_method.items() if cell.get("sentiment")]
    if sent and all("flipped" in s for _, _, s in sent):
        lines += ["## ConvSent sentiment", "",
                  "| section | method | success pre | success post | margin pre | margin post | flipped | ES | "
                  "Fluency pre | Fluency post |", "|---|---|---|---|---|---|---|---|---|---|"]
        for section, method, s in sent:
            lines.append(f"| {section} | {method} | {_with_ci(s, 'success_pre', 1)} | {_with_ci(s, 'success_post', 1)} | "
                         f"{_with_ci(s, 'margin_pre', 3)} | {_with_ci(s, 'margin_post', 3)} | {_with_ci(s, 'flipped', 1)} | "
                         f"{_with_ci(s, 'es', 1)} | {_with_ci(s, 'fluency_pre', 2)} | {_with_ci(s, 'fluency_post', 2)} |")
        lines.append("")
    elif sent:  # results of the earlier protocol: edits towards positive only
        lines += ["## ConvSent sentiment", "",
                  "| section | method | success pre | success post | margin pre | margin post | flipped to positive |",
                  "|---|---|---|---|---|---|---|"]
        for section, method, s in sent:
            lines.append(f"| {section} | {method} | {_fmt(s['success_pre'])} | {_fmt(s['success_post'])} | "
                         f"{_fmt(s['margin_pre'], 3)} | {_fmt(s['margin_post'], 3)} | {_fmt(s['flip_to_positive'])} |")
        lines.append("")
    if out.get("latency"):
        lines += ["## Edit latency (median)", "", "| method | edit ms |", "|---|---|"]
        lines += [f"| {m} | {_with_ci(v, 'edit_ms', 1)} |" for m, v in out["latency"].items()]
        lines.append("")
        for name, (ratio, lo, hi) in (out.get("latency_ratio") or {}).items():
            lines += [f"Median edit latency {name}: {ratio:.3f} [{lo:.3f}, {hi:.3f}] (edits resampled in pairs).", ""]
    lines += [f"- {key}: {text}" for key, text in (out.get("method_notes") or {}).items()]
    lines += ["", "## Configuration", ""]
    if out.get("command"):
        lines.append(f"- command: `{out['command']}`" + (f" ({out['date']})" if out.get("date") else ""))
    lines += [
        f"- model: {out['model']}; edited weights: {', '.join(out['inner_params'])}",
        (f"- editor: rank {args['rank']}, lr {args['lr']}, edit_lr {args['edit_lr']}, lr_lr {args['lr_lr']}, "
         f"cedit {args['cedit']}, cloc {args['cloc']}, batch 1, Adam; trainer: InstructEditTrainer with answer_logits=True (answer-position logits)"),
        (f"- {args['max_iters']} steps per editor (step count; {args['threads']} thread(s)): " if args.get("max_iters") else
         f"- CPU budget {args['budget_minutes']} min ({args['threads']} thread(s)): {out['train_steps']} steps per editor; ")
        + "; ".join(f"{name}: {r['wall_s']:.0f} s ({r['seconds_per_step']:.2f} s/step), tasks {r['tasks']}"
                    for name, r in out["runs"].items()),
        (f"- training data: {out['train_records']} (CounterFact: counterfact-train.json minus test "
         "subjects; Recent: recent_train.json minus the test split; ConvSent: blender_val.json)"),
        (f"- test data (first {args['n_test']} per file): {out['test_records']}; "
         f"at most {args['max_pairs']} locality/portability prompts per key and record"),
        *([f"- evaluated tasks (in this order): {', '.join(out['evaluated_tasks'])}; not evaluated: "
           f"{', '.join(t for t in TASK_ORDER if t not in out['evaluated_tasks']) or 'none'}"] if out.get("evaluated_tasks") else []),
        f"- evaluation time {out['eval_seconds']:.0f} s; total wall time {out['wall_seconds']:.0f} s",
        "", "## Targets", "", *targets(out),
    ]
    lines += merged_runs_lines(out, bullet="-")
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def load_data(data_dir: Path, n_test: int, n_train: int, seed: int, convsent_direction: str = "positive"):
    from instructedit_plugin.data import load_convsent, load_requests
    from instructedit_plugin.instructedit.dataset import record_identity, split_tasks

    cf_test = load_requests(data_dir / "counterfact" / "test_cf-generate-10.jsonl", limit=n_test)
    test_subjects = {r["subject"] for r in cf_test}
    cf_train = [r for r in load_requests(data_dir / "counterfact" / "counterfact-train.json", limit=n_train + 200)
                if r["subject"] not in test_subjects][:n_train]
    recent_all = load_requests(data_dir / "recent" / "recent_train.json")
    recent_split = split_tasks({"recent": recent_all}, seed=seed, val_size=min(100, len(recent_all) // 5))
    recent_train, recent_test = recent_split[0]["recent"], recent_split[1]["recent"][:n_test]
    convsent_train = load_convsent(data_dir / "convsent" / "blender_val.json", limit=n_train, direction=convsent_direction)
    convsent_test = load_convsent(data_dir / "convsent" / "blender_test.json", limit=n_test, direction=convsent_direction)
    zsre_test = load_requests(data_dir / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=n_test)
    train = {"counterfact": cf_train, "recent": recent_train[:n_train], "convsent": convsent_train}
    test = {"counterfact": cf_test, "recent": recent_test, "convsent": convsent_test, HOLDOUT_TASK: zsre_test}
    # disjointness checks (by record identity; ConvSent by topic)
    for task in ("counterfact", "recent"):
        assert not {record_identity(task, r) for r in train[task]} & {record_identity(task, r) for r in test[task]}
    assert not {r["topic"] for r in convsent_train} & {r["topic"] for r in convsent_test}
    return train, test


def merge_saved(out_path: str | Path, part_path: str | Path, command: str, notes: str | Path | None = None) -> Path:
    """``--merge_from``: :func:`merge_results` of the saved ``part_path`` into the saved ``out_path``, written
    back (JSON, then the markdown rendered from it; with ``notes``, that file's text as the notes)."""
    out_path, part_path = Path(out_path), Path(part_path)
    for label, path in (("--out", out_path), ("--merge_from", part_path)):
        if not path.is_file():
            raise MergeError(f"{label}: no saved results at {path}. Fix: pass the JSON a run of this script wrote")
    base = json.loads(out_path.read_text(encoding="utf-8"))
    part = json.loads(part_path.read_text(encoding="utf-8"))
    out = merge_results(base, part, base_name=str(out_path), part_name=str(part_path), merged_by=command)
    if notes is not None:
        out["notes"] = read_notes(notes)
        if not out["notes"]:
            out.pop("notes")
    md_path = write_results(out_path, out, render_markdown, RESULT_KEYS)
    LOG.info("merged tasks %s of %s into %s and %s", evaluated_tasks(part), part_path, out_path, md_path)
    return md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:  # rebuild the .md from the saved .json alone (--notes: replace its notes first)
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    if args.merge_from:  # add a saved part's tasks to the saved --out file; nothing runs
        print(merge_saved(args.out, args.merge_from, command_line(SCRIPT, argv), notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None  # a missing notes file fails before any work
    command = command_line(SCRIPT, argv)
    import torch

    from instructedit_plugin.core.config import read_yaml
    from instructedit_plugin.data import resolve_data_dir
    from instructedit_plugin.instructedit import InstructEditTrainingHparams
    from instructedit_plugin.instructedit import evaluate as ie_evaluate
    from instructedit_plugin.instructedit.evaluate import MethodSpec, evaluate_instructedit, train_editor
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm

    assert ie_evaluate.HOLDOUT_TASK == HOLDOUT_TASK, ie_evaluate.HOLDOUT_TASK
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("instructedit_plugin.instructedit.trainer", "instructedit_plugin.instructedit.checkpoint",
                  "instructedit_plugin.models.loading", "instructedit_plugin.instructedit.instructedit_main"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.time()
    if args.work_dir is None:
        import tempfile

        args.work_dir = tempfile.mkdtemp(prefix="instructedit_cpu_")
    data_dir = resolve_data_dir(args.data_dir)
    protocol = protocol_settings(args)
    LOG.info("protocol: %s", protocol)
    train, test = load_data(data_dir, args.n_test, args.n_train, args.seed, protocol["convsent_direction"])
    LOG.info("train records: %s; test records: %s", {k: len(v) for k, v in train.items()}, {k: len(v) for k, v in test.items()})

    model_dir = Path(args.model_dir) if args.model_dir else embedded_model_dir()
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    # model_name set while loading: the YAML's `model_name: embedded` is then never resolved (no conversion with --model_dir)
    cfg = InstructEditTrainingHparams.from_dict({**read_yaml(TRAIN_YAML)[0],
                                                 "model_name": str(model_dir)}, source=str(TRAIN_YAML))
    cfg.inner_params = [f"model.layers.{i}.mlp.{w}_proj.weight" for i in layers for w in ("up", "down")]
    cfg.device = "cpu"
    cfg.dtype = args.dtype
    cfg.rank, cfg.lr, cfg.edit_lr, cfg.lr_lr = args.rank, args.lr, args.edit_lr, args.lr_lr
    cfg.cedit, cfg.cloc = args.cedit, args.cloc
    cfg.accumulate_bs, cfg.batch_size = 1, 1
    cfg.max_iters = 100000
    cfg.val_interval, cfg.val_steps = 100000, 12
    cfg.log_interval = 25
    cfg.progress = False
    cfg.seed = args.seed
    cfg.instructions = str(Path(data_dir) / "instructedit" / "easyedit_task_descriptions.json") \
        if protocol["instructions"] == "easyedit" else protocol["instructions"]
    cfg.raw_edit_loss = protocol["raw_edit_loss"]
    cfg.task_mixing = protocol["task_mixing"]
    cfg.convsent_subsample = protocol["convsent_subsample"]
    from instructedit_plugin.instructions import load_instructions

    library = load_instructions(cfg.instructions)

    budget_s = 60.0 * args.budget_minutes
    if args.max_iters:
        LOG.info("every editor trains %d steps", args.max_iters)
    else:
        LOG.info("CPU training budget: %.1f minutes for all editors (InstructEdit gets half; baselines the same step count)",
                 args.budget_minutes)
    runs = {}
    cfg.results_dir = str(Path(args.work_dir) / "instructedit")
    if args.max_iters:  # a step count: the same figures on a loaded machine
        cfg.max_iters = args.max_iters
        runs["instructedit"] = train_editor(cfg, train, tok, model, use_instructions=True, val_size=4)
    else:
        runs["instructedit"] = train_editor(cfg, train, tok, model, use_instructions=True, val_size=4,
                                            calibrate_steps=3, budget_s=budget_s / (2.0 if not args.no_single_task else 1.6))
    steps = int(runs["instructedit"]["steps"])
    LOG.info("instructedit: %d steps, %.1fs (%.2fs/step)", steps, runs["instructedit"]["train_time_s"],
             runs["instructedit"]["seconds_per_step"])
    base = {"mend_multitask": train}
    if not args.no_single_task:
        base["mend_single_task"] = {"counterfact": train["counterfact"]}
    for name, tasks in base.items():
        cfg.results_dir = str(Path(args.work_dir) / name)
        cfg.max_iters = steps
        runs[name] = train_editor(cfg, tasks, tok, model, use_instructions=False, val_size=4)
        LOG.info("%s: %d steps, %.1fs", name, runs[name]["steps"], runs[name]["wall_s"])
    train_seconds = sum(r["wall_s"] for r in runs.values())

    methods = [MethodSpec(name, r["best_checkpoint"], name == "instructedit") for name, r in runs.items()]
    from instructedit_plugin.instructedit.evaluate import record_values

    order = args.tasks.split(",")
    t_eval = time.time()
    per_edit: dict = {}  # {section: {task: {method: [per-edit record]}}}
    edit_seconds: dict = {}
    n_edits: dict = {}
    method_notes: dict = {}
    md_path = None
    for done, task in enumerate(order, 1):  # one task at a time; the result files are rewritten after each
        results = evaluate_instructedit(model, tok, methods, {task: test[task]}, max_pairs=args.max_pairs, seed=args.seed,
                                        metric_inputs=protocol["metric_inputs"], fluency_tokens=protocol["fluency_tokens"],
                                        library=library, keep_records=True, progress=lambda line: LOG.info("%s", line))
        for section, by_task in results["records"].items():
            per_edit.setdefault(section, {}).update(by_task)
        for name, seconds in results["edit_seconds"].items():
            edit_seconds.setdefault(name, []).extend(seconds)
        n_edits.update(results["n_edits"])
        method_notes = dict(results.get("notes") or {})
        eval_seconds = time.time() - t_eval

        # every figure from the per-edit values the JSON keeps (``records``), so each interval is recomputable
        records = {section: {t: {m: record_columns([record_values(r) for r in recs]) for m, recs in by_task[t].items()}
                             for t in TASK_ORDER if t in by_task}
                   for section, by_task in per_edit.items()}
        sections = {section: {t: {m: cell_from_columns(cols, args.bootstrap, args.seed) for m, cols in per_method.items()}
                              for t, per_method in by_task.items()}
                    for section, by_task in records.items()}
        edit_ms = {m: [round(1000.0 * x, 3) for x in v] for m, v in edit_seconds.items()}
        latency, latency_ratio = latency_figures(edit_ms, args.bootstrap, args.seed)

        out = {
            "model": f"{model_dir} ({args.dtype}, CPU)" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype}, CPU)",
            "train_steps": steps,
            "train_seconds": round(train_seconds, 1),
            **{section: sections[section] for section, _ in SECTIONS if sections.get(section)},
            "protocol": protocol,
            "latency": latency,
            **({"latency_ratio": latency_ratio} if latency_ratio else {}),
            "n_edits": {t: n_edits[t] for t in TASK_ORDER if t in n_edits},
            "method_notes": method_notes,
            "date": today(),
            "command": command,
            "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS},
            "inner_params": list(cfg.inner_params),
            "runs": {name: {"steps": int(r["steps"]), "wall_s": round(r["wall_s"], 1), "seconds_per_step": round(r["seconds_per_step"], 3),
                            "tasks": list(r["tasks"])} for name, r in runs.items()},
            "train_records": {k: len(v) for k, v in train.items()},
            "test_records": {k: len(v) for k, v in test.items()},
            **({} if order[:done] == list(TASK_ORDER) else {"evaluated_tasks": order[:done]}),
            "eval_seconds": round(eval_seconds, 1),
            "wall_seconds": round(time.time() - t_start, 1),
            "records": records,
            "edit_ms_per_edit": edit_ms,
        }
        md_path = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
        LOG.info("tasks %s of %s done: wrote %s and %s (%.0f s so far)", order[:done], order, args.out, md_path,
                 time.time() - t_start)
    LOG.info("wrote %s and %s in %.0f s", args.out, md_path, time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
