"""The one 95% bootstrap definition of the benchmarks (``benchmarks/results_io.py``) and the intervals
``benchmarks/instructedit_cpu.py`` builds from its per-edit values. Nothing here loads a model."""
from __future__ import annotations

import math
import statistics

import pytest

from benchmarks.results_io import bootstrap_ci, bootstrap_resamples, figures_with_ci, mean_with_ci

from ._scripts import load_script


def _ie_cpu():
    return load_script("benchmarks/instructedit_cpu.py", "benchmark_script_instructedit_cpu")


def test_known_cases():
    # two records 0 and 1: the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are the extremes
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0) == (0.0, 1.0)
    # 30 successes in 100: close to the normal approximation 0.3 +- 1.96 * sqrt(0.21 / 100)
    lo, hi = bootstrap_ci([1.0] * 30 + [0.0] * 70, n_boot=4000, seed=1)
    half = 1.96 * math.sqrt(0.21 / 100)
    assert lo == pytest.approx(0.3 - half, abs=0.01) and hi == pytest.approx(0.3 + half, abs=0.01)
    # records that agree: no spread, for the mean and any statistic
    assert bootstrap_ci([0.7] * 5) == (0.7, 0.7)
    assert bootstrap_ci([3.0], statistic=statistics.median) == (3.0, 3.0)
    assert mean_with_ci([1.0, 0.0, 1.0, 1.0], n_boot=500, scale=100.0, digits=1)[0] == 75.0


def test_seeded_and_one_definition_for_every_helper():
    values = [0.1, 0.9, 0.4, 0.4, 1.0, 0.0, 0.3]
    first = bootstrap_ci(values, n_boot=300, seed=5)
    assert first == bootstrap_ci(values, n_boot=300, seed=5)  # the same seed, the same interval
    assert first != bootstrap_ci(values, n_boot=300, seed=6)
    assert (bootstrap_resamples(7, 300, 5) == bootstrap_resamples(7, 300, 5)).all()
    # figures_with_ci on the mean is bootstrap_ci (same resamples, same percentiles)
    figs = figures_with_ci(values, lambda rows: {"mean": math.fsum(rows) / len(rows)}, n_boot=300, seed=5)
    assert figs["mean"][1:] == pytest.approx(list(first), abs=1e-12)
    assert mean_with_ci(values, n_boot=300, seed=5)[1:] == pytest.approx(list(first), abs=1e-12)
    # a statistic: the median's interval holds the median
    lo, hi = bootstrap_ci(values, n_boot=300, seed=5, statistic=statistics.median)
    assert lo <= statistics.median(values) <= hi


def test_intervals_widen_when_records_disagree_and_narrow_with_more_records():
    agree = bootstrap_ci([0.5] * 20, n_boot=500)
    mild = bootstrap_ci([0.4, 0.6] * 10, n_boot=500)
    wild = bootstrap_ci([0.0, 1.0] * 10, n_boot=500)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(agree) == 0.0 < width(mild) < width(wild)
    assert width(bootstrap_ci([0.0, 1.0] * 100, n_boot=500)) < width(wild)


@pytest.mark.parametrize("bad, kwargs, field", [
    ([], {}, "values"),
    ([1.0, None], {}, "values[1]"),
    ([1.0, float("nan")], {}, "values[1]"),
    ([1.0, "x"], {}, "values[1]"),
    ([1.0, 2.0], {"n_boot": 0}, "n_boot"),
    ([1.0, 2.0], {"n_boot": 2.5}, "n_boot"),
])
def test_bad_input_names_the_field_and_a_fix(bad, kwargs, field):
    with pytest.raises(ValueError) as err:
        bootstrap_ci(bad, **kwargs)
    assert field in str(err.value) and "Fix:" in str(err.value)


def test_figures_with_ci_keeps_unmeasured_figures_none():
    rows = [{"Rel": 1.0, "Por": None}, {"Rel": 0.0, "Por": None}]
    out = figures_with_ci(rows, lambda rs: {"Rel": sum(r["Rel"] for r in rs) / len(rs), "Por": None}, n_boot=200)
    assert out["Por"] is None and out["Rel"][0] == 0.5 and out["Rel"][1] <= 0.5 <= out["Rel"][2]
    with pytest.raises(ValueError, match="Fix:"):
        figures_with_ci([], lambda rs: {}, n_boot=10)


# ------------------------------------------------------------------ instructedit_cpu's cells
def test_instructedit_cells_come_from_the_per_edit_values():
    bench = _ie_cpu()
    cols = {"Rel": [100.0, 0.0, 100.0, 100.0], "Gen": [50.0] * 4, "Loc": [100.0, 80.0, None, 60.0], "Por": [None] * 4}
    cell = bench.cell_from_columns(cols, n_boot=500, seed=0)
    assert cell["n"] == 4 and cell["Rel"] == 75.0 and cell["Loc"] == 80.0 and cell["Por"] is None
    assert cell["Score"] == round((75.0 + 50.0 + 80.0) / 3, 2)  # Por not measured: left out
    assert cell["ci"]["Gen"] == [50.0, 50.0]  # the records agree: no spread
    for m in ("Rel", "Loc", "Score"):
        lo, hi = cell["ci"][m]
        assert lo <= cell[m] <= hi and lo < hi, m
    assert "Por" not in cell["ci"]
    assert cell == bench.cell_from_columns(cols, n_boot=500, seed=0)  # recomputable from the JSON's values
    # ConvSent: each sentiment figure with its interval; flipped / success in percent
    cols["sentiment"] = {k: [None] * 4 for k in bench.SENTIMENT_FIGURES}
    cols["sentiment"].update(success_pre=[0.0, 0.0, 100.0, 0.0], success_post=[100.0, 0.0, 100.0, 100.0],
                             flipped=[100.0, 0.0, 0.0, 100.0], fluency_post=[5.0, 5.5, 6.0, 5.0],
                             margin_pre=[-1.0, -0.5, 0.2, -0.1], margin_post=[1.0, -0.2, 0.5, 0.3])
    sent = bench.cell_from_columns(cols, n_boot=500, seed=0)["sentiment"]
    assert sent["n_edits"] == 4 and sent["flipped"] == 50.0 and sent["success_post"] == 75.0 and sent["es"] is None
    for k in ("flipped", "success_post", "fluency_post", "margin_post"):
        lo, hi = sent["ci"][k]
        assert lo <= sent[k] <= hi and lo < hi, k


def test_instructedit_latency_ratio_resamples_edits_in_pairs():
    bench = _ie_cpu()
    latency, ratio = bench.latency_figures({"instructedit": [11.0, 12.0, 13.0, 30.0], "mend_multitask": [10.0] * 4},
                                           n_boot=400, seed=0)
    assert latency["mend_multitask"] == {"edit_ms": 10.0, "ci": {"edit_ms": [10.0, 10.0]}, "n": 4}
    lo, hi = latency["instructedit"]["ci"]["edit_ms"]
    assert lo <= latency["instructedit"]["edit_ms"] == 12.5 <= hi
    r, rlo, rhi = ratio["instructedit/mend_multitask"]
    assert r == 1.25 and rlo <= r <= rhi and rlo < rhi


def test_instructedit_render_reads_old_and_new_results():
    bench = _ie_cpu()
    new_cell = bench.cell_from_columns({"Rel": [100.0, 0.0], "Gen": [100.0, 100.0], "Loc": [None, None],
                                        "Por": [None, None]}, n_boot=200, seed=0)
    assert bench._with_ci(new_cell, "Rel") == f"50.00 [{new_cell['ci']['Rel'][0]:.2f}, {new_cell['ci']['Rel'][1]:.2f}]"
    assert bench._with_ci({"Rel": 50.0}, "Rel") == "50.00"  # results written before the intervals
    assert bench._with_ci(new_cell, "Loc") == "–"


# ------------------------------------------------------------------ examples/run_mquake.py's release interval
def test_mquake_release_interval_is_the_one_bootstrap_definition_in_percent():
    run = load_script("examples/run_mquake.py", "example_script_run_mquake")
    values = [0.0, 1 / 3, 1.0, 0.5, 0.0, 1.0, 2 / 3] * 4  # per-case token accuracies
    low, high = bootstrap_ci(values, n_boot=run.BOOTSTRAP_RESAMPLES, seed=0)
    interval = run.bootstrap_interval(values)
    assert interval == [round(100 * low, 1), round(100 * high, 1)]
    assert interval[0] < 100 * math.fsum(values) / len(values) < interval[1]
    assert run.bootstrap_interval([0.0, 1.0], resamples=4000) == [0.0, 100.0]  # resampled means 0, 0.5, 1
    assert run.bootstrap_interval([0.25] * 5) == [25.0, 25.0] and run.bootstrap_interval([]) is None
