"""ConvSent sentiment metrics: does an edit towards positive sentiment make positive replies likelier?

ConvSent records (``instructedit_plugin.data.convsent``) carry a topic and lists of
positive (``pos``) and negative (``neg``) BlenderBot responses; the edit request
teaches ``pos[0]`` as the answer to "What do you think of <topic>?". Token
accuracy of that one response (Rel) says little about *sentiment*, so this
module scores the model's preference between the other responses:

* ``margin``: mean per-token log-likelihood of the positive responses minus that
  of the negative responses, given the topic question. The edit target
  ``pos[0]`` is left out, so the score measures whether the *sentiment*
  generalises beyond the single memorised reply.
* ``success``: 1 when ``margin > 0`` (the model prefers positive replies), else 0.

Averaged over edits and reported pre- and post-edit, ``success`` is the
"sentiment success rate" (percent) and ``margin`` its continuous counterpart;
``flip`` counts edits whose preference changed from negative to positive.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["sentiment_pairs", "sentiment_scores", "summarize_sentiment"]


def sentiment_pairs(record: Mapping[str, Any], max_responses: int = 4) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(positive pairs, negative pairs)`` of (question, response) to score, the edit target excluded."""
    prompt = record["prompt"]
    target = str(record.get("target_new", "")).strip()
    pos = [str(r).strip() for r in record.get("pos") or () if str(r).strip() and str(r).strip() != target]
    neg = [str(r).strip() for r in record.get("neg") or () if str(r).strip()]
    return [(prompt, r) for r in pos[:max_responses]], [(prompt, r) for r in neg[:max_responses]]


def sentiment_scores(pos_logprobs: Sequence[float], neg_logprobs: Sequence[float]) -> dict[str, float] | None:
    """Margin and success for one edit from per-response mean token log-probabilities."""
    if not pos_logprobs or not neg_logprobs:
        return None
    margin = sum(pos_logprobs) / len(pos_logprobs) - sum(neg_logprobs) / len(neg_logprobs)
    return {"margin": float(margin), "success": 1.0 if margin > 0 else 0.0}


def summarize_sentiment(pre: Sequence[Mapping[str, float] | None], post: Sequence[Mapping[str, float] | None]) -> dict[str, Any]:
    """Mean success (percent), mean margin and flip rate (percent) over edits scored both pre and post."""
    pairs = [(a, b) for a, b in zip(pre, post) if a is not None and b is not None]
    if not pairs:
        return {"n_edits": 0, "success_pre": None, "success_post": None, "margin_pre": None, "margin_post": None,
                "flip_to_positive": None}
    n = len(pairs)
    return {
        "n_edits": n,
        "success_pre": 100.0 * sum(a["success"] for a, _ in pairs) / n,
        "success_post": 100.0 * sum(b["success"] for _, b in pairs) / n,
        "margin_pre": sum(a["margin"] for a, _ in pairs) / n,
        "margin_post": sum(b["margin"] for _, b in pairs) / n,
        "flip_to_positive": 100.0 * sum(1 for a, b in pairs if a["success"] == 0 and b["success"] == 1) / n,
    }
