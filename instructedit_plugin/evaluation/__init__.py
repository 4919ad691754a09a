"""Metric summaries and reports on top of EasyEdit's per-edit metrics."""
from .summary import METRIC_NAMES, harmonic_mean, score, summarize_metrics

__all__ = ["METRIC_NAMES", "harmonic_mean", "score", "summarize_metrics"]
