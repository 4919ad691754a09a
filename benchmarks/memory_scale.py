"""Search cost, recall, RAM and disk of the instruction memory's indexes at 10k / 100k / 1M entries.

Usage::

    python benchmarks/memory_scale.py [--sizes 10000 100000 1000000] [--kinds dense flat ivf] [--out PATH] [--notes FILE]
    python benchmarks/memory_scale.py --render [--notes FILE]   # rebuild the .md from the .json

For every size and index kind (``InstructionMemory(index=...)``: ``dense`` = exact
torch product, ``flat`` = exact FAISS ``IndexFlatIP``, ``ivf`` = approximate
FAISS IVF with 8-bit codes, candidates re-scored exactly) it measures, on one
thread (``torch.set_num_threads(1)``, ``faiss.omp_set_num_threads(1)``):

* **build**: ``memory.add(n entries)`` plus building the index (the first search);
* **ms / query**: ``memory.search(query, k=5)`` one query at a time: median wall-clock time, and
  median CPU time of the searching thread (``time.thread_time``; less sensitive to other
  processes sharing the machine, whose load average is recorded);
* **recall@1**: how often the top-1 is the exact top-1 (a dense float32 product
  over all entries; a tie counts as found);
* **RAM / entry**: the embedding matrix plus the index's own bytes (texts and
  metadata not counted), divided by the entry count;
* **disk / entry**: the bytes of the folder ``memory.save()`` writes, divided by the entry count.

The data are synthetic 384-d unit vectors (the sentence encoder's dimension) in
clusters of ~50 (centres random, per-coordinate noise ``0.8 / sqrt(384)``), and the
queries are stored entries plus noise (``0.7 / sqrt(384)``, cosine ~0.82 to their
source): the "paraphrased question near its instruction" case. Results go to a
table on stdout, ``benchmarks/results/memory_scale.json`` and ``memory_scale.md``,
rendered from the JSON alone (see ``benchmarks/results_io.py``). The targets
(``ivf``: <= 1 ms/query at 100k and <= 2 ms/query at 1M, recall@1 >= 0.99) are
checked in the output, never in unit tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import (  # noqa: E402
    command_line, merged_runs_lines, notes_lines, produced_by, read_notes, render_saved, today, write_results,
)

SCRIPT = "benchmarks/memory_scale.py"
#: Every top-level key this script writes into ``memory_scale.json`` (nothing else belongs there).
RESULT_KEYS = frozenset({
    "benchmark", "torch", "faiss", "threads", "python", "cpu", "load_average_at_start", "load_average_at_end",
    "data", "dim", "queries", "k", "rows", "targets",  # the figures
    "date", "command", "notes", "merged_runs",  # the run; --notes text; other sources merged in
})
DIM = 384
K = 5
#: (kind, size) -> (max ms per query, min recall@1)
TARGETS = {("ivf", 100_000): (1.0, 0.99), ("ivf", 1_000_000): (2.0, 0.99)}


def clustered_data(n: int, queries: int, dim: int = DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unit vectors in clusters of ~50 and ``queries`` noisy copies of random stored ones (see the docs)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(max(1, n // 50), dim, generator=gen), dim=1)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        rows = centres[torch.randint(0, centres.shape[0], (stop - start,), generator=gen)]
        out[start:stop] = torch.nn.functional.normalize(
            rows + 0.8 * torch.randn(stop - start, dim, generator=gen) / math.sqrt(dim), dim=1)
    src = torch.randint(0, n, (queries,), generator=gen)
    q = torch.nn.functional.normalize(out[src] + 0.7 * torch.randn(queries, dim, generator=gen) / math.sqrt(dim), dim=1)
    return out, q


def exact_top1(q: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Row of the exact best match of every query (dense float32 product, in chunks)."""
    best = []
    for start in range(0, q.shape[0], 64):
        best.append((q[start:start + 64] @ vecs.T).argmax(dim=1))
    return torch.cat(best)


def measure(kind: str, vecs: torch.Tensor, q: torch.Tensor, truth: torch.Tensor, repeats: int,
            budget_s: float, tmp: Path) -> dict:
    """One row: build time, single-query latency, recall@1, RAM and disk per entry for ``kind``."""
    from instructedit_plugin.instructed.memory import InstructionMemory

    n = vecs.shape[0]
    texts = [f"fact {i}" for i in range(n)]
    start = time.perf_counter()
    memory = InstructionMemory(None, index=kind)
    memory.add(texts, embeddings=vecs)
    memory.search(q[:1], k=K)  # builds the index
    build_s = time.perf_counter() - start
    times, cpu_times = [], []
    deadline = time.perf_counter() + budget_s
    for i in range(repeats):
        one = q[i % q.shape[0]].unsqueeze(0)
        t0, c0 = time.perf_counter(), time.thread_time()
        memory.search(one, k=K)
        times.append((time.perf_counter() - t0) * 1000)
        cpu_times.append((time.thread_time() - c0) * 1000)
        if len(times) >= 5 and time.perf_counter() > deadline:
            break
    _, ids = memory.search(q, k=1)  # ids equal rows: nothing was removed
    got = ids[:, 0]
    best = (q * vecs[truth]).sum(1)
    found = (q * vecs[got]).sum(1)
    recall = float(((got == truth) | (found >= best)).float().mean())
    ram = memory.embeddings.numel() * memory.embeddings.element_size() + memory.index_bytes
    folder = tmp / f"{kind}-{n}"
    start = time.perf_counter()
    memory.save(folder)
    save_s = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    index = memory._index
    row = {
        "size": n, "kind": kind, "build_s": round(build_s, 2),
        "query_ms": round(statistics.median(times), 3), "query_ms_p90": round(sorted(times)[int(0.9 * (len(times) - 1))], 3),
        "query_cpu_ms": round(statistics.median(cpu_times), 3),
        "timed_queries": len(times), "recall_at_1": round(recall, 4),
        "ram_bytes_per_entry": round(ram / n, 1), "disk_bytes_per_entry": round(disk / n, 1), "save_s": round(save_s, 2),
    }
    row["active_index"] = index.kind
    if kind == "ivf":
        if index.nlist:
            row["nlist"], row["nprobe"] = index.nlist, index.nprobe
        else:
            row["active_index"] = "dense (too small for IVF)"
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return row


def check_targets(rows: list[dict]) -> list[dict]:
    """One entry per target whose row was measured: the figures and whether both are met."""
    out = []
    for (kind, size), (max_ms, min_recall) in TARGETS.items():
        for r in rows:
            if r["kind"] == kind and r["size"] == size:
                out.append({"kind": kind, "size": size, "max_query_ms": max_ms, "min_recall_at_1": min_recall,
                            "query_ms": r["query_ms"], "recall_at_1": r["recall_at_1"],
                            "met": r["query_ms"] <= max_ms and r["recall_at_1"] >= min_recall})
    return out


def render_markdown(out: dict) -> str:
    """``memory_scale.md`` from ``memory_scale.json`` alone (figures as the JSON stores them)."""
    sizes = sorted({r["size"] for r in out["rows"]})
    lines = [f"# Instruction memory indexes at {' / '.join(f'{s:,}' for s in sizes)} entries", "",
             produced_by(SCRIPT, "memory_scale.json") + " Wall-clock times on CPU.", "",
             "## Configuration", ""]
    if out.get("command"):
        lines.append(f"* Command: `{out['command']}`" + (f" ({out['date']})." if out.get("date") else "."))
    start, end = out.get("load_average_at_start"), out.get("load_average_at_end")
    lines += [f"* torch {out['torch']}, FAISS {out['faiss']}, {out['threads']} thread(s), Python {out['python']}, "
              f"CPU {out['cpu']}.",
              "* Load average (1, 5, 15 min) at the start "
              f"{', '.join(str(x) for x in start) if start else 'n/a'}; at the end "
              f"{', '.join(str(x) for x in end) if end else 'n/a'} (the machine is shared).",
              f"* Data: {out['data']}",
              f"* {out['queries']} queries, `search(k={out['k']})`; recall@1 against a dense float32 product over "
              "all entries (a tie counts as found).",
              "", "## Targets", ""]
    if out["targets"]:
        for t in out["targets"]:
            lines.append(f"* `{t['kind']}` at {t['size']:,}: <= {t['max_query_ms']} ms/query and recall@1 >= "
                         f"{t['min_recall_at_1']}; measured {t['query_ms']} ms/query, recall@1 {t['recall_at_1']}: "
                         f"**{'met' if t['met'] else 'missed'}**.")
    else:
        lines.append("* No targeted size was measured in this run.")
    lines += ["", "## Results", "",
              "build: `add()` plus building the index; ms/query: median (p90) wall-clock time of single-query searches on one "
              "thread; CPU ms/query: median CPU time of that thread per search; "
              "RAM: embedding matrix + index per entry (texts not counted); disk: the saved folder per entry.", "",
              "| entries | index | searched with | build s | ms / query (p90) | CPU ms / query | recall@1 | RAM B / entry | disk B / entry | IVF cells (probed) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        cells = f"{r['nlist']} ({r['nprobe']})" if r.get("nlist") else ""
        lines.append(f"| {r['size']:,} | {r['kind']} | {r['active_index']} | {r['build_s']} | {r['query_ms']} "
                     f"({r['query_ms_p90']}) | {r['query_cpu_ms']} | {r['recall_at_1']} | {r['ram_bytes_per_entry']} | "
                     f"{r['disk_bytes_per_entry']} | {cells} |")
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["dense", "flat", "ivf"], choices=["dense", "flat", "ivf"])
    parser.add_argument("--queries", type=int, default=500, help="queries for recall@1 (and the timing pool)")
    parser.add_argument("--repeats", type=int, default=300, help="single-query searches timed per row (at most)")
    parser.add_argument("--budget_s", type=float, default=5.0, help="stop timing a row after this many seconds")
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
    import faiss

    threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="memory_scale-") as tmp:
            for size in args.sizes:
                vecs, q = clustered_data(size, args.queries)
                truth = exact_top1(q, vecs)
                for kind in args.kinds:
                    row = measure(kind, vecs, q, truth, args.repeats, args.budget_s, Path(tmp))
                    rows.append(row)
                    print(f"  {size:>9,} {kind:>5}: build {row['build_s']} s, {row['query_ms']} ms/query, recall@1 "
                          f"{row['recall_at_1']}, RAM {row['ram_bytes_per_entry']} B/entry, disk "
                          f"{row['disk_bytes_per_entry']} B/entry", file=sys.stderr, flush=True)
                del vecs, q, truth
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    result = {
        "benchmark": "instruction memory indexes",
        "torch": torch.__version__, "faiss": faiss.__version__, "threads": 1, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": load_at_start, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "data": (f"synthetic {DIM}-d unit vectors in clusters of ~50 (random centres, per-coordinate noise "
                 f"0.8/sqrt({DIM})); queries are stored entries plus noise 0.7/sqrt({DIM}) (cosine ~0.82 to their "
                 "source). Not sentence embeddings of real text."),
        "dim": DIM, "queries": args.queries, "k": K,
        "rows": rows, "targets": check_targets(rows),
        "date": today(), "command": command,
    }
    md_path = write_results(args.out, result, render_markdown, RESULT_KEYS, notes)
    print(render_markdown(json.loads(json.dumps(result))))
    print(f"wrote {args.out} and {md_path}")
    return result


if __name__ == "__main__":
    main()
