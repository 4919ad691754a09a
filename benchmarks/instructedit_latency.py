"""Edit latency of InstructEdit with and without the instruction-prefix cache, against MEND, on Gemma-3-270M.

One editor network (the benchmark's: ``hparams/TRAINING/InstructEdit/gemma-3-270m.yaml``, MLP up/down
projections of ``--layers``, ``--rank``) edits the first ``--n_edits`` CounterFact test records three
ways, interleaved record by record in one process:

* ``mend``: the plain edit prompt (multi-task MEND edits without instructions);
* ``instructedit``: the prompt after a seen training description of the paper's library (as
  ``benchmarks/instructedit_cpu.py`` edits), the whole sequence through every layer;
* ``instructedit_cached``: the same edit with the instruction's states below the first edited layer
  reused across edits (:mod:`instructedit_plugin.instructedit.prefix_states`), as the evaluator edits by default.

Each timed unit is :meth:`~instructedit_plugin.instructedit.evaluate.EditEvaluator.edit_weights`
(tokenising and the edit), the latency the benchmark reports. The cost of an edit does not depend on the
editor's trained values, so the editor is the untrained network unless ``--archive`` names a checkpoint.
Reported: the median wall time and the median CPU time of the editing thread per method, each with a 95%
bootstrap interval over edits, the ratios of the medians to MEND (edits resampled in pairs), the largest
difference between the cached and uncached edits' float32 updates (relative to the update; with a bfloat16
model also on a float32 copy, ``--check_float32``, beside the bfloat16 rounding), and the cache's hits.
Writes ``benchmarks/results/instructedit_latency.json`` and ``.md`` (rendered from the JSON alone).

Run from the repository root::

    python benchmarks/instructedit_latency.py --data_dir ../shared/data --n_edits 20
    python benchmarks/instructedit_latency.py --render
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import (  # noqa: E402
    DEFAULT_RESAMPLES, bootstrap_ci, command_line, figures_with_ci, notes_lines, produced_by, read_notes, render_saved,
    setup_logging, today, write_results,
)

LOG = logging.getLogger("instructedit_latency")
SCRIPT = "benchmarks/instructedit_latency.py"
TRAIN_YAML = ROOT / "hparams" / "TRAINING" / "InstructEdit" / "gemma-3-270m.yaml"
METHODS = ("mend", "instructedit", "instructedit_cached")
CLOCKS = ("wall_ms", "cpu_ms")
RESULT_KEYS = frozenset({"model", "date", "command", "args", "latency", "ratios", "per_edit", "cache", "exactness",
                         "edit_tokens", "notes"})
_UNSAVED_ARGS = ("out", "render", "notes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--n_edits", type=int, default=20, help="CounterFact test records edited by each method")
    p.add_argument("--layers", default="16,17", help="decoder layers whose MLP up/down projections are edited")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--archive", default=None, help="a trained editor checkpoint (default: the untrained network)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model_dir", default=None, help="a local causal LM instead of the embedded Gemma-3-270M (tests)")
    p.add_argument("--check_float32", type=int, default=5,
                   help="with a lower-precision --dtype: repeat the first N edits on a float32 copy (exactness of the "
                        "cache there, and the dtype's own rounding); 0: skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples of each 95%% interval")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instructedit_latency.json"))
    p.add_argument("--render", action="store_true", help="rebuild the .md from the saved .json and exit")
    p.add_argument("--notes", default=None, help="markdown file whose text goes into the JSON as notes")
    args = p.parse_args(argv)
    if args.n_edits < 2:
        p.error(f"--n_edits must be at least 2 (an interval needs several edits), got {args.n_edits}. Fix: pass e.g. 20")
    return args


# ----------------------------------------------------------------------------------------------
# Figures (from the per-edit times alone)
# ----------------------------------------------------------------------------------------------
def latency_figures(per_edit: dict, n_boot: int, seed: int, hits: list | None = None) -> tuple[dict, dict]:
    """``({method: {clock: [median, low, high]}}, {"<method>/mend": {clock: [ratio, low, high]}})``: median
    latencies with 95% bootstrap intervals over edits, and ratios of medians with the edits resampled in pairs
    (every method edited the same records). ``hits`` (per edit: the cached edit found its instruction in the
    cache) adds ``instructedit_cached_hits/mend``: the same ratio over those edits only."""
    latency = {m: {c: [round(statistics.median(per_edit[m][c]), 2),
                       *(round(x, 2) for x in bootstrap_ci(per_edit[m][c], n_boot, seed, statistic=statistics.median))]
                   for c in CLOCKS} for m in METHODS if m in per_edit}
    ratios = {}
    for m in METHODS[1:]:
        if m not in per_edit:
            continue
        ratios[f"{m}/mend"] = {}
        for c in CLOCKS:
            pairs = list(zip(per_edit[m][c], per_edit["mend"][c]))

            def ratio(rows):
                return {"r": statistics.median(a for a, _ in rows) / statistics.median(b for _, b in rows)}

            ratios[f"{m}/mend"][c] = figures_with_ci(pairs, ratio, n_boot, seed, digits=3)["r"]
            if m == "instructedit_cached" and hits and sum(hits) >= 2:
                hit_pairs = [p for p, h in zip(pairs, hits) if h]
                ratios.setdefault("instructedit_cached_hits/mend", {})[c] = figures_with_ci(
                    hit_pairs, ratio, n_boot, seed, digits=3)["r"]
    return latency, ratios


def render_markdown(out: dict) -> str:
    """``instructedit_latency.md`` from the JSON alone."""
    args = out["args"]
    fmt = lambda v: f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"  # noqa: E731
    rfmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    lines = [f"# InstructEdit edit latency: instruction-prefix cache ({out['model']})", "",
             produced_by(SCRIPT, "instructedit_latency.json")
             + f" {args['n_edits']} CounterFact edits per method, interleaved record by record in one process; medians "
             f"with 95% bootstrap intervals over edits ({args['bootstrap']} resamples); ratios of medians with the edits "
             "resampled in pairs. Wall: elapsed time of an edit; CPU: CPU time of the editing thread (robust to other "
             "processes on a shared machine).", "",
             "| method | wall ms | CPU ms | wall / MEND | CPU / MEND |", "|---|---|---|---|---|"]
    for m, v in out["latency"].items():
        r = out["ratios"].get(f"{m}/mend")
        lines.append(f"| {m} | {fmt(v['wall_ms'])} | {fmt(v['cpu_ms'])} | "
                     + (f"{rfmt(r['wall_ms'])} | {rfmt(r['cpu_ms'])} |" if r else "1 | 1 |"))
    cache, exact, tokens = out["cache"], out["exactness"], out["edit_tokens"]
    lines += ["", "## Target", ""]
    for name, label in (("instructedit_cached/mend", "all edits"), ("instructedit_cached_hits/mend", "cache hits only")):
        r = out["ratios"].get(name)
        for c in CLOCKS if r else ():
            lines.append(f"- InstructEdit (cached) / MEND, {label}, {c[:-3]}: {r[c][0]:.3f} (95% [{r[c][1]:.3f}, "
                         f"{r[c][2]:.3f}]); target <= 1.1: {'met' if r[c][0] <= 1.1 else 'missed'}")
    lines += ["", "## Configuration", "",
              f"- command: `{out['command']}` ({out['date']})",
              f"- model: {out['model']}; edited: MLP up/down of layers {args['layers']}, rank {args['rank']}; "
              f"editor: {args['archive'] or 'untrained network (same cost as a trained one)'}",
              f"- edit tokens (median): plain {tokens['plain']}, instructed {tokens['instructed']}, instruction prefix "
              f"{tokens['prefix']}",
              f"- cache: {cache['entries']} instructions, {cache['hits']} hits, {cache['misses']} misses (a miss computes "
              "the instruction's lower-layer states); median of the cached edits: "
              + "; ".join(f"{label} {cache[kind + '_median']['wall_ms']:.1f} ms wall, {cache[kind + '_median']['cpu_ms']:.1f} "
                          "ms CPU" for kind, label in (("hit", "hits"), ("miss", "misses")) if cache.get(kind + "_median"))
              + f" (MEND {out['latency']['mend']['wall_ms'][0]:.1f} / {out['latency']['mend']['cpu_ms'][0]:.1f} ms)",
              f"- exactness: largest |cached - uncached| of the editor's float32 update (before the cast to the model's "
              f"dtype), relative to the largest update entry: {exact['max_relative_gap']:.2e} over {exact['n']} edits"]
    check = exact.get("float32_check")
    if check:
        dtype_key = next(k for k in check if k.endswith("_uncached_vs_float32"))
        lines.append(f"- the first {check['n']} edits again on a float32 copy of the model: cached vs uncached "
                     f"{check['float32_cached_vs_uncached']:.2e} (the cache is exact); {dtype_key.split('_')[0]} uncached vs "
                     f"float32 uncached {check[dtype_key]:.2e} (the size of {dtype_key.split('_')[0]} rounding, the scale "
                     "of the gap above)")
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def editor_updates(model, tok, editor, cache, prompt: str, target: str, instruction: str, max_length: int = 96):
    """The editor's float32 updates (``capture`` of ``compute_edited_weights``, before the cast to the model's
    dtype) for one edit, without and with the instruction-prefix cache."""
    from instructedit_plugin.instructedit.dataset import encode_pairs
    from instructedit_plugin.instructedit.editable import compute_edited_weights
    from instructedit_plugin.instructedit.prefix_states import common_prefix_length

    batch = encode_pairs(tok, [(prompt, target)], max_length)
    prefix_ids = tok(instruction)["input_ids"]
    k = min(common_prefix_length(batch["input_ids"][0].tolist(), prefix_ids), len(prefix_ids) - 1,
            batch["input_ids"].shape[1] - 1)  # as EditEvaluator.edit_weights
    without, with_cache = {}, {}
    compute_edited_weights(model, editor.hypernet, editor.edit_lrs, editor.specs, batch, sparse_logits=True,
                           capture=without)
    compute_edited_weights(model, editor.hypernet, editor.edit_lrs, editor.specs, batch, sparse_logits=True,
                           capture=with_cache, prefix_cache=cache, prefix_len=k)
    return without, with_cache


def relative_gap(a: dict, b: dict) -> float:
    """Largest ``|a - b|`` over the weights, relative to the largest entry of ``b``."""
    return max(float((a[n].float() - b[n].float()).abs().max() / b[n].float().abs().max().clamp_min(1e-30)) for n in b)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None
    command = command_line(SCRIPT, argv)
    setup_logging()
    import torch
    from tqdm import tqdm

    from instructedit_plugin.core.config import read_yaml
    from instructedit_plugin.data import load_requests, resolve_data_dir
    from instructedit_plugin.instructedit import InstructEditTrainingHparams
    from instructedit_plugin.instructedit.editable import InstructEditModel
    from instructedit_plugin.instructedit.evaluate import EditEvaluator, instruction_for
    from instructedit_plugin.instructedit.instructedit_main import LoadedEditor
    from instructedit_plugin.instructedit.prefix_states import PrefixStateCache
    from instructedit_plugin.instructions import load_instructions
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir)
    requests = load_requests(data_dir / "counterfact" / "test_cf-generate-10.jsonl", limit=args.n_edits)
    library = load_instructions(str(Path(data_dir) / "instructedit" / "easyedit_task_descriptions.json"))
    model_dir = Path(args.model_dir) if args.model_dir else embedded_model_dir()
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    plain_eval = EditEvaluator(model, tok, library=library, seed=args.seed, prefix_cache=False)
    cached_eval = EditEvaluator(model, tok, library=library, seed=args.seed, prefix_cache=True)
    if args.archive:
        editor = plain_eval.editor(args.archive)
    else:
        cfg = InstructEditTrainingHparams.from_dict({**read_yaml(TRAIN_YAML)[0], "model_name": str(model_dir)},
                                                    source=str(TRAIN_YAML))
        cfg.inner_params = [f"model.layers.{int(i)}.mlp.{w}_proj.weight" for i in args.layers.split(",") for w in ("up", "down")]
        cfg.rank, cfg.device, cfg.dtype = args.rank, "cpu", args.dtype
        torch.manual_seed(args.seed)
        wrapper = InstructEditModel(model, cfg)
        wrapper.eval()
        editor = LoadedEditor(wrapper.hypernet, wrapper.edit_lrs.detach(), wrapper.specs, {}, Path("untrained"))
    model.eval()

    def timed(evaluator, prompt, target, instruction):
        wall, cpu = time.perf_counter(), time.thread_time()
        new, _ = evaluator.edit_weights(editor, prompt, target, instruction=instruction)
        return new, 1000.0 * (time.perf_counter() - wall), 1000.0 * (time.thread_time() - cpu)

    inputs = []
    for i, r in enumerate(requests):
        instruct = instruction_for(r, "counterfact", "seen", i, library, args.seed)
        inputs.append((r, instruct(r["prompt"]), instruct("")))
    # warm-up (not timed): first calls allocate; the cache starts empty again afterwards
    r0, p0, i0 = inputs[0]
    for ev, prompt, instr in ((plain_eval, r0["prompt"], None), (plain_eval, p0, i0), (cached_eval, p0, i0)):
        timed(ev, prompt, r0["target_new"], instr)
    cache = cached_eval.prefix_states(editor)
    cache.clear()
    cache.hits = cache.misses = 0

    per_edit = {m: {c: [] for c in CLOCKS} for m in METHODS}
    gaps, hit_flags = [], []

    def update_gap(prompt, target, instruction):
        """Largest difference of the editor's float32 updates (before the cast to the model's dtype) with and
        without the cache, relative to the largest update entry (not timed)."""
        without, with_cache = editor_updates(model, tok, editor, cache, prompt, target, instruction)
        return relative_gap(with_cache, without)
    for r, prompt, instr in tqdm(inputs, desc="edits", unit="record"):
        _, wall, cpu = timed(plain_eval, r["prompt"], r["target_new"], None)
        per_edit["mend"]["wall_ms"].append(wall)
        per_edit["mend"]["cpu_ms"].append(cpu)
        ref, wall, cpu = timed(plain_eval, prompt, r["target_new"], instr)
        per_edit["instructedit"]["wall_ms"].append(wall)
        per_edit["instructedit"]["cpu_ms"].append(cpu)
        hits = cache.hits
        _, wall, cpu = timed(cached_eval, prompt, r["target_new"], instr)
        per_edit["instructedit_cached"]["wall_ms"].append(wall)
        per_edit["instructedit_cached"]["cpu_ms"].append(cpu)
        hit_flags.append(cache.hits > hits)
        gaps.append(update_gap(prompt, r["target_new"], instr))
    float32_check = None
    if args.check_float32 and args.dtype != "float32":
        # the same edits on a float32 copy: exact there, and the model dtype's own rounding (uncached, vs float32)
        model32, _ = load_causal_lm(model_dir, dtype="float32")
        model32.eval()
        cache32 = PrefixStateCache(model32, cache.first_layer)
        fp32_gaps, dtype_gaps = [], []
        for r, prompt, instr in inputs[: args.check_float32]:
            plain32, cached32 = editor_updates(model32, tok, editor, cache32, prompt, r["target_new"], instr)
            plain, _ = editor_updates(model, tok, editor, cache, prompt, r["target_new"], instr)
            fp32_gaps.append(relative_gap(cached32, plain32))
            dtype_gaps.append(relative_gap(plain, plain32))
        del model32
        float32_check = {"n": len(fp32_gaps), "float32_cached_vs_uncached": max(fp32_gaps),
                         f"{args.dtype}_uncached_vs_float32": max(dtype_gaps)}
    per_edit = {m: {c: [round(x, 3) for x in v] for c, v in clocks.items()} for m, clocks in per_edit.items()}
    latency, ratios = latency_figures(per_edit, args.bootstrap, args.seed, hit_flags)  # from the values the JSON keeps
    lengths = {"plain": [len(tok(r["prompt"] + " " + r["target_new"])["input_ids"]) for r, _, _ in inputs],
               "instructed": [len(tok(p + " " + r["target_new"])["input_ids"]) for r, p, _ in inputs],
               "prefix": [len(tok(i)["input_ids"]) for _, _, i in inputs]}
    out = {
        "model": f"{model_dir} ({args.dtype}, CPU)" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype}, CPU)",
        "date": today(), "command": command,
        "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS},
        "latency": latency, "ratios": ratios,
        "per_edit": per_edit,
        "cache": {"entries": len(cache), "hits": sum(hit_flags), "misses": len(hit_flags) - sum(hit_flags),
                  "hit": hit_flags,
                  **{f"{kind}_median": {c: round(statistics.median(v for v, h in zip(per_edit["instructedit_cached"][c],
                                                                                     hit_flags) if h == want), 2)
                                        for c in CLOCKS} for kind, want in (("hit", True), ("miss", False))
                     if want in hit_flags}},
        "exactness": {"max_relative_gap": max(gaps), "n": len(gaps), **({"float32_check": float32_check} if float32_check else {})},
        "edit_tokens": {k: statistics.median(v) for k, v in lengths.items()},
    }
    md = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    LOG.info("wrote %s and %s", args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
