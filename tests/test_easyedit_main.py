"""The same integration checks against a clone of EasyEdit's GitHub main, and that importing the
plugin leaves EasyEdit's own algorithms alone there.

EasyEdit main is not on PyPI; point ``EASYEDIT_SRC`` at a clone to run these.
They run in subprocesses because this test process has already imported the
PyPI flavour.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")

pytestmark = [
    pytest.mark.easyedit_main,
    pytest.mark.skipif(not EASYEDIT_SRC, reason="EASYEDIT_SRC is not set: no clone of EasyEdit main to test against"),
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    import instructedit_plugin
    from instructedit_plugin.compat import load_easyedit_hparams, make_editor
    from tests.toy_algorithm import TOY_SPEC, ToyEditHyperParams

    info = instructedit_plugin.register()
    instructedit_plugin.register_algorithm(TOY_SPEC)
    from easyeditor import BaseEditor, FTHyperParams
    from easyeditor.editors.batch_editor import BatchEditor

    out = {{"flavour": info.flavour, "batchable": BatchEditor.is_batchable_method("ToyEdit"),
           "alg_dict": "ToyEdit" in sys.modules["easyeditor.util.alg_dict"].ALG_DICT,
           "train_dict": "TOYEDIT" in sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT}}
    facts = dict(prompts=["The capital of France is"], target_new=["Rome"], ground_truth=["Paris"])

    hp = load_easyedit_hparams(FTHyperParams, {repo!r} + "/hparams/FT/tiny-gpt2.yaml", model_name={model!r})
    metrics, _, _ = make_editor(hp).edit(**facts, sequential_edit=False, verbose=False)
    out["ft_pre"] = float(sum(metrics[0]["pre"]["rewrite_acc"]) / len(metrics[0]["pre"]["rewrite_acc"]))
    out["ft_post"] = float(sum(metrics[0]["post"]["rewrite_acc"]) / len(metrics[0]["post"]["rewrite_acc"]))

    hp = ToyEditHyperParams.from_dict({{"alg_name": "ToyEdit", "model_name": {model!r}, "device": "cpu",
                                        "layer": 3, "steps": 40, "lr": 0.02, "batch_size": 1}})
    metrics, _, _ = BaseEditor.from_hparams(hp).edit(**facts, verbose=False)
    out["toy_post"] = float(sum(metrics[0]["post"]["rewrite_acc"]) / len(metrics[0]["post"]["rewrite_acc"]))
    out["metric_keys"] = sorted(metrics[0]["post"])
    print("RESULT " + json.dumps(out))
    """
)


def test_plugin_works_with_easyedit_main(tiny_gpt2_dir):
    env = dict(os.environ, EASYEDIT_SRC=EASYEDIT_SRC, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=str(REPO), model=str(tiny_gpt2_dir))],
        capture_output=True, text=True, env=env, timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["flavour"] == "main"
    assert out["batchable"] and out["alg_dict"] and out["train_dict"]
    assert out["ft_pre"] < 1.0 and out["ft_post"] == 1.0
    assert out["toy_post"] == 1.0


FT_RUN = REPO / "tests" / "_easyedit_ft_run.py"


def test_importing_the_plugin_leaves_easyedit_ft_identical(tiny_llama_dir, tmp_path):
    """FT through EasyEdit's own ``BaseEditor`` in two fresh processes, one that never imports the plugin
    and one that imports and registers it: identical metrics and identical edited weights."""
    model = tmp_path / "tiny-llama"  # a name EasyEdit's own loader recognises (it sniffs names)
    model.symlink_to(tiny_llama_dir, target_is_directory=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("EASYEDIT_SRC", None)  # the script puts EasyEdit main on the path itself
    runs = {mode: subprocess.Popen([sys.executable, str(FT_RUN), EASYEDIT_SRC, str(model),
                                    str(REPO / "hparams/FT/tiny-llama.yaml"), mode],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
            for mode in ("plain", "plugin")}
    out = {}
    for mode, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=900)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{mode}: {stderr[-4000:]}"
        out[mode] = json.loads(lines[-1][len("RESULT "):])
    assert not out["plain"]["plugin_imported"] and out["plugin"]["plugin_imported"]
    plain, plugin = out["plain"]["metrics"], out["plugin"]["metrics"]
    assert [m["post"]["rewrite_acc"] for m in plain] == [[1.0], [1.0]]  # FT did edit
    assert plugin == plain
    assert out["plugin"]["weights"] == out["plain"]["weights"]
