"""InstructEd training data: examples from EasyEdit request dicts, tokenisation, 1:1 batches.

Examples (one per question; every example carries an instruction, see below)
------------------------------------------------------------------------------
Edit examples, answered with the new target (``kind``):

* ``rel`` -- the request's ``prompt`` -> ``target_new``;
* ``gen`` -- each ``rephrase_prompt`` -> ``target_new``;
* ``por`` -- each portability prompt -> its answer (``use_portability``).

Unmodified examples (``kind="loc"``), answered with the *unedited* model's own prediction:

* each locality prompt of the request, with the request's instruction in front;
* ``unrelated_locality`` more per request: its instruction + the question of a *different* edit.

How we read the paper's "unmodified data" (documented choice): InstructEd never runs an input
without instruction through the prefixes -- an input without an instruction is answered by the
plain model (no prefix, no re-weighting), so there is nothing to protect there. What the prefixes
can hurt is an input *with* an instruction that does not concern it; the unmodified half of every
batch is therefore "instruction + unrelated question -> what the unedited model says", mixed 1:1
with the edit examples (``batch_size`` + ``unmodified_batch_size``, 6 + 6 in the paper).

Targets of unmodified examples: the question and its answer (the locality ``ground_truth``, or for
another edit's question its ``ground_truth``) are run through the frozen model *without*
instruction and prefixes, once, and the label at each answer position is the model's argmax there
(teacher-forced). That is exactly what EasyEdit's locality metric compares the edited model
against. A question with no answer string gets ``locality_gen_tokens`` greedy tokens instead.

Tokenisation: ``[BOS] template(instruction)`` + ids of ``question + ' ' + answer`` (the way EasyEdit
tokenises what it scores); the answer starts after ``len(ids(question))`` tokens; loss only there.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RequestError
from .lm import pad_left
from .similarity import similarity
from .templates import InstructionTemplate, instruction_of

LOG = logging.getLogger(__name__)

__all__ = [
    "TrainExample",
    "EncodedExample",
    "build_examples",
    "fill_unedited_predictions",
    "fill_similarities",
    "question_answer_ids",
    "encode_example",
    "collate",
    "MixedBatches",
    "normalise_requests",
    "split_requests",
]

EDIT_KINDS = ("rel", "gen", "por")


@dataclass
class TrainExample:
    """One training/validation input: ``instruction`` + ``question`` -> answer tokens."""

    kind: str  # rel | gen | por | loc
    question: str
    instruction: str
    answer: str | None  # text appended to the question (teacher forcing); None: generate (loc only)
    edit_index: int = -1
    answer_ids: list[int] | None = None  # ids appended to the question ids
    label_ids: list[int] | None = None  # what the model should predict at those positions
    question_ids: list[int] | None = None  # ids of the question without BOS
    sim: float = 1.0
    subject: str | None = None  # the edit's subject (``similarity="subject_masked"`` removes it)

    @property
    def is_edit(self) -> bool:
        return self.kind in EDIT_KINDS


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # -100 except at answer positions (HF convention: labels[t] is predicted at t-1)
    span: tuple[int, int]
    sim: float
    is_edit: bool


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------
def _pairs(prompt: Any, answer: Any) -> list[tuple[str, str | None]]:
    if prompt is None:
        return []
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if answer is None or isinstance(answer, str):
        answers = [answer] * len(prompts)
    else:
        answers = [a if isinstance(a, str) or a is None else (a[0] if a else None) for a in answer]
        if len(answers) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [(p, a) for p, a in zip(prompts, answers) if isinstance(p, str) and p.strip()]


def normalise_requests(items: Any) -> list[dict[str, Any]]:
    """Request dicts from a list of requests or an EasyEdit-style dataset.

    EasyEdit's ``ZsreDataset``/``CounterFactDataset`` items (``prompt``, ``target_new``,
    ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``, ``ground_truth``) are
    mapped to the request layout.
    """
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RequestError(f"training item {i} is a {type(item).__name__}, not a request dict")
        req = dict(item)
        if "locality" not in req and "locality_prompt" in req:
            req["locality"] = {"neighborhood": {"prompt": req["locality_prompt"],
                                                "ground_truth": req.get("locality_ground_truth")}}
        if not isinstance(req.get("prompt"), str) or not isinstance(req.get("target_new"), str):
            raise RequestError(f"request {i} needs string 'prompt' and 'target_new'")
        out.append(req)
    return out


def split_requests(requests: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/validation split by edit (at least one validation edit when the fraction is > 0)."""
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(requests) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(requests) > 1:
        n_val = 1
    val = set(order[:n_val])
    return [r for i, r in enumerate(requests) if i not in val], [r for i, r in enumerate(requests) if i in val]


def build_examples(requests: Sequence[Mapping[str, Any]], *, use_portability: bool = True,
                   unrelated_locality: int = 1, seed: int = 0) -> list[TrainExample]:
    """Edit and unmodified examples of ``requests`` (see the module docstring)."""
    rng = random.Random(seed)
    examples: list[TrainExample] = []
    instructions = [instruction_of(r) for r in requests]
    for i, (req, ins) in enumerate(zip(requests, instructions)):
        target = req["target_new"]
        first = len(examples)
        examples.append(TrainExample("rel", req["prompt"], ins, target, i))
        for q, _ in _pairs(req.get("rephrase_prompt"), None):
            examples.append(TrainExample("gen", q, ins, target, i))
        if use_portability:
            for entry in (req.get("portability") or {}).values():
                for q, a in _pairs(entry.get("prompt"), entry.get("ground_truth")):
                    if a:
                        examples.append(TrainExample("por", q, ins, a, i))
        for entry in (req.get("locality") or {}).values():
            for q, a in _pairs(entry.get("prompt"), entry.get("ground_truth")):
                examples.append(TrainExample("loc", q, ins, a, i))
        others = [j for j in range(len(requests)) if j != i and requests[j]["prompt"] != req["prompt"]]
        for j in rng.sample(others, min(unrelated_locality, len(others))):
            gt = requests[j].get("ground_truth")
            answer = gt if isinstance(gt, str) and gt and gt != "<|endoftext|>" else None
            examples.append(TrainExample("loc", requests[j]["prompt"], ins, answer, i))
        subject = req.get("subject") if isinstance(req.get("subject"), str) and req["subject"].strip() else None
        for ex in examples[first:]:
            ex.subject = subject
    return examples


# ----------------------------------------------------------------------------------------------
# Targets and similarities
# ----------------------------------------------------------------------------------------------
def question_answer_ids(template: InstructionTemplate, question: str, answer: str,
                        max_length: int | None = None) -> tuple[list[int], list[int]]:
    """``(ids of question, ids of question + ' ' + answer)`` without BOS: the answer's tokens are the
    second list's tail after ``len(first)`` (the way EasyEdit tokenises what it scores). Used for the
    training examples here and for EasyEdit's batches (:mod:`.easyedit_training`)."""
    q_ids = template.strip_bos(template.question_ids(question))
    full = template.strip_bos(template.question_ids(f"{question} {answer}"))
    return q_ids, full if max_length is None else full[:max_length]


def _tokenise(example: TrainExample, template: InstructionTemplate, max_length: int) -> None:
    q_ids = template.strip_bos(template.question_ids(example.question))
    if example.answer is not None:
        q_ids, full = question_answer_ids(template, example.question, example.answer, max_length)
        if len(full) <= len(q_ids):
            raise RequestError(f"answer {example.answer!r} adds no tokens to {example.question!r} within max_length={max_length}")
        example.question_ids = full[: len(q_ids)]
        example.answer_ids = full[len(q_ids):]
    else:
        example.question_ids = q_ids[:max_length]
        example.answer_ids = None
    if example.is_edit:
        example.label_ids = list(example.answer_ids)


@torch.no_grad()
def fill_unedited_predictions(model: torch.nn.Module, template: InstructionTemplate, examples: Sequence[TrainExample],
                              *, max_length: int, gen_tokens: int = 4, progress: bool = False) -> None:
    """Tokenise every example; give unmodified ones the frozen model's own predictions as labels.

    The model must run unedited (no prefix attached, or attached but disabled, no context).
    Inputs are grouped by length so that no padding is ever needed.
    """
    for ex in examples:
        _tokenise(ex, template, max_length)
    lead = [template.bos_id] if template.bos_id is not None else []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pending = [ex for ex in examples if not ex.is_edit]
    to_generate = [ex for ex in pending if ex.answer_ids is None]
    if progress and to_generate:
        from tqdm.auto import tqdm

        to_generate = tqdm(to_generate, desc="unedited answers for the locality examples", unit="example",
                           dynamic_ncols=True)
    for ex in to_generate:
        ids = torch.tensor([lead + ex.question_ids], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens,
                             do_sample=False, pad_token_id=template.tokenizer.pad_token_id or 0)
        ex.answer_ids = out[0, ids.shape[1]:].tolist() or [template.tokenizer.eos_token_id or 0]
    groups: dict[int, list[TrainExample]] = defaultdict(list)
    for ex in pending:
        groups[len(ex.question_ids) + len(ex.answer_ids)].append(ex)
    for length, group in groups.items():
        for start in range(0, len(group), 32):
            chunk = group[start:start + 32]
            ids = torch.tensor([lead + ex.question_ids + ex.answer_ids for ex in chunk], device=device)
            # logits only from the first answer-predicting position on (the output layer dominates otherwise)
            low = min(len(lead) + len(ex.question_ids) - 1 for ex in chunk)
            keep = torch.arange(low, ids.shape[1], device=device)
            pred = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep).logits.argmax(-1).cpu()
            for row, ex in zip(pred, chunk):
                first = len(lead) + len(ex.question_ids) - 1 - low
                ex.label_ids = row[first:first + len(ex.answer_ids)].tolist()
    model.train(was_training)


def fill_similarities(encoder: Any, examples: Sequence[TrainExample], chunk: int = 256, mode: str = "cosine") -> None:
    """``sim`` of every example (computed once): ``cos(Enc(question), Enc(instruction))``, or with
    ``mode="subject_masked"`` the same with the edit's subject removed from both (:mod:`.similarity`)."""
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        sims = similarity(encoder, [e.question for e in part], [e.instruction for e in part],
                          [e.subject for e in part], mode)
        for ex, s in zip(part, sims.tolist()):
            ex.sim = float(s)


def encode_example(example: TrainExample, template: InstructionTemplate) -> EncodedExample:
    """Token ids and labels of one example (after :func:`fill_unedited_predictions`)."""
    if example.question_ids is None or example.answer_ids is None or example.label_ids is None:
        raise RequestError("example is not tokenised yet; call fill_unedited_predictions first")
    prefix = template.encode_instruction(example.instruction)
    ids = prefix.ids + example.question_ids + example.answer_ids
    labels = [-100] * (len(prefix.ids) + len(example.question_ids)) + list(example.label_ids)
    return EncodedExample(ids, labels, prefix.span, example.sim, example.is_edit)


@dataclass
class TrainBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    spans: list[tuple[int, int]]
    sim: torch.Tensor
    is_edit: torch.Tensor
    extra: dict = field(default_factory=dict)


def collate(encoded: Sequence[EncodedExample], pad_id: int, device: torch.device | str | None = None) -> TrainBatch:
    """Left-pad a list of encoded examples (the layout used at evaluation time)."""
    ids, mask, pads = pad_left([e.input_ids for e in encoded], pad_id, device)
    labels = torch.full_like(ids, -100)
    for i, (e, p) in enumerate(zip(encoded, pads)):
        labels[i, p:] = torch.tensor(e.labels, dtype=torch.long)
    spans = [(e.span[0] + p, e.span[1] + p) for e, p in zip(encoded, pads)]
    sim = torch.tensor([e.sim for e in encoded], dtype=torch.float32)
    is_edit = torch.tensor([e.is_edit for e in encoded], dtype=torch.bool)
    return TrainBatch(ids, mask, labels, spans, sim, is_edit)


class MixedBatches:
    """Batches of ``batch_size`` edit examples + ``unmodified_batch_size`` unmodified examples.

    An epoch is one pass over the edit examples (shuffled with ``seed + epoch``); the unmodified
    examples are drawn from their own shuffled cycle. ``epoch(e)`` is deterministic, so a resumed
    run sees exactly the batches it would have seen.
    """

    def __init__(self, n_edit: int, n_unmodified: int, batch_size: int, unmodified_batch_size: int, seed: int = 0):
        if n_edit < 1:
            raise RequestError("no edit examples to train on")
        self.n_edit, self.n_unmod = n_edit, n_unmodified
        self.batch_size = batch_size
        self.unmod_size = unmodified_batch_size if n_unmodified else 0
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_edit // self.batch_size)

    def epoch(self, e: int) -> list[tuple[list[int], list[int]]]:
        rng = random.Random(self.seed * 1_000_003 + e)
        edits = list(range(self.n_edit))
        rng.shuffle(edits)
        unmod: list[int] = []
        batches = []
        for s in range(self.steps_per_epoch):
            need = self.unmod_size
            picked = []
            while need:
                if not unmod:
                    unmod = list(range(self.n_unmod))
                    rng.shuffle(unmod)
                take = min(need, len(unmod))
                picked += unmod[:take]
                unmod = unmod[take:]
                need -= take
            batches.append((edits[s * self.batch_size:(s + 1) * self.batch_size], picked))
        return batches
