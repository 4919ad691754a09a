"""Score/H helpers on EasyEdit metrics from both flavours."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from instructedit_plugin.evaluation import harmonic_mean, score, summarize_metrics

PYPI_STYLE = [
    {"case_id": 0, "time": 0.1, "pre": {"rewrite_acc": [0.0]},
     "post": {"rewrite_acc": [np.float64(1.0)], "rephrase_acc": [0.5],
              "locality": {"nq_acc": [1.0, 0.0]}, "portability": {"one_hop_acc": [0.0]}}},
    {"case_id": 1, "time": 0.1, "pre": {"rewrite_acc": [0.0]},
     "post": {"rewrite_acc": [1.0], "rephrase_acc": [1.0],
              "locality": {"nq_acc": [1.0]}, "portability": {"one_hop_acc": [1.0]}}},
]
MAIN_STYLE = [
    {"case_id": 0, "pre": {}, "post": {"rewrite_acc": 1.0, "rephrase_acc": 0.5, "metric_meta": {"x": 1},
                                       "locality": {"nq_acc": [1.0, 0.0], "nq_output": [[1, 2]]},
                                       "portability": {"one_hop_acc": [0.0]}}},
    {"case_id": 1, "pre": {}, "post": {"rewrite_acc": [1.0], "rephrase_acc": [1.0],
                                       "locality": {"nq_acc": 1.0}, "portability": {"one_hop_acc": [1.0]}}},
]


@pytest.mark.parametrize("metrics", [PYPI_STYLE, MAIN_STYLE], ids=["pypi", "main"])
def test_summary_reads_either_flavour(metrics):
    s = summarize_metrics(metrics)
    assert s["Rel"] == pytest.approx(100.0)
    assert s["Gen"] == pytest.approx(75.0)
    assert s["Loc"] == pytest.approx(75.0)  # per-edit means 0.5 and 1.0
    assert s["Por"] == pytest.approx(50.0)
    assert s["Score"] == pytest.approx(75.0)
    assert s["H"] == pytest.approx(4 / (1 / 100 + 1 / 75 + 1 / 75 + 1 / 50))


def test_unmeasured_metrics_are_none_and_excluded():
    s = summarize_metrics([{"post": {"rewrite_acc": [1.0]}}])
    assert s["Gen"] is None and s["Loc"] is None and s["Por"] is None
    assert s["Score"] == 100.0 and s["H"] == 100.0


def test_nan_values_are_ignored():
    s = summarize_metrics([{"post": {"rewrite_acc": [float("nan"), 1.0]}}])
    assert s["Rel"] == 100.0


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=8))
def test_score_and_h_bounds_order_invariance(values):
    h, sc = harmonic_mean(values), score(values)
    assert not math.isnan(h) and not math.isnan(sc)
    assert min(values) - 1e-9 <= h <= sc + 1e-9 <= max(values) + 2e-9
    assert harmonic_mean(list(reversed(values))) == pytest.approx(h)
    assert score(sorted(values)) == pytest.approx(sc)


def test_locality_from_answer_tokens_when_easyedit_left_no_acc():
    """PyPI ``batch_edit`` leaves locality as post/pre answer tokens: Loc is their agreement."""
    from instructedit_plugin.evaluation.summary import summarize_metrics

    records = [
        {"pre": {"rewrite_acc": [0.0], "locality": {"neighborhood_output": [[5, 6, 7, 8]]}},
         "post": {"rewrite_acc": [1.0], "locality": {"neighborhood_output": [[5, 6, 0, 8]]}}},
        {"pre": {"rewrite_acc": [0.0], "locality": {"neighborhood_output": [[1, 2]]}},
         "post": {"rewrite_acc": [1.0], "locality": {"neighborhood_output": [[1, 2]]}}},
    ]
    out = summarize_metrics(records)
    assert out["Loc"] == (75.0 + 100.0) / 2 and out["Rel"] == 100.0
    assert summarize_metrics(records, phase="pre")["Loc"] is None  # nothing to compare the unedited answers with
    # an explicit *_acc wins over the tokens
    records[0]["post"]["locality"]["neighborhood_acc"] = [0.0]
    assert summarize_metrics(records[:1])["Loc"] == 0.0
