"""ConvSent metrics: did the edit move the model's sentiment on the topic, and can it still talk?

ConvSent records (``instructedit_plugin.data.convsent``) carry a topic, lists of
positive (``pos``) and negative (``neg``) BlenderBot responses and the sentiment
the edit moves towards (``label``: ``positive`` or ``negative``; derived from
``target_new`` for records without one). Token accuracy of the one edited reply
(Rel) says little about *sentiment*, so this module scores the model's
preference between the other responses, given the topic question:

* ``margin``: mean per-token log-likelihood of the responses of the target
  sentiment minus that of the opposite sentiment (tokens pooled over the
  responses). The edit target is left out, so the score measures whether the
  *sentiment* generalises beyond the single memorised reply.
* ``success``: 1 when ``margin > 0`` (the model prefers the target sentiment), else 0.
* ``es`` (post-edit only): EasyEdit's/SERAC's edit success for sentiment,
  ``sigmoid(margin_post) * min(1, exp(target_post - target_pre))``: the target
  sentiment must win *and* its replies must not become less likely than before
  the edit (``z_sent * z_topic``).

Averaged over edits and reported pre- and post-edit, ``success`` is the
"sentiment success rate" (percent); ``flipped`` counts edits whose preference
changed to the target sentiment.

Fluency (the paper's Eq. 8, EasyEdit's ``n_gram_entropy``): the weighted mean of
the bigram and trigram entropies (bits) of a generated reply, weights 2/3 and
4/3, over word tokens (NLTK's word tokenizer); lower means more repetition.
:func:`classifier_success` scores generated replies with a sentiment classifier
when one is given (any callable ``texts -> labels``); none ships, because none is
available offline.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "FLUENCY_WEIGHTS",
    "classifier_success",
    "edit_label",
    "n_gram_entropy",
    "sentiment_pairs",
    "sentiment_scores",
    "summarize_sentiment",
]

#: n -> weight of the n-gram entropy in Fluency (EasyEdit's ``compute_n_gram_entropy`` defaults)
FLUENCY_WEIGHTS: dict[int, float] = {2: 2.0 / 3.0, 3: 4.0 / 3.0}
LABELS = ("positive", "negative")


def edit_label(record: Mapping[str, Any]) -> str:
    """The sentiment the edit moves towards: ``label``, else ``negative`` when ``target_new`` is a ``neg`` response."""
    label = str(record.get("label") or record.get("sentiment") or "").strip().lower()
    if label in LABELS:
        return label
    target = str(record.get("target_new", "")).strip()
    return "negative" if target and target in {str(r).strip() for r in record.get("neg") or ()} else "positive"


def sentiment_pairs(record: Mapping[str, Any], max_responses: int = 4,
                    question: str | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(target-sentiment pairs, opposite pairs)`` of (question, response) to score, the edit target excluded.

    ``question`` defaults to the record's prompt (the instructed prompt when metric inputs are instructed).
    """
    prompt = record["prompt"] if question is None else question
    target = str(record.get("target_new", "")).strip()
    pos = [str(r).strip() for r in record.get("pos") or () if str(r).strip()]
    neg = [str(r).strip() for r in record.get("neg") or () if str(r).strip()]
    toward, away = (neg, pos) if edit_label(record) == "negative" else (pos, neg)
    toward = [r for r in toward if r != target]
    return [(prompt, r) for r in toward[:max_responses]], [(prompt, r) for r in away[:max_responses]]


def _pooled(logprobs: Sequence[float], counts: Sequence[int] | None) -> float:
    if counts is None or not any(counts):
        return sum(logprobs) / len(logprobs)
    return sum(lp * n for lp, n in zip(logprobs, counts)) / sum(counts)


def sentiment_scores(toward_logprobs: Sequence[float], away_logprobs: Sequence[float], *,
                     toward_counts: Sequence[int] | None = None, away_counts: Sequence[int] | None = None,
                     pre: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Margin, success (and, given the pre-edit scores, EasyEdit's ``es``) of one edit.

    The inputs are per-response mean token log-probabilities; with ``*_counts`` (answer tokens
    per response) they are pooled over tokens, as EasyEdit's masked mean.
    """
    if not toward_logprobs or not away_logprobs:
        return None
    toward = _pooled(toward_logprobs, toward_counts)
    away = _pooled(away_logprobs, away_counts)
    margin = toward - away
    out = {"margin": float(margin), "success": 1.0 if margin > 0 else 0.0, "target_logp": float(toward)}
    if pre is not None and pre.get("target_logp") is not None:
        z_sent = 1.0 / (1.0 + math.exp(-margin))
        z_topic = min(1.0, math.exp(min(toward - pre["target_logp"], 0.0)))
        out["es"] = z_sent * z_topic
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_sentiment(pre: Sequence[Mapping[str, float] | None], post: Sequence[Mapping[str, float] | None]) -> dict[str, Any]:
    """Mean success (percent), margin, ES (percent), flip rate (percent) and Fluency over edits scored pre and post."""
    pairs = [(a, b) for a, b in zip(pre, post) if a is not None and b is not None]
    if not pairs:
        return {"n_edits": 0, "success_pre": None, "success_post": None, "margin_pre": None, "margin_post": None,
                "flipped": None, "es": None, "fluency_pre": None, "fluency_post": None}
    n = len(pairs)
    es = [b["es"] for _, b in pairs if b.get("es") is not None]
    out = {
        "n_edits": n,
        "success_pre": 100.0 * sum(a["success"] for a, _ in pairs) / n,
        "success_post": 100.0 * sum(b["success"] for _, b in pairs) / n,
        "margin_pre": sum(a["margin"] for a, _ in pairs) / n,
        "margin_post": sum(b["margin"] for _, b in pairs) / n,
        "flipped": 100.0 * sum(1 for a, b in pairs if a["success"] == 0 and b["success"] == 1) / n,
        "es": None if not es else 100.0 * sum(es) / len(es),
        "fluency_pre": _mean([a["fluency"] for a, _ in pairs if a.get("fluency") is not None]),
        "fluency_post": _mean([b["fluency"] for _, b in pairs if b.get("fluency") is not None]),
    }
    judged = [b["classifier_success"] for _, b in pairs if b.get("classifier_success") is not None]
    if judged:
        out["classifier_success"] = 100.0 * sum(judged) / len(judged)
    return out


# ------------------------------------------------------------------------- fluency
def _words(text: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer  # the word tokenizer of nltk.word_tokenize, without punkt data

    return NLTKWordTokenizer().tokenize(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def n_gram_entropy(text: str, weights: Mapping[int, float] | None = None) -> float:
    """Fluency of one text: the mean over n of ``weight_n * H_n`` (bits), ``H_n`` the n-gram entropy.

    With the default weights (bigram 2/3, trigram 4/3) this is EasyEdit's ``compute_n_gram_entropy``.
    """
    weights = FLUENCY_WEIGHTS if weights is None else weights
    words = _words(text)
    terms = [w * _entropy_bits(Counter(zip(*(words[i:] for i in range(n))))) for n, w in weights.items()]
    return sum(terms) / len(terms)


def classifier_success(replies: Sequence[str], labels: Sequence[str],
                       classifier: Callable[[Sequence[str]], Sequence[str]]) -> list[float]:
    """Per reply: 1.0 when ``classifier`` (texts -> ``positive``/``negative``) finds the target sentiment."""
    predicted = list(classifier(list(replies)))
    if len(predicted) != len(replies):
        raise ValueError(f"the sentiment classifier returned {len(predicted)} labels for {len(replies)} replies. "
                         "Fix: return one label per text")
    return [1.0 if str(p).strip().lower() == str(t).lower() else 0.0 for p, t in zip(predicted, labels)]
