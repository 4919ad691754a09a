"""``benchmarks/memory_editors.py``: EasyEdit main's GRACE / WISE / IKE beside InstructEd.

The GRACE test runs the benchmark's own runner (``run_one_hop`` / ``run_sequential`` through EasyEdit
main's ``BaseEditor.edit`` and ``apply_algo``) on a tiny LLaMA in a subprocess with EasyEdit main
imported from ``EASYEDIT_SRC`` (skipped without it, like the other pass-2 tests). The other tests
need no EasyEdit: bad method names, the tokenizer proxy for EasyEdit's GRACE generation metric and
the bootstrap intervals.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ._scripts import load_script

REPO = Path(__file__).resolve().parents[1]
EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")
BENCH = load_script("benchmarks/memory_editors.py", "benchmark_memory_editors")

def _run_script(template: str, model_dir, tmp_path, **fields: str) -> dict:
    """Run one of the subprocess scripts below against EasyEdit main (``fields``: its other template fields); its
    ``RESULT`` line as a dict."""
    env = dict(os.environ, EASYEDIT_SRC=EASYEDIT_SRC, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    script = template.format(repo=str(REPO), model=str(model_dir), work=str(tmp_path), **fields)
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


#: what every subprocess run starts with: the tiny model, EasyEdit main and two edit requests
RUN_HEAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.manual_seed(0)
    sys.path.insert(0, {repo!r})
    from tests._scripts import load_script
    bench = load_script("benchmarks/memory_editors.py", "bench_memory_editors")
    bench.require_easyedit_main()
    from instructedit_plugin.compat import make_editor
    from instructedit_plugin.models.loading import load_causal_lm

    model, tok = load_causal_lm({model!r}, dtype="float32")
    requests = [dict(prompt="The capital of France is", target_new="Rome", ground_truth="Paris",
                     locality={{"neighborhood": {{"prompt": "The capital of Spain is", "ground_truth": "Madrid"}}}}),
                dict(prompt="The capital of Egypt is", target_new="Berlin", ground_truth="Cairo")]
    """
)

#: one method through the benchmark's runner: two one-hop passes (``LABELS``, each editor from ``editor_for``),
#: then a sequential run; what each pass measured, and whether the edited layer is the original one afterwards
RUNNER = RUN_HEAD + textwrap.dedent(
    """
    hp = bench.easyedit_hparams({method}, Path({repo!r}) / "hparams/{alg}/gemma-3-270m.yaml", {model!r},
                                Path({work!r}), inner_params=["model.layers[{layer}].mlp.down_proj.weight"], **{overrides})
    layer = model.model.layers[{layer}].mlp.down_proj
    loc_prompts, query_texts = {loc_prompts}, {query_texts}
    out = {{"activation_in_config": getattr(model.config, "hidden_act", None)}}
    {editor_for}
    for label in {labels}:
        editor = editor_for(label)
        query_ms = []
        with bench.ModuleGuard(model, bench.edited_module_paths(hp)):
            metrics, ms, _, errors = bench.run_one_hop(editor, requests, label, None, loc_prompts, query_texts, query_ms)
        out[label] = dict(n=len(metrics), errors=errors, n_ms=len(ms), query_ms=query_ms,
                          pre=[r["Rel"] for r in bench.per_record(metrics, "pre")],
                          post=[r["Rel"] for r in bench.per_record(metrics)],
                          loc=[r["Loc"] for r in bench.per_record(metrics)])
    editor = editor_for("sequential")
    with bench.ModuleGuard(model, bench.edited_module_paths(hp)):
        metrics, ms = bench.run_sequential(editor, requests, "sequential", loc_prompts)
    out["sequential"] = dict(n=len(metrics), n_ms=len(ms), post=[r["Rel"] for r in bench.per_record(metrics)])
    out["layer_restored"] = model.model.layers[{layer}].mlp.down_proj is layer
    print("RESULT " + json.dumps(out))
    """
)


def _runner(method: str, layer: int, labels: tuple[str, str], editor_for: str, overrides: dict | None = None,
            loc_prompts: list[str] | None = None, query_texts: list[str] | None = None) -> dict[str, str]:
    """The fields of :data:`RUNNER` (for :func:`_run_script`) for ``method`` editing ``model.layers[layer].mlp.down_proj``;
    ``editor_for`` is the source of ``def editor_for(label)``, the editor of each pass (``label``: one of ``labels``,
    or ``"sequential"``)."""
    return dict(method=repr(method), alg=method.upper(), layer=str(layer), labels=repr(labels), overrides=repr(overrides or {}),
                loc_prompts=repr(loc_prompts), query_texts=repr(query_texts),
                editor_for=textwrap.dedent(editor_for).strip())


def needs_easyedit_main(test):
    """Run ``test`` only with a clone of EasyEdit main (``EASYEDIT_SRC``), marked ``easyedit_main``."""
    skip = pytest.mark.skipif(not EASYEDIT_SRC, reason="EASYEDIT_SRC is not set: no clone of EasyEdit main to test against")
    return pytest.mark.easyedit_main(skip(test))


#: GRACE scored by EasyEdit's generation metric with the bare target ("bare") and through the proxy ("spaced")
GRACE_RUN = _runner("grace", 2, ("bare", "spaced"), """
    def editor_for(label):
        editor = make_editor(hp, model, tok)
        if label != "bare":
            editor.tok = bench.SpacedTargetTokenizer(tok)
        return editor
""")


@needs_easyedit_main
def test_grace_edits_succeed_through_the_benchmark_runner(tiny_llama_dir, tmp_path):
    out = _run_script(RUNNER, tiny_llama_dir, tmp_path, **GRACE_RUN)
    spaced, bare = out["spaced"], out["bare"]
    assert not spaced["errors"] and spaced["n_ms"] == 2  # both edits ran, each apply_algo call timed
    assert spaced["pre"] == [0.0, 0.0]
    assert spaced["post"] == [1.0, 1.0]  # GRACE says the new one-token answer after its edit
    # EasyEdit main compares the generated tokens with the *bare* target ("Rome", not " Rome"): on a
    # tokenizer without a dummy prefix the same successful edits score 0 -- why the proxy exists
    assert bare["post"] == [0.0, 0.0]
    # sequential: after the second edit the codebook still answers the first one
    assert out["sequential"]["post"] == [1.0, 1.0]
    assert out["layer_restored"]  # the adaptor is gone after the guard


#: WISE on Gemma 3 as EasyEdit main ships it ("as_shipped") and with the activation under the name it reads
WISE_RUN = _runner("wise", 3, ("as_shipped", "with_activation"), """
    def editor_for(label):
        if label != "as_shipped":
            bench.wise_activation(hp, model)
        return make_editor(hp, model, tok)
""", overrides={"n_iter": 5}, loc_prompts=["The capital of Japan is Tokyo", "Water boils at one hundred degrees"],
    query_texts=["The capital of Italy is Rome", "a b"])


@needs_easyedit_main
def test_wise_edits_a_gemma3_model_through_the_benchmark_runner_only_with_the_activation_fix(tiny_gemma3_dir, tmp_path):
    out = _run_script(RUNNER, tiny_gemma3_dir, tmp_path, **WISE_RUN)
    assert out["activation_in_config"] is None  # Gemma 3 calls it hidden_activation
    shipped, fixed = out["as_shipped"], out["with_activation"]
    # EasyEdit main's WISE as shipped: every Gemma 3 edit fails on the activation's name
    assert shipped["n"] == 0 and len(shipped["errors"]) == 2
    assert all("hidden_act" in e for e in shipped["errors"])
    assert fixed["errors"] == [] and fixed["n"] == 2 and fixed["n_ms"] == 2  # both edits ran, each timed
    assert fixed["loc"][0] == 1.0  # WISE's router leaves the unrelated prompt to the original layer
    # the query times of the last edited model, taken right after its edit (no second edit to time them)
    assert len(fixed["query_ms"]) == 2 and all(t > 0 for t in fixed["query_ms"])
    assert out["sequential"]["n"] == 2 and out["sequential"]["n_ms"] == 2
    assert out["layer_restored"]


def test_unknown_method_names_raise_a_clear_error():
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--methods: unknown method 'rome'.*Fix: use some of"):
        BENCH.parse_args(["--methods", "grace,rome"])
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--sequential_methods: unknown method 'ike'.*Fix:"):
        BENCH.parse_args(["--sequential_methods", "ike"])  # IKE keeps no state to edit sequentially
    args = BENCH.parse_args(["--methods", "unedited, grace", "--sequential_methods", ""])
    assert args.method_list == ["unedited", "grace"] and args.sequential_list == []


def test_missing_hparams_yaml_names_the_file(tmp_path):
    pytest.importorskip("easyeditor")
    with pytest.raises(BENCH.BenchmarkInputError, match=r"grace: no hparams file .*Fix: pass --hparams_dir"):
        BENCH.easyedit_hparams("grace", tmp_path / "GRACE" / "nope.yaml", "embedded", tmp_path)


def test_spaced_target_tokenizer_reads_the_target_as_it_follows_the_prompt():
    from tests.support.tokenizer import load_tokenizer

    tok = load_tokenizer()
    proxy = BENCH.SpacedTargetTokenizer(tok)
    in_context = tok.encode("The capital of France is Rome", add_special_tokens=False)
    assert proxy.encode("Rome", add_special_tokens=False) == in_context[-1:]
    assert tok.encode("Rome", add_special_tokens=False) != in_context[-1:]  # the bare target is another token
    assert proxy.encode(" Rome", add_special_tokens=False) == in_context[-1:]  # already spaced: unchanged
    assert proxy("Rome")["input_ids"] == tok("Rome")["input_ids"]  # calls and everything else pass through
    assert proxy.pad_token_id == tok.pad_token_id


def test_bootstrap_intervals_bracket_the_figures():
    rows = [{"Rel": 1.0, "Gen": 1.0, "Loc": 1.0, "Por": None}] * 5 + [{"Rel": 0.0, "Gen": 1.0, "Loc": 0.5, "Por": None}] * 5
    out = BENCH.bootstrap_summary(rows, n_boot=400, seed=0)
    assert out["Por"] is None
    assert out["Gen"] == [100.0, 100.0, 100.0]  # no spread, no interval
    value, lo, hi = out["Rel"]
    assert value == 50.0 and 15.0 < lo < value < hi < 85.0
    assert out["Score"][0] == pytest.approx((50.0 + 100.0 + 75.0) / 3, abs=0.01)
    assert out["H"][0] < out["Score"][0]
    assert BENCH.bootstrap_median([10.0, 20.0, 30.0], n_boot=200, seed=0)[0] == 20.0


def test_wise_gets_gemma3s_activation_under_the_name_it_reads():
    from types import SimpleNamespace

    hp = SimpleNamespace()
    BENCH.wise_activation(hp, SimpleNamespace(config=SimpleNamespace(hidden_activation="gelu_pytorch_tanh")))
    assert hp.hidden_act == "gelu_pytorch_tanh"  # Gemma 3 names it hidden_activation
    hp = SimpleNamespace(hidden_act="silu")
    BENCH.wise_activation(hp, SimpleNamespace(config=SimpleNamespace(hidden_activation="gelu_pytorch_tanh")))
    assert hp.hidden_act == "silu"  # a value already there is kept


def _saved_run(rows: dict, seq: dict | None = None, errors: dict | None = None) -> dict:
    cell = lambda v: [v, v, v]  # noqa: E731
    return {
        "model": "m", "date": "2026-11-30", "command": "python benchmarks/memory_editors.py --limit 5",
        "args": {"limit": 5, "baseline_limit": 2, "bootstrap": 10, "threads": 1, "ike_demos": 200, "latency_n": 2},
        "wall_minutes": 1.0, "archive": "a", "recipe": "r", "easyedit": "main", "hparams": {"grace": "hparams/GRACE/x.yaml"},
        "datasets": {"zsre": {m: {k: cell(v) for k, v in figs.items()} for m, figs in rows.items()}},
        "n_evaluated": {"zsre": {m: 5 for m in rows}},
        "latency": {"unedited": {"edit_ms": None, "query_ratio": [1.0, 1.0, 1.0]},
                    **{m: {"edit_ms": [10.0, 9.0, 11.0], "query_ratio": [1.0, 0.9, 1.1]} for m in rows}},
        "sequential": seq, "errors": errors or {}, "base_query_ms": [5.0, 4.0, 6.0], "finished": True,
    }


def test_merge_puts_a_later_runs_rows_into_the_saved_file_and_records_the_command(tmp_path):
    base = _saved_run({"instructed_gold": {"Rel": 100.0}, "grace": {"Rel": 50.0}},
                      seq={"dataset": "zsre", "n": 10, "methods": {"grace": {"n": 3, "figures": {}, "edit_ms": None}}},
                      errors={"wise": ["zsre: AttributeError"], "sequential wise": ["AttributeError"]})
    run = _saved_run({"grace": {"Rel": 90.0}, "wise": {"Rel": 80.0}},
                     seq={"dataset": "zsre", "n": 100, "methods": {"wise": {"n": 20, "figures": {}, "edit_ms": None}}})
    run["n_evaluated"]["zsre"] = {"grace": 20, "wise": 20}
    merged = BENCH.merge_results(base, run, "python benchmarks/memory_editors.py --merge --methods grace,wise")
    zsre = merged["datasets"]["zsre"]
    assert list(zsre) == ["instructed_gold", "grace", "wise"]  # METHODS order, the untouched row kept
    assert zsre["grace"]["Rel"] == [90.0, 90.0, 90.0] and zsre["instructed_gold"]["Rel"] == [100.0] * 3
    assert merged["n_evaluated"]["zsre"] == {"instructed_gold": 5, "grace": 20, "wise": 20}
    assert merged["sequential"]["n"] == 100 and set(merged["sequential"]["methods"]) == {"grace", "wise"}
    assert merged["errors"] == {}  # WISE measured now: its old errors no longer describe the file
    assert merged["command"] == base["command"] and base["datasets"]["zsre"]["grace"]["Rel"] == [50.0] * 3
    entry = merged["merged_runs"][-1]
    assert entry["command"].endswith("--methods grace,wise")
    assert {"datasets.zsre.grace", "datasets.zsre.wise", "latency.wise", "sequential.wise"} <= set(entry["keys"])
    assert "datasets.zsre.instructed_gold" not in entry["keys"]
    out = tmp_path / "memory_editors.json"
    md = BENCH.write_results(out, merged, BENCH.render_markdown, BENCH.RESULT_KEYS).read_text()
    assert "## Merged into this file" in md and "--methods grace,wise" in md and "| wise | 20 |" in md
    assert "have their own counts" in md  # the header's record counts are the first run's
    run["sequential"]["dataset"] = "counterfact"
    with pytest.raises(BENCH.BenchmarkInputError, match=r"sequential rows edit zsre.*Fix: pass --sequential_dataset"):
        BENCH.merge_results(base, run, "cmd")


def test_the_markdown_names_the_json_it_is_rendered_from_and_the_command_that_rebuilds_it():
    out = _saved_run({"grace": {"Rel": 50.0}})
    default = "rendered from `memory_editors.json` (`python benchmarks/memory_editors.py --render`)"
    assert default in BENCH.render_markdown(out)
    name = "benchmarks/results/memory_editors_sequential.json"
    for command in (f"{out['command']} --out {name}", f"{out['command']} --out={name} --threads 2"):
        md = BENCH.render_markdown(dict(out, command=command))
        assert (f"rendered from `memory_editors_sequential.json` (`python benchmarks/memory_editors.py --render "
                f"--out {name}`)") in md and default not in md


def test_merge_without_a_saved_file_names_it(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--merge: no saved results at .*nope.json.*Fix:"):
        BENCH.parse_args(["--merge", "--out", str(missing)])


def _bos_adding_tokenizer():
    """The tests' tokenizer, but putting ``<bos>`` in front of every text as Gemma's does."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from tests.support.tokenizer import load_tokenizer

    tok = copy.deepcopy(load_tokenizer())
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                              special_tokens=[(tok.bos_token, bos)])
    assert tok("Rome")["input_ids"][0] == bos
    return tok


class _NextTokenOracle(torch.nn.Module):
    """A "model" whose greedy prediction at every position is the token that really follows there."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, **_):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_ike_metric_scores_a_perfect_continuation_1_with_a_bos_adding_tokenizer():
    pytest.importorskip("easyeditor")
    import instructedit_plugin

    instructedit_plugin.register()
    icl_lm_eval = sys.modules["easyeditor.evaluate.evaluate"].icl_lm_eval
    tok = _bos_adding_tokenizer()
    model = _NextTokenOracle(len(tok))
    hp = SimpleNamespace(device="cpu")
    demos = ["New Fact: The capital of Italy is Rome\nPrompt: The capital of Italy is Rome\n\n"]
    args = dict(icl_examples=demos, target="Paris Berlin", x="New Fact: The capital of France is Paris Berlin\nPrompt: "
                "The capital of France is")
    from instructedit_plugin.compat.devices import cuda_strings_to_cpu

    with cuda_strings_to_cpu(True):  # PyPI's metric formats the device as f"cuda:{device}"
        raw = icl_lm_eval(model, "gemma-3-270m", hp, tok, **args)
        fixed = icl_lm_eval(model, "gemma-3-270m", hp, BENCH.ContinuationTokenizer(tok), **args)
    assert fixed == 1.0, fixed  # the model continues with exactly the target
    assert raw < 1.0, raw  # EasyEdit with the bare tokenizer: the <bos> position can never match
    proxy = BENCH.ContinuationTokenizer(tok)
    assert proxy("The capital")["input_ids"] == tok("The capital")["input_ids"]  # prompts keep their <bos>
    assert proxy(" Paris\n")["input_ids"] == tok(" Paris\n", add_special_tokens=False)["input_ids"]


def test_hparams_variant_rows_stand_beside_the_default_rows_with_their_own_label(tmp_path):
    args = BENCH.parse_args(["--hparams_variant", "grace=gemma-3-270m-n_iter20"])
    assert args.variant_stems == {"grace": "gemma-3-270m-n_iter20"}
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--hparams_variant: 'rome=x'.*Fix: pass e.g."):
        BENCH.parse_args(["--hparams_variant", "rome=x"])
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--hparams_variant: 'grace'.*Fix:"):
        BENCH.parse_args(["--hparams_variant", "grace"])
    variant = BENCH.row_label("grace", "gemma-3-270m-n_iter20")
    assert variant == "grace (gemma-3-270m-n_iter20)" and BENCH.base_method(variant) == "grace"
    # a run in another dtype: its rows carry it (and the hparams variant first when both are set)
    labels = BENCH.row_labels(BENCH.parse_args(["--dtype_in_label", "wise", "--hparams_variant", "grace=g"]))
    assert labels["wise"] == "wise (bfloat16)" and labels["grace"] == "grace (g)" and labels["ike"] == "ike"
    labels = BENCH.row_labels(BENCH.parse_args(["--dtype_in_label", "wise,ike", "--float32_methods", "wise"]))
    assert labels["wise"] == "wise (float32)" and labels["ike"] == "ike (bfloat16)"
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--dtype_in_label: unknown method 'rome'.*Fix:"):
        BENCH.parse_args(["--dtype_in_label", "rome"])
    assert BENCH.row_label("wise", None, "bfloat16") == "wise (bfloat16)"
    assert BENCH.row_label("wise", "x", "bfloat16") == "wise (x, bfloat16)"
    assert BENCH.base_method("wise (x, bfloat16)") == "wise"
    seq = lambda rows: {"dataset": "zsre", "n": 100, "methods": rows}  # noqa: E731
    row = lambda n: {"n": n, "figures": {"Rel": [90.0, 80.0, 100.0]}, "edit_ms": [1000.0, 900.0, 1100.0]}  # noqa: E731
    base = _saved_run({"instructed_gold": {"Rel": 100.0}, "grace": {"Rel": 50.0}, "wise": {"Rel": 40.0}},
                      seq=seq({"instructed_retrieval": row(100), "grace": row(3)}))
    run = _saved_run({variant: {"Rel": 70.0}}, seq=seq({variant: row(60)}))
    merged = BENCH.merge_results(base, run, "python benchmarks/memory_editors.py --merge --hparams_variant grace=x")
    assert list(merged["datasets"]["zsre"]) == ["instructed_gold", "grace", variant, "wise"]  # beside its method
    assert list(merged["sequential"]["methods"]) == ["instructed_retrieval", "grace", variant]
    assert merged["datasets"]["zsre"]["grace"]["Rel"] == [50.0] * 3  # the default row is kept
    md = BENCH.render_markdown(merged)
    table = md.split("## Sequential editing")[1]
    lines = [line for line in table.splitlines() if line.startswith("| grace") or "paper: GRACE" in line]
    # the paper's GRACE rows (at 100 edits) follow the last GRACE row, not the first
    assert [line.split(" |")[0] for line in lines] == ["| grace", f"| {variant}", "| *paper: GRACE (Table 11, LLaMA-2-7B)*",
                                                       "| *paper: GRACE (Table 11, LLaMA-1-7B)*"]
    assert f"| {variant} | 60 |" in md


def test_the_unmet_requests_section_names_each_short_row_with_its_n_and_projected_hours():
    seq = {"dataset": "zsre", "n": 100, "methods": {
        "instructed_retrieval": {"n": 100, "figures": {}, "edit_ms": [30.0, 20.0, 40.0]},
        "grace": {"n": 3, "figures": {}, "edit_ms": [72000.0, 70000.0, 80000.0]}}}
    out = _saved_run({"grace": {"Rel": 90.0}, "ike": {"Rel": 90.0}}, seq=seq,
                     errors={"sequential wise": ["MemoryError: out of memory"]})
    out["n_evaluated"]["zsre"] = {"grace": 2, "ike": 5}  # --limit 5: IKE reached it, GRACE did not
    lines = BENCH.unmet_requests_lines(out)
    text = "\n".join(lines)
    assert lines[0] == "## Requests of #15 item 4 this file does not meet"
    assert "**grace, one edit at a time**: n = zsre 2 of the 5 records per file of the InstructEd rows; median edit " \
           "0.0 s [0.0, 0.0], so the 5 edits asked for take about 0 min of editing alone" in text
    assert "**wise, one edit at a time**: n = zsre 0 of the 5 records" in text
    assert "ike, one edit" not in text and "instructed_retrieval" not in text  # met: not listed
    assert "**grace, sequential**: n = 3 of 100; median edit 72.0 s [70.0, 80.0], so the 100 edits asked for take " \
           "about 2.0 h of editing alone" in text
    assert "**wise, sequential**: not run; error: MemoryError: out of memory." in text
    out["n_evaluated"]["zsre"]["grace"] = 5
    out["n_evaluated"]["counterfact"] = {"grace": 5, "ike": 5, "wise": 5}
    out["datasets"]["counterfact"] = {m: {} for m in ("grace", "ike", "wise")}
    out["datasets"]["zsre"]["wise"] = {}
    out["n_evaluated"]["zsre"]["wise"] = 5
    out["sequential"]["methods"].update(grace={"n": 100, "figures": {}, "edit_ms": None},
                                        wise={"n": 100, "figures": {}, "edit_ms": None})
    assert BENCH.unmet_requests_lines(out) == []  # everything asked for is there: no section


GRACE_DENSE_RUN = RUN_HEAD + textwrap.dedent(
    """
    from torch.profiler import profile
    hp = bench.easyedit_hparams("grace", Path({repo!r}) / "hparams/GRACE/gemma-3-270m.yaml", {model!r},
                                Path({work!r}), inner_params=["model.layers[2].mlp.down_proj.weight"], n_iter=10)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    unedited_flags = [(p, p.requires_grad) for p in model.parameters()]
    out = {{"flags_before": sum(flag for _, flag in unedited_flags), "hooks_before": len(head._forward_pre_hooks)}}
    dense_output_layer = bench.dense_output_layer

    def spaced_editor():
        editor = make_editor(hp, model, tok)
        editor.tok = bench.SpacedTargetTokenizer(tok)
        return editor

    for label in ("without_hook", "with_hook"):
        for param, flag in unedited_flags:  # each run starts from the unedited model's flags
            param.requires_grad_(flag)
        bench.dense_output_layer = dense_output_layer if label == "with_hook" else (lambda model: (lambda: None))
        torch.manual_seed(0)  # GRACE's cold codebook values are random
        with profile(record_shapes=True) as prof, bench.ModuleGuard(model, bench.edited_module_paths(hp)):
            metrics, ms = bench.run_sequential(spaced_editor(), requests, label)
        # the output layer through bmm: the transposed weight [d, vocab] copied per generated token
        lm_head_bmm = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                          if e.key == "aten::bmm" and any(s and s[-1] == vocab for s in e.input_shapes))
        torch.manual_seed(0)
        with bench.ModuleGuard(model, bench.edited_module_paths(hp)):
            one_hop, _, _, errors = bench.run_one_hop(spaced_editor(), requests, label)
        out[label] = dict(sequential=json.dumps(metrics, sort_keys=True, default=str), lm_head_bmm=lm_head_bmm,
                          one_hop=json.dumps(one_hop, sort_keys=True, default=str), errors=errors,
                          flags_after=sum(p.requires_grad for p in model.parameters()),
                          hooks_after=len(head._forward_pre_hooks), rel=[r["Rel"] for r in bench.per_record(metrics)])
    print("RESULT " + json.dumps(out))
    """
)


@needs_easyedit_main
def test_grace_scoring_keeps_the_frozen_output_layer_off_bmm_with_identical_metrics(tiny_gemma3_dir, tmp_path):
    """EasyEdit's GRACE freezes every parameter; generation then runs the LM head on the last-token slice
    through ``bmm`` (a copy of the whole output weight per token: 18x slower scoring on Gemma-3-270M).
    The benchmark's runners score with the output layer's dense-input hook (``dense_output_layer``): the
    same metrics, and the LM head through ``mm``, with EasyEdit's flags left as GRACE sets them."""
    out = _run_script(GRACE_DENSE_RUN, tiny_gemma3_dir, tmp_path)
    without, with_hook = out["without_hook"], out["with_hook"]
    assert out["flags_before"] > 0 and not without["errors"] and not with_hook["errors"]
    # GRACE froze the model (its own codebook left the model with the guard); the hook leaves the flags alone
    assert without["flags_after"] == with_hook["flags_after"] == 0
    assert without["lm_head_bmm"] > 0  # the slow path: the frozen output layer through bmm in the scoring
    assert with_hook["lm_head_bmm"] == 0
    assert with_hook["sequential"] == without["sequential"]  # identical metrics (pre and post), every record
    assert with_hook["one_hop"] == without["one_hop"]
    assert max(with_hook["rel"]) == 1.0  # an edit succeeds (so the compared metrics are not all zero)
    assert with_hook["hooks_after"] == out["hooks_before"]  # the runners take their hook off again


WISE_RESUME_RUN = RUN_HEAD + textwrap.dedent(
    """
    import hashlib, io
    from benchmarks.sequential_checkpoint import SequentialCheckpoint, run_fingerprint
    mode = {mode!r}
    requests += [dict(prompt="The capital of Peru is", target_new="Oslo", ground_truth="Lima"),
                 dict(prompt="The capital of Chile is", target_new="Bern", ground_truth="Santiago")]
    loc_prompts = ["The capital of Japan is Tokyo", "Water boils at one hundred degrees"]
    yaml = Path({repo!r}) / "hparams/WISE/gemma-3-270m.yaml"
    hp = bench.easyedit_hparams("wise", yaml, {model!r}, Path({work!r}), inner_params=["model.layers[3].mlp.down_proj.weight"],
                                n_iter=4)
    bench.wise_activation(hp, model)
    paths = bench.edited_module_paths(hp)
    folder = Path({work!r}) / ("full" if mode == "full" else "stopped")
    checkpoint = SequentialCheckpoint(folder, run_fingerprint("wise", "zsre", requests, yaml, "float32"), "WISE", paths)
    out = {{}}
    with bench.ModuleGuard(model, paths):
        result = bench.run_sequential(make_editor(hp, model, tok), requests, mode, loc_prompts, checkpoint,
                                      2 if mode == "first" else None)
    out["stopped"] = result is None
    if result is not None:
        out["post"] = [m["post"] for m in result[0]]
        out["pre"] = [m["pre"] for m in result[0]]
        out["n_ms"] = len(result[1])
    if (folder / "modules.pt").is_file():
        adapter = next(iter(torch.load(folder / "modules.pt", weights_only=False).values()))
        out["edits_in_adapter"] = adapter.editing_total_cnt
        out["adapter_sha"] = hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in adapter.state_dict().values())
                                            ).hexdigest()
    if mode == "full":  # EasyEdit's apply_algo twice, as its own sequential editing calls it: no sequential flag
        plain = bench.easyedit_hparams("wise", yaml, {model!r}, Path({work!r}),
                                       inner_params=["model.layers[3].mlp.down_proj.weight"], n_iter=2)
        bench.wise_activation(plain, model)
        with bench.ModuleGuard(model, paths):
            for r in requests[:2]:
                edited, _ = bench.make_editor_apply(model, tok, plain, r, loc_prompts[0])
            out["edits_kept_without_flag"] = edited.get_adapter_layer().editing_total_cnt
    print("RESULT " + json.dumps(out, default=float))
    """
)


@needs_easyedit_main
def test_sequential_wise_keeps_every_edit_and_a_stopped_run_resumes_to_the_uninterrupted_result(tiny_gemma3_dir, tmp_path):
    def run(mode):
        return _run_script(WISE_RESUME_RUN, tiny_gemma3_dir, tmp_path, mode=mode)

    full = run("full")
    assert not full["stopped"] and full["n_ms"] == 4
    assert full["edits_in_adapter"] == 4  # the sequential flag: one side memory holds all four edits
    # EasyEdit main's WISE without it: each apply_algo builds a fresh adapter, the earlier edits are gone
    assert full["edits_kept_without_flag"] == 1
    first = run("first")  # a new process, stopped after two edits: no metrics, the progress on disk
    assert first["stopped"] and first["edits_in_adapter"] == 2
    resumed = run("resume")  # another new process: resumes after edit 2 and finishes
    assert not resumed["stopped"] and resumed["n_ms"] == 4  # the two saved edit times + two new ones
    assert resumed["adapter_sha"] == full["adapter_sha"]  # the same side memory, bit for bit
    assert resumed["pre"] == full["pre"] and resumed["post"] == full["post"]


def test_sequential_checkpoint_restores_modules_and_random_state_and_refuses_another_runs_folder(tmp_path):
    from benchmarks.sequential_checkpoint import CheckpointMismatchError, SequentialCheckpoint

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fingerprint = {"method": "grace", "dataset": "zsre", "n": 3}
    ck = SequentialCheckpoint(tmp_path / "ck", fingerprint, "GRACE", ["1"])
    assert ck.load(model) is None  # nothing saved yet
    edited = torch.nn.Linear(4, 2)
    model[1] = edited
    ck.save(model, 1, [{"rewrite_acc": [0.0]}], [12.5])
    expected_draws = torch.rand(3)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    resumed = SequentialCheckpoint(tmp_path / "ck", fingerprint, "GRACE", ["1"]).load(fresh)
    assert (resumed.done, resumed.pre, resumed.edit_ms) == (1, [{"rewrite_acc": [0.0]}], [12.5])
    assert torch.equal(fresh[1].weight, edited.weight)  # the edited module is back in place
    assert torch.equal(torch.rand(3), expected_draws)  # and the random state where the save left it
    with pytest.raises(CheckpointMismatchError, match=r"field 'n' is 3, this run's is 5.*Fix: pass another --checkpoint_dir"):
        SequentialCheckpoint(tmp_path / "ck", {**fingerprint, "n": 5}, "GRACE", ["1"]).load(fresh)
    with pytest.raises(CheckpointMismatchError, match=r"ROME runs cannot be resumed.*Fix:"):
        SequentialCheckpoint(tmp_path / "x", fingerprint, "ROME", ["1"])


class _RefAdapter(torch.nn.Module):
    """As WISE's adapter: the original layer, an alias of its weight, a copy of the layer, a side memory."""

    def __init__(self, layer):
        import copy

        super().__init__()
        self.layer = layer
        self.weight = layer.weight
        self.original = copy.deepcopy(layer)
        self.side = torch.nn.Parameter(layer.weight.detach() + 1.0)


def test_sequential_checkpoint_stores_copies_of_the_unedited_weights_as_references(tmp_path, monkeypatch):
    import benchmarks.sequential_checkpoint as sc

    def model_with(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(64, 64))

    fingerprint = {"method": "wise", "dataset": "zsre", "n": 3}
    model = model_with(0)
    ck = sc.SequentialCheckpoint(tmp_path / "ck", fingerprint, "GRACE", ["1"])
    assert ck.load(model) is None  # remembers the unedited tensors at the module path
    model[1] = _RefAdapter(model[1])
    ck.save(model, 1, [{}], [1.0])
    state = torch.load(tmp_path / "ck" / "state.pt", weights_only=False)
    assert {k: v[0] for k, v in state["unedited_refs"]["1"].items()} == {
        "weight": "weight", "layer.bias": "bias", "original.weight": "weight", "original.bias": "bias"}
    weight_bytes = 64 * 64 * 4
    assert (tmp_path / "ck" / "modules.pt").stat().st_size < 1.5 * weight_bytes  # the side memory only, not 3 copies
    assert torch.equal(model[1].weight, model[1].original.weight)  # the live model got its tensors back
    fresh = model_with(0)
    sc.SequentialCheckpoint(tmp_path / "ck", fingerprint, "GRACE", ["1"]).load(fresh)
    assert fresh[1].weight is fresh[1].layer.weight  # the alias survives
    for name, tensor in model[1].state_dict().items():
        assert torch.equal(fresh[1].state_dict()[name], tensor), name
    with pytest.raises(sc.CheckpointMismatchError, match=r"unedited 1\.(weight|bias) of this model is not the one.*Fix:"):
        sc.SequentialCheckpoint(tmp_path / "ck", fingerprint, "GRACE", ["1"]).load(model_with(1))
    monkeypatch.setattr(sc, "FORMAT", 1)  # a folder written before the references (every tensor pickled) still reads
    old = sc.SequentialCheckpoint(tmp_path / "old", fingerprint, "GRACE", ["1"])
    old.save(model, 1, [{}], [1.0])
    assert (tmp_path / "old" / "modules.pt").stat().st_size > 3 * weight_bytes
    monkeypatch.setattr(sc, "FORMAT", 2)
    fresh = model_with(0)
    sc.SequentialCheckpoint(tmp_path / "old", fingerprint, "GRACE", ["1"]).load(fresh)
    assert torch.equal(fresh[1].side, model[1].side) and torch.equal(fresh[1].original.weight, model[1].weight)


def test_stop_after_without_a_checkpoint_folder_is_refused():
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--stop_after 2: needs --checkpoint_dir.*Fix: add --checkpoint_dir"):
        BENCH.parse_args(["--stop_after", "2"])
    assert BENCH.parse_args(["--stop_after", "2", "--checkpoint_dir", "x"]).stop_after == 2


def test_latency_only_merges_the_query_ratio_alone_and_the_table_marks_ratios_timed_at_the_runs_start():
    base = _saved_run({"grace": {"Rel": 50.0}, "wise": {"Rel": 40.0}})
    run = _saved_run({})
    run["datasets"], run["n_evaluated"] = {}, {}
    run["latency"] = {"unedited": {"edit_ms": None, "query_ratio": [1.0] * 3},
                      "wise": {"query_ratio": [1.05, 1.0, 1.1], "query_base": BENCH.QUERY_BASE}}
    merged = BENCH.merge_results(base, run, "python benchmarks/memory_editors.py --merge --latency_only --methods wise")
    assert merged["latency"]["wise"] == {"edit_ms": [10.0, 9.0, 11.0], "query_ratio": [1.05, 1.0, 1.1],
                                         "query_base": BENCH.QUERY_BASE}  # the saved edit times stay
    assert merged["datasets"]["zsre"]["wise"]["Rel"] == [40.0] * 3  # and the rows
    assert merged["merged_runs"][-1]["keys"] == ["latency.wise.query_ratio"]
    md = BENCH.render_markdown(merged)
    assert "| wise | 10.0 [9.0, 11.0] | 1.05 [1.00, 1.10] |" in md  # timed beside its queries: no mark
    assert "| grace | 10.0 [9.0, 11.0] | 1.00 [0.90, 1.10] † |" in md  # the run's first forwards: marked
    with pytest.raises(BENCH.BenchmarkInputError, match=r"--latency_only: .*needs --merge.*Fix: add --merge"):
        BENCH.parse_args(["--latency_only", "--sequential_methods", ""])


def test_the_unmet_requests_section_reads_the_methods_row_that_got_furthest():
    # a float32 `wise` row of 2 records beside a bfloat16 row of 4: the section gives the bfloat16 row's n and edit time
    seq = {"dataset": "zsre", "n": 100, "methods": {
        "wise": {"n": 3, "figures": {}, "edit_ms": [600000.0, 590000.0, 610000.0]},
        "wise (bfloat16)": {"n": 40, "figures": {}, "edit_ms": [100000.0, 95000.0, 105000.0]}}}
    out = _saved_run({"wise": {"Rel": 100.0}, "wise (bfloat16)": {"Rel": 90.0}}, seq=seq)
    out["n_evaluated"]["zsre"] = {"wise": 2, "wise (bfloat16)": 4}
    out["latency"]["wise"]["edit_ms"] = [639000.0, 629000.0, 719000.0]
    out["latency"]["wise (bfloat16)"]["edit_ms"] = [110000.0, 105000.0, 118000.0]
    text = "\n".join(BENCH.unmet_requests_lines(out))
    assert ("**wise, one edit at a time** (row `wise (bfloat16)`): n = zsre 4 of the 5 records per file of the "
            "InstructEd rows; median edit 110.0 s [105.0, 118.0]") in text
    assert "**wise, sequential** (row `wise (bfloat16)`): n = 40 of 100; median edit 100.0 s [95.0, 105.0]" in text
    out["n_evaluated"]["zsre"]["wise (bfloat16)"] = 5  # the bfloat16 row reached the records asked for
    assert "wise, one edit at a time" not in "\n".join(BENCH.unmet_requests_lines(out))
