"""CPU benchmark: EasyEdit main's memory-based editors (IKE, GRACE, WISE) beside InstructEd on Gemma-3-270M.

Every method edits the same records as ``benchmarks/instructed_cpu.py`` (the first ``--limit``
records of ``instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json`` and of
``zsre/zsre_mend_eval_portability_gpt4.json``) on the embedded Gemma-3-270M, through EasyEdit
main's ``BaseEditor.edit`` and ``compute_edit_quality`` (IKE: ``compute_icl_edit_quality``):

* ``unedited`` -- EasyEdit's pre-edit metrics (Loc is 100 by definition);
* ``instructed_gold`` / ``instructed_retrieval`` -- InstructEd with the cached prefixes of the
  default recipe (``instructed/recipes.py``, CounterFact-only training; never retrained here);
  retrieval from a memory that holds every evaluated edit of the dataset;
* ``ike`` / ``grace`` / ``wise`` -- EasyEdit main's own methods with ``hparams/{IKE,GRACE,WISE}/gemma-3-270m.yaml``;
  IKE's demonstrations are CounterFact training records (``counterfact/counterfact-train.json``)
  encoded with the packaged offline all-MiniLM-L6-v2.

One edit per call, the model restored after each (EasyEdit's non-sequential protocol). Reported:
Rel / Gen / Loc / Por / Score / H (:func:`~instructedit_plugin.evaluation.summary.summarize_metrics`),
the median edit time (the method's ``apply_algo`` call, timed around EasyEdit's own call) and the
median query time of the edited model on ``prompt + target_new`` as a ratio to the unedited model's,
timed right after it, each with a 95% bootstrap interval over the records (GRACE / WISE: timed on the last
edit's model right after its edit; ``--latency_only --merge`` re-times a saved row's ratio).
``--sequential_methods``: ``--sequential_n`` edits applied one after another to one model (the InstructEd
memory, the GRACE codebook, the WISE side memory grow; WISE with ``sequential_edit`` set, see
:func:`run_sequential`), then every edit evaluated on the final model; ``--checkpoint_dir`` makes a long
GRACE / WISE run resumable (:mod:`benchmarks.sequential_checkpoint`). EasyEdit scores with the output layer kept on torch's fast path (:func:`dense_output_layer`:
GRACE freezes every parameter, which made its generation-based scoring on Gemma-3-270M 18 times slower with the
same outputs). ``--hparams_variant grace=STEM`` runs a labelled other setting
(``hparams/GRACE/STEM.yaml``) whose rows stand beside the default's. The markdown ends with the requests
of #15 item 4 the file does not meet (rows short of the records / the 100 sequential edits asked for,
with the measured edit time and the time the asked-for edits would take at it).

EasyEdit main is imported from ``EASYEDIT_SRC`` (as the plugin's compat loader does), e.g.::

    EASYEDIT_SRC=../shared/easyedit-main nohup nice -n 5 python benchmarks/memory_editors.py \\
        --data_dir ../shared/data --limit 40 --threads 1 > logs/memory_editors.log 2>&1 &
    python benchmarks/memory_editors.py --render          # rebuild the .md from the .json

Writes ``benchmarks/results/memory_editors.json`` and ``.md`` (rendered from the JSON alone, see
``benchmarks/results_io.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import paper_figures  # noqa: E402
from benchmarks.easyedit_calls import edit_kwargs  # noqa: E402
from benchmarks.sequential_checkpoint import SequentialCheckpoint, run_fingerprint  # noqa: E402
from benchmarks.results_io import (  # noqa: E402
    EDIT_METRICS, bootstrap_ci, command_line, merged_run, merged_runs_lines, notes_lines, read_notes,
    record_values, render_saved, rendered_from, setup_logging, summarize_with_intervals, today, write_results,
)

LOG = logging.getLogger("memory_editors")
SCRIPT = "benchmarks/memory_editors.py"
#: Where the results go without ``--out``.
DEFAULT_RESULT = "memory_editors.json"
METHODS = ("unedited", "instructed_gold", "instructed_retrieval", "ike", "grace", "wise")
SEQUENTIAL_METHODS = ("instructed_retrieval", "grace", "wise")
SEQUENTIAL_REQUESTED = 100  # #15 item 4: sequential editing of 100 edits (the paper's Table 11)
#: method -> EasyEdit's alg_name (also the folder of its YAMLs under hparams/; its hparams class comes from
#: :func:`instructedit_plugin.registry.hparams_class_for`)
EASYEDIT_METHODS = {"ike": "IKE", "grace": "GRACE", "wise": "WISE"}
METRICS = EDIT_METRICS
DATASETS = ("counterfact", "zsre")
#: how a latency row's query ratio was timed: against the unedited forwards taken right after the method's
#: (rows without it compared with the forwards timed once at the start of their run)
QUERY_BASE = "unedited timed after the method's queries"
IKE_DEMO_FILE = "counterfact/counterfact-train.json"
RESULT_KEYS = frozenset({
    "model", "date", "command", "args", "wall_minutes", "archive", "recipe", "easyedit", "hparams",
    "datasets", "latency", "sequential", "n_evaluated", "errors", "base_query_ms", "notes", "finished", "merged_runs",
})
_UNSAVED_ARGS = ("out", "render", "notes", "work_dir", "merge", "checkpoint_dir", "stop_after")


class BenchmarkInputError(ValueError):
    """A command-line value this benchmark cannot run with (the message names it and ends in a fix)."""


def parse_methods(text: str, allowed: Sequence[str], option: str) -> list[str]:
    """The comma-separated method names of ``option``, each one of ``allowed``."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise BenchmarkInputError(f"{option}: unknown method {unknown[0]!r}. Fix: use some of {', '.join(allowed)}")
    return names


def parse_variants(items: Sequence[str]) -> dict[str, str]:
    """``--hparams_variant METHOD=STEM`` values as ``{method: stem}`` (methods with a YAML: ike, grace, wise)."""
    out: dict[str, str] = {}
    for item in items:
        method, sep, stem = (part.strip() for part in item.partition("="))
        if not sep or not stem or method not in EASYEDIT_METHODS:
            raise BenchmarkInputError(f"--hparams_variant: {item!r} is not METHOD=STEM with METHOD one of "
                                      f"{', '.join(EASYEDIT_METHODS)}. Fix: pass e.g. --hparams_variant grace=gemma-3-270m-n_iter20")
        out[method] = stem
    return out


def row_label(method: str, stem: str | None = None, dtype: str | None = None) -> str:
    """The key of ``method``'s rows: its name, or with its labelled setting in brackets: ``'grace
    (gemma-3-270m-n_iter20)'`` for an hparams variant, ``'wise (bfloat16)'`` for a run in another dtype,
    ``'wise (stem, bfloat16)'`` for both."""
    setting = ", ".join(part for part in (stem, dtype) if part)
    return f"{method} ({setting})" if setting else method


def method_dtype(args: argparse.Namespace, method: str) -> str:
    """The dtype ``method`` runs the model in: float32 for ``--float32_methods``, else ``--dtype``."""
    return "float32" if method in args.float32_list else args.dtype


def row_labels(args: argparse.Namespace) -> dict[str, str]:
    """Each method's row key for this run (:func:`row_label` with its ``--hparams_variant`` stem and, for
    ``--dtype_in_label`` methods, its dtype)."""
    return {m: row_label(m, args.variant_stems.get(m), method_dtype(args, m) if m in args.dtype_label_list else None)
            for m in METHODS}


def base_method(label: str) -> str:
    """The method of a row key (:func:`row_label` undone)."""
    return label.split(" (", 1)[0]


def in_method_order(labels: Iterable[str]) -> list[str]:
    """Row keys in ``METHODS`` order, a variant right after its method's default row."""
    return sorted(labels, key=lambda k: (METHODS.index(base_method(k)), k != base_method(k), k))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="dataset folder (default $INSTRUCTEDIT_DATA_DIR)")
    p.add_argument("--model_dir", default=None, help="local causal-LM folder (default: the embedded Gemma-3-270M)")
    p.add_argument("--archive", default=None,
                   help="InstructEd prefixes (default: the cached prefixes of the default recipe; never trained here)")
    p.add_argument("--hparams_dir", default=str(ROOT / "hparams"), help="folder with {IKE,GRACE,WISE}/<name>.yaml")
    p.add_argument("--hparams_name", default="gemma-3-270m", help="YAML stem under each method's folder")
    p.add_argument("--hparams_variant", action="append", default=[], metavar="METHOD=STEM",
                   help="run METHOD (ike, grace, wise) with <hparams_dir>/<METHOD>/<STEM>.yaml instead of --hparams_name; "
                        "its rows are labelled 'METHOD (STEM)' so they stand beside the default setting's rows")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sequential_methods", default=",".join(SEQUENTIAL_METHODS))
    p.add_argument("--limit", type=int, default=40, help="records per dataset (one edit each)")
    p.add_argument("--baseline_limit", type=int, default=None,
                   help="records per dataset for GRACE and WISE (default --limit; each of their edits trains for many steps)")
    p.add_argument("--sequential_n", type=int, default=100, help="edits in the sequential run")
    p.add_argument("--sequential_baseline_n", type=int, default=None,
                   help="edits in the sequential run of GRACE and WISE (default --sequential_n)")
    p.add_argument("--sequential_dataset", default="zsre", choices=DATASETS)
    p.add_argument("--checkpoint_dir", default=None,
                   help="sequential GRACE / WISE: save the run's progress under DIR/<row> after every edit and "
                        "resume a saved run there after its last finished edit (a stopped run loses nothing)")
    p.add_argument("--stop_after", type=int, default=None,
                   help="sequential, with --checkpoint_dir: end after this many edits in all (progress saved; the "
                        "same command later goes on from there); no results are written for a stopped method")
    p.add_argument("--ike_demos", type=int, default=1000, help="CounterFact training records IKE retrieves from")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--float32_methods", default="",
                   help="methods run with the model in float32 (bf16 -> fp32 -> bf16 is lossless)")
    p.add_argument("--dtype_in_label", default="",
                   help="methods whose rows carry the dtype they ran in, e.g. 'wise (bfloat16)', so a run in "
                        "another dtype than the saved rows of that method stands beside them")
    p.add_argument("--retrieval_gate", type=float, default=0.1)
    p.add_argument("--latency_n", type=int, default=10, help="query-latency inputs per dataset")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work_dir", default=str(ROOT / "logs" / "memory_editors"),
                   help="scratch folder (IKE's demonstration embeddings)")
    p.add_argument("--merge", action="store_true",
                   help="add this run's rows to the saved --out file (its other rows kept; the command goes into merged_runs)")
    p.add_argument("--render", action="store_true", help="only rebuild the .md from the saved .json")
    p.add_argument("--latency_only", action="store_true",
                   help="with --merge: re-time the query ratios of --methods (each edits the first record of each "
                        "file, then its edited and the unedited model's forwards are timed); the saved rows and edit "
                        "times stay")
    p.add_argument("--notes", default=None, help="markdown file whose text goes into the JSON as the run's notes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / DEFAULT_RESULT))
    args = p.parse_args(argv)
    args.method_list = parse_methods(args.methods, METHODS, "--methods")
    args.sequential_list = parse_methods(args.sequential_methods, SEQUENTIAL_METHODS, "--sequential_methods")
    args.float32_list = parse_methods(args.float32_methods, METHODS, "--float32_methods")
    args.dtype_label_list = parse_methods(args.dtype_in_label, METHODS, "--dtype_in_label")
    args.variant_stems = parse_variants(args.hparams_variant)
    if args.latency_only and (not args.merge or args.sequential_list):
        raise BenchmarkInputError("--latency_only: re-times the query ratios of a saved file's one-edit rows, so it needs "
                                  "--merge and no sequential methods. Fix: add --merge and --sequential_methods ''")
    if args.stop_after is not None and (args.stop_after < 1 or not args.checkpoint_dir):
        raise BenchmarkInputError(f"--stop_after {args.stop_after}: needs --checkpoint_dir (else the edits done are "
                                  "lost) and a positive number. Fix: add --checkpoint_dir DIR, or drop --stop_after")
    for name in ("limit", "bootstrap"):
        if getattr(args, name) < 1:
            raise BenchmarkInputError(f"--{name} must be >= 1, got {getattr(args, name)}. Fix: pass a positive number")
    if args.merge and not args.render and not Path(args.out).is_file():
        raise BenchmarkInputError(f"--merge: no saved results at {args.out} to add this run's rows to. "
                                  "Fix: run once without --merge first, or pass the saved file as --out")
    return args


def merge_results(base: Mapping[str, Any], run: Mapping[str, Any], command: str) -> dict:
    """``base`` (a saved result) with the rows this ``run`` measured put in (a row of the same method and
    dataset replaced), its errors added and the command recorded in ``merged_runs`` with the keys it set.
    The configuration lines (command, args, wall time, unedited forward time) stay ``base``'s; every row
    carries its own n, and a merged query ratio compares with the unedited forward timed in its own run."""
    out = json.loads(json.dumps(base))
    keys: list[str] = []
    for ds, rows in (run.get("datasets") or {}).items():
        merged = {**out.setdefault("datasets", {}).get(ds, {}), **rows}
        out["datasets"][ds] = {m: merged[m] for m in in_method_order(merged)}
        out.setdefault("n_evaluated", {}).setdefault(ds, {}).update((run.get("n_evaluated") or {}).get(ds, {}))
        keys += [f"datasets.{ds}.{m}" for m in rows]
    for method, row in (run.get("latency") or {}).items():
        if method != "unedited":
            latency = out.setdefault("latency", {"unedited": {"edit_ms": None, "query_ratio": [1.0, 1.0, 1.0]}})
            if "edit_ms" in row:
                latency[method] = row
                keys.append(f"latency.{method}")
            else:  # --latency_only: the query ratio alone, the saved edit times stay
                latency[method] = {**(latency.get(method) or {"edit_ms": None}), **row}
                keys.append(f"latency.{method}.query_ratio")
    seq = run.get("sequential")
    if seq and seq.get("methods"):
        saved = out.get("sequential") or {"dataset": seq["dataset"], "n": seq["n"], "methods": {}}
        if saved["dataset"] != seq["dataset"]:
            raise BenchmarkInputError(f"--merge: the saved sequential rows edit {saved['dataset']}, this run "
                                      f"{seq['dataset']}. Fix: pass --sequential_dataset {saved['dataset']} or another --out")
        saved["n"] = max(saved["n"], seq["n"])
        merged_seq = {**saved["methods"], **seq["methods"]}
        saved["methods"] = {m: merged_seq[m] for m in in_method_order(merged_seq)}
        out["sequential"] = saved
        keys += [f"sequential.{m}" for m in seq["methods"]]
    errors = out.setdefault("errors", {})
    for key in keys:  # a method measured again: the saved run's errors for it no longer describe the file
        section, _, method = key.rpartition(".")
        errors.pop(f"sequential {method}" if section == "sequential" else method, None)
    errors.update(run.get("errors") or {})
    for key in ("hparams",):
        out[key] = {**(out.get(key) or {}), **(run.get(key) or {})}
    if run.get("finished") is False:
        out["finished"] = False
    out.setdefault("merged_runs", []).append(merged_run(command, keys))
    return out


# ----------------------------------------------------------------------------------------------
# EasyEdit main
# ----------------------------------------------------------------------------------------------
def require_easyedit_main() -> Any:
    """EasyEdit main, imported through the plugin's loader (``EASYEDIT_SRC``); the PyPI flavour has no WISE."""
    import instructedit_plugin

    info = instructedit_plugin.register()
    if info.flavour != "main":
        raise BenchmarkInputError(
            f"IKE, GRACE and WISE are run from EasyEdit main, but the {info.flavour} flavour was imported from "
            f"{info.location}. Fix: set EASYEDIT_SRC to a clone of EasyEdit main (e.g. ../shared/easyedit-main)")
    return info


def easyedit_hparams(method: str, yaml_path: Path, model_name: str, work_dir: Path, **overrides: Any) -> Any:
    """EasyEdit main's hparams object for ``method`` from ``yaml_path``.

    WISE's ``act_margin: [alpha, beta, gamma]`` is split by the plugin's loader (``load_easyedit_hparams``,
    as EasyEdit's ``from_hparams`` does); IKE's ``all-MiniLM-L6-v2`` becomes the packaged offline encoder
    folder and its ``results_dir`` the scratch folder; ``overrides`` replace YAML fields (e.g.
    ``inner_params`` for another model).
    """
    from instructedit_plugin.compat.hparams_bridge import load_easyedit_hparams
    from instructedit_plugin.core.config import read_yaml
    from instructedit_plugin.registry import hparams_class_for

    if not yaml_path.is_file():
        raise BenchmarkInputError(f"{method}: no hparams file {yaml_path}. Fix: pass --hparams_dir / --hparams_name")
    extra = dict(overrides)
    if method == "ike":
        from instructedit_plugin.instructed.encoder import default_encoder_path

        encoder = {**read_yaml(yaml_path)[0], **extra}.get("sentence_model_name")
        if encoder in (None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
            extra["sentence_model_name"] = str(default_encoder_path())
        extra["results_dir"] = str(work_dir)
    cls = hparams_class_for(EASYEDIT_METHODS[method])
    return load_easyedit_hparams(cls, yaml_path, model_name=model_name, **extra)


def prepare_ike_demonstrations(hparams: Any, demos: list[dict]) -> list[dict]:
    """Encode IKE's demonstration records with EasyEdit's ``encode_ike_facts`` (once per count); returns them."""
    from easyeditor.models.ike.util import encode_ike_facts
    from sentence_transformers import SentenceTransformer

    name = hparams.sentence_model_name.rsplit("/", 1)[-1]
    stored = Path(hparams.results_dir) / hparams.alg_name / "embedding" / f"{name}_{type(demos).__name__}_{len(demos)}.pkl"
    if not stored.is_file():
        LOG.info("IKE: encoding %d demonstration records with %s", len(demos), hparams.sentence_model_name)
        encode_ike_facts(SentenceTransformer(hparams.sentence_model_name, device="cpu"), demos, hparams)
    return demos


def wise_loc_prompts(demos: Sequence[Mapping[str, Any]]) -> list[str]:
    """WISE's ``loc_prompts``: the CounterFact training records' locality facts (``prompt + answer``), one per
    edit in turn (EasyEdit's WISE examples use unrelated NQ questions; these are unrelated facts as well)."""
    out = [f"{d['locality_prompt']} {d['locality_ground_truth']}" for d in demos if d.get("locality_prompt")]
    if not out:
        raise BenchmarkInputError(f"WISE needs loc_prompts, but no record of {IKE_DEMO_FILE} has a locality_prompt. "
                                  "Fix: pass a --data_dir whose CounterFact training file has locality prompts")
    return out


def _prepare(req: Mapping[str, Any], loc_prompt: str | None = None) -> dict:
    """EasyEdit main's request dict for ``req`` (its own ``_prepare_requests``)."""
    from easyeditor.editors.utils import _prepare_requests

    kw = edit_kwargs(req, loc_prompt=loc_prompt)
    return _prepare_requests(kw.pop("prompts"), kw.pop("target_new"), kw.pop("ground_truth"), None,
                             kw.pop("rephrase_prompts", None), kw.pop("locality_inputs", None),
                             kw.pop("portability_inputs", None), **kw)[0]


class SpacedTargetTokenizer:
    """The tokenizer, except that ``encode(text, add_special_tokens=False)`` reads ``text`` as it follows a prompt.

    EasyEdit main scores GRACE by greedy generation and compares the generated tokens with
    ``tok.encode(target_new, add_special_tokens=False)``: the *bare* target. With a SentencePiece
    tokenizer that adds no dummy prefix (Gemma's), the bare ``"Rome"`` is the token ``Rome`` while the
    model continues ``"... is"`` with ``▁Rome``, so every GRACE edit would score 0 whatever the model
    says. GRACE itself trains on ``f"{prompt} {target}"`` (the target after a space), and EasyEdit's
    teacher-forced metrics score ``prompt + ' ' + target``; this proxy gives the generation metric the
    same reading. Everything else goes to the wrapped tokenizer unchanged.
    """

    def __init__(self, tok: Any):
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: Any, *args: Any, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        if not add_special_tokens and isinstance(text, str) and text and not text[0].isspace():
            text = " " + text
        return self._tok.encode(text, *args, add_special_tokens=add_special_tokens, **kwargs)


class ContinuationTokenizer(SpacedTargetTokenizer):
    """:class:`SpacedTargetTokenizer`, and a *call* on text that starts with whitespace adds no special tokens.

    EasyEdit's IKE metric (``icl_lm_eval``, the branch for models other than T5/LLaMA) tokenizes
    ``' ' + target + '\\n'`` with the tokenizer's defaults and lines those ids up with the last
    positions of the scored prompt. A tokenizer that puts ``<bos>`` in front of every text (Gemma's)
    shifts that line-up by one: the first compared id is ``<bos>``, which the model never predicts there,
    so a k-token target scores at most k/(k+1) however right the edited model is (every IKE Rel on
    Gemma was 50.0 with no spread). Text that continues a prompt is not the start of a document, so it
    gets no ``<bos>`` here; prompts (which never start with a space) keep theirs.
    """

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and text[:1].isspace():
            kwargs.setdefault("add_special_tokens", False)
        return self._tok(text, *args, **kwargs)


def wise_activation(hparams: Any, model: Any) -> None:
    """Give WISE the model's activation function under the name it reads.

    EasyEdit main's WISE copies ``model.config.hidden_act`` (LLaMA, Qwen) or ``activation_function``
    (GPT-2) into ``hparams.hidden_act`` and scores activations with ``ACT2FN[hparams.hidden_act]``;
    Gemma 3's config calls it ``hidden_activation``, so without this every WISE edit on Gemma 3 fails
    with ``AttributeError: 'WISEHyperParams' object has no attribute 'hidden_act'``.
    """
    config = getattr(model, "config", None)
    if getattr(hparams, "hidden_act", None) or config is None:
        return
    for name in ("hidden_act", "activation_function", "hidden_activation"):
        if getattr(config, name, None):
            hparams.hidden_act = getattr(config, name)
            return


def edited_module_paths(hparams: Any) -> list[str]:
    """Module paths (``model.layers.15.mlp.down_proj``) that GRACE / WISE replace with their adaptors."""
    import re

    paths = []
    for name in getattr(hparams, "inner_params", None) or []:
        name = re.sub(r"\[(\d+)\]", r".\1", name)
        paths.append(name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name)
    return paths


class ModuleGuard:
    """Puts the original modules at ``paths`` back on exit (an adaptor left by a failed or finished edit)."""

    def __init__(self, model: Any, paths: Sequence[str]):
        self.model, self.saved = model, {p: model.get_submodule(p) for p in paths}

    def __enter__(self) -> "ModuleGuard":
        return self

    def __exit__(self, *exc: Any) -> None:
        for path, module in self.saved.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, module)


def ike_demonstrations(data_dir: Path, n: int, exclude_subjects: set[str]) -> list[dict]:
    """The first ``n`` CounterFact training records (subjects of evaluated records left out), as IKE reads them."""
    rows = json.loads((data_dir / IKE_DEMO_FILE).read_text(encoding="utf-8"))
    out = []
    for rec in rows:
        if str(rec.get("subject", "")).strip().lower() in exclude_subjects:
            continue
        demo = {"prompt": rec["prompt"], "target_new": rec["target_new"]}
        if rec.get("rephrase_prompt"):
            demo["rephrase_prompt"] = rec["rephrase_prompt"]
        if rec.get("locality_prompt"):
            demo["locality_prompt"], demo["locality_ground_truth"] = rec["locality_prompt"], rec["locality_ground_truth"]
        out.append(demo)
        if len(out) >= n:
            break
    return out


def dense_output_layer(model: Any) -> Callable[[], None]:
    """Put :func:`~instructedit_plugin.models.output_layer.keep_output_layer_dense`'s pre-hook on ``model``'s output
    layer; returns what takes it off again (nothing when the hook was there already).

    Why the benchmark needs it (the GRACE scoring slowdown on Gemma-3-270M): EasyEdit main's GRACE freezes every
    parameter of the model it edits (``GRACE.__init__``, easyeditor/models/grace/GRACE.py lines 44-45), and its
    scoring is greedy generation (``model.generate``), which runs the output layer on the last-position slice
    ``hidden_states[:, -1:, :]``. For that input (torch 2.13, ``F.linear`` without a bias) a frozen weight takes
    the ``bmm`` path, which copies the whole transposed weight -- for Gemma-3-270M's tied 262,144 x 640 output
    layer about 2.7 s per generated token instead of 0.07 s. The hook hands the layer a standard-strided copy of
    the slice: the same logits on the fast path, whatever the ``requires_grad`` flags (EasyEdit's stay as GRACE
    leaves them).
    """
    from instructedit_plugin.models.output_layer import keep_output_layer_dense

    handle = keep_output_layer_dense(model)
    return handle.remove if handle is not None else (lambda: None)


class TimedApply:
    """Wraps ``editor.apply_algo``: EasyEdit main records no edit time, so each call is timed here.

    ``after``, when set, is called with the edited model right after a timed call (outside the timing), while
    EasyEdit has not yet scored or restored it.
    """

    def __init__(self, apply: Callable[..., Any]):
        self.apply, self.ms = apply, []
        self.after: Callable[[Any], None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.apply(*args, **kwargs)
        self.ms.append((time.perf_counter() - t0) * 1000)
        if self.after is not None:
            self.after(out[0] if isinstance(out, tuple) else out)
        return out


def run_one_hop(editor: Any, requests: Sequence[Mapping[str, Any]], name: str, train_ds: list | None = None,
                loc_prompts: Sequence[str] | None = None, query_texts: Sequence[str] | None = None,
                query_ms_out: list[float] | None = None) -> tuple[list[dict], list[float], Any, list[str]]:
    """One ``BaseEditor.edit`` call per request (restored after each): metrics, edit ms, last edited model, errors.

    With ``query_texts``, the edited model of the last request is timed on them (:func:`query_times`) right
    after its edit, before EasyEdit scores and restores it, and the times go into ``query_ms_out`` (GRACE
    and WISE: no second edit only to time queries). EasyEdit scores with :func:`dense_output_layer`."""
    timer = TimedApply(editor.apply_algo)
    editor.apply_algo = timer
    undo_dense = dense_output_layer(editor.model)
    metrics, errors, edited = [], [], None
    extra = {"train_ds": train_ds} if train_ds is not None else {}
    try:
        for i, req in enumerate(requests):
            try:
                loc = loc_prompts[i % len(loc_prompts)] if loc_prompts else None
                if query_texts and query_ms_out is not None and i == len(requests) - 1:
                    timer.after = lambda edited_model: query_ms_out.extend(query_times(edited_model, editor.tok, query_texts))
                out, edited, _ = editor.edit(**edit_kwargs(req, loc_prompt=loc), sequential_edit=False, verbose=False, **extra)
                metrics.extend(out)
            except Exception as exc:  # noqa: BLE001 - one failing record must not sink the benchmark
                errors.append(f"record {i}: {type(exc).__name__}: {exc}")
                LOG.warning("%s: record %d failed: %s", name, i, exc, exc_info=len(errors) <= 2)
            if (i + 1) % 10 == 0:
                LOG.info("%s: %d/%d edits", name, i + 1, len(requests))
    finally:
        editor.apply_algo = timer.apply
        undo_dense()
    return metrics, timer.ms, edited, errors


def run_sequential(editor: Any, requests: Sequence[Mapping[str, Any]], name: str,
                   loc_prompts: Sequence[str] | None = None, checkpoint: SequentialCheckpoint | None = None,
                   stop_after: int | None = None) -> tuple[list[dict], list[float]] | None:
    """Apply every request one after another to one model with EasyEdit's ``apply_algo`` (nothing restored in
    between), then score every request on the final model with EasyEdit's ``compute_edit_quality``
    (pre-edit metrics first, on the unedited model); the model is restored at the end. The scoring runs with
    :func:`dense_output_layer` (same outputs, the unedited model's speed).

    WISE is told that its edits are sequential (``hparams.sequential_edit``: EasyEdit main's text WISE reads
    it, ``WISE.py:81``, but neither its hparams class nor ``BaseEditor`` sets it, and without it every edit
    replaces the side memory of the edits before it). With ``checkpoint``, the progress is saved after every
    edit and a saved run resumes after its last finished edit; ``stop_after`` ends this call after that many
    edits in all (progress saved, ``None`` returned: run it again to go on).
    """
    from easyeditor.editors.editor import finalize_locality_metrics
    from easyeditor.evaluate import compute_edit_quality
    from tqdm import tqdm

    if stop_after is not None and checkpoint is None:
        raise ValueError("run_sequential: stop_after without a checkpoint would lose the edits made. Fix: pass a "
                         "SequentialCheckpoint too")
    hp = editor.hparams
    if getattr(hp, "alg_name", None) == "WISE":
        hp.sequential_edit = True
    prepared = [_prepare(req, loc_prompts[i % len(loc_prompts)] if loc_prompts else None) for i, req in enumerate(requests)]
    undo_dense = dense_output_layer(editor.model)
    first_restore, edited = None, editor.model
    try:
        resumed = checkpoint.load(editor.model) if checkpoint is not None else None
        if resumed is not None:
            metrics, edit_ms, start = [{"pre": pre} for pre in resumed.pre], resumed.edit_ms, resumed.done
        else:
            metrics = [{"pre": compute_edit_quality(editor.model, editor.model_name, hp, editor.tok, r, hp.device)}
                       for r in tqdm(prepared, desc=f"{name} pre", leave=False)]
            edit_ms, start = [], 0
        for i in tqdm(range(start, len(prepared)), desc=f"{name} edits", initial=start, total=len(prepared), leave=False):
            t0 = time.perf_counter()
            edited, restore = editor.apply_algo(editor.model, editor.tok, [prepared[i]], hp, copy=False,
                                                return_orig_weights=True, keep_original_weight=False)
            edit_ms.append((time.perf_counter() - t0) * 1000)
            first_restore = restore if first_restore is None else first_restore
            if checkpoint is not None:
                checkpoint.save(editor.model, i + 1, [m["pre"] for m in metrics], edit_ms)
            if stop_after is not None and i + 1 >= stop_after and i + 1 < len(prepared):
                LOG.info("%s: stopped after %d of %d edits; progress in %s", name, i + 1, len(prepared), checkpoint.folder)
                return None
        try:
            for m, r in zip(tqdm(metrics, desc=f"{name} post", leave=False), prepared):
                m["post"] = compute_edit_quality(edited, editor.model_name, hp, editor.tok, r, hp.device)
                finalize_locality_metrics(m, r, hp, editor.model_name)
        finally:
            if callable(first_restore):  # GRACE / WISE: the original layer back; InstructEd: the empty memory
                first_restore()
    finally:
        undo_dense()
    return metrics, edit_ms


# ----------------------------------------------------------------------------------------------
# Figures with bootstrap intervals
# ----------------------------------------------------------------------------------------------
def per_record(metrics: Sequence[Mapping[str, Any]], phase: str = "post") -> list[dict[str, float | None]]:
    """Rel/Gen/Loc/Por in [0, 1] of each record (:func:`benchmarks.results_io.record_values`); ``phase="pre"``:
    the unedited model's, with Loc 1 (the unedited model agrees with itself)."""
    if phase == "post":
        return record_values(list(metrics))
    return [dict(row, Loc=1.0) for row in record_values([{"post": rec.get("pre")} for rec in metrics])]


def bootstrap_summary(rows: Sequence[Mapping[str, float | None]], n_boot: int, seed: int) -> dict[str, list | None]:
    """``{metric: [value, low, high]}`` in percent (:func:`benchmarks.results_io.summarize_with_intervals`, the
    metric means summed with ``math.fsum`` as every committed ``memory_editors*.json`` was); every figure None
    without records."""
    if not rows:
        return dict.fromkeys(METRICS)
    return summarize_with_intervals(rows, n_boot, seed, summation=math.fsum)


def bootstrap_median(values: Sequence[float], n_boot: int, seed: int, digits: int = 1) -> list[float] | None:
    """``[median, low, high]`` with a 95% bootstrap interval (:func:`benchmarks.results_io.bootstrap_ci`)."""
    if not values:
        return None
    lo, hi = bootstrap_ci(values, n_boot, seed, statistic=statistics.median)
    return [round(statistics.median(values), digits), round(lo, digits), round(hi, digits)]


# ----------------------------------------------------------------------------------------------
# Query latency
# ----------------------------------------------------------------------------------------------
def _forward_ms(model: Any, tok: Any, text: str) -> float:
    import torch

    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return (time.perf_counter() - t0) * 1000


def query_times(model: Any, tok: Any, texts: Sequence[str]) -> list[float]:
    """Per-input forward time (ms) of ``model`` on ``texts``, after one warm-up."""
    if texts:
        _forward_ms(model, tok, texts[0])
    return [_forward_ms(model, tok, t) for t in texts]


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ci(cell: Any, digits: int = 1) -> str:
    if cell is None:
        return "–"
    value, lo, hi = cell
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _last_of_method(rows: Mapping[str, Any], key: str) -> bool:
    """Whether ``key`` is the last row of its method in ``rows`` (the paper's rows follow it)."""
    keys = list(rows)
    i = keys.index(key)
    return i == len(keys) - 1 or base_method(keys[i + 1]) != base_method(key)


def _duration(ms: float) -> str:
    """``ms`` as hours, or minutes under an hour."""
    return f"{ms / 3.6e6:.1f} h" if ms >= 3.6e6 else f"{ms / 6e4:.0f} min"


def unmet_requests_lines(out: Mapping[str, Any]) -> list[str]:
    """The section that names what #15 item 4 asked for and this file does not have, from the JSON alone.

    Asked: IKE, GRACE and WISE on the same records as the InstructEd rows (the first ``--limit`` of
    each file) and :data:`SEQUENTIAL_REQUESTED` sequential edits for InstructEd retrieval, GRACE and
    WISE. For each missing or smaller row: the n reached, the measured median edit time and the time the
    asked-for edits alone would take at it (scoring not included), or the error that stopped it.
    """
    args, errors = out["args"], out.get("errors") or {}
    latency, n_eval = out.get("latency") or {}, out.get("n_evaluated") or {}
    items: list[str] = []

    def edit_ms_of(rows: Mapping[str, Any], label: str | None, method: str) -> list | None:
        """The edit time of the row ``label`` (the method's row that got furthest), else of any row of the method."""
        if label and (rows.get(label) or {}).get("edit_ms"):
            return rows[label]["edit_ms"]
        cells = [(rows.get(k) or {}).get("edit_ms") for k in rows if base_method(k) == method]
        return next((c for c in cells if c), None)

    def row_name(label: str | None, method: str) -> str:
        return f" (row `{label}`)" if label and label != method else ""

    def cost(asked_edits: int, edit_cell: list | None, error_key: str) -> str:
        text = ""
        if edit_cell:
            text += (f"; median edit {edit_cell[0] / 1000:.1f} s [{edit_cell[1] / 1000:.1f}, {edit_cell[2] / 1000:.1f}], "
                     f"so the {asked_edits} edits asked for take about {_duration(asked_edits * edit_cell[0])} of editing "
                     "alone on this CPU (scoring not included)")
        if errors.get(error_key):
            text += f"; error: {errors[error_key][0]}"
        return text

    if out.get("datasets"):
        asked = int(args["limit"])
        present = [ds for ds in DATASETS if out["datasets"].get(ds)]
        for method in ("ike", "grace", "wise"):
            labels = [k for k in dict.fromkeys(k for ds in present for k in out["datasets"][ds]) if base_method(k) == method]
            # the method's row that got furthest (several rows: another dtype or hparams variant beside the default)
            best = max(labels, key=lambda k: sum(n_eval.get(ds, {}).get(k, 0) for ds in present), default=None)
            reached = {ds: n_eval.get(ds, {}).get(best, 0) if best else 0 for ds in present}
            if any(n < asked for n in reached.values()):
                counts = ", ".join(f"{ds} {n}" for ds, n in reached.items())
                items.append(f"* **{method}, one edit at a time**{row_name(best, method)}: n = {counts} of the {asked} "
                             f"records per file of the InstructEd rows"
                             f"{cost(asked * len(present), edit_ms_of(latency, best, method), method)}.")
    seq = out.get("sequential")
    if seq is not None:
        rows = seq.get("methods") or {}
        for method in SEQUENTIAL_METHODS:
            mine = {k: r for k, r in rows.items() if base_method(k) == method}
            best = max(mine, key=lambda k: mine[k]["n"], default=None)
            done = mine[best]["n"] if best else 0
            if done < SEQUENTIAL_REQUESTED:
                items.append(f"* **{method}, sequential**{row_name(best, method)}: "
                             + (f"n = {done} of {SEQUENTIAL_REQUESTED}" if done else "not run")
                             + cost(SEQUENTIAL_REQUESTED, edit_ms_of(mine, best, method), f"sequential {method}") + ".")
    if not items:
        return []
    return ["## Requests of #15 item 4 this file does not meet", "",
            "Measured here, from this file's rows (the reasons in words are under *How this run was made*):", ""] + items + [""]


def result_file(out: Mapping[str, Any]) -> str:
    """The saved JSON's file name, from the command that first wrote it (its ``--out``; else the default)."""
    words = shlex.split(out.get("command") or "")
    for i, word in enumerate(words):
        if word == "--out" and i + 1 < len(words):
            return Path(words[i + 1]).name
        if word.startswith("--out="):
            return Path(word.split("=", 1)[1]).name
    return DEFAULT_RESULT


def render_markdown(out: Mapping[str, Any]) -> str:
    """``memory_editors.md`` (or the ``.md`` beside another ``--out``) from its JSON alone."""
    args = out["args"]
    name = result_file(out)
    where = rendered_from(SCRIPT, name, "" if name == DEFAULT_RESULT else f" --out benchmarks/results/{name}")
    lines = [
        "# Memory-based editors beside InstructEd on CPU: embedded Gemma-3-270M",
        "",
        f"Produced by `{SCRIPT}`; {where}." + " Percent; every figure with its 95% bootstrap interval "
        f"over the records ({args['bootstrap']} resamples). EasyEdit main's `BaseEditor.edit` + `compute_edit_quality` "
        "(IKE: `compute_icl_edit_quality`), one edit per call, restored after each; Rel = rewrite_acc, Gen = rephrase_acc, "
        "Loc = locality, Por = the GPT-4 one-hop portability question, Score = mean, H = harmonic mean of the four.",
        "",
        "## Configuration",
        "",
        f"* Command: `{out['command']}`" + (f" ({out['date']})." if out.get("date") else "."),
        f"* Model: {out['model']}; torch threads {args['threads']}; wall time {out['wall_minutes']:.1f} min"
        + (" (**unfinished run**: the file is written after every method, and the run was stopped before the methods "
           "and datasets missing below)." if out.get("finished") is False else "."),
        f"* EasyEdit: {out['easyedit']}.",
        f"* InstructEd prefixes: `{out['archive']}` ({out['recipe']}).",
        "* Hparams: " + "; ".join(f"{m}: `{p}`" for m, p in out["hparams"].items()) + ".",
        f"* Records (the command above): the first {args['limit']}"
        + (f" (GRACE and WISE: {args.get('baseline_limit') or args['limit']})"
           if {"grace", "wise"} & set(str(args.get("methods", "")).split(",")) else "") + " of "
        "`counterfact_portability_gpt4_ins.json` and of "
        f"`zsre_mend_eval_portability_gpt4.json`; IKE retrieves its k demonstrations from the first {args['ike_demos']} "
        f"records of `{IKE_DEMO_FILE}` (evaluated subjects left out)."
        + (" Rows merged from later runs (see *Merged into this file*) have their own counts: each row's n."
           if out.get("merged_runs") else ""),
        "",
    ]
    if out.get("datasets"):
        lines += ["## One edit at a time", ""]
    n = out.get("n_evaluated") or {}
    for ds in DATASETS:
        rows = out["datasets"].get(ds) or {}
        if not rows:
            continue
        lines += [f"### {ds}", "", "| method | n | " + " | ".join(METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
        for m, cells in rows.items():
            lines.append(f"| {m} | {n.get(ds, {}).get(m, '')} | " + " | ".join(_ci(cells.get(k)) for k in METRICS) + " |")
            if _last_of_method(rows, m):
                lines += paper_figures.reference_rows(ds, paper_figures.PAPER_NAMES.get(base_method(m), ""), extra_cells=1)
        lines += ["", paper_figures.REFERENCE_NOTE, ""]
    if len(out.get("latency") or {}) > 1:  # more than the unedited row
        lines += ["### Latency", "",
                  f"Unedited forward (`prompt + target_new`, median over {args['latency_n']} inputs per dataset): "
                  f"{_ci(out['base_query_ms'])} ms. Edit: the method's `apply_algo` call (median over every edit); "
                  "query: the edited model's forward on the same inputs (IKE: its demonstrations, the new fact and the "
                  "prompt), as a ratio to the unedited forward on the same inputs, timed right after the method's "
                  "(median of the per-input ratios; † the unedited forwards timed once at the start of the run, as the "
                  "script did before: minutes apart on a shared machine, so a rough ratio).", "",
                  "| method | median edit (ms) | query / unedited |", "|---|---|---|"]
        for m, row in out["latency"].items():
            mark = " †" if row.get("query_ratio") and m != "unedited" and row.get("query_base") != QUERY_BASE else ""
            lines.append(f"| {m} | {_ci(row.get('edit_ms'))} | {_ci(row.get('query_ratio'), 2)}{mark} |")
        lines.append("")
    seq = out.get("sequential")
    if seq:
        lines += ["## Sequential editing", "",
                  f"The first edits of `{seq['dataset']}` (n per method below, at most {seq['n']}) applied one after another "
                  "to one model (nothing restored in between), then every edit evaluated on the final model (pre-edit "
                  "metrics on the unedited model).", "",
                  "| method | n | " + " | ".join(METRICS) + " | median edit (ms) |", "|---" * (3 + len(METRICS)) + "|"]
        for m, row in seq["methods"].items():
            lines.append(f"| {m} | {row['n']} | " + " | ".join(_ci(row["figures"].get(k)) for k in METRICS)
                         + f" | {_ci(row.get('edit_ms'))} |")
            theirs = {"instructed_retrieval": "InstructEd", "grace": "GRACE"}.get(base_method(m))
            if not _last_of_method(seq["methods"], m):
                continue
            for model in ("LLaMA-2-7B", "LLaMA-1-7B"):
                fig = paper_figures.INSTRUCTED_SEQUENTIAL_100.get((seq["dataset"], model), {}).get(theirs or "")
                if fig:
                    lines.append(f"| *paper: {theirs} (Table 11, {model})* | 100 | "
                                 + " | ".join(paper_figures._cell(v) for v in fig) + " | – |")
        lines += ["", f"Rows in *italics* quote {paper_figures.HAN}, Table 11: the paper's rows are at n = "
                      f"{SEQUENTIAL_REQUESTED} sequential edits (LLaMA-1/2-7B; WISE is not in the paper); ours are at the "
                      "n of each row, so a row with a smaller n is not the paper's setting.", ""]
    lines += unmet_requests_lines(out)
    if out.get("errors"):
        lines += ["## Errors", ""] + [f"* {m}: {'; '.join(e)}" for m, e in out["errors"].items()] + [""]
    lines += merged_runs_lines(out)
    lines += notes_lines(out)
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
def default_archive() -> Path:
    """The cached prefixes of the default recipe (its key is independent of where the data folder lies)."""
    from instructedit_plugin.instructed import recipes

    return recipes.train_embedded_prefixes(data_dir=str(ROOT / "instructedit_plugin" / "demo_data"), progress=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_saved(args.out, render_markdown, RESULT_KEYS, notes=args.notes))
        return 0
    notes = read_notes(args.notes) if args.notes else None
    command = command_line(SCRIPT, argv)
    import torch

    torch.set_num_threads(args.threads)
    setup_logging()
    started = time.perf_counter()
    info = require_easyedit_main()

    from instructedit_plugin.compat import make_editor
    from instructedit_plugin.data import resolve_data_dir
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, reset_memory
    from instructedit_plugin.instructed.recipes import evaluation_records, recipe_info
    from instructedit_plugin.models.embedded import embedded_model_dir
    from instructedit_plugin.models.loading import load_causal_lm

    data_dir = Path(resolve_data_dir(args.data_dir))
    model_dir = args.model_dir or str(embedded_model_dir())
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    archive = Path(args.archive) if args.archive else default_archive()
    rinfo = recipe_info(archive)
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    model.eval()
    dense_output_layer(model)  # for the whole run: the unedited and the edited models' forwards timed alike
    n_eval = max(args.limit, args.baseline_limit or 0, args.sequential_n if args.sequential_list else 0,
                 args.sequential_baseline_n or 0)
    evaluation = evaluation_records(data_dir, limit=n_eval)

    def ins_hparams(**kw: Any) -> Any:
        return InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=model_dir, archive=str(archive),
                                                    device="cpu", max_length=40, retrieval_gate=args.retrieval_gate, **kw))

    yaml_of = {m: Path(args.hparams_dir) / EASYEDIT_METHODS[m] / f"{args.variant_stems.get(m, args.hparams_name)}.yaml"
               for m in EASYEDIT_METHODS}
    label = row_labels(args)  # the key of each method's rows
    specs: dict[str, Callable[[], Any]] = {
        "instructed_gold": lambda: ins_hparams(instruction_source="gold"),
        "instructed_retrieval": lambda: ins_hparams(instruction_source="retrieval"),
        **{m: (lambda m=m: easyedit_hparams(m, yaml_of[m], model_dir, work_dir)) for m in EASYEDIT_METHODS},
    }
    subjects = {str(r.get("subject", "")).strip().lower() for ds in DATASETS for r in evaluation[ds]}
    wanted = set(args.method_list) | set(args.sequential_list)
    demos = ike_demonstrations(data_dir, args.ike_demos, subjects) if wanted & {"ike", "wise"} else None
    loc_prompts = wise_loc_prompts(demos) if "wise" in wanted else None

    def build_editor(method: str, hp: Any) -> Any:
        if method == "wise":
            wise_activation(hp, model)
        editor = make_editor(hp, model, tok)
        if method == "grace":  # EasyEdit's generation metric with the target read as it follows the prompt
            editor.tok = SpacedTargetTokenizer(tok)
        elif method == "ike":  # EasyEdit's IKE metric with the target's ids lined up without a <bos>
            editor.tok = ContinuationTokenizer(tok)
        return editor

    def limit_for(method: str, n: int, baseline_n: int | None) -> int:
        return baseline_n if method in ("grace", "wise") and baseline_n else n

    results: dict[str, dict] = {ds: {} for ds in DATASETS}
    n_evaluated: dict[str, dict] = {ds: {} for ds in DATASETS}
    edit_ms: dict[str, list[float]] = {}
    errors: dict[str, list[str]] = {}
    latency_texts = {ds: [f"{r['prompt']} {r['target_new']}" for r in evaluation[ds][: args.latency_n]] for ds in DATASETS}
    base_times = {ds: query_times(model, tok, latency_texts[ds]) for ds in DATASETS}
    query_ratio: dict[str, list[float]] = {}

    def as_dtype(method: str) -> Any:
        return getattr(torch, method_dtype(args, method))

    sequential: dict | None = None
    base_out = json.loads(Path(args.out).read_text(encoding="utf-8")) if args.merge else None

    def save(finished: bool = False) -> Path:
        """Write the JSON and markdown of everything measured so far (after every method: a run stopped
        early still leaves its finished methods on disk, marked ``finished: false``)."""
        latency = {"unedited": {"edit_ms": None, "query_ratio": [1.0, 1.0, 1.0]}}
        for method in args.method_list:
            if method in edit_ms or method in query_ratio:
                latency[label[method]] = {
                    "query_ratio": bootstrap_median(query_ratio.get(method, []), args.bootstrap, args.seed, 3),
                    "query_base": QUERY_BASE}
                if not args.latency_only:  # a latency-only run's one edit per file does not replace the edit times
                    latency[label[method]]["edit_ms"] = bootstrap_median(edit_ms.get(method, []), args.bootstrap,
                                                                         args.seed)
        out = {
            "model": f"{model_dir} ({args.dtype})" if args.model_dir else f"gemma-3-270m (embedded, {args.dtype})",
            "date": today(), "command": command,
            "args": {k: v for k, v in vars(args).items() if k not in _UNSAVED_ARGS and not k.endswith("_list")},
            "wall_minutes": round((time.perf_counter() - started) / 60, 1),
            "archive": str(archive),
            "recipe": f"recipe {rinfo['recipe']['name']}, {rinfo['steps']} steps, sources {', '.join(rinfo['recipe']['sources'])}",
            "easyedit": f"{info.flavour} ({Path(info.location).parent if info.location else '?'})",
            "hparams": {label[m]: os.path.relpath(yaml_of[m], ROOT) for m in EASYEDIT_METHODS
                        if m in args.method_list or m in args.sequential_list},
            "datasets": {ds: results[ds] for ds in DATASETS if results[ds]},
            "latency": latency, "sequential": sequential,
            "n_evaluated": n_evaluated,
            "errors": {m: e[:5] + ([f"... {len(e) - 5} more"] if len(e) > 5 else []) for m, e in errors.items() if e},
            "base_query_ms": bootstrap_median([t for ds in DATASETS for t in base_times[ds]], args.bootstrap, args.seed),
        }
        out["finished"] = finished
        if base_out is not None:
            out = merge_results(base_out, out, command)
        return write_results(args.out, out, render_markdown, RESULT_KEYS, notes)

    for ds in DATASETS:
        pre_rows = None
        for method in args.method_list:
            if method == "unedited":
                continue
            t0 = time.perf_counter()
            requests = evaluation[ds][: 1 if args.latency_only else limit_for(method, args.limit, args.baseline_limit)]
            model.to(as_dtype(method))
            try:
                hp = specs[method]()
                editor = build_editor(method, hp)
                train_ds = prepare_ike_demonstrations(hp, demos) if method == "ike" else None
                locs = loc_prompts if method == "wise" else None
                if method == "instructed_retrieval":
                    reset_memory(model)
                    apply_instructed_to_model(model, tok, [dict(r) for r in requests], hp, keep_original_weight=False)
                timed_in_edit = method in ("grace", "wise")  # their query times come from the last edit itself
                in_edit_qtimes: list[float] = []
                with ModuleGuard(model, edited_module_paths(hp)):
                    metrics, times, edited, errs = run_one_hop(editor, requests, f"{ds}/{method}", train_ds, locs,
                                                               latency_texts[ds] if timed_in_edit else None, in_edit_qtimes)
                    # query latency of this method's edited model on this dataset's latency inputs
                    qtimes = in_edit_qtimes if timed_in_edit else method_query_times(
                        method, model, tok, hp, requests, latency_texts[ds], edited, demos, locs)
            except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, not fatal
                LOG.exception("%s/%s could not run", ds, method)
                errors.setdefault(label[method], []).append(f"{ds}: {type(exc).__name__}: {exc}")
                model.to(getattr(torch, args.dtype))
                continue
            finally:
                reset_memory(model)
            # the unedited model on the same inputs, in the method's dtype, minutes after the edited one (not the
            # run's first forwards: those compared times taken under another load of the shared machine)
            base_now = query_times(model, tok, latency_texts[ds]) if qtimes else []
            model.to(getattr(torch, args.dtype))
            errors.setdefault(label[method], []).extend(f"{ds} {e}" for e in errs)
            if not args.latency_only:
                edit_ms.setdefault(method, []).extend(times)
            if qtimes:
                query_ratio.setdefault(method, []).extend(q / b for q, b in zip(qtimes, base_now))
            if metrics and not args.latency_only:
                results[ds][label[method]] = bootstrap_summary(per_record(metrics), args.bootstrap, args.seed)
                n_evaluated[ds][label[method]] = len(metrics)
                if pre_rows is None and method != "ike":  # IKE's pre metrics are scored on the bare prompt too
                    pre_rows = per_record(metrics, phase="pre")
            LOG.info("%s %s: %s (%.0fs)", ds, label[method], results[ds].get(label[method]), time.perf_counter() - t0)
            if "unedited" in args.method_list and pre_rows and "unedited" not in results[ds]:
                results[ds] = {"unedited": bootstrap_summary(pre_rows, args.bootstrap, args.seed), **results[ds]}
                n_evaluated[ds]["unedited"] = len(pre_rows)
            save()

    if args.sequential_list:
        sequential = {"dataset": args.sequential_dataset, "n": args.sequential_n, "methods": {}}
        stopped: list[str] = []
        for method in args.sequential_list:
            t0 = time.perf_counter()
            requests = evaluation[args.sequential_dataset][: limit_for(method, args.sequential_n, args.sequential_baseline_n)]
            model.to(as_dtype(method))
            try:
                hp = specs[method]()
                reset_memory(model)
                checkpoint = None
                if args.checkpoint_dir and method in EASYEDIT_METHODS:
                    checkpoint = SequentialCheckpoint(
                        Path(args.checkpoint_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", label[method]).strip("_"),
                        run_fingerprint(label[method], args.sequential_dataset, requests, yaml_of[method],
                                        method_dtype(args, method)),
                        hp.alg_name, edited_module_paths(hp))
                with ModuleGuard(model, edited_module_paths(hp)):
                    outcome = run_sequential(build_editor(method, hp), requests, f"sequential/{method}",
                                             loc_prompts if method == "wise" else None, checkpoint, args.stop_after)
            except Exception as exc:  # noqa: BLE001
                LOG.exception("sequential %s could not run", method)
                errors.setdefault(f"sequential {label[method]}", []).append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                reset_memory(model)
                model.to(getattr(torch, args.dtype))
            if outcome is None:  # --stop_after: the progress is on disk, no row yet
                stopped.append(label[method])
                continue
            metrics, times = outcome
            sequential["methods"][label[method]] = {
                "n": len(metrics), "figures": bootstrap_summary(per_record(metrics), args.bootstrap, args.seed),
                "edit_ms": bootstrap_median(times, args.bootstrap, args.seed)}
            LOG.info("sequential %s: %s (%.0fs)", label[method], sequential["methods"][label[method]], time.perf_counter() - t0)
            save()

        if stopped:
            print(f"stopped (--stop_after {args.stop_after}) before the end of: {', '.join(stopped)}; their progress is "
                  f"under {args.checkpoint_dir}, run the same command again to go on; no results written for them")
            return 0
    md_path = save(finished=True)
    print(md_path.read_text(), end="")
    return 0


def method_query_times(method: str, model: Any, tok: Any, hp: Any, requests: Sequence[Mapping[str, Any]],
                       texts: Sequence[str], edited: Any, demos: list[dict] | None,
                       loc_prompts: Sequence[str] | None = None) -> list[float]:
    """Forward times of ``method``'s edited model on ``texts`` (the edited state of the last edit, or for
    retrieval the memory of every evaluated edit; IKE: demonstrations + new fact + prompt)."""
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, reset_memory

    if method.startswith("instructed"):
        reset_memory(model)
        batch = [dict(r) for r in requests] if method == "instructed_retrieval" else [dict(requests[0])]
        qm, _ = apply_instructed_to_model(model, tok, batch, hp, keep_original_weight=False)
        try:
            return query_times(qm, tok, texts)
        finally:
            reset_memory(model)
    if method == "ike":
        from easyeditor.models.ike.ike_main import apply_ike_to_model

        req = dict(requests[0])
        examples = apply_ike_to_model(model, tok, [req], hp, train_ds=demos)
        fact = f"New Fact: {req['prompt']} {req['target_new']}\nPrompt: "
        return query_times(model, tok, ["".join(examples) + fact + t for t in texts])
    # GRACE / WISE: re-apply the first edit, time the wrapper, restore
    with ModuleGuard(model, edited_module_paths(hp)):
        edited, _ = make_editor_apply(model, tok, hp, requests[0], loc_prompts[0] if loc_prompts else None)
        return query_times(edited, tok, texts)


def make_editor_apply(model: Any, tok: Any, hp: Any, req: Mapping[str, Any], loc_prompt: str | None = None) -> tuple[Any, Any]:
    """EasyEdit's ``apply_algo`` for ``hp`` on ``model`` with one request (what ``BaseEditor.edit`` calls)."""
    from easyeditor.util.alg_dict import ALG_DICT

    return ALG_DICT[hp.alg_name](model, tok, [_prepare(req, loc_prompt)], hp, copy=False, return_orig_weights=True,
                                 keep_original_weight=False)


if __name__ == "__main__":
    sys.exit(main())
