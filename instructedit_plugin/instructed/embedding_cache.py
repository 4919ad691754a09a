"""Sentence embeddings of instructions, computed once per instruction and reused by every query.

Every instructed query needs ``sim = cos(Enc(question), Enc(instruction))`` (Eq. 15). The question
changes from query to query, the instruction does not: an edit's instruction is asked about again and
again (its prompt, rephrases, portability questions; every retrieval hit). :class:`InstructionEmbeddingCache`
keeps the unit embedding of each instruction (least recently used first out, at most ``max_entries``), so a
query encodes only its question -- and a retrieval query not even that: the memory search already encoded
it, and its embedding is passed in (``question_vectors``).

Exactness: a missing instruction is encoded *alone* (a batch of one), so its vector never depends on
what it was batched with, and a query gives bit-identical outputs whether its instruction was cached
or not. (Without the cache ``cosine`` encodes question and instruction in one batch; the two differ
only in the last bits, the encoder's batch padding.) The cache is bound to one encoder object: another
encoder empties it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DEFAULT_EMBEDDING_CACHE", "InstructionEmbeddingCache"]

#: Instructions whose embeddings are kept by default (384 floats each with the default encoder: ~6 MB).
DEFAULT_EMBEDDING_CACHE = 4096


class InstructionEmbeddingCache:
    """Least-recently-used store of unit sentence embeddings keyed by instruction text."""

    def __init__(self, max_entries: int = DEFAULT_EMBEDDING_CACHE):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}. Fix: pass a positive number")
        self.max_entries = int(max_entries)
        self._vectors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._encoder_id: int | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, text: object) -> bool:
        return text in self._vectors

    def clear(self) -> None:
        self._vectors.clear()

    @staticmethod
    def usable(encoder: Any) -> bool:
        """Whether ``encoder``'s ``cosine`` may be computed from cached ``encode`` rows: it has ``encode(texts)
        -> [n, dim]`` unit rows and says its ``cosine`` is their dot product (``cosine_from_encode``, as
        :class:`~.encoder.SentenceEncoder` does). Any other encoder keeps its own ``cosine``."""
        return callable(getattr(encoder, "encode", None)) and bool(getattr(encoder, "cosine_from_encode", False))

    def vectors(self, encoder: Any, texts: Sequence[str]) -> torch.Tensor:
        """Float32 ``[len(texts), dim]`` unit embeddings; each missing text is encoded alone and kept."""
        if self._encoder_id != id(encoder):
            self._vectors.clear()
            self._encoder_id = id(encoder)
        rows = []
        for text in texts:
            vec = self._vectors.get(text)
            if vec is None:
                self.misses += 1
                vec = torch.as_tensor(encoder.encode([text]), dtype=torch.float32).detach().cpu().reshape(-1)
                self._vectors[text] = vec
                while len(self._vectors) > self.max_entries:
                    self._vectors.popitem(last=False)
            else:
                self.hits += 1
                self._vectors.move_to_end(text)
            rows.append(vec)
        return torch.stack(rows)

    def similarity(self, encoder: Any, questions: Sequence[str], instructions: Sequence[str],
                   question_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``[n]`` float32 ``cos(Enc(questions[i]), Enc(instructions[i]))``: one encoder call for the questions
        (none when ``question_vectors``, their ``encoder.encode`` rows ``[n, dim]``, are given, e.g. from the
        memory search that chose the instructions), the instructions from the cache."""
        if len(questions) != len(instructions):
            raise ValueError(f"similarity(): {len(questions)} questions vs {len(instructions)} instructions; "
                             "Fix: pass equally long lists")
        if not questions:
            return torch.zeros(0)
        if question_vectors is None:
            question_vectors = encoder.encode(list(questions))
        elif question_vectors.shape[0] != len(questions):
            raise ValueError(f"similarity(): {question_vectors.shape[0]} question_vectors for {len(questions)} "
                             "questions; Fix: pass one encoded row per question")
        q = torch.as_tensor(question_vectors, dtype=torch.float32).detach().cpu()
        return (q * self.vectors(encoder, instructions)).sum(dim=1)
