"""Edit and query cost of InstructEd's instruction memory at 1k / 10k / 100k instructions.

Usage::

    python benchmarks/memory_scale.py [--sizes 1000 10000 100000] [--threads 1] [--out PATH] [--notes FILE]
    python benchmarks/memory_scale.py --render [--notes FILE]   # rebuild the .md from the .json

What is measured (CPU, ``torch.set_num_threads(threads)``):

* **edit cost**: ``memory.add(1,000 instruction sentences)`` -- one batched
  encoder call (counted) plus storage; also the storage-only cost of appending
  1,000 pre-computed vectors to a 100k memory.
* **query cost**: ``search(k=5)`` for one query at a time (latency; median of
  repeated runs) and for a batch of 64 queries (per-query cost), with float32
  and float16 storage, through the default path (``prefilter="auto"``: the
  exact int8 prefilter for memories >= 32,768 items when available), the plain
  dense product (``prefilter=False``) and FAISS ``IndexFlatIP`` when installed.
  Query *encoding* (one MiniLM forward pass) is reported separately, as is one
  end-to-end ``select()`` from text.

To keep the run short, only 1,000 synthetic instruction texts are really
encoded; the 10k and 100k memories tile those 1,000 vectors and add small
Gaussian jitter (then re-normalise), which the output states. Results go to a
table on stdout, to ``benchmarks/results/memory_scale.json`` and to
``memory_scale.md``, rendered from the JSON alone (see ``benchmarks/results_io.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import (  # noqa: E402
    command_line, merged_runs_lines, notes_lines, read_notes, render_saved, today, write_results,
)

SCRIPT = "benchmarks/memory_scale.py"
#: Every top-level key this script writes into ``memory_scale.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "benchmark", "torch", "threads", "python", "cpu", "faiss", "load_average_at_start", "encoder", "dim", "note",
    "edit_cost", "query_encoding_ms", "retrieval_at_1_own_question_1k", "search",  # the figures
    "date", "command", "notes", "merged_runs",  # the run; --notes text; other sources merged in
})

RELATIONS = [
    ("The spouse of {} is", "Who is {} married to?"),
    ("{} is a citizen of", "What is the country of citizenship of {}?"),
    ("The capital of {} is", "What is the capital of {}?"),
    ("{} was performed by", "Who performed {}?"),
    ("The official language of {} is", "What is the official language of {}?"),
    ("{} was born in the city of", "Where was {} born?"),
    ("The head of state of {} is", "Who is the head of state of {}?"),
    ("{} works in the field of", "What field does {} work in?"),
    ("The author of {} is", "Who wrote {}?"),
    ("{} is affiliated with the religion of", "Which religion is {} affiliated with?"),
]
SYLLABLES = ["ka", "lo", "mi", "ran", "tes", "vo", "bel", "dor", "shi", "na", "qu", "ex", "pra", "lin", "gor", "zu"]


def _name(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
                    for _ in range(rng.randint(1, 2)))


def synthetic_edits(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` instruction sentences and, for each, a question it answers."""
    rng = random.Random(seed)
    facts, questions = [], []
    for _ in range(n):
        prompt, question = rng.choice(RELATIONS)
        subject, target = _name(rng), _name(rng)
        facts.append(f"{prompt.format(subject)} {target}.")
        questions.append(question.format(subject))
    return facts, questions


def tiled(base: torch.Tensor, n: int, jitter: float, seed: int = 0) -> torch.Tensor:
    """``n`` unit vectors: ``base`` repeated, plus Gaussian jitter (std ``jitter`` per coordinate)."""
    gen = torch.Generator().manual_seed(seed)
    reps = -(-n // base.shape[0])
    out = base.repeat(reps, 1)[:n].clone()
    out[base.shape[0]:] += jitter * torch.randn(n - base.shape[0], base.shape[1], generator=gen)
    return torch.nn.functional.normalize(out, dim=1)


def _times_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    return statistics.median(_times_ms(fn, repeats, warmup))


def measure(mem, q_batch: torch.Tensor, repeats: int) -> dict:
    """Single-query latency (median and min), batched per-query cost and exactness of ``mem.search``."""
    mem.search(q_batch[:1], k=5)  # the first search sets up the index / the prefilter decision
    path = "int8-prefilter" if mem._int8_state == "on" else ("faiss" if mem.use_faiss else "dense")
    counter = iter(range(10 ** 9))
    one = _times_ms(lambda: mem.search(q_batch[next(counter) % len(q_batch)].unsqueeze(0), k=5), repeats)
    batch_ms = _median_ms(lambda: mem.search(q_batch, k=5), max(3, repeats // 5))
    ref = (q_batch @ mem.embeddings.to(torch.float32).T).topk(5, dim=1)
    got = [mem.search(q_batch[i:i + 1], k=5)[0] for i in range(len(q_batch))]  # the single-query path
    exact = bool(torch.allclose(torch.cat(got), ref.values, atol=1e-5))
    exact &= bool(torch.allclose(mem.search(q_batch, k=5)[0], ref.values, atol=1e-5))  # and the batched one
    return {"path": path, "query_ms": round(statistics.median(one), 3), "query_ms_min": round(min(one), 3),
            "batch64_ms_per_query": round(batch_ms / len(q_batch), 3), "exact": exact}


def render_markdown(out: dict) -> str:
    """``memory_scale.md`` from ``memory_scale.json`` alone (figures as the JSON stores them)."""
    edit, enc = out["edit_cost"], out["query_encoding_ms"]
    lines = ["# Instruction memory at 1k / 10k / 100k instructions", "",
             "Produced by `benchmarks/memory_scale.py`; rendered from `memory_scale.json` "
             "(`python benchmarks/memory_scale.py --render`). Wall-clock times on CPU, in milliseconds.", "",
             "## Configuration", ""]
    if out.get("command"):
        lines.append(f"* Command: `{out['command']}`" + (f" ({out['date']})." if out.get("date") else "."))
    load = out.get("load_average_at_start")
    lines += [f"* torch {out['torch']}, {out['threads']} thread(s), Python {out['python']}, CPU {out['cpu']}, "
              f"FAISS {'installed' if out['faiss'] else 'not installed'}"
              + (f"; load average at the start {', '.join(str(x) for x in load)}" if load else "") + ".",
              f"* Encoder: `{out['encoder']}` ({out['dim']} dimensions).",
              f"* {out['note']}",
              "", "## Edit cost", "",
              f"`memory.add({edit['edits']:,} edits)`: {edit['add_total_ms']} ms in all, {edit['add_per_edit_ms']} ms per edit; "
              f"{edit['encoder_calls']} encoder call(s) of {', '.join(str(n) for n in edit['texts_per_call'])} texts.",
              "", "## Query encoding and retrieval", "",
              f"One query: {enc['one']} ms; in a batch of 64: {enc['batch64_per_query']} ms per query. "
              f"Own-question retrieval@1 over the 1k real texts: {out['retrieval_at_1_own_question_1k']}.",
              "", "## Search (k = 5)", "",
              "1 query: median (min) over repeated single-query searches; batch64: per-query cost in batches of 64; "
              "exact: the same top-5 scores as a dense float32 product.", "",
              "| size | dtype | mode | path | 1 query ms | batch64 ms / query | exact | select(text) ms | append 1k vectors ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in out["search"]:
        lines.append(f"| {r['size']:,} | {r['dtype']} | {r['mode']} | {r['path']} | {r['query_ms']} ({r['query_ms_min']}) | "
                     f"{r['batch64_ms_per_query']} | {'yes' if r['exact'] else 'no'} | {r.get('select_text_ms', '')} | "
                     f"{r.get('append_1k_vectors_ms', '')} |")
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jitter", type=float, default=0.02, help="per-coordinate noise std for tiled vectors")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_scale.json"))
    parser.add_argument("--render", action="store_true",
                        help="only rebuild the .md from the saved .json (with --notes: replace the JSON's notes first)")
    parser.add_argument("--notes", default=None,
                        help="markdown file whose text goes into the JSON as the run's notes and ends the .md")
    args = parser.parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return json.loads(Path(args.out).read_text(encoding="utf-8"))
    notes = read_notes(args.notes) if args.notes else None  # a missing notes file fails before any work
    command = command_line(SCRIPT, argv)
    from instructedit_plugin.instructed.encoder import SentenceEncoder
    from instructedit_plugin.instructed.memory import InstructionMemory

    torch.set_num_threads(args.threads)
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    try:
        import faiss  # noqa: F401
        have_faiss = True
    except ImportError:
        have_faiss = False

    encoder = SentenceEncoder()
    calls = []
    real_encode = encoder.encode

    def counting_encode(texts):
        calls.append(len(texts))
        return real_encode(texts)

    encoder.encode = counting_encode  # type: ignore[method-assign]

    facts, questions = synthetic_edits(1000)
    encoder.encode(facts[:8])  # warm-up
    calls.clear()
    memory = InstructionMemory(encoder)
    start = time.perf_counter()
    memory.add(facts)
    add_1k_s = time.perf_counter() - start
    base = memory.embeddings.clone()
    edit = {"edits": 1000, "encoder_calls": len(calls), "texts_per_call": list(calls),
            "add_total_ms": round(add_1k_s * 1000, 1), "add_per_edit_ms": round(add_1k_s, 3)}

    query_texts = questions[:64]
    start = time.perf_counter()
    q_batch = encoder.encode(query_texts)
    encode_batch_ms = (time.perf_counter() - start) * 1000
    encode_one_ms = _median_ms(lambda: encoder.encode(query_texts[:1]), 10)
    top1 = (q_batch @ base.T).argmax(dim=1)
    retrieval_at_1 = float((top1 == torch.arange(64)).float().mean())

    rows = []
    modes = [("auto", {}), ("dense", {"prefilter": False})] + ([("faiss", {"use_faiss": True})] if have_faiss else [])
    for size in args.sizes:
        vectors = tiled(base, size, args.jitter)
        texts = [facts[i % 1000] for i in range(size)]
        for dtype in (torch.float32, torch.float16):
            for mode, kwargs in modes:
                if mode == "faiss" and dtype == torch.float16:
                    continue  # FAISS keeps its own float32 copy
                mem = InstructionMemory(encoder, dtype=dtype, **kwargs)
                mem.add(texts, embeddings=vectors)
                row = {"size": size, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                       **measure(mem, q_batch, args.repeats), "tiled_from_1k": size > 1000}
                if mode == "auto" and dtype == torch.float32:
                    row["select_text_ms"] = round(_median_ms(lambda m=mem: m.select(query_texts[0]), 10), 3)
                    extra = tiled(base, 1000, args.jitter, seed=size)
                    start = time.perf_counter()
                    mem.add(facts, embeddings=extra)
                    row["append_1k_vectors_ms"] = round((time.perf_counter() - start) * 1000, 2)
                rows.append(row)
                print(f"  done size={size} dtype={row['dtype']} mode={mode}", file=sys.stderr, flush=True)

    result = {
        "benchmark": "instruction memory scale",
        "torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "faiss": have_faiss,
        "load_average_at_start": load_at_start,
        "encoder": encoder.identity["name"], "dim": encoder.dim,
        "note": (f"1,000 synthetic instruction texts are encoded for real; larger memories tile their vectors "
                 f"and add Gaussian jitter (std {args.jitter} per coordinate) before re-normalising."),
        "edit_cost": edit,
        "query_encoding_ms": {"one": round(encode_one_ms, 2), "batch64_per_query": round(encode_batch_ms / 64, 2)},
        "retrieval_at_1_own_question_1k": retrieval_at_1,
        "search": rows,
        "date": today(),
        "command": command,
    }
    if notes:
        result["notes"] = notes
    print(f"\nInstruction memory scale (torch {torch.__version__}, {args.threads} thread(s), faiss={have_faiss})")
    print(result["note"])
    print(f"edit cost: add(1,000 edits) = {edit['add_total_ms']:.0f} ms total "
          f"({edit['add_per_edit_ms']:.2f} ms/edit), encoder calls = {edit['encoder_calls']}")
    print(f"query encoding: {encode_one_ms:.1f} ms for one query, {encode_batch_ms / 64:.2f} ms/query in a batch "
          f"of 64; own-question retrieval@1 over the 1k real texts: {retrieval_at_1:.3f}")
    print("1 query ms: median (min) over repeated single-query searches; batch64: per-query cost in batches of 64")
    header = (f"{'size':>7} {'dtype':>7} {'mode':>6} {'path':>15} {'1 query ms':>16} {'batch64 ms/q':>13} "
              f"{'exact':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cell = f"{r['query_ms']:.3f} ({r['query_ms_min']:.3f})"
        print(f"{r['size']:>7} {r['dtype']:>7} {r['mode']:>6} {r['path']:>15} {cell:>16} "
              f"{r['batch64_ms_per_query']:>13.3f} {r['exact']!s:>6}"
              + (f"   select(text) {r['select_text_ms']:.1f} ms, append 1k vectors {r['append_1k_vectors_ms']:.1f} ms"
                 if "select_text_ms" in r else ""))
    md_path = write_results(args.out, result, render_markdown, RESULT_KEYS)
    print(f"\nwrote {args.out} and {md_path}")
    return result


if __name__ == "__main__":
    main()
