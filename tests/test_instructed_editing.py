"""InstructEd through EasyEdit: hparams validation, gold and retrieval editing, memory semantics.

Uses the session's world (``test_instructed_training``, :mod:`tests._instructed_world`): a tiny base
that cannot use an instruction by itself (Rel, Gen and Loc are 0 without trained prefixes, see
``test_instructed_ablation``) and the prefixes the plugin's trainer produced for it. Every quality
figure asserted here therefore depends on the training having worked. The locality questions are the
world's own (other people, half of them with the edited relation), so retrieval does find edits for
them and the model has to tell that the retrieved fact is about someone else.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import instructedit_plugin
from instructedit_plugin.errors import HyperParamsError
from instructedit_plugin.evaluation.summary import summarize_metrics
from instructedit_plugin.instructed import InstructEdHyperParams, InstructEdTrainingHparams
from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state


REPO = Path(__file__).resolve().parents[1]
EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")


def _hparams(world, **overrides) -> InstructEdHyperParams:
    data = dict(alg_name="InstructEd", model_name=str(world["base_dir"]), archive=str(world["results_dir"]),
                device="cpu", max_length=40)
    data.update(overrides)
    return InstructEdHyperParams.from_dict(data)


@pytest.fixture(scope="module")
def easyedit():
    import importlib

    importlib.import_module("instructedit_plugin.instructed")  # registers InstructEd (until listed as builtin)
    return instructedit_plugin.register()


def _edit_kwargs(requests):
    return dict(
        prompts=[r["prompt"] for r in requests],
        target_new=[r["target_new"] for r in requests],
        ground_truth=[r["ground_truth"] for r in requests],
        rephrase_prompts=[r["rephrase_prompt"] for r in requests],
        locality_inputs={"neighborhood": {"prompt": [r["locality"]["neighborhood"]["prompt"] for r in requests],
                                          "ground_truth": [r["locality"]["neighborhood"]["ground_truth"] for r in requests]}},
    )


# ----------------------------------------------------------------------------------------------
# hparams
# ----------------------------------------------------------------------------------------------
def test_hparams_validation_errors(instructed_world, tmp_path):
    ok = _hparams(instructed_world)
    assert ok.instruction_source == "gold" and ok.prefix_layers is None
    with pytest.raises(HyperParamsError, match=r"field 'archive'.*missing.*InstructEdTrainer"):
        _hparams(instructed_world, archive=None)
    with pytest.raises(HyperParamsError, match=r"field 'archive'.*does not exist.*train prefixes first"):
        _hparams(instructed_world, archive=str(tmp_path / "nothing-here")).check_ready()
    from easyeditor import BaseEditor

    with pytest.raises(HyperParamsError, match=r"field 'archive'.*does not exist"):  # before loading the model
        BaseEditor.from_hparams(_hparams(instructed_world, archive=str(tmp_path / "nothing-here")))
    with pytest.raises(HyperParamsError, match=r"field 'reweight_mode'"):
        _hparams(instructed_world, reweight_mode="sideways")
    with pytest.raises(HyperParamsError, match=r"field 'instruction_source'"):
        _hparams(instructed_world, instruction_source="oracle")
    with pytest.raises(HyperParamsError, match=r"field 'prefix_layers'.*out of range for a model with 4 layers"):
        _hparams(instructed_world, prefix_layers=[3, 4])
    with pytest.raises(HyperParamsError, match=r"field 'prefix_layers'.*contiguous"):
        _hparams(instructed_world, prefix_layers=[0, 2])
    with pytest.raises(HyperParamsError, match=r"field 'template'"):
        _hparams(instructed_world, template="no placeholder")
    with pytest.raises(HyperParamsError, match=r"field 'retrieval_gate'"):
        _hparams(instructed_world, retrieval_gate=2.0)
    with pytest.raises(HyperParamsError, match=r"field 'encoder'"):
        _hparams(instructed_world, encoder=" ")
    with pytest.raises(HyperParamsError, match=r"unknown field"):
        _hparams(instructed_world, prefix_lenght=5)
    # layers that disagree with the archive are refused when editing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"])
    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    with pytest.raises(HyperParamsError, match=r"prefix_layers.*differs from the archive"):
        apply_instructed_to_model(model, tok, instructed_world["test"][:1], _hparams(instructed_world, prefix_layers=[0, 1]))
    # training hparams
    base = dict(alg="InstructEd", model_name=str(instructed_world["base_dir"]))
    with pytest.raises(HyperParamsError, match=r"field 'prefix_layers'.*out of range"):
        InstructEdTrainingHparams.from_dict(dict(base, prefix_layers=[2, 3, 4]))
    with pytest.raises(HyperParamsError, match=r"field 'reweight_mode'"):
        InstructEdTrainingHparams.from_dict(dict(base, reweight_mode="x"))
    with pytest.raises(HyperParamsError, match=r"field 'alg'"):
        InstructEdTrainingHparams.from_dict(dict(base, alg="MEND"))


def test_shipped_yaml_files_load(instructed_world):
    from instructedit_plugin.registry import load_hparams

    for path in sorted((REPO / "hparams/TRAINING/InstructEd").glob("*.yaml")):
        cfg = InstructEdTrainingHparams.from_hparams(path)
        assert cfg.prefix_layers == sorted(cfg.prefix_layers)
    from instructedit_plugin.instructed.shipped import shipped_prefixes_dir

    shipped = shipped_prefixes_dir(must_exist=False)
    for path in sorted((REPO / "hparams/InstructEd").glob("*.yaml")):
        hp = InstructEdHyperParams.from_hparams(path)  # loads; editing needs the trained archive
        if Path(hp.archive) == shipped and shipped.exists():  # `archive: default`: the package's prefixes
            hp.check_ready()
            continue
        with pytest.raises(HyperParamsError, match="archive"):  # not trained here
            hp.check_ready()
    hp = load_hparams(REPO / "hparams/InstructEd/tiny.yaml", archive=str(instructed_world["archive"]),
                      model_name=str(instructed_world["base_dir"]))
    assert isinstance(hp, InstructEdHyperParams) and hp.prefix_layers == [1, 2]


# ----------------------------------------------------------------------------------------------
# Editing through EasyEdit (PyPI flavour in this process)
# ----------------------------------------------------------------------------------------------
def test_gold_instruction_edits_held_out_facts(easyedit, instructed_world):
    from easyeditor import BaseEditor

    editor = BaseEditor.from_hparams(_hparams(instructed_world))
    original = {k: v.clone() for k, v in editor.model.state_dict().items()}
    # PyPI's edit() builds the requests itself (no 'instruction' key): the instruction is built from
    # prompt + target_new ("Where does X live? Paris."), the ZsRE-style form.
    metrics, edited, weights_copy = editor.edit(**_edit_kwargs(instructed_world["test"]), **_mode(easyedit, False),
                                                verbose=False)
    pre = summarize_metrics(metrics, phase="pre")
    post = summarize_metrics(metrics)
    print("InstructEd gold, held-out tiny facts: pre", pre, "post", post)
    # measured: post 100/100/100, pre Rel/Gen 0 (8 edits: one miss is 12.5 points)
    assert post["Rel"] >= 87.5 and post["Gen"] >= 87.5 and post["Loc"] >= 87.5, post
    assert pre["Rel"] <= 12.5 and pre["Gen"] <= 12.5, pre
    assert len(editing_state(editor.model).entries) == 0  # each edit was forgotten after its evaluation
    for key, value in editor.model.state_dict().items():  # never a weight touched
        assert torch.equal(value, original[key]), key


#: questions about nothing in the world, for which retrieval finds nothing (the gate stays shut; "What is the
#: capital of France?" would retrieve "Where does Mozart live? Paris." from the held-out edits)
OFF_WORLD_QUESTIONS = ["Who is the CEO of Apple?", "Which company makes the iPhone?"]


def _unaffected(metrics, requests):
    """The metrics of the requests whose locality question no request of the run edits (an edited
    question cannot keep its answer; the world's held-out edits have one such pair)."""
    edited_questions = {q for r in requests for q in (r["prompt"], r["rephrase_prompt"])}
    return [m for m, r in zip(metrics, requests) if r["locality"]["neighborhood"]["prompt"] not in edited_questions]


def _mode(easyedit, sequential: bool) -> dict:
    """EasyEdit's switch for sequential editing in the flavour this process imported."""
    if easyedit.flavour == "main":
        return {"sequential_edit": sequential}
    return {"keep_original_weight": not sequential}


def test_retrieval_sequential_editing_and_unrelated_questions(easyedit, instructed_world):
    from easyeditor import BaseEditor

    editor = BaseEditor.from_hparams(_hparams(instructed_world, instruction_source="retrieval"))
    requests = instructed_world["test"]
    metrics, edited, _ = editor.edit(**_edit_kwargs(requests), **_mode(easyedit, True), verbose=False)
    post = summarize_metrics(metrics)
    print("InstructEd retrieval, sequential, held-out tiny facts:", post)
    state = editing_state(editor.model)
    assert len(state.entries) == len(instructed_world["test"])  # the memory accumulated every edit
    # measured: 100/100/87.5; the locality questions are about other people, and retrieval hands the
    # model an edit of the same relation for half of them (it keeps its answer for 7 of 8)
    assert post["Rel"] >= 87.5 and post["Gen"] >= 87.5 and post["Loc"] >= 75, post
    # after all edits, every edit is still answered (retrieved from the memory) ...
    tok = editor.tok
    for req in instructed_world["test"]:
        enc = tok([req["prompt"] + " " + req["target_new"]], return_tensors="pt")
        pred = edited(**enc).logits[0, -2].argmax().item()
        assert pred == enc["input_ids"][0, -1].item(), req
    # ... and a question about nothing edited retrieves nothing: exactly the unedited model
    enc = tok(OFF_WORLD_QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(edited(**enc).logits, editor.model(**enc).logits)
    # generation through the edited model answers with the new target
    req = instructed_world["test"][0]
    enc = tok([req["prompt"]], return_tensors="pt")
    out = edited.generate(**enc, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:]).strip().startswith(req["target_new"])


def test_pypi_memory_resets_per_edit_only_with_keep_original_weight(easyedit, instructed_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(instructed_world["base_dir"])
    tok = AutoTokenizer.from_pretrained(instructed_world["base_dir"])
    hp = _hparams(instructed_world, instruction_source="retrieval")
    reqs = instructed_world["test"][:3]
    _, restore = apply_instructed_to_model(model, tok, reqs[:1], hp, keep_original_weight=True)
    assert len(editing_state(model).entries) == 1
    list(restore.items())  # what EasyEdit does to restore weights
    assert len(editing_state(model).entries) == 0
    for req in reqs:
        _, copy = apply_instructed_to_model(model, tok, [req], hp, keep_original_weight=False)
        if easyedit.flavour == "pypi":
            assert copy == {} and type(copy) is dict
    assert len(editing_state(model).entries) == 3


@pytest.mark.easyedit_main
@pytest.mark.skipif(not EASYEDIT_SRC, reason="EASYEDIT_SRC is not set: no clone of EasyEdit main to test against")
def test_easyedit_main_sequential_and_single_editing(instructed_world):
    script = textwrap.dedent(f"""
        import json, sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(REPO)!r})
        import instructedit_plugin
        info = instructedit_plugin.register()
        import instructedit_plugin.instructed
        instructedit_plugin.register()
        from easyeditor import BaseEditor
        from instructedit_plugin.instructed import InstructEdHyperParams
        from instructedit_plugin.instructed.instructed_main import editing_state
        from instructedit_plugin.evaluation.summary import summarize_metrics
        out = {{"flavour": info.flavour}}
        for source in ("gold", "retrieval"):
            reqs = json.loads({json.dumps(json.dumps(instructed_world["test"]))})
            hp = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name={str(instructed_world["base_dir"])!r},
                archive={str(instructed_world["archive"])!r}, device="cpu", instruction_source=source))
            editor = BaseEditor.from_hparams(hp)
            for sequential in (False, True):
                kwargs = dict(prompts=[r["prompt"] for r in reqs], target_new=[r["target_new"] for r in reqs],
                              ground_truth=[r["ground_truth"] for r in reqs], rephrase_prompts=[r["rephrase_prompt"] for r in reqs],
                              locality_inputs={{"neighborhood": {{"prompt": [r["locality"]["neighborhood"]["prompt"] for r in reqs],
                                  "ground_truth": [r["locality"]["neighborhood"]["ground_truth"] for r in reqs]}}}})
                metrics, edited, _ = editor.edit(**kwargs, sequential_edit=sequential, verbose=False)
                s = summarize_metrics(metrics)
                kept = [m for m, r in zip(metrics, reqs) if r["locality"]["neighborhood"]["prompt"] not in
                        {{q for x in reqs for q in (x["prompt"], x["rephrase_prompt"])}}]
                out[f"{{source}}_{{sequential}}"] = dict(Rel=s["Rel"], Gen=s["Gen"], Loc=summarize_metrics(kept)["Loc"],
                                                         memory=len(editing_state(editor.model).entries))
                from instructedit_plugin.instructed.instructed_main import reset_memory
                reset_memory(editor.model)
        print("RESULT " + json.dumps(out))
    """)
    env = dict(os.environ, EASYEDIT_SRC=EASYEDIT_SRC, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    print("EasyEdit main:", out)
    assert out["flavour"] == "main"
    n = len(instructed_world["test"])
    for source in ("gold", "retrieval"):
        assert out[f"{source}_False"]["memory"] == 0  # non-sequential: memory reset after every edit
        assert out[f"{source}_True"]["memory"] == n  # sequential: accumulates
        for sequential in (False, True):
            got = out[f"{source}_{sequential}"]
            assert got["Rel"] >= 87.5 and got["Gen"] >= 87.5, (source, sequential, got)
            assert got["Loc"] >= (85 if source == "gold" else 70), (source, sequential, got)  # over 7 questions


@pytest.mark.parametrize("source,locality_form", [("gold", "inputs"), ("retrieval", "inputs"), ("gold", "lists")])
def test_batch_edit_adds_every_request_of_a_batch_to_the_memory(easyedit, instructed_world, source, locality_form):
    """``BaseEditor.batch_edit``: one ``apply`` call per chunk of ``batch_size`` requests; every
    request of the chunk is in the memory when the chunk is evaluated, and with
    ``keep_original_weight`` the memory is empty again afterwards (weights never touched).
    Locality is given as ``locality_inputs`` (both flavours) or, PyPI style, as
    ``locality_prompts``/``locality_ground_truth`` lists (PyPI's own batch_edit mis-routes those)."""
    from easyeditor import BaseEditor

    if locality_form == "lists" and easyedit.flavour != "pypi":
        pytest.skip("locality_prompts/locality_ground_truth lists are PyPI batch_edit's signature")
    requests = instructed_world["test"]
    editor = BaseEditor.from_hparams(_hparams(instructed_world, instruction_source=source, batch_size=len(requests)))
    original = {k: v.clone() for k, v in editor.model.state_dict().items()}
    sizes: list[int] = []
    real_apply = editor.apply_algo

    def spying_apply(model, tok, chunk, *args, **kwargs):
        out = real_apply(model, tok, chunk, *args, **kwargs)
        sizes.append(len(editing_state(model).entries))
        return out

    editor.apply_algo = spying_apply
    kwargs = dict(prompts=[r["prompt"] for r in requests], target_new=[r["target_new"] for r in requests],
                  ground_truth=[r["ground_truth"] for r in requests],
                  rephrase_prompts=[r["rephrase_prompt"] for r in requests])
    if locality_form == "lists":
        kwargs.update(locality_prompts=[r["locality"]["neighborhood"]["prompt"] for r in requests],
                      locality_ground_truth=[r["locality"]["neighborhood"]["ground_truth"] for r in requests])
    else:
        kwargs["locality_inputs"] = _edit_kwargs(requests)["locality_inputs"]
    metrics, edited, _ = editor.batch_edit(**kwargs, **_mode(easyedit, False), verbose=False)
    post = summarize_metrics(metrics)
    print(f"InstructEd batch_edit ({source}, {locality_form}):", post, "memory sizes", sizes)
    assert sizes == [len(requests)]  # one chunk, all of it in the memory at once
    assert len(metrics) == len(requests)
    assert all(m["post"]["locality"] for m in metrics)  # the locality questions reached the metrics
    assert post["Rel"] >= 87.5 and post["Gen"] >= 87.5, post
    # a locality question that another edit of the batch changes cannot keep its answer: Loc is
    # measured on the others (the world's held-out edits have one such pair: Tiger Woods' city)
    unaffected = _unaffected(metrics, requests)
    assert len(unaffected) == len(requests) - 1
    kept = summarize_metrics(unaffected)["Loc"]
    print("Loc over the unaffected locality questions:", kept)
    # measured over the 7: gold 100, retrieval (every edit in memory, the nearest retrieved) 100
    assert kept >= (85 if source == "gold" else 70), summarize_metrics(unaffected)
    assert len(editing_state(editor.model).entries) == 0  # restored after the batch
    for key, value in editor.model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_pypi_batch_edit_locality_arguments_are_checked(easyedit, instructed_world):
    from easyeditor import BaseEditor

    from instructedit_plugin.errors import RequestError

    if easyedit.flavour != "pypi":
        pytest.skip("PyPI batch_edit signature")
    editor = BaseEditor.from_hparams(_hparams(instructed_world, batch_size=2))
    with pytest.raises(RequestError, match="locality_ground_truth"):
        editor.batch_edit(prompts=["a b", "c d"], target_new=["x", "y"], locality_prompts=["q1", "q2"], verbose=False)
    with pytest.raises(RequestError, match="one way only"):
        editor.batch_edit(prompts=["a b", "c d"], target_new=["x", "y"], locality_prompts=["q1", "q2"],
                          locality_ground_truth=["a", "b"],
                          locality_inputs={"neighborhood": {"prompt": ["q1", "q2"], "ground_truth": ["a", "b"]}},
                          verbose=False)
