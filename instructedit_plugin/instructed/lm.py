"""``InstructedLM``: a frozen causal LM answering with an instruction and trained prefixes.

The wrapper is what InstructEd's apply function hands back to EasyEdit as ``edited_model``.
EasyEdit's metrics call it like the base model -- ``edited_model(input_ids, attention_mask)``
on ``prompt + ' ' + target`` tokenised with left padding, reading the logits at the original
positions -- and ``generate()`` for fluency/demos. For every example the wrapper

1. picks an instruction: one passed explicitly (``instructions=[...]``), else its *provider*'s
   choice -- :class:`GoldInstructions` (the edit request's own instruction) or
   :class:`RetrievedInstructions` (a search of the instruction memory, gated by the score);
   no instruction means the example runs through the plain base model (no prefix, no
   re-weighting) and its logits are exactly the base model's; with ``relation_gate`` (an option,
   :mod:`.similarity`) an instruction whose subject-masked similarity to the question is below the
   threshold is dropped the same way;
2. builds ``[BOS] Instructions: {instruction}\\nInput: `` + the example's own token ids (ids are
   concatenated, never re-tokenised, see :mod:`.templates`);
3. computes ``sim = cos(Enc(question), Enc(instruction))`` with the sentence encoder (``similarity=
   "subject_masked"``: with the edit's subject removed from both texts, see :mod:`.similarity`); the
   instruction's embedding is cached (:mod:`.embedding_cache`), and under retrieval the question's is the
   one the memory search computed, so a query runs the encoder once; with ``sim_overlap`` (an option,
   ``question_rows`` with cached instruction keys/values) it is computed in a worker thread while the
   forward runs up to its first attention, which waits for it (:mod:`.sim_overlap`; bit-identical outputs);
   in ``question_only`` (not in the paper) the rows are re-weighted from the question's first token, so the
   whole template prefix is cached and a query runs over the caller's own tokens only;
4. runs the base model with the prefixes attached under ``instruction_context(spans, sim,
   use_prefix)`` and slices the logits back onto the caller's positions, so ``.logits`` has the
   caller's shape. Logits at padding positions of instructed examples are 0 (nothing reads them).

The prefixes are attached only for the duration of a call (unless a trainer keeps them attached),
so the base model outside the wrapper is the stock model: EasyEdit's pre-edit metrics and other
algorithms see no difference.
"""
from __future__ import annotations

import contextlib
import logging
import re
from concurrent.futures import wait as futures_wait
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import MissingDependencyError, PluginError, RequestError
from .instructed_hparams import DEFAULT_TEMPLATE
from .memory.gate import CALIBRATED, gate_for_memory
from .context import instruction_context
from .prefix import PrefixBank, attach_instructed, find_attention_modules, get_instructed_handle
from .embedding_cache import DEFAULT_EMBEDDING_CACHE, InstructionEmbeddingCache
from .instruction_cache import InstructionKVCache
from .similarity import SIMILARITIES, relation_gate_open, similarity as pair_similarity
from .sim_overlap import defer_similarity
from .templates import InstructionTemplate

LOG = logging.getLogger(__name__)
#: Instructions whose keys/values an ``InstructedLM`` in mode ``question_rows`` keeps by default.
DEFAULT_INSTRUCTION_CACHE = 1024
#: Re-weighting modes in which an instruction's keys/values do not depend on the question (cacheable):
#: ``question_rows`` caches ``[BOS] head instruction``, ``question_only`` (not in the paper) the template's tail too.
CACHEABLE_MODES = ("question_rows", "question_only")

__all__ = [
    "Selection",
    "GoldInstructions",
    "RetrievedInstructions",
    "InstructedLM",
    "load_encoder",
    "encoder_identity",
    "pad_left",
]


# ----------------------------------------------------------------------------------------------
# Collaborators written elsewhere (imported lazily): the sentence encoder and the memory
# ----------------------------------------------------------------------------------------------
def load_encoder(spec: Any = "default", device: str | torch.device = "cpu", dtype: str = "float32",
                 backend: str = "torch") -> Any:
    """A sentence encoder: ``spec`` itself when it already is one (has ``encode``/``cosine``),
    else ``SentenceEncoder(name_or_path=spec, device=device, dtype=dtype, backend=backend)`` from :mod:`.encoder`."""
    if hasattr(spec, "cosine") and hasattr(spec, "encode"):
        return spec
    try:
        from .encoder import SentenceEncoder  # noqa: PLC0415 - optional module, imported on use
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependencyError("instructedit_plugin.instructed.encoder", "InstructEd's sentence encoder") from exc
    return SentenceEncoder(name_or_path=spec, device=str(device), dtype=dtype, backend=backend)


def new_memory(encoder: Any) -> Any:
    """An empty ``InstructionMemory`` from :mod:`.memory` using ``encoder``."""
    try:
        from .memory import InstructionMemory  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError("instructedit_plugin.instructed.memory", "InstructEd's instruction memory") from exc
    return InstructionMemory(encoder)


def encoder_identity(encoder: Any) -> Any:
    """JSON-able description of the encoder (its ``identity`` attribute: a dict or a string)."""
    ident = getattr(encoder, "identity", None)
    if ident is None:
        return type(encoder).__name__
    if isinstance(ident, (str, dict)):
        return ident
    return repr(ident)


def cosine(encoder: Any, questions: Sequence[str], instructions: Sequence[str]) -> torch.Tensor:
    """``[n]`` float32 cosine similarities of paired texts (empty input -> empty tensor)."""
    if not questions:
        return torch.zeros(0)
    sim = encoder.cosine(list(questions), list(instructions))
    return torch.as_tensor(sim, dtype=torch.float32).detach().cpu().reshape(-1)


# ----------------------------------------------------------------------------------------------
# Instruction providers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The instruction chosen for one input, the question text its similarity is computed on, and the
    edit's subject and own question (``None``: unknown; used by ``similarity="subject_masked"`` and the
    relation gate, :mod:`.similarity`)."""

    instruction: str
    question: str
    subject: str | None = None
    relation: str | None = None  # the edit's own question (its ``prompt``), read by the relation gate
    #: the question's embedding from the memory search that chose the instruction (an ``EncodedQueries``
    #: of one row, :mod:`.memory.store`), reused for ``sim`` so a retrieval query encodes its question once
    encoded: Any = field(default=None, compare=False, repr=False)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class _PromptMatcher:
    """Finds which known question a decoded input starts with.

    EasyEdit evaluates ``prompt + ' ' + target``; the question (for ``sim`` and retrieval) is the
    prompt, which is known from the requests. Inputs that match no known prompt are used whole.
    """

    def __init__(self, prompts: Mapping[str, Any] | Sequence[str] = ()):
        items = prompts.items() if isinstance(prompts, Mapping) else ((p, None) for p in prompts)
        self._known: list[tuple[str, str, Any]] = sorted(
            ((_norm(p), p, owner) for p, owner in items if p and _norm(p)), key=lambda t: -len(t[0])
        )

    def match(self, text: str) -> tuple[str, Any] | None:
        norm = _norm(text)
        for key, prompt, owner in self._known:
            if norm == key or norm.startswith(key + " ") or (norm.startswith(key) and not key[-1].isalnum()):
                return prompt, owner
        return None


class GoldInstructions:
    """Every input gets its own edit's instruction (the paper's single-edit evaluation).

    Args:
        entries: ``(instruction, prompts)`` per edit; ``prompts`` are the edit's questions
            (prompt, rephrase, portability, locality) used to tell which edit an input belongs to.
        encoder: used only when several edits are active and an input matches none of their
            prompts (then the most similar instruction is used).
        subjects / relations: the edits' subjects and own questions (one per entry, ``None`` allowed),
            passed on in the selections.
    """

    def __init__(self, entries: Sequence[tuple[str, Sequence[str]]], encoder: Any = None,
                 own_prompts: Sequence[Sequence[str]] | None = None, subjects: Sequence[str | None] | None = None,
                 relations: Sequence[str | None] | None = None):
        if not entries:
            raise RequestError("GoldInstructions needs at least one (instruction, prompts) entry")
        self.entries = [(ins, list(prompts)) for ins, prompts in entries]
        self.subjects = list(subjects) if subjects is not None else [None] * len(self.entries)
        self.relations = list(relations) if relations is not None else [None] * len(self.entries)
        if len(self.subjects) != len(self.entries) or len(self.relations) != len(self.entries):
            raise RequestError(f"GoldInstructions: {len(self.subjects)} subjects and {len(self.relations)} relations "
                               f"for {len(self.entries)} entries")
        self.encoder = encoder
        # A question that is one edit's own (prompt / rephrase / portability) and another edit's
        # locality probe (a batch may hold both) belongs to the edit that changed its answer.
        owner: dict[str, int] = {}
        for i, own in enumerate(own_prompts or []):
            for prompt in own:
                owner.setdefault(prompt, i)
        for i, (_, prompts) in enumerate(self.entries):
            for prompt in prompts:
                owner.setdefault(prompt, i)
        self._matcher = _PromptMatcher(owner)

    def choose(self, texts: Sequence[str]) -> list[Selection | None]:
        out: list[Selection | None] = []
        for text in texts:
            hit = self._matcher.match(text)
            if hit is not None:
                prompt, owner = hit
                out.append(Selection(self.entries[owner][0], prompt, self.subjects[owner], self.relations[owner]))
            elif len(self.entries) == 1 or self.encoder is None:
                out.append(Selection(self.entries[0][0], text, self.subjects[0], self.relations[0]))
            else:
                instructions = [ins for ins, _ in self.entries]
                scores = cosine(self.encoder, [text] * len(instructions), instructions)
                best = int(scores.argmax())
                out.append(Selection(instructions[best], text, self.subjects[best], self.relations[best]))
        return out


class RetrievedInstructions:
    """Inputs look their instruction up in an instruction memory, through its std gate.

    An input gets the top-1 instruction only when the standard deviation of its ``top_k`` best
    retrieval scores exceeds ``gate`` (a threshold on their spread, not on a score), else none.


    ``score`` / ``std`` / ``pad`` are the gate's options (see :mod:`.memory.gate`); ``gate="calibrated"``
    uses the threshold stored in the memory (resolved at each call, so a newly loaded memory counts).
    ``memory`` follows the ``InstructionMemory`` interface (``select(query, gate, top_k)`` returning
    an object with ``.text`` or ``None``; ``gate`` is a :class:`~.memory.gate.StdGate`). ``prompts``
    are known questions (see :class:`_PromptMatcher`).
    """

    def __init__(self, memory: Any, gate: float | str = 0.1, top_k: int = 5, prompts: Sequence[str] = (), *,
                 score: str = "cosine", std: str = "population", pad: str = "zero"):
        self.memory = memory
        self.gate = gate if gate == CALIBRATED else float(gate)
        self.top_k = int(top_k)
        self.options = {"score": score, "std": std, "pad": pad}
        gate_for_memory(None, 0.0, self.top_k, **self.options)  # bad options fail here, not at the first query
        self._matcher = _PromptMatcher(list(prompts))

    def choose(self, texts: Sequence[str]) -> list[Selection | None]:
        """Each input's selection; with a memory that has ``encode_queries`` (:class:`~.memory.InstructionMemory`)
        the question is encoded once (alone, as a search of its text would) and that embedding travels in the
        selection, so ``sim`` does not encode it again."""
        out: list[Selection | None] = []
        target = getattr(self.memory, "target", self.memory)
        std_gate = gate_for_memory(target, self.gate, self.top_k, **self.options)
        encode = getattr(target, "encode_queries", None)
        for text in texts:
            hit = self._matcher.match(text)
            question = hit[0] if hit is not None else text
            encoded = encode([question]) if callable(encode) else None
            chosen = self.memory.select(question if encoded is None else encoded, gate=std_gate, top_k=std_gate.top_k)
            meta = (getattr(chosen, "metadata", None) or {}) if chosen is not None else {}
            out.append(None if chosen is None else Selection(chosen.text, question, meta.get("subject"),
                                                              meta.get("prompt"), encoded))
        return out


# ----------------------------------------------------------------------------------------------
# Batching helpers
# ----------------------------------------------------------------------------------------------
def pad_left(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None):
    """Left-pad id lists: ``(input_ids [n, L], attention_mask [n, L], pad_counts list[int])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pads = []
    for i, row in enumerate(rows):
        n = width - len(row)
        pads.append(n)
        if row:
            ids[i, n:] = torch.tensor(list(row), dtype=torch.long)
            mask[i, n:] = 1
    return ids.to(device), mask.to(device), pads


@dataclass
class InstructedBatch:
    """Left-padded instructed inputs with per-example spans, similarities and prefix switches."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: list[tuple[int, int] | None]
    sim: torch.Tensor
    use_prefix: torch.Tensor
    question_start: list[int]  # position of the first question token in each padded row


# ----------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------
class InstructedLM(nn.Module):
    """The base model plus InstructEd prefixes, an encoder and an instruction provider.

    Args:
        model: the (frozen) Hugging Face causal LM.
        tokenizer: its tokenizer (used for the template and to decode inputs for retrieval).
        bank: trained :class:`~instructedit_plugin.instructed.prefix.PrefixBank`.
        encoder: sentence encoder (``cosine(a, b)``).
        provider: :class:`GoldInstructions`, :class:`RetrievedInstructions` or anything with
            ``choose(texts) -> list[Selection | None]``; ``None``: only explicit ``instructions=``.
        template / instruction_max_length: the input layout (see :mod:`.templates`).
        mode: re-weighting mode (:data:`~.attention.REWEIGHT_MODES`).
        instruction_cache: instructions whose keys/values are kept for reuse (:mod:`.instruction_cache`), or a
            shared :class:`~.instruction_cache.InstructionKVCache`; ``None``: 1024 in modes ``question_rows``
            and ``question_only`` (where reuse is exact, :data:`CACHEABLE_MODES`), else 0 (off).
        embedding_cache: instructions whose sentence embeddings are kept for ``sim`` (:mod:`.embedding_cache`),
            or a shared :class:`~.embedding_cache.InstructionEmbeddingCache`; ``None``: 4096 when the encoder's
            ``cosine`` is its ``encode`` rows' dot product (``cosine_from_encode``: the sentence encoder); 0: off
            (question and instruction encoded together at every query). In mode ``none`` and without prefixes
            ``sim`` is unused and never computed.
        similarity: how ``sim`` is computed (:data:`~.similarity.SIMILARITIES`; ``cosine`` is the paper's).
        sim_overlap: ``question_rows`` / ``question_only`` with an instruction cache: compute ``sim`` in a worker thread while the
            forward runs up to its first attention (:mod:`.sim_overlap`); bit-identical outputs, less wall
            clock where a second core is free, the same CPU time.
        fused_attention: run InstructEd layers in the fused SDPA kernel where it is exact (``attention.py``, "Fused
            kernel"; equal to eager up to float rounding); ``False``: the eager path everywhere (hparam
            ``attention_kernel: eager``).
        relation_gate: ``None`` (the paper: every input keeps its instruction) or a threshold: an input whose
            relation similarity to its instruction (:func:`~.similarity.relation_similarity`, the edit's
            subject masked) is below it runs without instruction, exactly as the base model.

    Attribute access that the wrapper does not define (``config``, ``generation_config``,
    ``device``...) and ``named_parameters``/``parameters``/``state_dict`` are the base model's, so
    code written for the base model (EasyEdit's metrics) works unchanged. The prefix parameters are
    ``bank.parameters()``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        bank: PrefixBank,
        *,
        encoder: Any,
        provider: Any = None,
        template: str = DEFAULT_TEMPLATE,
        instruction_max_length: int = 128,
        mode: str = "paper",
        use_prefixes: bool = True,
        instruction_cache: int | InstructionKVCache | None = None,
        embedding_cache: int | InstructionEmbeddingCache | None = None,
        similarity: str = "cosine",
        relation_gate: float | None = None,
        sim_overlap: bool = False,
        fused_attention: bool = True,
    ):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise PluginError(f"similarity {similarity!r} is not one of {', '.join(SIMILARITIES)}. "
                              "Fix: pass similarity='cosine' (the paper's) or 'subject_masked'")
        self.similarity = similarity
        self.relation_gate = None if relation_gate is None else float(relation_gate)
        self.model = model
        #: False: the instruction in context on the plain model, no prefixes and no re-weighting
        #: (the paper's in-context baseline), through exactly the same input layout.
        self.use_prefixes = bool(use_prefixes)
        self.bank = bank
        self.__dict__["tokenizer"] = tokenizer
        self.__dict__["encoder"] = encoder
        self.__dict__["provider"] = provider
        self.__dict__["template"] = InstructionTemplate(tokenizer, template, instruction_max_length)
        self.mode = mode
        if instruction_cache is None:
            instruction_cache = DEFAULT_INSTRUCTION_CACHE if mode in CACHEABLE_MODES else 0
        if instruction_cache and mode not in CACHEABLE_MODES:
            raise PluginError(f"an instruction key/value cache is exact only with reweight_mode 'question_rows' or "
                              f"'question_only', not {mode!r}. Fix: set reweight_mode: question_rows, or "
                              "instruction_cache=0")
        if isinstance(instruction_cache, int):
            instruction_cache = InstructionKVCache(instruction_cache) if instruction_cache else None
        #: instruction keys/values reused across questions (:data:`CACHEABLE_MODES` only, inference only)
        self.__dict__["instruction_cache"] = instruction_cache
        if embedding_cache is None:
            embedding_cache = DEFAULT_EMBEDDING_CACHE if InstructionEmbeddingCache.usable(encoder) else 0
        if isinstance(embedding_cache, int):
            embedding_cache = InstructionEmbeddingCache(embedding_cache) if embedding_cache else None
        #: instruction sentence embeddings reused across questions (any mode)
        self.__dict__["embedding_cache"] = embedding_cache
        if sim_overlap and instruction_cache is None:
            raise PluginError("sim_overlap computes sim beside the cached-instruction forward, which needs "
                              "reweight_mode 'question_rows' or 'question_only' and an instruction cache. Fix: set "
                              "reweight_mode: question_rows (instruction_cache > 0), or sim_overlap: false")
        #: compute sim in a worker thread while the cached-instruction forward starts (:mod:`.sim_overlap`)
        self.sim_overlap = bool(sim_overlap)
        #: run InstructEd layers in the fused kernel where it is exact (``InstructedHandle.fused_attention``)
        self.fused_attention = bool(fused_attention)
        #: the base model's attention modules by layer (found once; every call attaches the prefixes to them)
        self.__dict__["_attention_modules"] = None
        #: the prefixes' keys/values, projected once and kept across calls (each call attaches the bank anew;
        #: entries are checked against the bank's and the layers' version counters, see ``attach_instructed``)
        self.__dict__["_prefix_memo"] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    # -- forwarding to the base model ----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(super().__getattr__("model"), name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def named_parameters(self, *args: Any, **kwargs: Any):  # noqa: D102 - the base model's
        return self.model.named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # noqa: D102
        return self.model.parameters(recurse)

    def state_dict(self, *args: Any, **kwargs: Any):  # noqa: D102
        return self.model.state_dict(*args, **kwargs)

    def set_provider(self, provider: Any) -> None:
        self.__dict__["provider"] = provider

    # -- attaching -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def activated(self) -> Iterator[Any]:
        """Attach the prefixes for the duration of the block (reuses a handle already attached with
        this bank, e.g. by the trainer). Outside any ``instruction_context`` prefixes stay off."""
        handle = get_instructed_handle(self.model)
        if handle is not None:
            if handle.bank is not self.bank:
                raise PluginError("another InstructEd prefix bank is attached to this model; detach it first")
            previous, fused = handle.mode, handle.fused_attention
            handle.mode, handle.fused_attention = self.mode, self.fused_attention
            try:
                yield handle
            finally:
                handle.mode, handle.fused_attention = previous, fused
            return
        if self.__dict__["_attention_modules"] is None:
            self.__dict__["_attention_modules"] = find_attention_modules(self.model)
        handle = attach_instructed(self.model, bank=self.bank, mode=self.mode, freeze=False,
                                   prefix_memo=self.__dict__["_prefix_memo"],
                                   modules=self.__dict__["_attention_modules"])
        handle.prefix_enabled = False
        handle.fused_attention = self.fused_attention
        try:
            yield handle
        finally:
            handle.detach()

    # -- building inputs -----------------------------------------------------------------------
    def similarities(self, questions: Sequence[str], instructions: Sequence[str],
                     subjects: Sequence[str | None] | None = None, encoded: Sequence[Any] | None = None) -> torch.Tensor:
        """``[n]`` float32 ``sim`` of each (question, instruction) pair under this wrapper's ``similarity``:
        for ``cosine`` (the paper's) the instructions' embeddings come from :attr:`embedding_cache` when
        there is one, and the questions' from ``encoded`` (their memory searches' ``EncodedQueries``, one per
        question) when every one is given and made by this wrapper's encoder; ones in mode ``none`` (``sim``
        unused) and without prefixes (the in-context baseline never re-weights)."""
        if self.mode == "none" or not self.use_prefixes:
            return torch.ones(len(questions), dtype=torch.float32)
        if self.similarity == "cosine" and self.embedding_cache is not None:
            vectors = None
            if encoded is not None and questions and all(e is not None and e.encoder is self.encoder for e in encoded):
                vectors = torch.cat([e.vectors for e in encoded])
            return self.embedding_cache.similarity(self.encoder, questions, instructions, question_vectors=vectors)
        return pair_similarity(self.encoder, questions, instructions, subjects, self.similarity)

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        return [input_ids[i][attention_mask[i].bool()].tolist() for i in range(input_ids.shape[0])]

    def select(self, rows: Sequence[Sequence[int]], instructions: Sequence[str | None] | str | None = None) -> list[Selection | None]:
        """The instruction of each row: explicit ``instructions`` (a string applies to all rows,
        ``None`` entries mean none), else the provider's choice."""
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        if instructions is not None:
            if isinstance(instructions, str):
                instructions = [instructions] * len(rows)
            if len(instructions) != len(rows):
                raise RequestError(f"got {len(instructions)} instructions for {len(rows)} inputs")
            return [None if ins is None else Selection(ins, t) for ins, t in zip(instructions, texts)]
        if self.provider is None:
            return [None] * len(rows)
        chosen = list(self.provider.choose(texts))
        if len(chosen) != len(rows):
            raise PluginError(f"instruction provider returned {len(chosen)} choices for {len(rows)} inputs")
        return self.gate_relations(chosen)

    def gate_relations(self, selections: Sequence[Selection | None]) -> list[Selection | None]:
        """``selections`` with the instructions the relation gate closes on removed (see ``relation_gate``)."""
        held = [i for i, s in enumerate(selections) if s is not None]
        if self.relation_gate is None or not held:
            return list(selections)
        picked = [selections[i] for i in held]
        keep = relation_gate_open(self.encoder, [s.question for s in picked], [s.instruction for s in picked],
                                  [s.subject for s in picked], self.relation_gate, [s.relation for s in picked])
        out = list(selections)
        for i, ok in zip(held, keep):
            if not ok:
                out[i] = None
        return out

    def build(self, rows: Sequence[Sequence[int]], selections: Sequence[Selection | None]) -> InstructedBatch:
        """Instructed sequences (template + row ids; plain rows stay as they are), left-padded."""
        seqs, spans, starts, questions, instructions, subjects, encoded, which = [], [], [], [], [], [], [], []
        for i, (row, sel) in enumerate(zip(rows, selections)):
            if sel is None:
                seqs.append(list(row))
                spans.append(None)
                starts.append(0)
                continue
            prefix = self.template.encode_instruction(sel.instruction)
            seqs.append(prefix.ids + self.template.strip_bos(row))
            spans.append(prefix.span)
            starts.append(len(prefix.ids))
            questions.append(sel.question)
            instructions.append(sel.instruction)
            subjects.append(sel.subject)
            encoded.append(sel.encoded)
            which.append(i)
        ids, mask, pads = pad_left(seqs, self.pad_id, self.device)
        sim = torch.ones(len(rows), dtype=torch.float32)
        if which:
            sim[which] = self.similarities(questions, instructions, subjects, encoded)
        use_prefix = torch.tensor([s is not None for s in spans], dtype=torch.bool)
        spans = [None if s is None else (s[0] + p, s[1] + p) for s, p in zip(spans, pads)]
        return InstructedBatch(ids, mask, spans, sim, use_prefix, [s + p for s, p in zip(starts, pads)])

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, spans: Sequence[tuple[int, int] | None],
            sim: torch.Tensor | float, use_prefix: torch.Tensor | bool, question_starts: Sequence[int] | None = None,
            **kwargs: Any) -> Any:
        """One forward of the base model with prefixes under ``instruction_context`` (keeps the graph);
        ``question_starts`` (each row's first question token) are what mode ``question_only`` needs.

        Rows are left-padded; unless the caller passes ``position_ids``, each row's real tokens get the
        positions ``0, 1, ...`` (padding not counted), so a row's result does not depend on how much
        padding its batch gave it: the prefix keys carry no rotary embedding, so with positions counted
        from the padded start a rotary query's attention to them would shift with the padding.
        """
        if "position_ids" not in kwargs:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if not self.use_prefixes:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self.activated(), instruction_context(spans=list(spans), sim=sim, use_prefix=use_prefix,
                                                   question_starts=question_starts):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- forward / generate --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, instructions: Sequence[str | None] | str | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits of the caller's shape; see the module docstring. ``labels`` (``-100`` ignored) give
        the usual shifted next-token loss."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.pop("token_type_ids", None)
        kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)
        rows = self._rows(input_ids, attention_mask)
        selections = self.select(rows, instructions)
        chosen = [i for i, s in enumerate(selections) if s is not None]
        logits = None
        if not chosen:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        elif self.instruction_cache is not None and self.use_prefixes and not torch.is_grad_enabled():
            logits = self._forward_cached(input_ids, attention_mask, rows, selections, chosen, kwargs)
        if logits is None:
            batch = self.build([rows[i] for i in chosen], [selections[i] for i in chosen])
            # Only the caller's positions reach the output layer: rows are left-padded, so they are
            # the last ``width`` columns (a contiguous gather; the instruction's logits are never read).
            total = batch.input_ids.shape[1]
            width = min(total, max(len(rows[i]) for i in chosen))
            keep = torch.arange(total - width, total, device=batch.input_ids.device)
            out = self.run(batch.input_ids, batch.attention_mask, batch.spans, batch.sim, batch.use_prefix,
                           question_starts=batch.question_start, logits_to_keep=keep)
            logits = self._caller_logits(out.logits, [q - (total - width) for q in batch.question_start],
                                         input_ids, attention_mask, rows, selections, chosen, kwargs)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def warm_instructions(self, instructions: Sequence[str]) -> int:
        """Compute (or refresh) the cached keys/values of ``instructions`` now, and their sentence embeddings (for
        ``sim``, when there is an embedding cache), so a query asking under them runs neither; returns how many
        keys/values were new."""
        if self.instruction_cache is None or not self.use_prefixes:
            return 0
        if self.embedding_cache is not None and self.similarity == "cosine" and self.mode != "none":
            self.embedding_cache.vectors(self.encoder, list(instructions))  # each encoded alone, as a query would
        before = self.instruction_cache.misses
        with self.activated():
            for instruction in instructions:
                encoded = self.template.encode_instruction(instruction)
                self.instruction_cache.entry(self.model, self._cached_head(encoded), encoded.span, self.bank,
                                             keep_logits=self.mode == "question_only")
        return self.instruction_cache.misses - before

    def _cached_head(self, encoded: Any) -> list[int]:
        """The ids of an instruction's template prefix whose keys/values are cached: ``[BOS] head instruction``
        (``question_rows``), the template's tail too (``question_only``: only the question's rows are re-weighted)."""
        return list(encoded.ids) if self.mode == "question_only" else encoded.ids[: encoded.span[1]]

    def _forward_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[list[int]],
                        selections: list[Selection | None], chosen: list[int], kwargs: dict) -> torch.Tensor | None:
        """Logits of the instructed rows from their instructions' cached keys/values plus their own tokens;
        ``None`` when an instruction does not fit a sliding-window layer's cache (then the full forward runs)."""
        window = getattr(self.model.config, "sliding_window", None)
        pairs = ([selections[i].question for i in chosen], [selections[i].instruction for i in chosen],
                 [selections[i].subject for i in chosen], [selections[i].encoded for i in chosen])
        if self.sim_overlap:  # the forward below waits for it in its first attention
            sim = defer_similarity(lambda: self.similarities(*pairs), len(chosen))
            try:
                logits = self._forward_cached_with(sim, window, rows, selections, chosen, input_ids, attention_mask,
                                                   kwargs)
            finally:
                futures_wait([sim.future])  # never leave the worker running (a forward error keeps its own traceback)
            sim.value()  # a sim nothing read still reports its error
            return logits
        sim = self.similarities(*pairs)
        return self._forward_cached_with(sim, window, rows, selections, chosen, input_ids, attention_mask, kwargs)

    def _forward_cached_with(self, sim: Any, window: int | None, rows: list[list[int]],
                             selections: list[Selection | None], chosen: list[int], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """:meth:`_forward_cached` once ``sim`` is known or deferred (a :class:`~.context.DeferredSim`)."""
        entries, tails = [], []
        with self.activated():
            for i in chosen:
                encoded = self.template.encode_instruction(selections[i].instruction)
                head = self._cached_head(encoded)
                if window and len(encoded.ids) + len(rows[i]) > int(window):
                    return None  # a sliding layer would drop cached keys the full forward still sees
                entries.append(self.instruction_cache.entry(self.model, head, encoded.span, self.bank,
                                                            keep_logits=self.mode == "question_only"))
                tails.append(encoded.ids[len(head):] + self.template.strip_bos(rows[i]))
            inputs = InstructionKVCache.assemble(self.model, entries, tails, self.pad_id)
            width = min(inputs["input_ids"].shape[1], max(len(rows[i]) for i in chosen))
            total = inputs["input_ids"].shape[1]
            keep = torch.arange(total - width, total, device=inputs["input_ids"].device)
            # every new column lies after the cached ones: the question rows (question_only; padding included,
            # whose outputs nobody reads), so the call's re-weighting is the same for all rows (fused kernel)
            with instruction_context(spans=inputs["spans"], sim=sim, use_prefix=True,
                                     question_starts=[inputs["head"]] * len(chosen)):
                out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 position_ids=inputs["position_ids"], past_key_values=inputs["past_key_values"],
                                 use_cache=False, logits_to_keep=keep)
        starts = [inputs["tail_start"][j] + len(tails[j]) - len(self.template.strip_bos(rows[i])) - (total - width)
                  for j, i in enumerate(chosen)]
        logits = out.logits
        if self.mode == "question_only":  # the logits before the question's first token are the cached position's
            logits = torch.cat([logits.new_zeros(logits.shape[0], 1, logits.shape[-1]), logits], dim=1)
            for j, entry in enumerate(entries):
                logits[j, starts[j]] = entry.last_logits.to(logits.dtype)
            starts = [start + 1 for start in starts]
        return self._caller_logits(logits, starts, input_ids, attention_mask, rows, selections, chosen, kwargs)

    def _caller_logits(self, kept: torch.Tensor, question_starts: list[int], input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, rows: list[list[int]], selections: list[Selection | None],
                       chosen: list[int], kwargs: dict) -> torch.Tensor:
        """Logits of the caller's shape: the instructed rows' ``kept`` logits (``question_starts[j]``: the
        column of row ``chosen[j]``'s first question token in them) moved onto the caller's positions, the
        rows without instruction from the plain base model, zeros at padding."""
        plain = [i for i, s in enumerate(selections) if s is None]
        if not plain and len(chosen) == 1 and bool(attention_mask.all()):  # one unpadded row: a slice, no copy
            stripped = len(self.template.strip_bos(rows[0])) != len(rows[0])
            first = question_starts[0] - (1 if stripped else 0)
            if first >= 0 and first + input_ids.shape[1] <= kept.shape[1]:
                return kept[:, first : first + input_ids.shape[1]]
        logits = kept.new_zeros((*input_ids.shape, kept.shape[-1]))
        if plain:
            logits[plain] = self.model(input_ids=input_ids[plain], attention_mask=attention_mask[plain], **kwargs).logits
        for j, i in enumerate(chosen):
            positions = attention_mask[i].bool().nonzero().flatten()
            stripped = len(self.template.strip_bos(rows[i])) != len(rows[i])  # the caller's BOS: the token before
            first = question_starts[j] - (1 if stripped else 0)
            logits[i, positions] = kept[j, first : first + len(positions)]
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 instructions: Sequence[str | None] | str | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with each example's instruction and the prefixes (KV cache as usual).

        Returns the caller's ``input_ids`` followed by the generated tokens (the instruction is not
        part of the returned sequences), so ``out[:, input_ids.shape[1]:]`` are the new tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = self._rows(input_ids, attention_mask)
        selections = self.select(rows, instructions)
        if all(s is None for s in selections):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        batch = self.build(rows, selections)
        kwargs.setdefault("pad_token_id", self.pad_id)
        if not self.use_prefixes:
            out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        else:
            with self.activated(), instruction_context(spans=batch.spans, sim=batch.sim, use_prefix=batch.use_prefix,
                                                       question_starts=batch.question_start):
                out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        reps = sequences.shape[0] // input_ids.shape[0]
        prompt = input_ids.repeat_interleave(reps, dim=0) if reps > 1 else input_ids
        merged = torch.cat([prompt.to(sequences.device), sequences[:, batch.input_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return merged
        out.sequences = merged
        return out
