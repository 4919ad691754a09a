"""MQuAKE retrieval recall of the multi-hop procedures, measured without a language model (sentence encoder only).

Usage::

    python benchmarks/mquake_retrieval.py [--sizes 25 50 100] [--tune_cases 100 200] [--data_dir DIR] [--notes FILE]
        [--train_retriever [--retriever_cases 200 429] [--retriever_steps 300] ...] [--retriever FOLDER]
    python benchmarks/mquake_retrieval.py --render [--notes FILE]   # rebuild the .md from the .json

For each size N: one instruction memory holding the edits of the first N cases of MQuAKE-hard (as in
``examples/run_mquake.py``'s shared settings), every multi-hop question gets N-hop facts (N = the case's
hop count) from each procedure, and the **recall** is the share of the case's edited facts among them
(averaged over questions, as run_mquake's "retrieval recall"; 95% percentile bootstrap over cases).
No procedure reads the gold decomposition (``new_single_hops``) beyond its length:

* ``top_n`` -- the paper's (run_mquake's default ``shared_top_n``): the question's N best facts, one search;
* ``subject_chain`` -- run_mquake's option: each next fact is a stored edit whose ``subject`` is the previous
  fact's new object (reads the edits' metadata);
* ``chain`` -- one fact per hop through the std gate (run_mquake's ``shared_chain``);
* ``iterative`` -- ungated: hop 1 the question's best fact, hop i the best fact for the question followed by
  the last fact retrieved (text only);
* ``iterative_all`` -- the same with the question followed by every fact retrieved so far;
* ``iterative_bridge`` -- ``iterative`` plus a lexical bridge term: a candidate's cosine gains
  ``weight x`` the share of the last fact's words absent from the question (its new entity) that the
  candidate contains. ``weight`` is picked among ``--bridge_weights`` on the cases ``--tune_cases`` (after
  the evaluated ones; refused when they overlap);
* ``trained_iterative`` (with ``--train_retriever`` or ``--retriever FOLDER``) -- ``iterative_all`` (hop
  ``k`` queried with the question followed by every fact retrieved so far, ungated; run_mquake's
  ``shared_iterative``) with a memory whose encoder is all-MiniLM-L6-v2 fine-tuned for that query
  (:mod:`instructedit_plugin.instructed.retriever_training`) on the cases ``--retriever_cases`` (after the
  evaluated and the tuning cases; refused when they overlap; pairs whose fact is an evaluated case's fact
  are dropped unless ``--retriever_keep_evaluated_facts``); ``trained_top_n``: the paper's one search with
  that encoder. The retriever's recall on the tuning cases (base vs trained) goes into the JSON too.

Writes ``--out`` (JSON) and, rendered from it alone, the markdown beside it.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import command_line, notes_lines, read_notes, render_saved, setup_logging, today, write_results  # noqa: E402

SCRIPT = "benchmarks/mquake_retrieval.py"
LOG = logging.getLogger("mquake_retrieval")
DATA_FILE = "mquake/MQuAKE-hard.json"
RESULT_KEYS = frozenset({"benchmark", "encoder", "data", "sizes", "procedures", "results", "tuning", "seconds",
                         "date", "command", "notes", "retriever"})
PROCEDURES = ("top_n", "subject_chain", "chain", "iterative", "iterative_all", "iterative_bridge")
#: Procedures run with the trained retriever's memory (``--train_retriever`` / ``--retriever``).
TRAINED_PROCEDURES = ("trained_top_n", "trained_iterative")
BOOTSTRAP_RESAMPLES = 2000
_STOP = frozenset("a an the of is was by in to and for on at as with from that which who what where whose has have "
                  "its it be are".split())


class RetrievalError(ValueError):
    """Bad arguments of this benchmark (the message names the field and ends with a fix)."""


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.casefold()) if w not in _STOP}


def bridge_chains(memory, questions: Sequence[str], hops: Sequence[int], weight: float) -> list[list[str]]:
    """``iterative`` (``weight`` 0) or ``iterative_bridge``: the texts of N facts per question, see the module docs."""
    texts, n = memory.texts, len(memory)
    words = [_words(t) for t in texts]
    row_of = {item_id: row for row, item_id in enumerate(memory.ids)}
    chains: list[list[int]] = [[] for _ in questions]
    for hop in range(max(hops, default=0)):
        active = [q for q, h in enumerate(hops) if h > hop and len(chains[q]) < n]
        if not active:
            break
        queries = [questions[q] if hop == 0 else f"{questions[q]} {texts[chains[q][-1]]}" for q in active]
        scores, ids = memory.search(queries, n)
        for q, score_row, id_row in zip(active, scores.tolist(), ids.tolist()):
            novel = _words(texts[chains[q][-1]]) - _words(questions[q]) if chains[q] else set()
            best, best_score = None, float("-inf")
            for score, item_id in zip(score_row, id_row):
                row = row_of[int(item_id)]
                if row in chains[q]:
                    continue
                if weight and novel:
                    score += weight * len(novel & words[row]) / len(novel)
                if score > best_score:
                    best, best_score = row, score
            chains[q].append(best)
    return [[texts[row] for row in chain] for chain in chains]


def procedure_facts(name: str, memory, questions: list[str], hops: list[int], weight: float = 0.0) -> list[list[str]]:
    """The fact texts ``name`` (one of :data:`PROCEDURES`) gives each question."""
    from instructedit_plugin.instructed.memory import all_facts_chain_query, retrieve_subject_chains, retrieve_top_n

    if name in ("top_n", "trained_top_n"):
        chains = retrieve_top_n(memory, questions, hops)
    elif name == "subject_chain":
        chains = retrieve_subject_chains(memory, questions, hops)
    elif name == "chain":
        chains = memory.retrieve_chains(questions, hops)
    elif name in ("iterative_all", "trained_iterative"):
        chains = memory.retrieve_chains(questions, hops, None, query_builder=all_facts_chain_query)
    elif name in ("iterative", "iterative_bridge"):
        return bridge_chains(memory, questions, hops, weight if name == "iterative_bridge" else 0.0)
    else:
        raise RetrievalError(f"procedure: unknown {name!r}. Fix: use one of {', '.join(PROCEDURES + TRAINED_PROCEDURES)}")
    return [[s.text for s in chain] for chain in chains]


def shared_memory(cases: Sequence, encoder):
    """One memory holding every case's edit sentences (each identical sentence once)."""
    from instructedit_plugin.instructed.memory import InstructionMemory
    from instructedit_plugin.instructed.multihop import _case_instructions

    memory = InstructionMemory(encoder)
    pairs: dict[str, dict] = {}
    for case in cases:
        for text, meta in _case_instructions(case):
            pairs.setdefault(text, meta)
    memory.add(list(pairs), list(pairs.values()))
    return memory


def case_recalls(cases: Sequence, memory, name: str, weight: float = 0.0) -> list[list[float]]:
    """Per case, the recall of each of its questions under procedure ``name``."""
    from instructedit_plugin.instructed.multihop import edit_instruction

    questions = [q for case in cases for q in case.questions]
    hops = [len(case.new_single_hops) or len(case.edits) for case in cases for _ in case.questions]
    facts = iter(procedure_facts(name, memory, questions, hops, weight))
    out = []
    for case in cases:
        edits = {edit_instruction(e) for e in case.edits}
        out.append([len(set(next(facts)) & edits) / len(edits) for _ in case.questions])
    return out


def recall_with_interval(per_case: list[list[float]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                         ) -> tuple[float, list[float]]:
    """Recall over all questions (percent) and its 95% percentile bootstrap interval, resampling cases."""
    import numpy as np

    sums = np.array([sum(v) for v in per_case], dtype=float)
    counts = np.array([len(v) for v in per_case], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_case), size=(resamples, len(per_case)))
    means = np.sort(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    value = round(100 * float(sums.sum() / counts.sum()), 1)
    return value, [round(100 * float(means[int(0.025 * resamples)]), 1),
                   round(100 * float(means[int(0.975 * resamples) - 1]), 1)]


def wilson_over_facts(per_case: list[list[float]], facts_per_case: list[int]) -> tuple[int, int, list[float]]:
    """``(found, asked, [low, high])``: the (question, fact) pairs found over all questions and their 95% Wilson
    interval in percent (pairs of one case are not independent: narrower than the bootstrap over cases)."""
    from scipy.stats import binomtest

    found = round(sum(sum(v) * n for v, n in zip(per_case, facts_per_case)))
    asked = sum(len(v) * n for v, n in zip(per_case, facts_per_case))
    ci = binomtest(found, asked).proportion_ci(confidence_level=0.95, method="wilson")
    return found, asked, [round(100 * float(ci.low), 1), round(100 * float(ci.high), 1)]


def check_args(sizes: Sequence[int], tune_cases: Sequence[int], n_available: int,
               retriever_cases: Sequence[int] | None = None) -> None:
    """Refuse sizes the file cannot fill, and tuning or retriever training cases that overlap the evaluated ones
    (or each other)."""
    if not sizes or min(sizes) < 1:
        raise RetrievalError(f"--sizes: expected positive case counts, got {list(sizes)}. Fix: pass e.g. --sizes 25 50 100")
    if max(sizes) > n_available:
        raise RetrievalError(f"--sizes: {max(sizes)} cases asked, the file has {n_available}. Fix: pass smaller --sizes")
    start, stop = tune_cases
    if not 0 <= start < stop <= n_available:
        raise RetrievalError(f"--tune_cases: [{start}, {stop}) is not a range of the file's {n_available} cases. "
                             "Fix: pass START STOP with 0 <= START < STOP <= the number of cases")
    if start < max(sizes):
        raise RetrievalError(f"--tune_cases: starts at case {start}, inside the evaluated first {max(sizes)} cases. "
                             f"Fix: pass --tune_cases {max(sizes)} {max(sizes) + (stop - start)} or later")
    if retriever_cases is None:
        return
    first, last = retriever_cases
    if not 0 <= first < last <= n_available:
        raise RetrievalError(f"--retriever_cases: [{first}, {last}) is not a range of the file's {n_available} cases. "
                             "Fix: pass START STOP with 0 <= START < STOP <= the number of cases")
    if first < max(sizes) or (first < stop and start < last):
        raise RetrievalError(f"--retriever_cases: [{first}, {last}) overlaps the evaluated cases [0, {max(sizes)}) or "
                             f"the tuning cases [{start}, {stop}). Fix: pass --retriever_cases {max(stop, max(sizes))} "
                             f"{n_available}")


def render_markdown(out: dict) -> str:
    """The markdown table from the JSON alone."""
    names = out["procedures"]
    lines = [f"# MQuAKE retrieval recall without a model ({out['encoder']})", "",
             f"First N cases of `{out['data']}`, one memory of their edits; recall of the case's edited facts among "
             "those each multi-hop question gets (percent, 95% bootstrap interval over cases).", "",
             "| cases | facts in memory | questions | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for size in out["sizes"]:
        row = out["results"][str(size)]
        cells = [f"{row['procedures'][p]['recall']:.1f} [{row['procedures'][p]['ci95'][0]:.1f}–"
                 f"{row['procedures'][p]['ci95'][1]:.1f}]" for p in names]
        lines.append(f"| {size} | {row['facts']} | {row['questions']} | " + " | ".join(cells) + " |")
    if all("wilson95" in out["results"][str(size)]["procedures"][p] for size in out["sizes"] for p in names):
        lines += ["", "The same recalls with 95% Wilson intervals over the (question, fact) pairs found / asked (a case's "
                  "questions share its facts, so these are narrower than the bootstrap over cases):", "",
                  "| cases | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for size in out["sizes"]:
            row = out["results"][str(size)]["procedures"]
            lines.append(f"| {size} | " + " | ".join(
                f"{row[p]['recall']:.1f} [{row[p]['wilson95'][0]:.1f}–{row[p]['wilson95'][1]:.1f}] "
                f"({row[p]['facts_found']}/{row[p]['facts_asked']})" for p in names) + " |")
    tuning = out["tuning"]
    lines += ["", f"`iterative_bridge` weight {tuning['chosen']} picked on cases {tuning['cases'][0]}–"
              f"{tuning['cases'][1] - 1} (recall by weight: "
              + ", ".join(f"{w}: {r:.1f}" for w, r in tuning["recall_by_weight"].items()) + ")."]
    lines += retriever_lines(out.get("retriever"))
    lines += ["",
              f"Command: `{out['command']}` ({out['seconds']:.0f} s, {out['date']})."]
    return "\n".join(lines + notes_lines(out)) + "\n"


def retriever_lines(info: dict | None) -> list[str]:
    """The markdown paragraph describing the trained retriever (none without one)."""
    if not info:
        return []
    cfg, val = info["config"], info["validation"]
    negatives = " + a same-relation hard negative" if cfg["hard_negatives"] else ""
    facts = ("facts of evaluated cases kept as positives (less strict option)" if cfg["keep_evaluated_facts"] else
             f"the {info['excluded_evaluated_facts']} facts of the evaluated cases never a positive")
    cases = (f"cases {info['cases'][0]}–{info['cases'][1] - 1}" if info.get("cases") else
             f"{len(info['training_case_ids'])} cases (ids in the JSON)")
    loss = ("not trained (0 steps)" if info["loss_first"] is None else
            f"loss {info['loss_first']:.3f} (step 1) -> {info['loss_last']:.3f} (last step)")

    def pct(row: dict) -> str:
        return f"{row['recall']:.1f} [{row['ci95'][0]:.1f}–{row['ci95'][1]:.1f}]"
    return ["", f"`trained_*`: the encoder `{info['archive']}` ({info['base']} with its last {cfg['train_layers']} "
            f"transformer layers fine-tuned: MultipleNegativesRankingLoss{negatives}, {cfg['steps']} steps, batch "
            f"{cfg['batch_size']}, lr {cfg['learning_rate']:g}, seed {cfg['seed']}) on {info['pairs']} (question + facts "
            f"so far -> next fact) pairs of {cases}; {facts}; {loss}. Recall on the validation cases {val['cases'][0]}–{val['cases'][1] - 1}: "
            f"iterative_all {pct(val['iterative_all'])} -> trained_iterative {pct(val['trained_iterative'])}."]


def retriever_archive(args: argparse.Namespace, cases: Sequence, evaluated: Sequence) -> Path:
    """``--retriever FOLDER`` (checked: trained on none of ``evaluated``), else the archive ``--train_retriever``
    trains (or takes from the cache) on ``--retriever_cases``."""
    from instructedit_plugin.instructed.retriever_training import RetrieverConfig, check_retriever_disjoint, train_retriever

    if args.retriever:
        check_retriever_disjoint(args.retriever, evaluated)
        return Path(args.retriever)
    config = RetrieverConfig(steps=args.retriever_steps, batch_size=args.retriever_batch,
                             learning_rate=args.retriever_lr, seed=args.retriever_seed,
                             train_layers=args.retriever_layers, keep_evaluated_facts=args.retriever_keep_evaluated_facts)
    start, stop = args.retriever_cases
    return train_retriever(cases[start:stop], evaluated, config)


def shown_archive(folder: Path) -> str:
    """An archive under the plugin cache as ``<plugin cache>/...`` (the same on every machine), else as given."""
    from instructedit_plugin.models.cache import cache_dir

    try:
        return "<plugin cache>/" + Path(folder).resolve().relative_to(cache_dir().resolve()).as_posix()
    except ValueError:
        return str(folder)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--tune_cases", type=int, nargs=2, default=[100, 200], metavar=("START", "STOP"),
                        help="cases [START, STOP) on which iterative_bridge's weight is picked")
    parser.add_argument("--bridge_weights", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--data_dir", default=None, help="data folder (default: INSTRUCTEDIT_DATA_DIR), or the MQuAKE file")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mquake_retrieval.json"))
    parser.add_argument("--train_retriever", action="store_true",
                        help="fine-tune the encoder for iterative retrieval (or take it from the cache) and add trained_*")
    parser.add_argument("--retriever", default=None, help="a retriever archive folder (adds trained_*; checked disjoint)")
    parser.add_argument("--retriever_cases", type=int, nargs=2, default=[200, 429], metavar=("START", "STOP"),
                        help="cases [START, STOP) the retriever trains on (after the evaluated and tuning cases)")
    parser.add_argument("--retriever_steps", type=int, default=300)
    parser.add_argument("--retriever_batch", type=int, default=16)
    parser.add_argument("--retriever_lr", type=float, default=1e-4)
    parser.add_argument("--retriever_seed", type=int, default=0)
    parser.add_argument("--retriever_layers", type=int, default=2, help="last transformer layers trained")
    parser.add_argument("--retriever_keep_evaluated_facts", action="store_true",
                        help="keep training pairs whose fact is an evaluated case's fact (less strict; labelled)")
    parser.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    parser.add_argument("--notes", default=None, help="markdown file whose text goes into the JSON as notes")
    args = parser.parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return json.loads(Path(args.out).read_text(encoding="utf-8"))
    setup_logging()
    notes = read_notes(args.notes) if args.notes else None
    command = command_line(SCRIPT, argv)
    started = time.perf_counter()
    from instructedit_plugin.data import load_mquake, resolve_data_dir
    from instructedit_plugin.instructed.encoder import SentenceEncoder

    path = Path(args.data_dir) if args.data_dir and Path(args.data_dir).is_file() else \
        Path(resolve_data_dir(args.data_dir)) / DATA_FILE
    cases = list(load_mquake(path))
    retriever_cases = None
    if args.train_retriever:
        retriever_cases = [args.retriever_cases[0], min(args.retriever_cases[1], len(cases))]
        args.retriever_cases = retriever_cases
    check_args(args.sizes, args.tune_cases, len(cases), retriever_cases)
    encoder = SentenceEncoder()
    tune = cases[args.tune_cases[0]:args.tune_cases[1]]
    tune_memory = shared_memory(tune, encoder)
    by_weight = {}
    for weight in args.bridge_weights:
        by_weight[str(weight)] = recall_with_interval(case_recalls(tune, tune_memory, "iterative_bridge", weight))[0]
        LOG.info("tuning: weight %s -> recall %.1f", weight, by_weight[str(weight)])
    chosen = float(max(by_weight, key=lambda w: (by_weight[w], -float(w))))
    procedures, retriever, trained = list(PROCEDURES), None, None
    if args.train_retriever or args.retriever:
        from instructedit_plugin.instructed.retriever_training import retriever_info

        folder = retriever_archive(args, cases, cases[:max(args.sizes)])
        trained = SentenceEncoder(str(folder))
        info = retriever_info(folder)
        validation = {"cases": list(args.tune_cases)}
        for name, enc in (("iterative_all", encoder), ("trained_iterative", trained)):
            recall, ci = recall_with_interval(case_recalls(tune, shared_memory(tune, enc), name))
            validation[name] = {"recall": recall, "ci95": ci}
        LOG.info("retriever validation: %s", validation)
        procedures += list(TRAINED_PROCEDURES)
        retriever = {"archive": shown_archive(folder), "key": info["key"], "base": info["base"], "config": info["config"],
                     "cases": None if args.retriever else retriever_cases,
                     "training_case_ids": info["training"]["case_ids"], "pairs": info["training"]["pairs"],
                     "excluded_evaluated_facts": info["training"]["excluded_evaluated_facts"],
                     "loss_first": info["loss"]["first"], "loss_last": info["loss"]["last"],
                     "train_seconds": info["seconds"], "validation": validation}
    results = {}
    for size in args.sizes:
        memory = shared_memory(cases[:size], encoder)
        trained_memory = shared_memory(cases[:size], trained) if trained is not None else None
        row = {"facts": len(memory), "questions": sum(len(c.questions) for c in cases[:size]), "procedures": {}}
        for name in procedures:
            use = trained_memory if name in TRAINED_PROCEDURES else memory
            per_case = case_recalls(cases[:size], use, name, chosen)
            recall, ci = recall_with_interval(per_case)
            found, asked, wilson = wilson_over_facts(per_case, [len(c.edits) for c in cases[:size]])
            row["procedures"][name] = {"recall": recall, "ci95": ci, "wilson95": wilson, "facts_found": found,
                                       "facts_asked": asked}
        results[str(size)] = row
        LOG.info("%d cases: %s", size, {p: v["recall"] for p, v in row["procedures"].items()})
    out = {"benchmark": "mquake_retrieval", "encoder": encoder.name, "data": f"{path.parent.name}/{path.name}",
           "sizes": list(args.sizes), "procedures": procedures, "results": results,
           "tuning": {"cases": list(args.tune_cases), "recall_by_weight": by_weight, "chosen": chosen},
           "seconds": round(time.perf_counter() - started, 1), "date": today(), "command": command}
    if retriever is not None:
        out["retriever"] = retriever
    md_path = write_results(args.out, out, render_markdown, RESULT_KEYS, notes)
    print(render_markdown(json.loads(json.dumps(out))))
    print(f"wrote {args.out} and {md_path}")
    return out


if __name__ == "__main__":
    from instructedit_plugin.errors import PluginError

    try:
        main()
    except (RetrievalError, PluginError) as exc:
        raise SystemExit(f"mquake_retrieval: {exc}") from None
