"""The papers' figures quoted by the benchmarks (``benchmarks/paper_figures.py``) are transcribed faithfully.

The InstructEd paper prints Score (the mean) and H (the harmonic mean) beside Rel, Gen, Loc and
Por_hop in every one-hop table, so each transcribed row checks itself: a mistyped digit in any of the
six figures breaks the identity. The markdown rows quote the tables' figures at the paper's precision.
"""
from __future__ import annotations

from statistics import harmonic_mean, mean

import pytest

from ._scripts import load_script

FIGURES = load_script("benchmarks/paper_figures.py", "benchmark_paper_figures")


def _six_figure_rows():
    for (table, model), per_dataset in FIGURES.INSTRUCTED_ONE_HOP.items():
        for dataset, rows in per_dataset.items():
            for method, row in rows.items():
                yield f"{table} {model} {dataset} {method}", row
    for (dataset, model), rows in FIGURES.INSTRUCTED_SEQUENTIAL_100.items():
        for method, row in rows.items():
            yield f"Table 11 {model} {dataset} {method}", row
    for (model, dataset), rows in FIGURES.INSTRUCTED_ABLATIONS.items():
        for method, row in rows.items():
            yield f"Table 4 {model} {dataset} {method}", row


@pytest.mark.parametrize("name,row", list(_six_figure_rows()), ids=lambda v: v if isinstance(v, str) else "")
def test_score_and_h_agree_with_the_four_metrics(name, row):
    if row[4] is None:  # Table 5 prints no Score / H
        pytest.skip(f"{name}: no Score / H in the paper")
    rel_gen_loc_por = row[:4]
    assert mean(rel_gen_loc_por) == pytest.approx(row[4], abs=0.02), name
    assert harmonic_mean(rel_gen_loc_por) == pytest.approx(row[5], abs=0.02), name


def test_reference_rows_quote_the_table_for_our_method():
    rows = FIGURES.reference_rows("zsre", FIGURES.PAPER_NAMES["instructed_retrieval"], extra_cells=1)
    assert rows == [
        "| *paper: InstructEd + Retrieval (Table 2, LLaMA-2-7B)* | – | 96.93 | 84.48 | 98.4 | 67.38 | 86.8 | 84.82 |",
        "| *paper: InstructEd + Retrieval (Table 9, GPT2-XL)* | – | 95.9 | 78.37 | 97.55 | 54.44 | 81.56 | 77.21 |",
    ]
    assert FIGURES.reference_rows("zsre", "no such method") == []
    # ConvSent's paper Reliability is a sentiment score: never quoted beside our token-accuracy Rel
    assert FIGURES.instructedit_rows("convsent", "instructedit") == []
