"""Evaluation of InstructEdit against editors trained the same way without instructions.

The InstructEdit paper (Tian et al. 2024) reports, per task, Reliability /
Generalisation / Locality / Portability of

* ``instructedit``: the editor meta-trained on several tasks with instructions,
  editing with an instruction-prefixed input; evaluated with a *seen*
  instruction (a training description, deterministic per record) and with the
  family's held-back description (*unseen* instruction);
* ``mend_multitask``: the same editor network and trainer on the same tasks,
  with instructions switched off (``use_instructions: false``): plain MEND
  trained multi-task;
* ``mend_single_task``: the same, trained on one task only;

on the training tasks (CounterFact, Recent, ConvSent) and on a hold-out task
(ZsRE) that no editor saw during training.

Metrics (``metric_backend``):

* ``"plugin"`` (default, fast): the plugin's own equivalent of EasyEdit's
  ``compute_edit_quality`` with ``eval_metric='token_em'``: teacher-forced token
  accuracy of the target after ``prompt + " " + target`` (Rel: the edit prompt,
  Gen: the rephrased prompt, Por: each portability question with its answer),
  and for Loc the share of answer tokens whose argmax prediction is unchanged by
  the edit (EasyEdit compares the pre- and post-edit predicted tokens the same
  way). Logits are computed only at answer positions (:func:`answer_logits`),
  left-padded rows, the edit applied with ``functional_call`` (the model's own
  weights are never written).
* ``"easyedit"``: EasyEdit's ``compute_edit_quality`` itself on the model with
  the edited weights written in (and restored afterwards); slower.

Metric inputs (``metric_inputs``): ``"instructed"`` is the paper's protocol, as
EasyEdit's evaluation script (``examples/test_InstructEdit.py``) builds it for
InstructEdit: the instruction the edit was made with stands in front of the edit
prompt (Rel), the rephrase (Gen) and every portability question (Por), while
locality prompts stay plain; editors without instructions are scored on plain
inputs. ``"plain"`` (the default of this function) scores every method on the plain
prompts; several styles may be asked for at once (the first fills ``tasks``; the
others are reported beside, in ``tasks_<style>_inputs``). ConvSent gets
sentiment metrics and Fluency (:mod:`instructedit_plugin.evaluation.convsent`):
the target sentiment (``label``) may be positive or negative per record; the greedy replies Fluency is
computed from are generated per edit as one left-padded batch (:func:`greedy_reply_ids`). Records without a rephrase
get Gen from :func:`prepare_test_requests` where the data allows (CounterFact's
LLM paraphrases, a fixed ConvSent paraphrase); records without locality data
borrow the next record's prompt for Loc (documented in the results).

Edits made with an instruction reuse its hidden states below the first edited layer across records
(:mod:`.prefix_states`, ``prefix_cache=True`` by default): the same edit up to floating-point rounding,
at about the cost of an edit without the instruction.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.durable import atomic_write_text
from ..evaluation.convsent import (
    classifier_success, edit_label, n_gram_entropy, sentiment_pairs, sentiment_scores, summarize_sentiment,
)
from ..evaluation.summary import METRIC_NAMES, summarize_metrics
from ..instructions import InstructionLibrary, default_library
from .instructedit_main import LoadedEditor, load_editor_for
from .dataset import encode_pairs, make_datasets, split_tasks
from .editable import answer_logits, compute_edited_weights, left_pad
from .prefix_states import PrefixStateCache, common_prefix_length, first_edited_layer, supports
from .trainer import InstructEditTrainer

LOG = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("instructedit", "mend_multitask", "mend_single_task")
TRAIN_TASKS: tuple[str, ...] = ("counterfact", "recent", "convsent")
HOLDOUT_TASK = "zsre_holdout"
#: evaluation task name -> instruction family (the hold-out task uses the zsre family)
TASK_FAMILY = {HOLDOUT_TASK: "zsre"}
INSTRUCTION_MODES = ("seen", "unseen", "none")
#: metric-input styles: the paper's (instruction before prompt, rephrase, portability) and plain prompts
METRIC_INPUTS = ("instructed", "plain")

__all__ = [
    "HOLDOUT_TASK",
    "METHODS",
    "METRIC_INPUTS",
    "TRAIN_TASKS",
    "EditEvaluator",
    "MethodSpec",
    "edit_prompt",
    "evaluate_instructedit",
    "instruction_for",
    "left_pad",
    "prepare_test_requests",
    "record_values",
    "result_sections",
    "results_markdown",
    "sentiment_table",
    "save_results",
    "train_editor",
]


def family_for(task: str) -> str:
    return TASK_FAMILY.get(task, task)


# ----------------------------------------------------------------------- training
def train_editor(
    config: Any,
    tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    model: nn.Module | None = None,
    *,
    use_instructions: bool = True,
    val_size: int | None = None,
    calibrate_steps: int = 0,
    budget_s: float | None = None,
    trainer_cls: type = InstructEditTrainer,
    answer_logits: bool = True,
) -> dict[str, Any]:
    """Meta-train one editor on ``tasks`` (``{task: requests}``) and return the trainer's result.

    ``config`` is an :class:`InstructEditTrainingHparams` (copied; ``use_instructions``
    set from the argument). ``val_size`` records per task go to validation
    (default: the config's ``val_fraction``). With ``calibrate_steps`` the first
    steps are timed (they count as training) and, when ``budget_s`` is given,
    ``max_iters`` is lowered so the run fits the budget (:meth:`InstructEditTrainer.calibrate`).
    ``answer_logits`` (default): the losses from answer-position logits, several times cheaper
    for large vocabularies (see :class:`InstructEditTrainer`). The result adds
    ``seconds_per_step`` and ``wall_s``.
    """
    cfg = copy.copy(config)
    cfg.use_instructions = bool(use_instructions)
    if val_size is not None:
        train_tasks, val_tasks = split_tasks(tasks, seed=cfg.seed, val_size=val_size)
    else:
        train_tasks, val_tasks = split_tasks(tasks, cfg.val_fraction, cfg.seed)
    train_set, val_set = make_datasets(train_tasks, tokenizer, cfg, val_tasks=val_tasks)
    start = time.time()
    trainer = trainer_cls(cfg, train_set, val_set, model=model, answer_logits=answer_logits)
    per_step = trainer.calibrate(calibrate_steps, budget_s) if calibrate_steps else None
    result = trainer.run()
    result["seconds_per_step"] = per_step if per_step is not None else result["train_time_s"] / max(result["steps"], 1)
    result["wall_s"] = time.time() - start
    result["use_instructions"] = cfg.use_instructions
    result["tasks"] = sorted(train_tasks)
    return result


# ------------------------------------------------------------------------ requests
_NUMBERED = re.compile(r"^\s*\d+[.)]\s*")


def prepare_test_requests(task: str, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``requests`` with what the metrics need filled in where the data allows.

    * no ``rephrase_prompt`` but KnowEdit CounterFact's ``generate_prompts``
      (LLM paraphrases, "1. ..."): the first paraphrase, numbering removed;
    * ConvSent (``topic``): ``rephrase_prompt`` = "How do you feel about <topic>?";
    * ``task`` is set (the instruction family of ``task``).
    """
    out = []
    for request in requests:
        r = dict(request)
        r["task"] = family_for(task)
        if not r.get("rephrase_prompt"):
            gen = r.get("generate_prompts") or r.get("generate_prompt")
            if isinstance(gen, list) and gen:
                r["rephrase_prompt"] = _NUMBERED.sub("", str(gen[0])).strip()
            elif r.get("topic"):
                r["rephrase_prompt"] = f"How do you feel about {r['topic']}?"
        out.append(r)
    return out


def _plain(text: str) -> str:
    return text


def instruction_for(request: Mapping[str, Any], task: str, mode: str, index: int = 0,
                    library: InstructionLibrary | None = None, seed: int = 0) -> Callable[[str], str]:
    """The function that puts ``request``'s instruction in front of a text (identity for ``mode="none"``).

    ``mode``: ``"none"`` no instruction; ``"seen"`` a training description of the task's
    family (drawn deterministically from ``seed``/``task``/``index``); ``"unseen"`` the
    family's held-back description only. The same description serves the edit prompt and,
    with instructed metric inputs, the rephrase and portability questions.
    """
    if mode not in INSTRUCTION_MODES:
        raise ValueError(f"instruction mode must be one of {INSTRUCTION_MODES}, got {mode!r}")
    if mode == "none":
        return _plain
    family = (library or default_library()).get(family_for(task))
    if mode == "unseen":
        if family.held_out_index is None:
            raise ValueError(f"instruction family '{family.task}' has no held-out description")
        desc = family.held_out_index
    else:
        desc = family.sample_index(random.Random(f"{seed}:{task}:{index}"))
    description = family.description(desc, request)
    return lambda text: family.render(text, description)


def edit_prompt(request: Mapping[str, Any], task: str, mode: str, index: int = 0,
                library: InstructionLibrary | None = None, seed: int = 0) -> str:
    """The edit input for ``request`` (see :func:`instruction_for` for ``mode``)."""
    return instruction_for(request, task, mode, index, library, seed)(request["prompt"])


def _pairs(block: Mapping[str, Any] | None, limit: int) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for key, entry in (block or {}).items():
        if not isinstance(entry, Mapping):
            continue
        prompts, answers = entry.get("prompt"), entry.get("ground_truth")
        if isinstance(prompts, str):
            prompts, answers = [prompts], [answers]
        pairs = []
        for p, a in zip(prompts or [], answers or []):
            if isinstance(a, list):
                a = a[0] if a else None
            if isinstance(p, str) and isinstance(a, str) and p and a:
                pairs.append((p, a))
        if pairs:
            out[str(key)] = pairs[:limit]
    return out


# ---------------------------------------------------------------------- evaluator
@torch.no_grad()
def greedy_reply_ids(model: nn.Module, tok: Any, questions: Sequence[str], max_new_tokens: int,
                     padding_side: str = "left") -> list[list[int]]:
    """The new token ids of greedy replies (``max_new_tokens`` each) to ``questions``, generated as one batch.

    The questions are left-padded (``padding_side``; ``"right"`` exists for tests only: generation then
    continues after the padding and the replies differ), so every row's prompt ends at the same column; a
    row that ends early is cut after its end-of-sequence token, as generating it alone stops there. In float32
    each reply equals the one generated for its question alone; in bfloat16 on CPU the batch shape changes
    the rounding (a question batched with a copy of itself can already differ), so a reply may differ where
    two next tokens are nearly tied.
    """
    if not questions:
        return []
    device = next(model.parameters()).device
    enc = tok(list(questions), return_tensors="pt", padding=True, padding_side=padding_side).to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    width = enc["input_ids"].shape[1]
    replies = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        replies.append(row[:end])
    return replies


def greedy_replies(model: nn.Module, tok: Any, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to ``questions`` as text, generated as one left-padded batch (:func:`greedy_reply_ids`)."""
    return [tok.decode(ids, skip_special_tokens=True) for ids in greedy_reply_ids(model, tok, questions, max_new_tokens)]


@dataclasses.dataclass
class MethodSpec:
    """One evaluated editor: its checkpoint(s) and whether it edits with an instruction.

    ``archive`` is one checkpoint, or ``{task: checkpoint}`` (key ``"*"``: any
    other task), e.g. one single-task editor per task.
    """

    name: str
    archive: Any
    instructions: bool

    def archive_for(self, task: str) -> Any:
        if isinstance(self.archive, Mapping):
            return self.archive.get(task, self.archive.get("*"))
        return self.archive


@dataclasses.dataclass
class _Rows:
    pairs: list[tuple[str, str]]
    slices: dict[str, slice]


class EditEvaluator:
    """Pre/post metrics of single edits on one model, without writing the model's weights."""

    def __init__(self, model: nn.Module, tok: Any, *, max_length: int = 96, max_pairs: int = 4,
                 library: InstructionLibrary | None = None, seed: int = 0, metric_backend: str = "plugin",
                 easyedit_hparams: Any = None, sentiment_responses: int = 2, response_words: int = 8,
                 fluency_tokens: int = 0, sentiment_classifier: Callable[[Sequence[str]], Sequence[str]] | None = None,
                 prefix_cache: bool = True):
        if metric_backend not in ("plugin", "easyedit"):
            raise ValueError(f"metric_backend must be 'plugin' or 'easyedit', got {metric_backend!r}")
        self.model = model
        self.tok = tok
        if getattr(tok, "pad_token_id", None) is None:
            tok.pad_token = tok.eos_token
        self.max_length = max_length
        self.max_pairs = max_pairs
        self.library = library or default_library()
        self.seed = seed
        self.backend = metric_backend
        self.easyedit_hparams = easyedit_hparams
        self.sentiment_responses = sentiment_responses
        self.response_words = response_words
        #: ConvSent: new tokens generated for Fluency (n-gram entropy) and the classifier (0: no generation)
        self.fluency_tokens = fluency_tokens
        self.sentiment_classifier = sentiment_classifier
        self.device = next(model.parameters()).device
        self._pre: dict[tuple[str, int], dict[str, Any]] = {}
        self._editors: dict[str, LoadedEditor] = {}
        #: reuse an instruction's states below the first edited layer across edits (:mod:`.prefix_states`)
        self.prefix_cache = bool(prefix_cache) and supports(model)
        self._prefix_caches: dict[int, PrefixStateCache] = {}
        self._prefix_ids: dict[str, list[int]] = {}

    def editor(self, archive: Any) -> LoadedEditor:
        if isinstance(archive, LoadedEditor):
            return archive
        key = str(archive)
        if key not in self._editors:
            self._editors[key] = load_editor_for(self.model, archive)
        return self._editors[key]

    # ------------------------------------------------------------------ rows
    def _rows(self, request: Mapping[str, Any], fallback_loc: tuple[str, str] | None,
              instruct: Callable[[str], str] = _plain) -> _Rows:
        """The scored (input, answer) rows; ``instruct`` prefixes the edit prompt, rephrase, portability
        and sentiment questions (never locality), as EasyEdit's InstructEdit evaluation does."""
        pairs: list[tuple[str, str]] = []
        slices: dict[str, slice] = {}

        def add(name: str, items: Sequence[tuple[str, str]]) -> None:
            if items:
                slices[name] = slice(len(pairs), len(pairs) + len(items))
                pairs.extend(items)

        target = request["target_new"]
        add("rewrite", [(instruct(request["prompt"]), target)])
        if request.get("rephrase_prompt"):
            add("rephrase", [(instruct(request["rephrase_prompt"]), target)])
        loc = _pairs(request.get("locality"), self.max_pairs)
        if not loc and fallback_loc is not None:
            loc = {"neighbour": [fallback_loc]}
        for key, items in loc.items():
            add(f"loc:{key}", items)
        for key, items in _pairs(request.get("portability"), self.max_pairs).items():
            add(f"port:{key}", [(instruct(p), a) for p, a in items])
        if request.get("pos") and request.get("neg"):
            pos, neg = sentiment_pairs(request, self.sentiment_responses, question=instruct(request["prompt"]))

            def cut(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
                return [(p, " ".join(a.split()[: self.response_words])) for p, a in items]

            add("sent_pos", cut(pos))
            add("sent_neg", cut(neg))
        return _Rows(pairs, slices)

    @torch.no_grad()
    def _score(self, weights: Mapping[str, torch.Tensor] | None, rows: _Rows) -> dict[str, list]:
        """Per row: token accuracy, predicted answer tokens and mean token log-prob."""
        enc = left_pad(encode_pairs(self.tok, rows.pairs, self.max_length))
        enc = {k: v.to(self.device) for k, v in enc.items()}
        logits, targ = answer_logits(self.model, weights, enc)
        mask = targ != -100
        safe = targ.masked_fill(~mask, 0)
        tok_lp = torch.zeros(targ.shape, dtype=torch.float32, device=logits.device)
        kept = logits[mask].float()  # log-softmax only where an answer token is scored
        tok_lp[mask] = kept.log_softmax(-1).gather(-1, safe[mask].unsqueeze(-1)).squeeze(-1)
        pred = logits.argmax(-1)
        acc, tokens, mean_lp, counts = [], [], [], []
        for r in range(targ.shape[0]):
            m = mask[r]
            n = int(m.sum())
            acc.append(float((pred[r][m] == targ[r][m]).float().mean()) if n else 0.0)
            tokens.append(pred[r][m].tolist())
            mean_lp.append(float(tok_lp[r][m].mean()) if n else 0.0)
            counts.append(n)
        return {"acc": acc, "tokens": tokens, "logp": mean_lp, "ntok": counts}

    @staticmethod
    def _metrics(scores: Mapping[str, list], rows: _Rows, pre: Mapping[str, list] | None,
                 pre_sentiment: Mapping[str, float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"locality": {}, "portability": {}}
        for name, sl in rows.slices.items():
            if name == "rewrite":
                out["rewrite_acc"] = scores["acc"][sl]
            elif name == "rephrase":
                out["rephrase_acc"] = scores["acc"][sl]
            elif name.startswith("loc:"):
                key = name[4:]
                if pre is None:  # pre-edit: the predicted tokens are the reference
                    out["locality"][f"{key}_output"] = scores["tokens"][sl]
                else:
                    out["locality"][f"{key}_acc"] = [
                        float(sum(a == b for a, b in zip(p, q)) / max(len(q), 1))
                        for p, q in zip(scores["tokens"][sl], pre["tokens"][sl])]
            elif name.startswith("port:"):
                out["portability"][f"{name[5:]}_acc"] = scores["acc"][sl]
        if "sent_pos" in rows.slices and "sent_neg" in rows.slices:  # sent_pos: the target sentiment
            toward, away = rows.slices["sent_pos"], rows.slices["sent_neg"]
            out["sentiment"] = sentiment_scores(scores["logp"][toward], scores["logp"][away],
                                                toward_counts=scores["ntok"][toward], away_counts=scores["ntok"][away],
                                                pre=pre_sentiment)
        return out

    @torch.no_grad()
    def _replies(self, weights: Mapping[str, torch.Tensor] | None, questions: Sequence[str]) -> list[str]:
        """The model's greedy replies to ``questions`` (``fluency_tokens`` new tokens each, one left-padded batch:
        :func:`greedy_replies`), edited weights written in for the call and restored afterwards."""
        params = dict(self.model.named_parameters())
        saved = {k: params[k].detach().clone() for k in weights or {}}
        try:
            for k, v in (weights or {}).items():
                params[k].copy_(v)
            return greedy_replies(self.model, self.tok, questions, self.fluency_tokens)
        finally:
            for k, v in saved.items():
                params[k].copy_(v)

    def _add_generations(self, items: Sequence[tuple[dict[str, Any], Mapping[str, Any], _Rows]],
                         weights: Mapping[str, torch.Tensor] | None) -> None:
        """ConvSent: Fluency of the reply to each ``(metrics, request, rows)`` item's (metric-input) question and
        the classifier's verdict; the replies made with the same ``weights`` are generated as one batch. Items
        that already hold a reply (a cached pre-edit record) or have no sentiment are left as they are."""
        if self.fluency_tokens <= 0:
            return
        todo, seen = [], set()
        for m, request, rows in items:
            sent = m.get("sentiment")
            if sent is not None and "reply" not in sent and id(sent) not in seen:  # one reply per record object
                seen.add(id(sent))
                todo.append((sent, request, rows))
        if not todo:
            return
        replies = self._replies(weights, [rows.pairs[rows.slices["rewrite"]][0][0] for _, _, rows in todo])
        verdicts = (classifier_success(replies, [edit_label(request) for _, request, _ in todo], self.sentiment_classifier)
                    if self.sentiment_classifier is not None else None)
        for i, ((sent, _, _), reply) in enumerate(zip(todo, replies)):
            sent["reply"] = reply
            sent["fluency"] = n_gram_entropy(reply)
            if verdicts is not None:
                sent["classifier_success"] = verdicts[i]

    def pre(self, key: tuple, request: Mapping[str, Any], fallback_loc: tuple[str, str] | None,
            instruct: Callable[[str], str] = _plain, generate: bool = True) -> dict[str, Any]:
        """Pre-edit scores of a record's rows (cached by ``key``: shared by every method with the same inputs);
        ``generate=False``: without the ConvSent reply (the caller batches it: :meth:`_add_generations`)."""
        if key not in self._pre:
            rows = self._rows(request, fallback_loc, instruct)
            if self.backend == "easyedit":
                scores = None
                metrics = self._easyedit_quality(request, rows)
            else:
                scores = self._score(None, rows)
                metrics = self._metrics(scores, rows, None)
            self._pre[key] = {"rows": rows, "scores": scores, "metrics": metrics}
        if generate:
            self._add_generations([(self._pre[key]["metrics"], request, self._pre[key]["rows"])], None)
        return self._pre[key]

    # ---------------------------------------------------------------- editing
    def prefix_states(self, editor: LoadedEditor) -> PrefixStateCache | None:
        """The instruction-prefix cache for ``editor``'s edited layers (None: off, or not applicable)."""
        if not self.prefix_cache:
            return None
        first = first_edited_layer(spec.name for spec in editor.specs)
        if not first:  # a weight outside the decoder layers, or layer 0: nothing below it to reuse
            return None
        if first not in self._prefix_caches:
            self._prefix_caches[first] = PrefixStateCache(self.model, first)
        return self._prefix_caches[first]

    def edit_weights(self, editor: LoadedEditor, prompt: str, target: str,
                     instruction: str | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """New weights for one edit and the wall time it took (tokenising included).

        ``instruction``: the text the edit prompt starts with (the instruction, as ``instruct("")`` renders it);
        with the prefix cache on, the states of its tokens below the first edited layer are computed once per
        instruction (:mod:`.prefix_states`), the same edit up to floating-point rounding."""
        start = time.perf_counter()
        batch = encode_pairs(self.tok, [(prompt, target)], self.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        cache, prefix_len = (self.prefix_states(editor), 0) if instruction else (None, 0)
        if cache is not None:
            if instruction not in self._prefix_ids:
                self._prefix_ids[instruction] = self.tok(instruction, add_special_tokens=True)["input_ids"]
            prefix_ids = self._prefix_ids[instruction]
            # the instruction's last token ("Input: " ends in a space) may or may not merge with the input's first
            # word: leave it out, so that every edit with this instruction finds the same cache entry
            prefix_len = min(common_prefix_length(batch["input_ids"][0].tolist(), prefix_ids), len(prefix_ids) - 1,
                             batch["input_ids"].shape[1] - 1)
        was_training = self.model.training
        self.model.eval()
        try:
            new, _ = compute_edited_weights(self.model, editor.hypernet, editor.edit_lrs, editor.specs, batch,
                                            sparse_logits=True, prefix_cache=cache if prefix_len > 0 else None,
                                            prefix_len=prefix_len)
        finally:
            self.model.train(was_training)
        new = {k: v.detach() for k, v in new.items()}
        return new, time.perf_counter() - start

    def evaluate(self, editor: LoadedEditor, request: Mapping[str, Any], task: str, index: int, mode: str,
                 fallback_loc: tuple[str, str] | None = None, metric_inputs: str = "plain") -> tuple[dict[str, Any], float]:
        """One edit: ``({"pre", "post", "requested_rewrite", ...}, edit seconds)`` in EasyEdit's per-edit layout."""
        records, seconds = self.evaluate_inputs(editor, request, task, index, mode, fallback_loc, (metric_inputs,))
        return records[metric_inputs], seconds

    def evaluate_inputs(self, editor: LoadedEditor, request: Mapping[str, Any], task: str, index: int, mode: str,
                        fallback_loc: tuple[str, str] | None, styles: Sequence[str]) -> tuple[dict[str, Any], float]:
        """One edit, scored on each metric-input style (``METRIC_INPUTS``): ``({style: record}, edit seconds)``."""
        unknown = [s for s in styles if s not in METRIC_INPUTS]
        if unknown or not styles:
            raise ValueError(f"metric_inputs must name styles from {METRIC_INPUTS}, got {list(styles)!r}. "
                             "Fix: use 'instructed' (the paper's protocol) and/or 'plain'")
        instruct = instruction_for(request, task, mode, index, self.library, self.seed)
        prompt = instruct(request["prompt"])
        new, seconds = self.edit_weights(editor, prompt, request["target_new"],
                                         instruction=instruct("") if mode != "none" else None)
        pres = {}
        for style in styles:
            instructed = style == "instructed" and mode != "none"
            pres[style] = self.pre((task, index, mode if instructed else "plain"), request, fallback_loc,
                                   instruct if instructed else _plain, generate=False)
        # ConvSent replies: the pre-edit ones not yet cached in one batch, the edited model's in another
        self._add_generations([(pre["metrics"], request, pre["rows"]) for pre in pres.values()], None)
        posts = {}
        for style, pre in pres.items():
            rows = pre["rows"]
            if self.backend == "easyedit":
                posts[style] = self._easyedit_post(request, rows, new, pre["metrics"])
            else:
                posts[style] = self._metrics(self._score(new, rows), rows, pre["scores"], pre["metrics"].get("sentiment"))
        self._add_generations([(posts[style], request, pres[style]["rows"]) for style in styles], new)
        records = {}
        for style, pre in pres.items():
            rows = pre["rows"]
            records[style] = {
                "case_id": index, "task": task, "mode": mode, "metric_inputs": style, "edit_prompt": prompt,
                "rewrite_input": rows.pairs[rows.slices["rewrite"]][0][0], "pre": dict(pre["metrics"]),
                "post": posts[style],
                "requested_rewrite": {"prompt": request["prompt"], "target_new": request["target_new"]}}
        return records, seconds

    # ---------------------------------------------------------- EasyEdit path
    def _easyedit_record(self, request: Mapping[str, Any], rows: _Rows) -> dict[str, Any]:
        def block(prefix: str) -> dict[str, Any]:
            out = {}
            for name, sl in rows.slices.items():
                if name.startswith(prefix):
                    items = rows.pairs[sl]
                    out[name[len(prefix):]] = {"prompt": [p for p, _ in items], "ground_truth": [a for _, a in items]}
            return out

        record = {"prompt": rows.pairs[rows.slices["rewrite"]][0][0],  # instructed with instructed metric inputs
                  "target_new": request["target_new"],
                  "ground_truth": request.get("ground_truth") or "<|endoftext|>",
                  "locality": block("loc:"), "portability": block("port:")}
        if "rephrase" in rows.slices:
            record["rephrase_prompt"] = rows.pairs[rows.slices["rephrase"]][0][0]
        return record

    def _easyedit_quality(self, request: Mapping[str, Any], rows: _Rows) -> dict[str, Any]:
        from easyeditor.evaluate.evaluate import (
            compute_edit_quality,  # needs instructedit_plugin.register()
        )

        from ..compat.devices import cuda_strings_to_cpu

        hp = self.easyedit_hparams
        side = self.tok.padding_side
        self.tok.padding_side = "left"
        # PyPI EasyEdit formats devices as f"cuda:{device}": redirect to the CPU where CUDA is not used
        device = self.device.index if self.device.type == "cuda" else "cpu"
        try:
            with cuda_strings_to_cpu(self.device.type != "cuda"):
                return compute_edit_quality(self.model, hp.model_name, hp, self.tok,
                                            self._easyedit_record(request, rows), device)
        finally:
            self.tok.padding_side = side

    def _easyedit_post(self, request: Mapping[str, Any], rows: _Rows, new: Mapping[str, torch.Tensor],
                       pre: Mapping[str, Any]) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        saved = {k: params[k].detach().clone() for k in new}
        with torch.no_grad():
            for k, v in new.items():
                params[k].copy_(v)
        try:
            post = self._easyedit_quality(request, rows)
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)
        for key in list(post.get("locality", {})):
            if key.endswith("_output"):
                ref = pre["locality"][key]
                post["locality"][key[: -len("_output")] + "_acc"] = [
                    float(sum(a == b for a, b in zip(_as_list(p), _as_list(q))) / max(len(_as_list(q)), 1))
                    for p, q in zip(post["locality"].pop(key), ref)]
        return post


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ------------------------------------------------------------------ the evaluation
def _fallback_loc(requests: Sequence[Mapping[str, Any]], i: int) -> tuple[str, str] | None:
    """Locality stand-in for records without locality data: the next record's prompt and answer."""
    if len(requests) < 2:
        return None
    other = requests[(i + 1) % len(requests)]
    answer = other.get("ground_truth") or other.get("target_new")
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    return (other["prompt"], answer) if isinstance(answer, str) and answer else None


def _summary(records: Sequence[Mapping[str, Any]], latencies: Sequence[float]) -> dict[str, Any]:
    summary = summarize_metrics(records)
    summary["edit_ms"] = 1000.0 * statistics.median(latencies) if latencies else None
    sent = [r["post"].get("sentiment") for r in records]
    if any(s is not None for s in sent):
        summary["sentiment"] = summarize_sentiment([r["pre"].get("sentiment") for r in records], sent)
    return summary


def evaluate_instructedit(
    model: nn.Module,
    tok: Any,
    methods: Mapping[str, MethodSpec] | Sequence[MethodSpec],
    test_tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    n_per_task: int | None = None,
    unseen: bool = True,
    metric_backend: str = "plugin",
    easyedit_hparams: Any = None,
    max_length: int = 96,
    max_pairs: int = 4,
    sentiment_responses: int = 2,
    metric_inputs: str | Sequence[str] = "plain",
    fluency_tokens: int = 0,
    sentiment_classifier: Callable[[Sequence[str]], Sequence[str]] | None = None,
    library: InstructionLibrary | None = None,
    seed: int = 0,
    keep_records: bool = False,
    progress: Callable[[str], None] | None = None,
    prefix_cache: bool = True,
) -> dict[str, Any]:
    """Edit every test record with every method and summarise per task.

    ``methods``: :class:`MethodSpec` objects (by name). A method with
    ``instructions=True`` is evaluated with a seen instruction (``tasks``) and,
    with ``unseen``, with the held-back description (``unseen_instruction``);
    others edit with the plain prompt. ``test_tasks``: ``{task: requests}``; task
    names are instruction families, ``zsre_holdout`` uses the zsre family.

    Returns ``{"tasks": {task: {method: summary}}, "unseen_instruction": {task:
    {method: summary}}, "latency": {method: {"edit_ms"}}, "n_edits": {task: n},
    "metric_backend", "notes", ["records", "edit_seconds"]}``; a summary holds Rel/Gen/Loc/Por
    (percent, None where the data has none), Score, H, n_edits, edit_ms and, for
    ConvSent, ``sentiment`` (with ``fluency_tokens`` > 0: Fluency of generated replies;
    ``sentiment_classifier``: texts -> labels, the share of replies of the target sentiment).

    ``metric_inputs``: ``"instructed"`` (the paper's protocol: instruction before the edit
    prompt, the rephrase and the portability questions; locality plain), ``"plain"``, or
    several styles: the first fills ``tasks``/``unseen_instruction``, each other style
    ``<section>_<style>_inputs`` for the methods that edit with an instruction (the others
    score plain inputs in every style). Task names may be aliases (``wikirecent``).

    ``prefix_cache`` (default): edits with an instruction reuse its states below the first edited layer
    (:class:`EditEvaluator`); the same edits up to floating-point rounding, faster.

    ``keep_records``: also ``records`` (``{section: {task: {method: [per-edit record]}}}`` for every
    section, other metric inputs included; :func:`record_values` reads one) and ``edit_seconds``
    (``{method: [seconds per edit]}``, seen-instruction edits in task order, what ``latency`` is the median of).
    """
    if not isinstance(methods, Mapping):
        methods = {m.name: m for m in methods}
    styles = (metric_inputs,) if isinstance(metric_inputs, str) else tuple(metric_inputs)
    evaluator = EditEvaluator(model, tok, max_length=max_length, max_pairs=max_pairs, library=library, seed=seed,
                              metric_backend=metric_backend, easyedit_hparams=easyedit_hparams,
                              sentiment_responses=sentiment_responses, fluency_tokens=fluency_tokens,
                              sentiment_classifier=sentiment_classifier, prefix_cache=prefix_cache)
    results: dict[str, Any] = {"tasks": {}, "unseen_instruction": {}, "latency": {}, "n_edits": {},
                               "metric_backend": metric_backend}
    all_latency: dict[str, list[float]] = {}
    records_out: dict[str, Any] = {}
    for task, requests in test_tasks.items():
        requests = prepare_test_requests(task, list(requests)[:n_per_task] if n_per_task else list(requests))
        results["n_edits"][task] = len(requests)
        for name, spec in methods.items():
            runs = [("seen", "tasks")] if spec.instructions else [("none", "tasks")]
            if spec.instructions and unseen:
                runs.append(("unseen", "unseen_instruction"))
            archive = spec.archive_for(task)
            if archive is None:
                LOG.info("no %s editor for task %s; skipped", name, task)
                continue
            editor = evaluator.editor(archive)
            for mode, section in runs:
                method_styles = styles if spec.instructions else styles[:1]
                recs: dict[str, list] = {style: [] for style in method_styles}
                lat = []
                for i, request in enumerate(tqdm(requests, desc=f"{task} {name} {mode}", leave=False,
                                                 disable=progress is None)):
                    by_style, seconds = evaluator.evaluate_inputs(editor, request, task, i, mode,
                                                                  _fallback_loc(requests, i), method_styles)
                    for style, rec in by_style.items():
                        recs[style].append(rec)
                    lat.append(seconds)
                for style in method_styles[1:]:
                    results.setdefault(f"{section}_{style}_inputs", {}).setdefault(task, {})[name] = _summary(recs[style], lat)
                    if keep_records:
                        records_out.setdefault(f"{section}_{style}_inputs", {}).setdefault(task, {})[name] = recs[style]
                recs = recs[method_styles[0]]
                results[section].setdefault(task, {})[name] = _summary(recs, lat)
                if section == "tasks":
                    all_latency.setdefault(name, []).extend(lat)
                if keep_records:
                    records_out.setdefault(section, {}).setdefault(task, {})[name] = recs
                if progress:
                    s = results[section][task][name]
                    progress(f"{task:13s} {name:17s} {mode:6s} " + " ".join(
                        f"{m}={s[m]:.1f}" if s[m] is not None else f"{m}=-" for m in METRIC_NAMES))
    results["latency"] = {name: {"edit_ms": 1000.0 * statistics.median(v)} for name, v in all_latency.items() if v}
    results["notes"] = {
        "metrics": ("plugin token-accuracy metrics equivalent to EasyEdit compute_edit_quality (token_em)"
                    if metric_backend == "plugin" else "EasyEdit compute_edit_quality (token_em)"),
        "metric_inputs": (
            "instructed (as EasyEdit's InstructEdit evaluation: the edit's instruction before the edit prompt, the "
            "rephrase and the portability questions; locality plain; editors without instructions: plain inputs)"
            if styles[0] == "instructed" else "plain prompts (only the edit input carries the instruction)")
        + (f"; also reported: {', '.join(styles[1:])} inputs" if len(styles) > 1 else ""),
        "seen_instruction": "a training description per record (deterministic)",
        "unseen_instruction": "the family's held-back description (held_out_index) only",
        "loc_fallback": "records without locality data use the next test record's prompt and answer",
        "convsent": ("Gen: 'How do you feel about <topic>?'; sentiment: mean token log-likelihood of the responses "
                     "of the target sentiment (the record's label) vs the opposite ones (edit target excluded; up to "
                     "sentiment_responses of each, first 8 words), success = target preferred, ES = EasyEdit's "
                     "sigmoid(margin) * min(1, exp(target post - target pre))"
                     + (f"; Fluency: n-gram entropy (bigram 2/3, trigram 4/3) of a {fluency_tokens}-token greedy reply"
                        if fluency_tokens > 0 else "")),
    }
    if keep_records:
        results["records"] = records_out
        results["edit_seconds"] = {name: list(v) for name, v in all_latency.items()}
    return results


#: per-edit ConvSent values :func:`record_values` reads (``flipped``: 1 when the edit turned a failure into success)
SENTIMENT_VALUES = ("success_pre", "success_post", "margin_pre", "margin_post", "flipped", "es",
                    "fluency_pre", "fluency_post", "classifier_success")


def record_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """One edit's figures, from its record (``keep_records``): Rel/Gen/Loc/Por in [0, 1] (None where not
    measured, as :func:`~instructedit_plugin.evaluation.summary.edit_metrics` reads them) and, for a ConvSent
    record scored before and after the edit, ``sentiment``: ``SENTIMENT_VALUES`` (success/flipped 0 or 1,
    margins, ES in [0, 1], Fluency; None where not measured). Averaging these over records gives the
    summaries of :func:`evaluate_instructedit` (``summarize_metrics``, ``summarize_sentiment``)."""
    from ..evaluation.summary import edit_metrics

    out: dict[str, Any] = dict(edit_metrics(record.get("post") or {}, record.get("pre")))
    pre, post = (record.get("pre") or {}).get("sentiment"), (record.get("post") or {}).get("sentiment")
    if pre is not None and post is not None:
        out["sentiment"] = {
            "success_pre": float(pre["success"]), "success_post": float(post["success"]),
            "margin_pre": float(pre["margin"]), "margin_post": float(post["margin"]),
            "flipped": 1.0 if pre["success"] == 0 and post["success"] == 1 else 0.0,
            "es": None if post.get("es") is None else float(post["es"]),
            "fluency_pre": None if pre.get("fluency") is None else float(pre["fluency"]),
            "fluency_post": None if post.get("fluency") is None else float(post["fluency"]),
            "classifier_success": None if post.get("classifier_success") is None else float(post["classifier_success"]),
        }
    return out


# ----------------------------------------------------------------------- reports
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def result_sections(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(section, heading)`` of every results table: seen/baselines, unseen, then other metric inputs."""
    out = [("tasks", "Seen instruction / baselines"), ("unseen_instruction", "Unseen (held-back) instruction")]
    for style in METRIC_INPUTS:
        out += [(f"tasks_{style}_inputs", f"Seen instruction, {style} metric inputs"),
                (f"unseen_instruction_{style}_inputs", f"Unseen instruction, {style} metric inputs")]
    return [(sec, head) for sec, head in out if results.get(sec)]


def sentiment_table(rows: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines of the ConvSent table from ``(section, method, sentiment summary)`` rows."""
    lines = ["## ConvSent sentiment", "",
             "| section | method | success pre | success post | margin pre | margin post | flipped | ES | "
             "Fluency pre | Fluency post |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sec, method, s in rows:
        flipped = s.get("flipped", s.get("flip_to_positive"))  # results of earlier versions: positive only
        margins = " | ".join("–" if s.get(k) is None else f"{s[k]:.3f}" for k in ("margin_pre", "margin_post"))
        lines.append(f"| {sec} | {method} | {_fmt(s.get('success_pre'))} | {_fmt(s.get('success_post'))} | {margins} | "
                     f"{_fmt(flipped)} | {_fmt(s.get('es'))} | {_fmt(s.get('fluency_pre'), 2)} | "
                     f"{_fmt(s.get('fluency_post'), 2)} |")
    return lines + [""]


def results_markdown(results: Mapping[str, Any], title: str = "InstructEdit evaluation") -> str:
    """A markdown report: one table per section, methods as rows, Rel/Gen/Loc/Por/Score as columns."""
    lines = [f"# {title}", ""]
    sections = result_sections(results)
    for section, heading in sections:
        block = results[section]
        lines += [f"## {heading}", "", "| task | method | Rel | Gen | Loc | Por | Score | n |", "|---|---|---|---|---|---|---|---|"]
        for task, per_method in block.items():
            for method, s in per_method.items():
                lines.append(f"| {task} | {method} | " + " | ".join(_fmt(s.get(m)) for m in (*METRIC_NAMES, "Score"))
                             + f" | {s.get('n_edits', '')} |")
        lines.append("")
    sent = [(sec, m, s["sentiment"]) for sec, _ in sections
            for pm in results[sec].values() for m, s in pm.items() if s.get("sentiment")]
    if sent:
        lines += sentiment_table(sent)
    if results.get("latency"):
        lines += ["## Edit latency (median)", "", "| method | edit ms |", "|---|---|"]
        lines += [f"| {m} | {v['edit_ms']:.1f} |" for m, v in results["latency"].items()]
        lines.append("")
    for key, text in (results.get("notes") or {}).items():
        lines.append(f"- {key}: {text}")
    return "\n".join(lines).rstrip() + "\n"


def save_results(results: Mapping[str, Any], json_path: str | Path, md_path: str | Path | None = None,
                 title: str = "InstructEdit evaluation") -> None:
    """``json_path`` (the results) and, with ``md_path``, their markdown; each written crash-safely."""
    atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")
    if md_path is not None:
        atomic_write_text(md_path, results_markdown(results, title))
