"""Wall time of the README's main-job commands on a fresh clone, first run and cached.

Clones the repository (its committed ``HEAD``) into an empty folder with no ``../shared`` beside it,
creates a new virtualenv, and runs ``bash examples/demo.sh --quick`` and ``bash examples/demo.sh``
twice each with a new, empty plugin cache (``INSTRUCTEDIT_CACHE``) and no ``INSTRUCTEDIT_DATA_DIR``:
the first run of each pays the install (first command only) and the model conversion, the second
is the cached run. Writes ``benchmarks/results/demo_timing.{json,md}``; the README quotes them.

Run from the repository root (about 20 minutes on the 2-core development machine)::

    python benchmarks/demo_timing.py

pip's own download cache is left as it is (a machine that has never installed the dependencies
also spends the time to download them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

RUNS = (
    ("quick, first run (install + model conversion)", ["--quick"]),
    ("quick, cached", ["--quick"]),
    ("default, first run (model cached)", []),
    ("default, cached", []),
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return wall, proc.returncode, tail[0]


RESULT_KEYS = ("commit", "machine", "setup", "runs", "date", "command", "notes", "merged_runs")


def render_markdown(result: dict) -> str:
    """The markdown table of a saved result (rendered from the JSON alone)."""
    from benchmarks.results_io import merged_runs_lines, notes_lines, rendered_from

    lines = [f"# Main-job wall time on a fresh clone (commit {result['commit'][:10]})", "",
             f"{result['setup']}; {result['machine']['cpus']} CPUs. Written by `python benchmarks/demo_timing.py`; "
             + rendered_from("benchmarks/demo_timing.py", "demo_timing.json") + ".", "",
             "| run | command | wall time | exit | demo phases (s) |", "|---|---|---|---|---|"]
    for row in result["runs"]:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in (row.get("demo_phase_seconds") or {}).items()) or "-"
        lines.append(f"| {row['run']} | `{row['command']}` | {row['wall_seconds'] / 60:.1f} min ({row['wall_seconds']:.0f} s) "
                     f"| {row['exit_code']} | {phases} |")
    lines += merged_runs_lines(result)
    lines += notes_lines(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.results_io import command_line, read_notes, render_saved, today, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", default=None, help="folder for the clone, venv and cache (default: a new temp folder)")
    parser.add_argument("--out", default=str(RESULTS / "demo_timing.json"), help="results JSON (the .md goes beside it)")
    parser.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    parser.add_argument("--notes", default=None, help="markdown file whose text goes into the JSON and ends the .md")
    args = parser.parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None
    work = Path(args.work or tempfile.mkdtemp(prefix="demo-timing-"))
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    clone = work / "instructedit-plugin"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone.parent / "shared").exists(), "the clone must have no ../shared beside it"
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("INSTRUCTEDIT_DATA_DIR", "EASYEDIT_SRC", "PYTHONPATH")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               INSTRUCTEDIT_CACHE=str(work / "cache"), PYTHON=str(venv / "bin" / "python"))
    rows = []
    for label, extra in RUNS:
        log = work / f"demo-{len(rows)}.log"
        print(f"running: bash examples/demo.sh {' '.join(extra)}  ({label})", flush=True)
        wall, rc, last = _run(["bash", "examples/demo.sh", *extra], clone, env, log)
        print(f"  {wall:.0f} s, exit {rc}: {last}", flush=True)
        demo = clone / "results" / "demo" / "demo.json"
        payload = json.loads(demo.read_text()) if rc == 0 and demo.is_file() else {}
        rows.append({"run": label, "command": " ".join(["bash", "examples/demo.sh", *extra]), "wall_seconds": round(wall, 1),
                     "exit_code": rc, "demo_phase_seconds": payload.get("timings"),
                     "data_origin": payload.get("data_origin"), "prefixes": payload.get("prefixes"),
                     "table": payload.get("table")})
        if rc != 0:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            break
    result = {"commit": commit, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "python": platform.python_version()},
              "setup": "git clone with no ../shared, new virtualenv, empty INSTRUCTEDIT_CACHE, INSTRUCTEDIT_DATA_DIR unset",
              "runs": rows, "date": today(), "command": command_line("benchmarks/demo_timing.py", argv)}
    print(write_results(args.out, result, render_markdown, RESULT_KEYS, notes))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
