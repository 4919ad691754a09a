"""Fine-tuning the memory's sentence encoder into a multi-hop retriever on MQuAKE cases disjoint from the evaluated ones.

The result is a cached sentence-transformers archive.

The paper's multi-hop retrieval (the question's N best facts) finds few of a question's facts in one shared
memory: the question names the first subject and the relations, never the bridge entities. Iterative
retrieval (hop ``k`` queries with the question followed by the facts retrieved at hops ``< k``,
:func:`~.memory.all_facts_chain_query`, ``retrieval="iterative"``) reads only the question and the memory;
this module teaches the encoder that query:

* :func:`training_pairs` -- per training case, per multi-hop question, per hop ``k``: anchor = the question
  followed by the case's first ``k - 1`` new facts (the gold chain: training data only), positive = fact
  ``k``, hard negative = a fact of another training case with the same relation (a "sibling", which the
  base encoder confuses with the right one). Pairs whose positive is a fact of an evaluated case are dropped
  (``keep_evaluated_facts=False``, the default): the retriever never learns to retrieve an evaluated fact;
* :func:`train_retriever` -- MultipleNegativesRankingLoss (sentence-transformers; in-batch negatives plus
  the hard negative column), AdamW, a fixed number of steps, a fixed seed, batches without a repeated
  positive text. Only the last ``train_layers`` (2 of 6) transformer layers train: the lower layers'
  outputs are computed once per text, which makes a step about four times cheaper on a CPU; refuses training cases that are evaluated (:func:`check_training_disjoint`). The
  archive (a ``SentenceTransformer.save`` folder: safetensors weights, tokenizer, pooling, plus
  :data:`MANIFEST` with the configuration, the training case ids and the loss curve) is published with
  :func:`~instructedit_plugin.core.durable.atomic_dir` (a folder with module subfolders:
  ``commit_folder`` takes plain file names only) under ``<plugin cache>/retrievers/<key>``, keyed by the
  base encoder's weights, the configuration and the training data; a second call returns the cached one;
* :func:`retriever_info` / :func:`check_retriever_disjoint` -- what an archive was trained on, and the check
  an evaluation runs on it. Load it with ``SentenceEncoder(folder)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PluginError, RequestError
from .memory import all_facts_chain_query
from .multihop import edit_instruction

__all__ = [
    "MANIFEST",
    "RETRIEVERS_DIR",
    "HopPair",
    "RetrieverConfig",
    "case_facts",
    "check_retriever_disjoint",
    "check_training_disjoint",
    "retriever_info",
    "train_retriever",
    "training_pairs",
]

LOG = logging.getLogger(__name__)
#: Bump when the training procedure changes what a configuration trains (old cache keys become stale).
RETRIEVER_VERSION = 1
#: The archive's description, written beside the sentence-transformers files.
MANIFEST = "retriever.json"
#: Sub-folder of the plugin cache holding trained retrievers.
RETRIEVERS_DIR = "retrievers"


@dataclass(frozen=True)
class RetrieverConfig:
    """What a retriever training run does (every field goes into the cache key)."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-4
    seed: int = 0
    #: add a same-relation fact of another training case as each pair's hard negative
    hard_negatives: bool = True
    #: MultipleNegativesRankingLoss's scale (inverse temperature)
    scale: float = 20.0
    #: transformer layers trained (the last ones); the lower ones stay as they are
    train_layers: int = 2
    #: keep pairs whose positive is also a fact of an evaluated case (a labelled, less strict option)
    keep_evaluated_facts: bool = False

    def check(self) -> RetrieverConfig:
        """Refuse impossible settings with an error naming the field."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise RequestError(f"steps: expected a non-negative int, got {self.steps!r}. Fix: pass e.g. --retriever_steps 300")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise RequestError(f"batch_size: expected an int >= 2 (in-batch negatives), got {self.batch_size!r}. "
                               "Fix: pass e.g. --retriever_batch 16")
        if not self.learning_rate > 0:
            raise RequestError(f"learning_rate: expected > 0, got {self.learning_rate!r}. Fix: pass e.g. 5e-5")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HopPair:
    """One training example: the hop query, the fact it should retrieve, and where it comes from."""

    anchor: str
    positive: str
    case_id: Any
    hop: int
    relation_id: str | None


def case_facts(case: Any) -> list[str]:
    """The case's new facts in chain order (MQuAKE lists its rewrites along the chain; each next rewrite's
    subject is the previous one's new object -- checked, an unchained case is refused)."""
    edits = list(case.edits)
    for before, after in zip(edits, edits[1:]):
        if after.get("subject") != before.get("target_new"):
            raise RequestError(f"MQuAKE case {case.case_id}: requested_rewrite is not a chain (the subject "
                               f"{after.get('subject')!r} is not the previous new object {before.get('target_new')!r}). "
                               "Fix: drop the case from the retriever's training cases")
    return [edit_instruction(e) for e in edits]


def training_pairs(cases: Sequence[Any], excluded_facts: Iterable[str] = ()) -> list[HopPair]:
    """Every (hop query -> next fact) pair of ``cases``' multi-hop questions, see the module docs; pairs whose
    positive is in ``excluded_facts`` are left out."""
    excluded = set(excluded_facts)
    pairs = []
    for case in cases:
        facts = case_facts(case)
        relations = [e.get("relation_id") for e in case.edits]
        for question in case.questions:
            for hop, fact in enumerate(facts):
                if fact in excluded:
                    continue
                pairs.append(HopPair(all_facts_chain_query(question, facts[:hop]), fact, case.case_id, hop + 1,
                                     relations[hop]))
    return pairs


def check_training_disjoint(training: Sequence[Any], evaluated: Sequence[Any], *, field: str = "train cases") -> None:
    """Raise :class:`RequestError` when a training case is an evaluated one (same ``case_id`` or a shared
    multi-hop question)."""
    eval_ids = {c.case_id for c in evaluated}
    eval_questions = {" ".join(q.split()).casefold() for c in evaluated for q in c.questions}
    overlap = sorted({c.case_id for c in training if c.case_id in eval_ids
                      or any(" ".join(q.split()).casefold() in eval_questions for q in c.questions)}, key=str)
    if overlap:
        shown = ", ".join(str(i) for i in overlap[:10]) + (" ..." if len(overlap) > 10 else "")
        raise RequestError(f"{field}: {len(overlap)} of the retriever's training cases are evaluated (case_id {shown}). "
                           "Fix: train on cases after the evaluated ones (e.g. --retriever_cases 200 429)")


def _base_location(base: str | os.PathLike[str] | None) -> tuple[str, str]:
    from .encoder import _resolve

    source = _resolve(None if base is None else os.fspath(base))
    return source.label, source.location


def _weights_digest(location: str) -> str:
    from .encoder import SentenceEncoder

    return SentenceEncoder(location).identity["weights_sha256"]


def retriever_key(config: RetrieverConfig, base_weights: str, pairs: Sequence[HopPair]) -> str:
    """Stable key of (procedure version, base encoder weights, configuration, training pairs)."""
    from ..models.cache import content_key

    digest = hashlib.sha256(json.dumps([[p.anchor, p.positive] for p in pairs]).encode("utf-8")).hexdigest()
    return content_key({"version": RETRIEVER_VERSION, "base": base_weights, "config": config.to_dict(),
                        "pairs": digest}, length=16)


def _batches(pairs: Sequence[HopPair], config: RetrieverConfig, rng: random.Random,
             siblings: dict[str | None, list[str]]) -> Iterable[list[tuple[str, ...]]]:
    """Endless batches of (anchor, positive[, negative]); no positive twice in a batch (it would be a false
    negative of the other row), a hard negative never one of the batch's positives."""
    limit = min(config.batch_size, len({p.positive for p in pairs}))
    queue: list[HopPair] = []
    while True:
        batch: list[HopPair] = []
        positives: set[str] = set()
        skipped: list[HopPair] = []
        while len(batch) < limit:
            if not queue:
                queue = list(pairs)
                rng.shuffle(queue)
            pair = queue.pop()
            if pair.positive in positives:
                skipped.append(pair)
                continue
            batch.append(pair)
            positives.add(pair.positive)
        queue.extend(skipped)
        rows = []
        for pair in batch:
            if not config.hard_negatives:
                rows.append((pair.anchor, pair.positive))
                continue
            options = [f for f in siblings.get(pair.relation_id, []) if f not in positives]
            if not options:
                options = [f for pool in siblings.values() for f in pool if f not in positives]
            rows.append((pair.anchor, pair.positive, rng.choice(options) if options else pair.positive))
        if config.hard_negatives and any(r[2] == r[1] for r in rows):
            rows = [r[:2] for r in rows]
        yield rows


def _lower_states(model: Any, texts: Sequence[str], frozen: int, batch_size: int = 64) -> dict[str, Any]:
    """Each text's token states after the first ``frozen`` transformer layers (which training leaves as they
    are, so they are computed once) and its attention mask."""
    import torch

    bert = model[0].auto_model
    states: dict[str, Any] = {}
    ordered = sorted(set(texts), key=len)
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start:start + batch_size]
            feats = model.preprocess(chunk)
            out = bert(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                       token_type_ids=feats.get("token_type_ids"), output_hidden_states=True)
            for i, text in enumerate(chunk):
                length = int(feats["attention_mask"][i].sum())
                states[text] = out.hidden_states[frozen][i, :length].clone()
    return states


def _upper_embeddings(model: Any, states: dict[str, Any], texts: Sequence[str], frozen: int) -> Any:
    """Sentence embeddings of ``texts`` from their cached lower states through the trainable upper layers
    and the model's pooling (the same numbers as the whole model's forward pass)."""
    import torch

    bert = model[0].auto_model
    rows = [states[t] for t in texts]
    width = max(r.shape[0] for r in rows)
    hidden = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        hidden[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = 1
    attention = bert._create_attention_masks(attention_mask=mask, encoder_attention_mask=None, embedding_output=hidden,
                                             encoder_hidden_states=None, past_key_values=None)[0]
    for layer in bert.encoder.layer[frozen:]:
        out = layer(hidden, attention_mask=attention)
        hidden = out[0] if isinstance(out, tuple) else out
    return model[1]({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]


def _fit(location: str, pairs: Sequence[HopPair], config: RetrieverConfig, progress: bool) -> tuple[Any, list[float]]:
    """The fine-tuned ``SentenceTransformer`` (its last ``config.train_layers`` transformer layers trained, the
    rest frozen, their outputs computed once per text) and its loss per step."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from tqdm.auto import tqdm

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = SentenceTransformer(location, device="cpu", local_files_only=True)  # a private copy, never the shared one
    losses: list[float] = []
    if config.steps == 0 or not pairs:
        return model, losses
    layers = model[0].auto_model.encoder.layer
    if not 1 <= config.train_layers <= len(layers):
        raise RequestError(f"train_layers: the encoder has {len(layers)} transformer layers, got "
                           f"{config.train_layers}. Fix: pass 1 to {len(layers)}")
    frozen = len(layers) - config.train_layers
    for param in model.parameters():
        param.requires_grad_(False)
    trained = [p for layer in layers[frozen:] for p in layer.parameters()]
    for param in trained:
        param.requires_grad_(True)
    rng = random.Random(config.seed)
    siblings: dict[str | None, list[str]] = {}
    for pair in pairs:
        if pair.positive not in siblings.setdefault(pair.relation_id, []):
            siblings[pair.relation_id].append(pair.positive)
    model.eval()
    states = _lower_states(model, [p.anchor for p in pairs] + [p.positive for p in pairs], frozen)
    LOG.info("retriever: lower %d layers of %d texts computed once; training the last %d", frozen, len(states),
             config.train_layers)
    loss_fn = MultipleNegativesRankingLoss(model, scale=config.scale)
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate)
    model.train()
    batches = _batches(pairs, config, rng, siblings)
    bar = tqdm(range(config.steps), desc="retriever", unit="step", disable=not progress)
    for step in bar:
        rows = next(batches)
        columns = [list(col) for col in zip(*rows)]
        embeddings = _upper_embeddings(model, states, [t for col in columns for t in col], frozen)
        loss = loss_fn.compute_loss_from_embeddings(list(embeddings.split(len(rows))), None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 6))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 50 == 0 or step == config.steps - 1:
            LOG.info("retriever step %d/%d: loss %.4f", step + 1, config.steps, losses[-1])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, losses


def train_retriever(training: Sequence[Any], evaluated: Sequence[Any], config: RetrieverConfig | None = None, *,
                    base: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                    progress: bool = True) -> Path:
    """Fine-tune ``base`` (default: the packaged all-MiniLM-L6-v2) on ``training``'s hop pairs, or return the
    cached archive of the same training; see the module docs. ``evaluated``: the cases the retriever will be
    evaluated on (refused among ``training``; their facts are no positive unless ``keep_evaluated_facts``)."""
    from ..core.durable import atomic_dir, atomic_write_json
    from ..models.cache import cache_dir as default_cache_dir
    from ..models.cache import file_lock

    config = (config or RetrieverConfig()).check()
    training, evaluated = list(training), list(evaluated)
    if not training:
        raise RequestError("train cases: none given. Fix: pass MQuAKE cases after the evaluated ones")
    check_training_disjoint(training, evaluated)
    excluded = set() if config.keep_evaluated_facts else {edit_instruction(e) for c in evaluated for e in c.edits}
    pairs = training_pairs(training, excluded)
    if not pairs:
        raise RequestError("train cases: every fact of the training cases is an evaluated case's fact. "
                           "Fix: train on other cases, or pass keep_evaluated_facts=True")
    label, location = _base_location(base)
    base_weights = _weights_digest(location)
    key = retriever_key(config, base_weights, pairs)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / RETRIEVERS_DIR / key
    with file_lock(root / RETRIEVERS_DIR / f".{key}.lock"):
        if (folder / MANIFEST).is_file():
            LOG.info("cached retriever %s", folder)
            return folder
        started = time.perf_counter()
        LOG.info("training a retriever: %d pairs from %d cases, %d steps, batch %d (key %s)", len(pairs),
                 len(training), config.steps, config.batch_size, key)
        model, losses = _fit(location, pairs, config, progress)
        info = {
            "format": "instructedit-retriever", "version": RETRIEVER_VERSION, "key": key, "base": label,
            "base_weights_sha256": base_weights, "config": config.to_dict(),
            "training": {"case_ids": sorted((c.case_id for c in training), key=str), "cases": len(training),
                         "pairs": len(pairs), "excluded_evaluated_facts": len(excluded),
                         "evaluated_case_ids": sorted((c.case_id for c in evaluated), key=str)},
            "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                     "per_step": losses},
            "seconds": round(time.perf_counter() - started, 1),
        }
        with atomic_dir(folder) as tmp:
            model.save(str(tmp), create_model_card=False, safe_serialization=True)
            atomic_write_json(tmp / MANIFEST, info)  # last: a folder holding it is complete
    LOG.info("retriever saved to %s (%.0f s)", folder, info["seconds"])
    return folder


def retriever_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The :data:`MANIFEST` of a retriever archive."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PluginError(f"retriever: {folder} has no {MANIFEST} (not an archive written by train_retriever). "
                          "Fix: pass a folder that train_retriever / --train_retriever wrote")
    return json.loads(path.read_text(encoding="utf-8"))


def check_retriever_disjoint(folder: str | os.PathLike[str], evaluated: Sequence[Any]) -> dict[str, Any]:
    """Refuse (:class:`RequestError`) a retriever trained on one of the ``evaluated`` cases; returns its info."""
    info = retriever_info(folder)
    trained = set(info["training"]["case_ids"])
    overlap = sorted({c.case_id for c in evaluated} & trained, key=str)
    if overlap:
        shown = ", ".join(str(i) for i in overlap[:10]) + (" ..." if len(overlap) > 10 else "")
        raise RequestError(f"retriever: {folder} was trained on {len(overlap)} of the evaluated MQuAKE cases "
                           f"(case_id {shown}). Fix: evaluate other cases or train the retriever without them")
    return info
