"""The InstructEdit paper's analyses (Tian et al. 2024) at CPU scale, one sub-command each.

* ``pilot`` (Table 1): a MEND editor trained on CounterFact only and one trained on ZsRE only
  (``zsre/ZsRE-test-all.json`` minus every subject of the ZsRE test records), each applied to
  both test sets: a 2x2 table of Rel / Gen / Loc / Por, in-domain on the diagonal, beside an
  untrained editor (the same network, 0 steps) as the floor. The paper's pilot shows current
  methods (no instructions); ``--pilot_instructions`` trains and edits with instructions instead.
* ``scaling`` (Fig. 4(b, c)): InstructEdit trained on 1, 2 and 3 tasks, tested on the hold-out
  ZsRE. The paper's order is Recent; Recent & CounterFact; + ConvSent (``--scaling_order``).
* ``mixing`` (Fig. 4(d)): InstructEdit trained on Recent & ConvSent with three task mixings,
  tested on Recent, CounterFact and hold-out ZsRE: ``unbalanced`` (tasks drawn in the paper's
  record proportions before balancing, ConvSent 14,390 : Recent 570, Table 5), ``balanced``
  (the paper's protocol: ``task_mixing: records`` with ConvSent subsampled to
  ``--convsent_subsample``, i.e. the records this run has) and ``uniform`` (each task 1/2).
  Also reports the mean norm of the editor's update per task (the paper ties imbalance to
  larger, task-dependent update magnitudes).
* ``directions`` (Fig. 4(a)): the normalised editing direction ``delta~ u~^T`` of every edit
  (per edited layer, sketched to ``--project_dim``, unit-normalised, concatenated) for the same
  test records under InstructEdit (multi-task, seen instruction), multi-task MEND and
  single-task MEND (each task's points from the editor trained on that task alone); t-SNE
  (scikit-learn) per editor coloured by task, and the silhouette score of the task labels in
  the full space (cosine; overall and per task, 95% bootstrap intervals over the per-edit
  silhouette values) and in the t-SNE plane.

All editors of one analysis train the same number of steps (``--steps``) with the same seed
and network; an editor whose training settings and data are identical to one trained before
is reused from ``--work_dir`` (keyed by a hash of both), so the analyses share editors
(pilot's single-task CounterFact/ZsRE editors, scaling's 3-task InstructEdit). The protocol is
the paper's (as ``benchmarks/instructedit_cpu.py --protocol paper``): the GPT-4 task
descriptions (``--instructions easyedit``), instructed metric inputs, no extra plain-prompt
loss, ConvSent edits in both directions. Every figure has a 95% bootstrap interval over edits
(``--bootstrap`` resamples). Each run writes ``benchmarks/results/instructedit_<analysis>.json``,
``.md`` (rendered from the JSON alone) and ``.png`` (drawn from the JSON alone).

Run from the repository root, one analysis at a time (CPU)::

    nice -n 5 python benchmarks/instructedit_analyses.py pilot --data_dir ../shared/data --steps 150 --n_test 40
    python benchmarks/instructedit_analyses.py pilot --render     # rebuild .md and .png from the .json

Tests run every analysis on a tiny model with ``--data_json`` (a synthetic world, see
``tests/test_instructedit_analyses.py``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.instructedit_cpu import add_editor_arguments  # noqa: E402  (the shared editor options)
from benchmarks.results_io import (  # noqa: E402
    bootstrap_ci, command_line, notes_lines, read_notes, today, write_results,
)

LOG = logging.getLogger("instructedit_analyses")
SCRIPT = "benchmarks/instructedit_analyses.py"
ANALYSES = ("pilot", "scaling", "mixing", "directions")
METRICS = ("Rel", "Gen", "Loc", "Por")
HOLDOUT = "zsre_holdout"
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "gemma-3-270m.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: the paper's training-set sizes (Table 5): ConvSent before and after balancing, Recent, CounterFact
PAPER_RECORDS = {"convsent_original": 14390, "convsent_balanced": 1427, "recent": 570, "counterfact": 1427}
#: which training tasks each analysis needs, and which test sets
NEEDS = {
    "pilot": ({"counterfact", "zsre"}, {"counterfact", HOLDOUT}),
    "scaling": ({"counterfact", "recent", "convsent"}, {HOLDOUT}),
    "mixing": ({"recent", "convsent"}, {"recent", "counterfact", HOLDOUT}),
    "directions": ({"counterfact", "recent", "convsent", "zsre"}, {"counterfact", "recent", HOLDOUT}),
}
#: every top-level key a result JSON of this script may hold
RESULT_KEYS = frozenset({
    "analysis", "model", "steps", "seed", "protocol", "editors", "cells", "test_records", "train_records",
    "scaling", "mixing", "update_norms", "directions", "paper", "date", "command", "args", "inner_params",
    "wall_seconds", "notes",
})
_UNSAVED_ARGS = ("render", "notes", "work_dir", "out_dir", "out")


class AnalysisError(ValueError):
    """Bad analysis name, missing data or an inconsistent option (raised before any model loads)."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("analysis", nargs="?", default=None, help=f"one of {', '.join(ANALYSES)}")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--data_json", default=None,
                   help="instead of --data_dir: one JSON {'train': {task: [records]}, 'test': {task: [records]}} "
                        "(train tasks counterfact/recent/convsent/zsre, test tasks counterfact/recent/convsent/zsre_holdout)")
    p.add_argument("--model_dir", default=None, help="local base model folder (default: the embedded Gemma-3-270M)")
    p.add_argument("--train_yaml", default=str(TRAIN_YAML), help="InstructEdit training YAML the editors start from")
    p.add_argument("--steps", type=int, default=150, help="training steps of every editor of the analysis")
    p.add_argument("--n_test", type=int, default=40, help="test records per task (first N)")
    p.add_argument("--n_train", type=int, default=2000, help="at most this many training records per task")
    # the editor settings the analyses' committed results ran with (their commands name none)
    add_editor_arguments(p, max_pairs=2, layers="16,17", cedit=1.0, cloc=1.0,
                         layers_help="decoder layers whose MLP up/down projections are edited; 'yaml': the YAML's inner_params")
    p.add_argument("--instructions", default="easyedit",
                   help="instruction library: easyedit (the paper's, from --data_dir), plugin, or a path")
    p.add_argument("--convsent_subsample", type=int, default=PAPER_RECORDS["convsent_balanced"],
                   help="ConvSent training records kept under balanced mixing (the paper: 1427)")
    p.add_argument("--pilot_instructions", action="store_true", help="pilot: train and edit with instructions")
    p.add_argument("--scaling_order", default="recent,counterfact,convsent",
                   help="scaling: training tasks added in this order (the paper's: recent,counterfact,convsent)")
    p.add_argument("--mixings", default="unbalanced,balanced,uniform", help="mixing: variants to train")
    p.add_argument("--project_dim", type=int, default=4096, help="directions: sketch size per edited layer")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=str(Path.home() / ".cache" / "instructedit_plugin" / "analysis_editors"),
                   help="trained editors, reused across analyses when settings and data are identical")
    p.add_argument("--out_dir", default=str(RESULTS_DIR), help="writes instructedit_<analysis>.json/.md/.png here")
    p.add_argument("--out", default=None, help="the result JSON instead (with --render the analysis is read from it)")
    p.add_argument("--render", action="store_true", help="only rebuild the .md and .png from the saved .json")
    p.add_argument("--notes", default=None, help="markdown file whose text goes into the JSON and ends the .md")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every option error, before any data or model is read."""
    if args.render and args.analysis is None and args.out:
        return
    if args.analysis not in ANALYSES:
        raise AnalysisError(f"analysis {args.analysis!r} is unknown. Fix: name one of {', '.join(ANALYSES)}")
    if args.render:
        return
    if args.steps < 1:
        raise AnalysisError(f"--steps {args.steps}: every editor must train at least one step. Fix: give --steps >= 1")
    if args.n_test < 2:
        raise AnalysisError(f"--n_test {args.n_test}: intervals need at least 2 test records. Fix: give --n_test >= 2")
    order = [t.strip() for t in args.scaling_order.split(",") if t.strip()]
    if sorted(order) != ["convsent", "counterfact", "recent"]:
        raise AnalysisError(f"--scaling_order {args.scaling_order!r} must name counterfact, recent and convsent once "
                            "each. Fix: e.g. --scaling_order recent,counterfact,convsent")
    mixings = [m.strip() for m in args.mixings.split(",") if m.strip()]
    unknown = sorted(set(mixings) - set(MIXINGS))
    if unknown or not mixings:
        raise AnalysisError(f"--mixings {args.mixings!r}: unknown variants {unknown}. Fix: choose from {', '.join(MIXINGS)}")
    if args.data_json is None and args.data_dir is None:
        import os

        if not os.environ.get("INSTRUCTEDIT_DATA_DIR"):
            raise AnalysisError("no data: neither --data_dir nor --data_json is given and $INSTRUCTEDIT_DATA_DIR is "
                                "not set. Fix: pass --data_dir ../shared/data")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
SHARED_FILES = {
    "counterfact": ("counterfact/test_cf-generate-10.jsonl", "counterfact/counterfact-train.json"),
    "recent": ("recent/recent_train.json",),
    "convsent": ("convsent/blender_val.json", "convsent/blender_test.json"),
    "zsre": ("zsre/ZsRE-test-all.json", "zsre/zsre_mend_eval_portability_gpt4.json"),
}


def load_analysis_data(args: argparse.Namespace) -> tuple[dict[str, list], dict[str, list]]:
    """``(train, test)`` for the analysis; missing files or tasks raise :class:`AnalysisError` (with a Fix)."""
    need_train, need_test = NEEDS[args.analysis]
    if args.data_json:
        path = Path(args.data_json)
        if not path.is_file():
            raise AnalysisError(f"--data_json {path}: no such file. Fix: give the path of a JSON with 'train' and 'test'")
        data = json.loads(path.read_text(encoding="utf-8"))
        train, test = dict(data.get("train") or {}), dict(data.get("test") or {})
        test = {t: list(rs)[: args.n_test] for t, rs in test.items()}
        train = {t: list(rs)[: args.n_train] for t, rs in train.items()}
    else:
        from benchmarks.instructedit_cpu import load_data
        from instructedit_plugin.data import load_requests, resolve_data_dir

        data_dir = resolve_data_dir(args.data_dir)
        missing = [rel for task in ("counterfact", "recent", "convsent", "zsre") for rel in SHARED_FILES[task]
                   if not (data_dir / rel).is_file()]
        if missing:
            raise AnalysisError(f"--data_dir {data_dir}: missing {', '.join(missing)}. Fix: point --data_dir at the "
                                "shared data folder (see its README)")
        train, test = load_data(data_dir, args.n_test, args.n_train, args.seed, "both")
        test_subjects = {r.get("subject") for r in test[HOLDOUT]}
        test_prompts = {r["prompt"] for r in test[HOLDOUT]}
        train["zsre"] = [r for r in load_requests(data_dir / "zsre" / "ZsRE-test-all.json")
                         if r.get("subject") not in test_subjects and r["prompt"] not in test_prompts][: args.n_train]
    lacking = sorted(t for t in need_train if not train.get(t)) + sorted(f"test:{t}" for t in need_test if not test.get(t))
    if lacking:
        raise AnalysisError(f"analysis {args.analysis!r} needs data for {', '.join(lacking)}, which the data has not. "
                            "Fix: add those tasks to --data_json (train: counterfact/recent/convsent/zsre; test: "
                            "counterfact/recent/convsent/zsre_holdout) or use --data_dir")
    short = sorted(t for t in need_test if len(test[t]) < 2)
    if short:
        raise AnalysisError(f"test sets {short} have fewer than 2 records. Fix: give more test records")
    return train, test


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def metric_cell(records: Sequence[Mapping[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Rel/Gen/Loc/Por in percent with 95% bootstrap intervals over edits, from per-edit records."""
    from instructedit_plugin.evaluation.summary import edit_metrics

    per_edit = [edit_metrics(r["post"], r.get("pre")) for r in records]
    cell: dict[str, Any] = {"n": len(records)}
    for m in METRICS:
        vals = [100.0 * e[m] for e in per_edit if e[m] is not None]
        cell[m] = round(sum(vals) / len(vals), 2) if vals else None
        ci = bootstrap_ci(vals, resamples, seed) if vals else None
        cell[f"{m}_ci"] = None if ci is None else [round(ci[0], 2), round(ci[1], 2)]
    return cell


# ----------------------------------------------------------------------------------------------
# Editors (trained once per settings + data, reused across analyses)
# ----------------------------------------------------------------------------------------------
MIXINGS = ("unbalanced", "balanced", "uniform")


class Context:
    """The model, tokenizer, base training config and library shared by an analysis's editors."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from instructedit_plugin.core.config import read_yaml
        from instructedit_plugin.instructedit import InstructEditTrainingHparams
        from instructedit_plugin.instructions import load_instructions
        from instructedit_plugin.models.loading import load_causal_lm

        torch.set_num_threads(args.threads)
        self.args = args
        if args.model_dir:
            self.model_dir = Path(args.model_dir)
            self.model_label = f"{self.model_dir.name} ({args.dtype}, CPU)"
        else:
            from instructedit_plugin.models.embedded import embedded_model_dir

            self.model_dir = embedded_model_dir()
            self.model_label = f"gemma-3-270m (embedded, {args.dtype}, CPU)"
        if args.instructions == "easyedit":
            if args.data_dir is None and args.data_json is not None:
                raise AnalysisError("--instructions easyedit reads the paper's descriptions from --data_dir. "
                                    "Fix: pass --data_dir too, or --instructions plugin")
            from instructedit_plugin.data import resolve_data_dir

            self.instructions = str(resolve_data_dir(args.data_dir) / "instructedit" / "easyedit_task_descriptions.json")
        else:
            self.instructions = args.instructions
        self.library = load_instructions(self.instructions)
        self.model, self.tok = load_causal_lm(self.model_dir, dtype=args.dtype)
        self.model.eval()
        yaml_path = Path(args.train_yaml)
        cfg = InstructEditTrainingHparams.from_dict({**read_yaml(yaml_path)[0], "model_name": str(self.model_dir)},
                                                   source=str(yaml_path))
        if args.layers != "yaml":
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
            cfg.inner_params = [f"model.layers.{i}.mlp.{w}_proj.weight" for i in layers for w in ("up", "down")]
        cfg.device, cfg.dtype = "cpu", args.dtype
        cfg.rank, cfg.lr, cfg.edit_lr, cfg.lr_lr = args.rank, args.lr, args.edit_lr, args.lr_lr
        cfg.cedit, cfg.cloc = args.cedit, args.cloc
        cfg.accumulate_bs, cfg.batch_size = 1, 1
        cfg.max_iters = args.steps
        cfg.val_interval, cfg.val_steps = 10 ** 9, 8
        cfg.log_interval = max(1, args.steps // 4)
        cfg.early_stop_patience = 10 ** 9
        cfg.progress = False
        cfg.seed = args.seed
        cfg.instructions = self.instructions
        cfg.raw_edit_loss = False  # the paper has no extra loss on the plain prompt
        cfg.task_mixing = "records"
        cfg.convsent_subsample = args.convsent_subsample
        cfg.task_proportions = None
        self.cfg = cfg
        self.work_dir = Path(args.work_dir)

    def _key(self, tasks: Mapping[str, Sequence[Mapping]], instructions: bool, cfg: Any) -> str:
        settings = {k: v for k, v in sorted(vars(cfg).items()) if k not in ("results_dir", "progress", "log_interval")}
        blob = json.dumps({"model": str(self.model_dir), "cfg": settings, "instructions": instructions,
                           "tasks": {t: list(rs) for t, rs in sorted(tasks.items())}}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def editor(self, name: str, tasks: Mapping[str, Sequence[Mapping]], *, instructions: bool,
               mixing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train (or reuse) one editor for ``--steps`` steps; ``{"checkpoint", "steps", "wall_s", ...}``."""
        from instructedit_plugin.core.durable import atomic_write_text
        from instructedit_plugin.instructedit.evaluate import train_editor

        cfg = copy.copy(self.cfg)
        for key, value in (mixing or {}).items():
            setattr(cfg, key, value)
        key = self._key(tasks, instructions, cfg)
        folder = self.work_dir / f"{name}-{key}"
        info_path = folder / "analysis_editor.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if Path(info["checkpoint"]).exists():
                LOG.info("%s: reusing %s (%d steps)", name, info["checkpoint"], info["steps"])
                return {**info, "reused": True}
        cfg.results_dir = str(folder)
        LOG.info("%s: training %d steps on %s (instructions %s)", name, cfg.max_iters,
                 {t: len(r) for t, r in tasks.items()}, instructions)
        result = train_editor(cfg, tasks, self.tok, self.model, use_instructions=instructions, val_size=2)
        info = {"checkpoint": str(result["best_checkpoint"] or result["last_checkpoint"]), "steps": int(result["steps"]),
                "wall_s": round(float(result["wall_s"]), 1), "seconds_per_step": round(float(result["seconds_per_step"]), 3),
                "tasks": sorted(tasks), "instructions": instructions, "key": key,
                "mixing": {k: v for k, v in (mixing or {}).items()}}
        if info["steps"] != self.args.steps:
            raise RuntimeError(f"{name} trained {info['steps']} steps, not {self.args.steps}")
        atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
        return {**info, "reused": False}

    def untrained(self) -> dict[str, Any]:
        """The editor network as initialised (seeded), never trained: the floor of the pilot."""
        import torch

        from instructedit_plugin.instructedit import InstructEditModel, save_editor

        folder = self.work_dir / f"untrained-{self._key({}, False, self.cfg)}"
        if not (folder / "editor.safetensors").is_file():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.args.seed)
                wrapper = InstructEditModel(self.model, self.cfg)
            save_editor(folder, wrapper.state_dict(), {"alg": "InstructEdit", **wrapper.editor_config()})
            del wrapper
        return {"checkpoint": str(folder), "steps": 0, "wall_s": 0.0, "tasks": [], "instructions": False, "reused": False}

    def evaluate(self, methods: Mapping[str, tuple[Any, bool]], test: Mapping[str, Sequence[Mapping]]) -> dict:
        """Per-edit records of every method on every test task: ``{task: {method: [records]}}``."""
        from instructedit_plugin.instructedit.evaluate import MethodSpec, evaluate_instructedit

        specs = [MethodSpec(name, archive, instr) for name, (archive, instr) in methods.items()]
        results = evaluate_instructedit(self.model, self.tok, specs, test, unseen=False, metric_inputs="instructed",
                                        max_pairs=self.args.max_pairs, library=self.library, seed=self.args.seed,
                                        keep_records=True, progress=lambda line: LOG.info("%s", line))
        return results["records"]["tasks"]

    def cells(self, records: Mapping[str, Mapping[str, Sequence]]) -> dict[str, dict[str, dict]]:
        return {task: {m: metric_cell(recs, self.args.bootstrap, self.args.seed) for m, recs in per.items()}
                for task, per in records.items()}


def _editor_row(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("steps", "wall_s", "tasks", "instructions", "reused") if k in info} | (
        {"mixing": info["mixing"]} if info.get("mixing") else {})


# ----------------------------------------------------------------------------------------------
# The analyses (each returns the result keys it adds)
# ----------------------------------------------------------------------------------------------
def run_pilot(ctx: Context, train: dict, test: dict) -> dict[str, Any]:
    instr = bool(ctx.args.pilot_instructions)
    editors = {"trained_on_counterfact": ctx.editor("pilot_cf", {"counterfact": train["counterfact"]}, instructions=instr),
               "trained_on_zsre": ctx.editor("pilot_zsre", {"zsre": train["zsre"]}, instructions=instr),
               "untrained": ctx.untrained()}
    methods = {name: (e["checkpoint"], instr and name != "untrained") for name, e in editors.items()}
    records = ctx.evaluate(methods, {"counterfact": test["counterfact"], HOLDOUT: test[HOLDOUT]})
    cells = ctx.cells(records)
    return {"editors": {n: _editor_row(e) for n, e in editors.items()},
            "cells": {"counterfact": cells["counterfact"], "zsre": cells[HOLDOUT]},
            "paper": PAPER["pilot"]}


def scaling_sets(args: argparse.Namespace) -> list[list[str]]:
    order = [t.strip() for t in args.scaling_order.split(",") if t.strip()]
    return [order[: k + 1] for k in range(len(order))]


def run_scaling(ctx: Context, train: dict, test: dict) -> dict[str, Any]:
    editors, methods = {}, {}
    for tasks in scaling_sets(ctx.args):
        name = "+".join(tasks)
        editors[name] = ctx.editor(f"instructedit_{len(tasks)}tasks", {t: train[t] for t in tasks}, instructions=True)
        methods[name] = (editors[name]["checkpoint"], True)
    cells = ctx.cells(ctx.evaluate(methods, {HOLDOUT: test[HOLDOUT]}))
    return {"editors": {n: _editor_row(e) for n, e in editors.items()}, "cells": {"zsre_holdout": cells[HOLDOUT]},
            "scaling": {"order": scaling_sets(ctx.args)[-1], "n_tasks": {n: len(n.split("+")) for n in editors}},
            "paper": PAPER["scaling"]}


def mixing_settings(args: argparse.Namespace, train: dict) -> dict[str, dict[str, Any]]:
    settings = {
        "unbalanced": {"task_proportions": {"recent": PAPER_RECORDS["recent"], "convsent": PAPER_RECORDS["convsent_original"]},
                       "convsent_subsample": None},
        "balanced": {"task_mixing": "records", "convsent_subsample": args.convsent_subsample, "task_proportions": None},
        "uniform": {"task_mixing": "uniform", "convsent_subsample": None, "task_proportions": None},
    }
    wanted = [m.strip() for m in args.mixings.split(",") if m.strip()]
    return {m: settings[m] for m in MIXINGS if m in wanted}


def _share(setting: Mapping[str, Any], train: Mapping[str, Sequence]) -> dict[str, float]:
    """Expected share of training steps per task under a mixing setting."""
    if setting.get("task_proportions"):
        w = dict(setting["task_proportions"])
    elif setting.get("task_mixing") == "uniform":
        w = {t: 1.0 for t in train}
    else:
        sub = setting.get("convsent_subsample")
        w = {t: float(min(len(rs), sub) if t == "convsent" and sub else len(rs)) for t, rs in train.items()}
    total = sum(w.values())
    return {t: round(v / total, 4) for t, v in sorted(w.items())}


def update_norms(ctx: Context, archive: Any, tasks: Mapping[str, Sequence], instructions: bool) -> dict[str, Any]:
    """Mean Frobenius norm of the editor's update (``edit_lr`` times its output, all edited layers) per task,
    with a 95% bootstrap interval over edits."""
    import torch

    from instructedit_plugin.instructedit.evaluate import EditEvaluator, edit_prompt

    evaluator = EditEvaluator(ctx.model, ctx.tok, library=ctx.library, seed=ctx.args.seed)
    editor = evaluator.editor(archive)
    params = dict(ctx.model.named_parameters())
    out = {}
    for task, requests in tasks.items():
        norms = []
        for i, r in enumerate(requests):
            r = dict(r)
            prompt = edit_prompt(r, task, "seen" if instructions else "none", i, ctx.library, ctx.args.seed)
            new, _ = evaluator.edit_weights(editor, prompt, r["target_new"])
            norms.append(math.sqrt(sum(float((v.float() - params[k].detach().float()).pow(2).sum()) for k, v in new.items())))
            del new
        out[task] = {"mean": round(sum(norms) / len(norms), 6),
                     "ci": [round(x, 6) for x in bootstrap_ci(norms, ctx.args.bootstrap, ctx.args.seed)],
                     "n": len(norms)}
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def run_mixing(ctx: Context, train: dict, test: dict) -> dict[str, Any]:
    pair = {"recent": train["recent"], "convsent": train["convsent"]}
    settings = mixing_settings(ctx.args, pair)
    editors, methods = {}, {}
    for name, setting in settings.items():
        editors[name] = ctx.editor(f"mixing_{name}", pair, instructions=True, mixing=setting)
        methods[name] = (editors[name]["checkpoint"], True)
    tests = {t: test[t] for t in ("recent", "counterfact", HOLDOUT)}
    cells = ctx.cells(ctx.evaluate(methods, tests))
    norms = {name: update_norms(ctx, methods[name][0], tests, True) for name in settings}
    return {"editors": {n: _editor_row(e) for n, e in editors.items()}, "cells": cells, "update_norms": norms,
            "mixing": {name: {"setting": s, "task_share": _share(s, pair)} for name, s in settings.items()},
            "paper": PAPER["mixing"]}


def collect_directions(ctx: Context, editors: Mapping[str, tuple[Any, bool]], tests: Mapping[str, Sequence],
                       n_per_task: int) -> dict[str, dict[str, Any]]:
    """Per editor: ``{"vectors": (n, d) array, "tasks": labels, "index": record index}`` on the same test records.

    ``editors``: name -> (archive or ``{task: archive}``, instructions). One vector per edit: each edited
    layer's update direction sketched and unit-normalised, concatenated, divided by sqrt(#layers)."""
    import numpy as np

    from instructedit_plugin.instructedit.analysis import collect_edit_gradients
    from instructedit_plugin.instructedit.instructedit_main import load_editor_for

    out = {}
    for name, (archive, instructions) in editors.items():
        rows, labels, index = [], [], []
        for task, requests in tests.items():
            path = archive.get(task) if isinstance(archive, Mapping) else archive
            editor = load_editor_for(ctx.model, path)
            entries = collect_edit_gradients(ctx.model, ctx.tok, editor, {task: requests}, n_per_task=n_per_task,
                                             modes=("seen",) if instructions else ("none",),
                                             project_dim=ctx.args.project_dim, library=ctx.library, seed=ctx.args.seed)
            for e in entries:
                layers = list(e["layers"])
                rows.append(np.concatenate([e["layers"][n] for n in layers]) / math.sqrt(len(layers)))
                labels.append(task)
                index.append(e["index"])
        out[name] = {"vectors": np.stack(rows), "tasks": labels, "index": index}
    return out


def separation(vectors, labels: Sequence[str], resamples: int, seed: int) -> dict[str, Any]:
    """Silhouette of ``labels`` (cosine, full space): overall and per task, each the mean of the per-edit
    silhouette values with a 95% bootstrap interval over edits; t-SNE coordinates and the silhouette in
    the t-SNE plane; intra/inter-task cosine per task pair."""
    import numpy as np
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_samples, silhouette_score

    from instructedit_plugin.instructedit.analysis import gradient_separation

    vectors = np.asarray(vectors, dtype=np.float64)
    labels = list(labels)
    per_edit = silhouette_samples(vectors, labels, metric="cosine")
    by_task = {}
    for t in sorted(set(labels)):
        vals = [float(v) for v, lab in zip(per_edit, labels) if lab == t]
        ci = bootstrap_ci(vals, resamples, seed)
        by_task[t] = {"mean": round(sum(vals) / len(vals), 4), "ci": [round(x, 4) for x in ci]}
    ci = bootstrap_ci(per_edit.tolist(), resamples, seed)
    n = len(labels)
    perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    pairs = gradient_separation(vectors, labels)["pairs"]
    return {"silhouette_cosine": round(float(per_edit.mean()), 4), "silhouette_cosine_ci": [round(x, 4) for x in ci],
            "silhouette_by_task": by_task, "silhouette_tsne": round(float(silhouette_score(coords, labels)), 4),
            "pairs": {k: {kk: (None if vv is None else round(vv, 4)) for kk, vv in v.items()} for k, v in pairs.items()},
            "tsne": [[round(float(x), 3), round(float(y), 3)] for x, y in coords], "tasks": labels, "n": n}


def run_directions(ctx: Context, train: dict, test: dict) -> dict[str, Any]:
    multi = {t: train[t] for t in ("counterfact", "recent", "convsent")}
    points = {t: test[t] for t in ("recent", "counterfact", HOLDOUT)}
    single_train = {"recent": "recent", "counterfact": "counterfact", HOLDOUT: "zsre"}
    trained = {"instructedit": ctx.editor("instructedit_3tasks", multi, instructions=True),
               "mend_multitask": ctx.editor("mend_multitask", multi, instructions=False)}
    single = {}
    for test_task, train_task in single_train.items():
        name = {"counterfact": "pilot_cf", "zsre": "pilot_zsre"}.get(train_task, f"mend_single_{train_task}")
        single[test_task] = ctx.editor(name, {train_task: train[train_task]}, instructions=False)
    editors = {"instructedit": (trained["instructedit"]["checkpoint"], True),
               "mend_multitask": (trained["mend_multitask"]["checkpoint"], False),
               "mend_single_task": ({t: e["checkpoint"] for t, e in single.items()}, False)}
    vectors = collect_directions(ctx, editors, points, ctx.args.n_test)
    directions = {name: separation(v["vectors"], v["tasks"], ctx.args.bootstrap, ctx.args.seed)
                  for name, v in vectors.items()}
    rows = {**{n: _editor_row(e) for n, e in trained.items()},
            **{f"mend_single_task[{t}]": _editor_row(e) for t, e in single.items()}}
    return {"editors": rows, "directions": directions,
            "paper": PAPER["directions"]}


#: what the paper reports for each analysis (quoted beside ours; --render refreshes it in the JSON)
PAPER = {
    "pilot": {"table": "Table 1 (its caption names neither model nor editor; Rel/Gen/Por; cross-task rows are "
                       "drops, signed)",
              "counterfact": {"in_domain": {"Rel": 84.62, "Gen": 46.01, "Por": 42.46},
                              "to_zsre": {"Rel": -25.26, "Gen": -18.36, "Por": -4.79}},
              "zsre": {"in_domain": {"Rel": 96.62, "Gen": 94.60, "Por": 48.85},
                       "to_counterfact": {"Rel": -56.31, "Gen": -64.90, "Por": -1.35}}},
    "scaling": {"figure": "Fig. 4(c): Reliability/Generalization on hold-out ZsRE rise with 1, 2, 3 training tasks "
                          "(Recent; Recent & CF; Recent & CF & ConvSent); values only plotted"},
    "mixing": {"figure": "Fig. 4(d): Recent & ConvSent, balanced (ConvSent subsampled to 1,427 of 14,390) vs "
                         "unbalanced; Reliability on the OOD tasks rises from 18.23 to 25.55 with balancing"},
    "directions": {"figure": "Fig. 4(a): t-SNE of the editing direction; multi-task MEND's task clusters overlap, "
                             "InstructEdit's separate with a margin, like single-task MEND's"},
}


RUNNERS = {"pilot": run_pilot, "scaling": run_scaling, "mixing": run_mixing, "directions": run_directions}


# ----------------------------------------------------------------------------------------------
# Rendering (from the JSON alone)
# ----------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(cell: Mapping[str, Any], m: str) -> str:
    ci = cell.get(f"{m}_ci")
    return f"{_fmt(cell.get(m))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(cell.get(m))


def _metric_table(rows: list[tuple[str, str, Mapping[str, Any]]], first: str, second: str) -> list[str]:
    lines = [f"| {first} | {second} | " + " | ".join(METRICS) + " | n |", "|---|---|" + "---|" * len(METRICS) + "---|"]
    for a, b, cell in rows:
        lines.append(f"| {a} | {b} | " + " | ".join(_ci(cell, m) for m in METRICS) + f" | {cell.get('n', '')} |")
    return lines


def render_markdown(out: Mapping[str, Any]) -> str:
    analysis = out["analysis"]
    titles = {"pilot": "Pilot (paper Table 1): single-task editors across tasks",
              "scaling": "Task scaling (paper Fig. 4(b, c)): 1, 2, 3 training tasks -> hold-out ZsRE",
              "mixing": "Balanced vs unbalanced task mixing (paper Fig. 4(d))",
              "directions": "Editing directions (paper Fig. 4(a)): t-SNE and task separation"}
    lines = [f"# InstructEdit analysis: {titles[analysis]}", "",
             f"Produced by `{SCRIPT} {analysis}`; rendered from `instructedit_{analysis}.json` "
             f"(`python {SCRIPT} {analysis} --render` rebuilds this file and `instructedit_{analysis}.png`). "
             f"Model: {out['model']}; every editor trained {out['steps']} steps (seed {out['seed']}). "
             + ("Silhouette values in [-1, 1] and cosines" if analysis == "directions" else "Figures in percent")
             + " with 95% bootstrap intervals over edits; n = edits.", ""]
    proto = out.get("protocol") or {}
    if proto:
        lines += ["Protocol: " + ", ".join(f"{k} {v}" for k, v in proto.items()) + ".", ""]
    if analysis == "pilot":
        rows = [(train.replace("trained_on_", ""), test, out["cells"][test][train])
                for train in ("trained_on_counterfact", "trained_on_zsre", "untrained")
                for test in ("counterfact", "zsre") if train in out["cells"][test]]
        lines += ["## Editor trained on (row) applied to (column task)", ""]
        lines += _metric_table(rows, "trained on", "tested on") + [""]
        home = {"counterfact": "trained_on_counterfact", "zsre": "trained_on_zsre"}
        lines += ["Transfer gap: the cross-task editor minus the in-domain editor on the same test task "
                  "(percentage points; the paper's Table 1 reports such drops):", "",
                  "| trained on | tested on | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for test_task, own in home.items():
            for other in home.values():
                if other == own:
                    continue
                a, b = out["cells"][test_task][other], out["cells"][test_task][own]
                lines.append(f"| {other.replace('trained_on_', '')} | {test_task} | " + " | ".join(
                    "–" if a.get(m) is None or b.get(m) is None else f"{a[m] - b[m]:+.1f}" for m in METRICS) + " |")
        lines += [""]
        lines += ["Diagonal (counterfact->counterfact, zsre->zsre) is in-domain; `untrained` is the editor network "
                  "before training (the floor). ZsRE test: `zsre_mend_eval_portability_gpt4` (first n); ZsRE "
                  "training: `ZsRE-test-all` minus every test subject.", ""]
        paper = out["paper"]
        lines += [f"Paper ({paper['table']}): CounterFact editor in-domain "
                  + ", ".join(f"{k} {v}" for k, v in paper["counterfact"]["in_domain"].items())
                  + "; on ZsRE " + ", ".join(f"{k} {v:+}" for k, v in paper["counterfact"]["to_zsre"].items())
                  + ". ZsRE editor in-domain " + ", ".join(f"{k} {v}" for k, v in paper["zsre"]["in_domain"].items())
                  + "; on CounterFact " + ", ".join(f"{k} {v:+}" for k, v in paper["zsre"]["to_counterfact"].items()) + ".",
                  ""]
    elif analysis == "scaling":
        rows = [(str(out["scaling"]["n_tasks"][name]), name, cell) for name, cell in out["cells"]["zsre_holdout"].items()]
        lines += ["## InstructEdit on hold-out ZsRE by training tasks", ""]
        lines += _metric_table(rows, "# tasks", "trained on") + [""]
        lines += [f"Paper: {out['paper']['figure']}.", ""]
    elif analysis == "mixing":
        lines += ["## Mixing variants (training tasks Recent & ConvSent)", "", "| variant | setting | share of steps |",
                  "|---|---|---|"]
        for name, m in out["mixing"].items():
            setting = ", ".join(f"{k} {v}" for k, v in m["setting"].items() if v is not None)
            lines.append(f"| {name} | {setting} | " + ", ".join(f"{t} {s:.2f}" for t, s in m["task_share"].items()) + " |")
        lines += ["", "## Metrics per test task", ""]
        rows = [(task, name, cell) for task, per in out["cells"].items() for name, cell in per.items()]
        lines += _metric_table(rows, "test task", "variant") + [""]
        lines += ["## Mean update norm per task (Frobenius, all edited weights; 95% bootstrap interval)", "",
                  "| variant | " + " | ".join(next(iter(out["update_norms"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(out["update_norms"].values())))]
        for name, per in out["update_norms"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{v['mean']:.4g} [{v['ci'][0]:.4g}, {v['ci'][1]:.4g}]" if v.get("ci") else f"{v['mean']:.4g}"
                for v in per.values()) + " |")
        lines += ["", f"Paper: {out['paper']['figure']}.", ""]
    else:
        tasks = sorted({t for d in out["directions"].values() for t in d["tasks"]})
        lines += ["## Task separation of the editing directions (same test records for every editor)", "",
                  "| editor | silhouette (cosine, full space) [95% CI] | "
                  + " | ".join(f"{t} [95% CI]" for t in tasks) + " | silhouette (t-SNE plane) | n |",
                  "|---|---|" + "---|" * len(tasks) + "---|---|"]
        for name, d in out["directions"].items():
            ci = d["silhouette_cosine_ci"]
            per = " | ".join(f"{d['silhouette_by_task'][t]['mean']:.3f} [{d['silhouette_by_task'][t]['ci'][0]:.3f}, "
                             f"{d['silhouette_by_task'][t]['ci'][1]:.3f}]" for t in tasks)
            lines.append(f"| {name} | {d['silhouette_cosine']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {per} | "
                         f"{d['silhouette_tsne']:.3f} | {d['n']} |")
        lines += ["", "## Intra- vs inter-task cosine of the directions", "", "| editor | task pair | intra | inter | separation |",
                  "|---|---|---|---|---|"]
        for name, d in out["directions"].items():
            for pair, s in d["pairs"].items():
                lines.append(f"| {name} | {pair} | {_fmt(s['intra_cosine'], 3)} | {_fmt(s['inter_cosine'], 3)} | "
                             f"{_fmt(s['separation'], 3)} |")
        lines += ["", "Silhouette: +1 separate task clusters, 0 overlapping, labels = the test task of each edit. "
                  "Per-task columns: the mean silhouette of that task's edits. Intervals: 95% bootstrap of the mean of the "
                  "per-edit silhouette values (each computed once on all edits). "
                  "Single-task MEND: each task's points come from the editor trained on that task alone.", "",
                  f"Paper: {out['paper']['figure']}.", ""]
    lines += ["## Editors", "", "| editor | steps | train s | tasks | instructions | reused |", "|---|---|---|---|---|---|"]
    for name, e in out["editors"].items():
        lines.append(f"| {name} | {e['steps']} | {e['wall_s']:.0f} | {', '.join(e['tasks']) or '–'} | "
                     f"{e['instructions']} | {e['reused']} |")
    lines += ["", "## Configuration", "", f"- command: `{out['command']}` ({out['date']})",
              f"- edited weights: {', '.join(out['inner_params'])}",
              "- editor: rank {rank}, lr {lr}, edit_lr {edit_lr}, lr_lr {lr_lr}, cedit {cedit}, cloc {cloc}, batch 1; "
              "{threads} thread(s)".format(**out["args"]),
              f"- test records: {out['test_records']}; training records: {out['train_records']}",
              f"- wall time: {out['wall_seconds']:.0f} s"]
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def render_png(out: Mapping[str, Any], path: Path) -> None:
    """The analysis's figure, drawn from the JSON alone (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from instructedit_plugin.core.durable import atomic_write_file

    analysis = out["analysis"]
    if analysis == "directions":
        names = list(out["directions"])
        fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False)
        tasks = sorted({t for d in out["directions"].values() for t in d["tasks"]})
        colour = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(tasks)}
        for ax, name in zip(axes[0], names):
            d = out["directions"][name]
            for t in tasks:
                pts = [p for p, lab in zip(d["tsne"], d["tasks"]) if lab == t]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colour[t], label=t)
            ci = d["silhouette_cosine_ci"]
            ax.set_title(f"{name}\nsilhouette {d['silhouette_cosine']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][0].legend(fontsize=8)
    else:
        panels = [(task, per) for task, per in out["cells"].items()]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, (task, per) in zip(axes[0], panels):
            names = list(per)
            width = 0.8 / max(len(names), 1)
            for j, name in enumerate(names):
                cell = per[name]
                xs, ys, lo, hi = [], [], [], []
                for k, m in enumerate(METRICS):
                    if cell.get(m) is None:
                        continue
                    xs.append(k + j * width)
                    ys.append(cell[m])
                    ci = cell.get(f"{m}_ci") or [cell[m], cell[m]]
                    lo.append(cell[m] - ci[0])
                    hi.append(ci[1] - cell[m])
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name.replace("trained_on_", "from "))
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(METRICS))], METRICS)
            ax.set_ylim(0, 105)
            ax.set_title(f"tested on {task}", fontsize=9)
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"InstructEdit {analysis} ({out['model']}, {out['steps']} steps)", fontsize=9)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_all(out: dict[str, Any], json_path: Path, notes: str | None) -> Path:
    md = write_results(json_path, out, render_markdown, RESULT_KEYS, notes)
    render_png(json.loads(json_path.read_text(encoding="utf-8")), json_path.with_suffix(".png"))
    return md


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    json_path = Path(args.out) if args.out else Path(args.out_dir) / f"instructedit_{args.analysis}.json"
    if args.render:  # rebuild .md and .png from the JSON (--notes FILE: its text replaces the notes first)
        out = json.loads(json_path.read_text(encoding="utf-8"))
        if args.notes is not None:
            out["notes"] = read_notes(args.notes)
            if not out["notes"]:
                out.pop("notes")
        out["paper"] = PAPER[out["analysis"]]
        print(write_all(out, json_path, None))
        return 0
    notes = read_notes(args.notes) if args.notes else None
    command = command_line(SCRIPT, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("instructedit_plugin.instructedit.trainer", "instructedit_plugin.instructedit.checkpoint",
                  "instructedit_plugin.models.loading", "instructedit_plugin.instructedit.instructedit_main",
                  "instructedit_plugin.core.trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.time()
    train, test = load_analysis_data(args)  # every data error before the model loads
    need_train, need_test = NEEDS[args.analysis]
    train = {t: rs for t, rs in train.items() if t in need_train}
    test = {t: rs for t, rs in test.items() if t in need_test}
    ctx = Context(args)
    added = RUNNERS[args.analysis](ctx, train, test)
    out = {"analysis": args.analysis, "model": ctx.model_label, "steps": args.steps, "seed": args.seed,
           "protocol": {"instructions": args.instructions, "metric_inputs": "instructed", "raw_edit_loss": False,
                        "convsent_direction": "both"},
           **added, "test_records": {t: len(r) for t, r in test.items()},
           "train_records": {t: len(r) for t, r in train.items()}, "date": today(), "command": command,
           "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS},
           "inner_params": list(ctx.cfg.inner_params), "wall_seconds": round(time.time() - start, 1)}
    md = write_all(out, json_path, notes)
    LOG.info("wrote %s, %s and %s", json_path, md, json_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
