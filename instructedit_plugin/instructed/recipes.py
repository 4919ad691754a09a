"""Reusable training recipes: InstructEd prefixes for the embedded Gemma-3-270M on a CPU budget.

``train_embedded_prefixes(budget_minutes=10)`` is what ``instructedit demo`` and
``benchmarks/instructed_cpu.py`` call. It

1. loads the base model (the embedded Gemma-3-270M, or ``model_dir``) in ``dtype`` (bfloat16 by
   default: on CPU 4-5x faster than float32 with metrics within ~0.03);
2. builds a training set of ``n_train`` edits from three sources, in equal parts:

   * ``counterfact/counterfact-train.json`` (MEND format; the instruction is the fact sentence
     ``"{prompt} {target_new}."`` built by :func:`~.templates.instruction_of`),
   * the InstructEd CounterFact file ``instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json``
     and the InstructEd ZsRE file ``.../zsre_mend_eval_portability_gpt4_ins.json``, both *without*
     their first :data:`EVAL_LIMIT` records (those are the evaluation records). These carry the
     paper's instruction and a one-hop portability question, which is what teaches the prefixes to
     reason *from* the instruction rather than only copy it;

   every candidate whose ``case_id`` (CounterFact ids are shared by all CounterFact files), subject
   or question equals one of the evaluation records' is excluded (:func:`evaluation_exclusions`),
   so training and evaluation are disjoint whatever ``--limit`` the benchmark uses;
3. trains with :class:`~.trainer.InstructEdTrainer` until the wall-clock budget is spent -- the
   *whole* call (loading, the unedited model's locality labels, training, the final validation
   and the save) fits in ``budget_minutes``; the trainer re-aims its linear learning-rate decay at
   the number of steps the budget allows (``max_seconds``);
4. stores the result under ``<plugin cache>/instructed_recipes/<key>/`` where ``key`` hashes the
   model identity (config fingerprint + weight files) and the complete recipe configuration
   (budget included), and writes ``recipe.json`` (what was reached) last. A later call with the
   same key returns the archive at once; ``resume=True`` continues an interrupted run from its
   ``last`` checkpoint.

The returned folder (``.../results/best``) is what ``archive:`` in
:class:`~.config.InstructEdHyperParams` takes; :func:`recipe_info` reads ``recipe.json`` back.
"""
from __future__ import annotations

from tqdm.auto import tqdm

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PluginError

LOG = logging.getLogger(__name__)

__all__ = [
    "RECIPE_VERSION", "EVAL_LIMIT", "EVAL_FILES", "TRAIN_SOURCES", "RecipeConfig", "QUICK", "DEFAULT",
    "train_embedded_prefixes", "train_quick_prefixes", "recipe_key", "recipe_info", "model_identity",
    "evaluation_records", "evaluation_exclusions", "training_split",
]

#: Bump when what a recipe trains changes for an unchanged configuration.
RECIPE_VERSION = 1
#: The evaluation uses the first ``EVAL_LIMIT`` records of each file in :data:`EVAL_FILES`.
EVAL_LIMIT = 100
EVAL_FILES: dict[str, str] = {
    "counterfact": "instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json",
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
}
#: Training sources: name -> (file, records skipped at the start because they are evaluated).
TRAIN_SOURCES: dict[str, tuple[str, int]] = {
    "counterfact_train": ("counterfact/counterfact-train.json", 0),
    "counterfact_ins": ("instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json", EVAL_LIMIT),
    "zsre_ins": ("instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_ins.json", EVAL_LIMIT),
}
RECIPES_DIR = "instructed_recipes"
INFO_FILE = "recipe.json"


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Everything that determines what a recipe trains (all of it goes into the cache key)."""

    name: str = "default"
    budget_minutes: float = 10.0
    n_train: int = 240  # a 10-minute budget on a shared 2-core CPU reaches ~275 steps x 6 edit examples (~2.5 passes)
    n_val: int = 16
    sources: tuple[str, ...] = ("counterfact_train", "counterfact_ins", "zsre_ins")
    max_locality: int = 1  # locality prompts kept per training edit (the InstructEd files carry 10)
    max_question_tokens: int = 40  # edits with a longer question are skipped (short sequences are fast)
    dtype: str = "bfloat16"
    seed: int = 0
    prefix_layers: tuple[int, ...] | None = None  # None: the middle third
    prefix_len: int = 5
    init_std: float = 0.02
    lr: float = 1e-2
    weight_decay: float = 0.02
    warmup_steps: int = 20
    batch_size: int = 6
    unmodified_batch_size: int = 6
    val_batch_size: int = 32
    val_interval: int = 100
    max_length: int = 64
    unrelated_locality: int = 1
    reweight_mode: str = "paper"
    encoder: str = "default"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sources"] = list(self.sources)
        data["prefix_layers"] = list(self.prefix_layers) if self.prefix_layers is not None else None
        return data


DEFAULT = RecipeConfig()
#: The ``--quick`` demo variant: about 2 minutes.
QUICK = RecipeConfig(name="quick", budget_minutes=2.0, n_train=60, n_val=6, val_interval=1000)


# ----------------------------------------------------------------------------------------------
# Data: evaluation records, exclusions, the training split
# ----------------------------------------------------------------------------------------------
def _norm(text: Any) -> str:
    return " ".join(str(text).split()).lower() if text is not None else ""


def _load(data_dir: Path, rel: str, limit: int | None = None) -> list[dict[str, Any]]:
    from ..data import load_requests

    return list(load_requests(data_dir / rel, limit=limit))


def evaluation_records(data_dir: str | os.PathLike | None = None, limit: int = EVAL_LIMIT) -> dict[str, list[dict]]:
    """The first ``limit`` records of each evaluation file (:data:`EVAL_FILES`) as request dicts."""
    from ..data import resolve_data_dir

    root = resolve_data_dir(data_dir)
    return {name: _load(root, rel, limit=limit) for name, rel in EVAL_FILES.items()}


def evaluation_exclusions(evaluation: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, set]:
    """``case_ids`` (CounterFact), ``subjects`` and ``questions`` (normalised) of the evaluation records."""
    from .templates import request_prompts

    out: dict[str, set] = {"case_ids": set(), "subjects": set(), "questions": set()}
    for name, records in evaluation.items():
        for rec in records:
            if name == "counterfact" and rec.get("case_id") is not None:
                out["case_ids"].add(int(rec["case_id"]))
            if rec.get("subject"):
                out["subjects"].add(_norm(rec["subject"]))
            out["questions"].update(_norm(p) for p in request_prompts(rec, include_locality=False))
    return out


def _excluded(source: str, rec: Mapping[str, Any], excl: Mapping[str, set]) -> bool:
    from .templates import request_prompts

    if source.startswith("counterfact") and rec.get("case_id") is not None and int(rec["case_id"]) in excl["case_ids"]:
        return True
    if rec.get("subject") and _norm(rec["subject"]) in excl["subjects"]:
        return True
    return any(_norm(p) in excl["questions"] for p in request_prompts(rec, include_locality=False))


def _trim(rec: dict[str, Any], max_locality: int) -> dict[str, Any]:
    """A training copy of ``rec``: at most ``max_locality`` locality prompts, no unused bulky fields."""
    out = {k: v for k, v in rec.items() if k not in ("attribute_prompts", "generation_prompts", "paraphrase_prompts")}
    loc = {}
    budget = max_locality
    for key, entry in (rec.get("locality") or {}).items():
        if budget <= 0 or not isinstance(entry, Mapping):
            break
        prompts, answers = entry.get("prompt"), entry.get("ground_truth")
        if isinstance(prompts, list):
            answers = answers if isinstance(answers, list) else [answers] * len(prompts)
            prompts, answers = prompts[:budget], answers[:budget]
            budget -= len(prompts)
        else:
            budget -= 1
        loc[key] = {"prompt": prompts, "ground_truth": answers}
    out["locality"] = loc
    return out


def training_split(config: RecipeConfig = DEFAULT, data_dir: str | os.PathLike | None = None,
                   tokenizer: Any = None, evaluation: Mapping[str, Sequence[Mapping]] | None = None
                   ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """``(train, val, stats)``: ``config.n_train`` + ``config.n_val`` edits drawn (seeded) in equal parts
    from ``config.sources``, none sharing a case id, subject or question with the evaluation records.

    ``tokenizer`` (optional) drops edits with a question longer than ``max_question_tokens``.
    """
    from ..data import resolve_data_dir
    from .templates import request_prompts

    root = resolve_data_dir(data_dir)
    if evaluation is None:
        evaluation = evaluation_records(root)
    excl = evaluation_exclusions(evaluation)
    rng = random.Random(config.seed)
    n_val_target = min(config.n_val, max(1, config.n_train // 10)) if config.n_val > 0 else 0
    want = config.n_train + n_val_target
    per_source = [want // len(config.sources) + (1 if i < want % len(config.sources) else 0)
                  for i in range(len(config.sources))]
    chosen: list[tuple[str, dict]] = []
    stats: dict[str, Any] = {"sources": {}}
    seen_subjects: set[str] = set()
    seen_questions: set[str] = set()
    for source, n in zip(config.sources, per_source):
        if source not in TRAIN_SOURCES:
            raise PluginError(f"unknown recipe training source {source!r}; known: {sorted(TRAIN_SOURCES)}")
        rel, skip = TRAIN_SOURCES[source]
        records = _load(root, rel)[skip:]
        order = list(range(len(records)))
        rng.shuffle(order)
        taken = excluded = too_long = 0
        for idx in order:
            if taken >= n:
                break
            rec = records[idx]
            if _excluded(source, rec, excl):
                excluded += 1
                continue
            subj = _norm(rec.get("subject"))
            if subj and subj in seen_subjects:  # one edit per subject: no two training edits contradict
                continue
            if tokenizer is not None and any(len(tokenizer(p)["input_ids"]) > config.max_question_tokens
                                             for p in request_prompts(rec)):
                too_long += 1
                continue
            questions = {_norm(q) for q in request_prompts(rec, include_locality=False)}
            if questions & seen_questions:
                continue
            seen_subjects.add(subj)
            seen_questions |= questions
            chosen.append((source, _trim(dict(rec, recipe_source=source, recipe_index=idx + skip), config.max_locality)))
            taken += 1
        stats["sources"][source] = {"file": rel, "skipped_first": skip, "taken": taken,
                                    "excluded_eval_overlap": excluded, "too_long": too_long}
    rng.shuffle(chosen)
    requests = [r for _, r in chosen]
    n_val = min(n_val_target, len(requests) - 1) if len(requests) > 1 else 0
    val, train = requests[:n_val], requests[n_val:]
    stats.update(n_train=len(train), n_val=len(val))
    return train, val, stats


# ----------------------------------------------------------------------------------------------
# Cache key
# ----------------------------------------------------------------------------------------------
def model_identity(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies a local model folder: its architecture fingerprint and weight files (name, size),
    plus the embedded model's verified source digest when its manifest names one."""
    from transformers import AutoConfig

    from .checkpoint import model_fingerprint

    folder = Path(model_dir)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin") and p.is_file())
    ident: dict[str, Any] = {"fingerprint": model_fingerprint(config), "weights": weights}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            ident["source"] = {k: v for k, v in data.items() if "sha" in k or k in ("model_id", "format_version")}
        except (OSError, ValueError):
            pass
    return ident


def _data_identity(data_dir: Path, config: RecipeConfig) -> dict[str, Any]:
    files = sorted({TRAIN_SOURCES[s][0] for s in config.sources} | set(EVAL_FILES.values()))
    out = {}
    for rel in files:
        path = data_dir / rel
        out[rel] = path.stat().st_size if path.is_file() else None
    return out


def recipe_key(config: RecipeConfig, identity: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> str:
    """Stable key of (model identity, recipe configuration, data files, recipe version)."""
    from ..models.cache import content_key

    return content_key({"version": RECIPE_VERSION, "model": identity, "config": config.to_dict(), "data": data or {}},
                       length=16)


def recipe_info(archive: str | os.PathLike) -> dict[str, Any]:
    """The ``recipe.json`` written next to a recipe's archive (``.../<key>/results/best``)."""
    path = Path(archive)
    for folder in (path, path.parent, path.parent.parent):
        info = folder / INFO_FILE
        if info.is_file():
            return json.loads(info.read_text())
    raise PluginError(f"{archive}: no {INFO_FILE} found (not an archive written by a recipe)")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _say(progress: bool, msg: str, *args: Any) -> None:
    LOG.info(msg, *args)
    if progress:
        tqdm.write("[recipe] " + (msg % args if args else msg))


def train_embedded_prefixes(budget_minutes: float = 10.0, n_train: int | None = None, data_dir: Any = None,
                            cache_dir: Any = None, dtype: str = "bfloat16", seed: int = 0, progress: bool = True,
                            resume: bool = True, *, model_dir: Any = None, config: RecipeConfig | None = None,
                            device: str = "cpu", **overrides: Any) -> Path:
    """Train (or fetch from the cache) InstructEd prefixes for the embedded Gemma-3-270M; see the module
    docstring. Returns the archive folder for ``InstructEdHyperParams(archive=...)``.

    Args:
        budget_minutes: wall-clock budget of the whole call (model loading included).
        n_train: training edits (default: ``config.n_train``).
        data_dir: the dataset folder (default ``$INSTRUCTEDIT_DATA_DIR``).
        cache_dir: cache root (default: the plugin cache, ``$INSTRUCTEDIT_CACHE`` or ~/.cache/instructedit_plugin).
        dtype: ``"bfloat16"`` (default, fast on CPU) or ``"float32"``.
        seed: data sampling and initialisation seed.
        progress: print progress lines and a tqdm bar.
        resume: continue an interrupted run of the same key from its last checkpoint.
        model_dir: another local base model folder (tests use tiny models).
        config: a :class:`RecipeConfig` (e.g. :data:`QUICK`); ``budget_minutes``/``n_train``/``dtype``/
            ``seed`` and ``overrides`` replace its fields.
    """
    from ..data import resolve_data_dir
    from ..models.cache import cache_dir as default_cache_dir
    from ..models.cache import file_lock

    started = time.perf_counter()
    base = config or DEFAULT
    fields = dict(budget_minutes=float(budget_minutes), dtype=dtype, seed=int(seed), **overrides)
    if n_train is not None:
        fields["n_train"] = int(n_train)
    if "prefix_layers" in fields and fields["prefix_layers"] is not None:
        fields["prefix_layers"] = tuple(fields["prefix_layers"])
    cfg = dataclasses.replace(base, **fields)
    if cfg.dtype not in ("bfloat16", "float32"):
        raise PluginError(f"dtype must be 'bfloat16' or 'float32', got {cfg.dtype!r}")
    if cfg.budget_minutes <= 0:
        raise PluginError(f"budget_minutes must be > 0, got {cfg.budget_minutes}")
    root = resolve_data_dir(data_dir)
    if model_dir is None:
        from ..models.embedded import embedded_model_dir

        model_dir = embedded_model_dir()
    model_dir = Path(model_dir)
    identity = model_identity(model_dir)
    key = recipe_key(cfg, identity, _data_identity(root, cfg))
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_root / RECIPES_DIR / key
    archive = folder / "results" / "best"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock"):
        if (folder / INFO_FILE).is_file() and (archive / "manifest.json").is_file():
            _say(progress, "cached InstructEd prefixes (recipe %s, key %s): %s", cfg.name, key, archive)
            return archive
        info = _train(cfg, model_dir, identity, root, folder, key, started, progress, resume, device)
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(folder / INFO_FILE, (json.dumps(info, indent=2, default=str) + "\n").encode())
    return archive


def train_quick_prefixes(**kwargs: Any) -> Path:
    """The ~2-minute variant (``instructedit demo --quick``): :data:`QUICK`."""
    kwargs.setdefault("budget_minutes", QUICK.budget_minutes)
    return train_embedded_prefixes(config=QUICK, **kwargs)


def _train(cfg: RecipeConfig, model_dir: Path, identity: dict, data_dir: Path, folder: Path, key: str,
           started: float, progress: bool, resume: bool, device: str) -> dict[str, Any]:
    import torch

    from ..models.loading import load_causal_lm
    from .config import InstructEdTrainingHparams
    from .trainer import InstructEdTrainer

    budget_s = cfg.budget_minutes * 60.0
    _say(progress, "InstructEd recipe %r: CPU budget %.1f min (whole call), key %s", cfg.name, cfg.budget_minutes, key)
    model, tok = load_causal_lm(model_dir, dtype=cfg.dtype)
    model.eval()
    train, val, stats = training_split(cfg, data_dir, tokenizer=tok)
    if not train:
        raise PluginError(f"recipe {cfg.name!r}: no training edits left in {data_dir} after excluding the evaluation records")
    _say(progress, "training edits: %d (+%d validation) from %s", len(train), len(val),
         {k: v["taken"] for k, v in stats["sources"].items()})
    results = folder / "results"
    last_ok = (results / "last" / "manifest.json").is_file()
    hp = InstructEdTrainingHparams.from_dict(dict(
        alg="InstructEd", model_name=str(model_dir), device=device, dtype=cfg.dtype,
        prefix_layers=list(cfg.prefix_layers) if cfg.prefix_layers is not None else None,
        prefix_len=cfg.prefix_len, encoder=cfg.encoder, reweight_mode=cfg.reweight_mode, init_std=cfg.init_std,
        max_length=cfg.max_length, use_portability=True, unrelated_locality=cfg.unrelated_locality,
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, lr_schedule="linear",
        epochs=1000, batch_size=cfg.batch_size, unmodified_batch_size=cfg.unmodified_batch_size,
        val_batch_size=cfg.val_batch_size, seed=cfg.seed, results_dir=str(results), log_interval=25,
        val_interval=cfg.val_interval, resume=bool(resume and last_ok), progress=progress))
    torch.manual_seed(cfg.seed)
    trainer = InstructEdTrainer(hp, train, val or None, model=model, tokenizer=tok)
    try:
        prep_s = time.perf_counter() - started
        # keep room for the final validation and the save (a validation pass costs ~1/3 of a step per example)
        reserve = min(0.15 * budget_s, 3.0 + 0.05 * len(trainer.val_examples))
        hp.max_seconds = max(1.0, budget_s - prep_s - reserve)
        _say(progress, "prepared %d edit + %d unmodified examples in %.0fs; training for at most %.0fs",
             len(trainer.edit_examples), len(trainer.unmod_examples), prep_s, hp.max_seconds)
        result = trainer.run()
    finally:
        trainer.close()
    total_s = time.perf_counter() - started
    last_val = result["history"][-1] if result["history"] else {}
    _say(progress, "reached step %d in %.0fs of training (%.0fs in all, budget %.0fs)%s; last validation %s",
         result["step"], result["seconds"], total_s, budget_s,
         ", stopped by the budget" if result.get("stopped_by_budget") else "",
         {k: round(v, 4) for k, v in last_val.items() if isinstance(v, float)})
    return {
        "recipe": cfg.to_dict(), "recipe_version": RECIPE_VERSION, "key": key, "model_dir": str(model_dir),
        "model_identity": identity, "data_dir": str(data_dir), "data": stats,
        "train_edits": len(trainer.train_requests), "val_edits": len(trainer.val_requests),
        "edit_examples": len(trainer.edit_examples), "unmodified_examples": len(trainer.unmod_examples),
        "steps": result["step"], "planned_steps": result.get("total_steps"),
        "stopped_by_budget": bool(result.get("stopped_by_budget")), "budget_seconds": budget_s,
        "prep_seconds": prep_s, "train_loop_seconds": result["seconds"], "train_seconds": total_s,
        "best_val_loss": result["best_val_loss"], "history": result["history"][-10:],
        "archive": str(folder / "results" / "best"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
