"""Multi-process training through Accelerate (DDP, gloo on the CPU) equals single-process training.

One ``accelerate launch --multi_gpu --num_processes 2`` (on a machine without GPUs: two CPU
processes) runs the ``instructedit train`` command of ``instructedit_plugin.cli`` -- the documented
launch (see :mod:`instructedit_plugin.core.distributed`) -- for both trainers on the tiny GPT-2, with
per-process batches. The same command runs in this process with the equivalent global batches, and
the trained parameters in the ``last/`` checkpoints must agree (float32, up to the order of
floating-point sums):

* InstructEd: 2 processes x batch b == 1 process x batch 2b == 1 process x batch b x accumulation 2;
  2 processes x batch b/2 x accumulation 2 == the same.
* InstructEdit (a batch is one joint edit, so a bigger batch is a different edit; the
  global batch is a number of micro-batches): 2 processes x ``accumulate_bs`` 1 == 1 process x
  ``accumulate_bs`` 2, and 2 processes x 2 == 1 process x 4, including the hypernetwork's running
  input statistics.

The launched runs share one launch (the processes start once) and run while the single-process
references run here; the whole module takes about 45 s on two busy CPU cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from instructedit_plugin.cli import EXIT_OK, main
from instructedit_plugin.core.distributed import launched_world_size, micro_batch_index, resolve_mixed_precision, shard
from instructedit_plugin.instructed.checkpoint import load_checkpoint
from instructedit_plugin.instructedit.checkpoint import load_editor

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5

FACTS = [
    ("Alice", "lives in", "Paris", "Rome"), ("Bob", "lives in", "London", "Berlin"),
    ("Carol", "works in", "Madrid", "Tokyo"), ("Dave", "works in", "Oslo", "Vienna"),
    ("Erin", "lives in", "Cairo", "Lima"), ("Frank", "works in", "Dublin", "Athens"),
    ("Grace", "lives in", "Prague", "Warsaw"), ("Heidi", "works in", "Lisbon", "Seoul"),
    ("Ivan", "lives in", "Delhi", "Quito"), ("Judy", "works in", "Sydney", "Nairobi"),
    ("Karl", "lives in", "Zurich", "Havana"), ("Lena", "works in", "Boston", "Manila"),
]

#: single-process (in this process) and two-process (launched) runs: name -> (alg, overrides)
INSTRUCTED = {"batch": dict(batch_size=4, unmodified_batch_size=4),
              "accum": dict(batch_size=2, unmodified_batch_size=2, accumulate_bs=2),
              "half": dict(batch_size=2, unmodified_batch_size=2),  # a different global batch: must differ
              "half_bf16": dict(batch_size=2, unmodified_batch_size=2, mixed_precision="bf16")}
INSTRUCTED_2P = {"ddp": dict(batch_size=2, unmodified_batch_size=2),
                 "ddp_accum": dict(batch_size=1, unmodified_batch_size=1, accumulate_bs=2)}
INSTRUCTEDIT = {"accum2": dict(accumulate_bs=2), "accum4": dict(accumulate_bs=4),
                "accum2_bf16": dict(accumulate_bs=2, mixed_precision="bf16")}
INSTRUCTEDIT_2P = {"ddp": dict(accumulate_bs=1), "ddp_accum": dict(accumulate_bs=2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2_dir):
    root = tmp_path_factory.mktemp("distributed")
    records = [{"case_id": i, "subject": s, "prompt": f"{s} {rel}", "target_new": new, "ground_truth": old,
                "rephrase_prompt": f"The city {s} {rel} is", "locality_prompt": "The capital of France is",
                "locality_ground_truth": "Paris"} for i, (s, rel, old, new) in enumerate(FACTS)]
    facts = root / "counterfact-train.json"
    facts.write_text(json.dumps(records))

    def command(alg: str, name: str, overrides: dict) -> list[str]:
        data = yaml.safe_load((REPO / "hparams" / "TRAINING" / alg / "tiny.yaml").read_text())
        data.update(model_name=str(tiny_gpt2_dir), results_dir=str(root / alg / name), progress=False, seed=0)
        if alg == "InstructEd":  # 18 edit examples: 6 steps of 4 cross the epoch's end (its 5th batch has 2)
            data.update(max_iters=6, warmup_steps=2, val_interval=1000, val_fraction=0.25, log_interval=1)
        else:
            data.update(max_iters=3, batch_size=1, val_interval=1000, val_steps=2, rank=32, log_interval=1)
        data.update(overrides)
        path = root / f"{alg}-{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        argv = ["train", "--hparams", str(path)]
        return argv + (["--train", str(facts)] if alg == "InstructEd" else ["--task", f"counterfact={facts}"])

    launched = [command("InstructEd", n, o) for n, o in INSTRUCTED_2P.items()]
    launched += [command("InstructEdit", n, o) for n, o in INSTRUCTEDIT_2P.items()]
    worker = root / "worker.py"
    worker.write_text(
        "import json, sys\nfrom accelerate import PartialState\nfrom instructedit_plugin.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n    rc = main(argv)\n    if rc:\n        sys.exit(rc)\n"
        "state = PartialState()\n"
        "open(f'rank{state.process_index}.json', 'w').write(json.dumps([state.num_processes, state.distributed_type.value]))\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    process = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(worker), json.dumps(launched)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the single-process references run here meanwhile
        for name, overrides in INSTRUCTED.items():
            assert main(command("InstructEd", name, overrides)) == EXIT_OK
        for name, overrides in INSTRUCTEDIT.items():
            assert main(command("InstructEdit", name, overrides)) == EXIT_OK
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out[-6000:]
    for rank in (0, 1):  # both processes ran, as one two-process group
        assert json.loads((root / f"rank{rank}.json").read_text()) == [2, "MULTI_CPU"], out[-3000:]
    return root


def _prefixes(root: Path, name: str) -> dict[str, torch.Tensor]:
    return {"embeddings": load_checkpoint(root / "InstructEd" / name / "last").bank.embeddings}


def _editor(root: Path, name: str) -> dict[str, torch.Tensor]:
    folders = list((root / "InstructEdit" / name / "models" / "InstructEdit").iterdir())
    assert len(folders) == 1
    tensors, meta = load_editor(folders[0] / "last")
    assert meta["step"] == 3
    return tensors


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def test_instructed_two_processes_equal_one_process_with_the_global_batch(runs):
    reference = _prefixes(runs, "batch")
    diffs = {name: _max_diff(reference, _prefixes(runs, name)) for name in ("ddp", "ddp_accum", "accum")}
    print(f"InstructEd max |prefix difference| vs 1 process x batch 4 + 4: {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    for name in ("batch", "ddp"):
        ckpt = load_checkpoint(runs / "InstructEd" / name / "last")
        assert ckpt.config["info"]["step"] == 6
        assert (runs / "InstructEd" / name / "best").is_dir()
    # the tolerance is far below what a different global batch changes
    assert _max_diff(reference, _prefixes(runs, "half")) > 1e-3


def test_instructedit_two_processes_equal_one_process_with_the_global_batch(runs):
    for ddp, single in (("ddp", "accum2"), ("ddp_accum", "accum4")):
        reference, other = _editor(runs, single), _editor(runs, ddp)
        diff = _max_diff(reference, other)
        print(f"InstructEdit max |editor difference| 2 processes ({ddp}) vs 1 process ({single}): {diff:.3g}")
        assert diff <= TOL, (ddp, diff)
        stats = [k for k in reference if k.endswith((".count", ".mean", ".m2"))]
        assert stats and all(torch.equal(reference[k], other[k]) for k in stats), "running statistics differ"
    # and the runs did train: accumulation 2 and 4 are different optimizer steps
    assert _max_diff(_editor(runs, "accum2"), _editor(runs, "accum4")) > 1e-4


def test_bf16_autocast_trains_both_methods(runs):
    """bf16 autocast (CPU here): float32 parameters, changed by bf16 arithmetic, about the same validation loss."""
    for low, full in ((_prefixes(runs, "half_bf16"), _prefixes(runs, "half")),
                      (_editor(runs, "accum2_bf16"), _editor(runs, "accum2"))):
        assert all(v.dtype != torch.bfloat16 and torch.isfinite(v).all() for v in low.values())
        assert _max_diff(low, full) > 0
    bf16 = load_checkpoint(runs / "InstructEd" / "half_bf16" / "last").config
    assert bf16["training"]["mixed_precision"] == "bf16"
    assert bf16["info"]["loss"] == pytest.approx(load_checkpoint(runs / "InstructEd" / "half" / "last").config["info"]["loss"],
                                                 rel=0.02)
    metas = [load_editor(next((runs / "InstructEdit" / n / "models" / "InstructEdit").iterdir()) / "last")[1]
             for n in ("accum2_bf16", "accum2")]
    key = "loss/total_edit_val"
    assert metas[0]["val_stats"][key] == pytest.approx(metas[1]["val_stats"][key], rel=0.02)


def test_global_micro_batches_partition_the_global_batch():
    for n in (0, 1, 5, 8, 9):
        items = list(range(n))
        for procs, accum in ((1, 1), (2, 1), (2, 2), (3, 2)):
            parts = [shard(items, micro_batch_index(j, r, procs), procs * accum) for r in range(procs) for j in range(accum)]
            assert sorted(x for p in parts for x in p) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_and_mixed_precision_resolution(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_world_size() == 4
    cpu = torch.device("cpu")
    assert resolve_mixed_precision(None, cpu) == "no"
    assert resolve_mixed_precision("bf16", cpu) == "bf16"
    assert resolve_mixed_precision("bf16", cpu, model_dtype="float16") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision(None, cpu) == "bf16"
    assert resolve_mixed_precision("no", cpu) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(Exception, match="bf16"):
        resolve_mixed_precision(None, cpu)
