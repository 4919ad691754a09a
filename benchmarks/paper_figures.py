"""The two papers' published figures, as data, for the benchmark renderers to quote beside ours.

Transcribed from the papers' texts in ``../shared/papers/`` (see its README):

* Han et al. 2024, *InstructEd: Soft-Instruction Tuning for Model Editing with Hops*
  (``instructed_han2024.txt``): Table 2 (LLaMA-1/2-7B, CounterFact and ZsRE one-hop portability),
  Table 3 (MQuAKE-T, LLaMA-2-7B), Table 4 (ablations), Table 5 (without instructions / without prefixes), Table 9
  (GPT2-XL), Table 11 (sequential editing of 100 edits).
* Tian et al. 2024, *InstructEdit: Instruction-Based Knowledge Editing for Large Language Models*
  (``instructedit_tian2024.txt``): Table 3 (multi-task and hold-out editing, GPT2-XL and LLaMA-2-7B)
  and Figure 3 (seen vs unseen instructions, GPT2-XL).

Every figure is in percent as printed in the paper. Each entry carries its citation (paper, table,
model); :func:`reference_rows` renders the entries that measure what one of our rows measures as
markdown table rows, so a results markdown can show the paper's figure under ours. The papers'
models (GPT2-XL, LLaMA-2-7B) are not ours (Gemma-3-270M on CPU): the rows are a reference for the
same protocol and metric, not a reproduction. Nothing here imports torch.
"""
from __future__ import annotations

from typing import Iterable, Mapping

HAN = "Han et al. 2024"
TIAN = "Tian et al. 2024"

#: InstructEd paper, one-hop editing: (table, model) -> dataset -> paper method -> Rel, Gen, Loc, Por_hop, Score, H.
INSTRUCTED_ONE_HOP: dict[tuple[str, str], dict[str, dict[str, tuple[float | None, ...]]]] = {
    ("Table 2", "LLaMA-2-7B"): {
        "counterfact": {
            "FT": (11.47, 14.11, 26.11, 45.83, 24.38, 18.33),
            "MEMIT": (99.52, 82.4, 94.76, 51.2, 81.97, 76.53),
            "PMET": (20.16, 17.10, 87.37, 12.53, 34.29, 20.06),
            "LoRA": (99.84, 60.84, 64.09, 52.10, 69.21, 65.30),
            "ROME": (15.68, 22.87, 97.61, 47.97, 46.03, 28.86),
            "SERAC": (98.53, 11.66, 100.0, 49.75, 64.99, 31.74),
            "RASE": (72.64, 71.30, 80.89, 5.81, 57.66, 18.84),
            "IKE": (99.63, 85.77, 49.64, 54.11, 72.29, 66.31),
            "InstructEd": (98.77, 98.32, 77.74, 65.85, 85.17, 82.74),
            "InstructEd + Retrieval": (98.07, 90.72, 94.38, 65.21, 87.09, 84.83),
        },
        "zsre": {
            "FT": (48.26, 48.54, 94.32, 51.64, 60.69, 56.11),
            "MEMIT": (66.13, 65.33, 99.56, 54.46, 71.37, 67.99),
            "PMET": (43.26, 41.92, 94.64, 55.94, 58.94, 53.04),
            "LoRA": (70.37, 67.15, 91.76, 54.51, 70.95, 68.56),
            "ROME": (64.13, 63.29, 99.54, 52.77, 69.93, 66.24),
            "SERAC": (96.57, 79.31, 100.0, 10.55, 71.61, 31.31),
            "IKE": (100.0, 99.71, 82.1, 65.52, 86.83, 84.26),
            "InstructEd": (98.70, 98.29, 75.57, 70.02, 85.65, 83.65),
            "InstructEd + Retrieval": (96.93, 84.48, 98.40, 67.38, 86.80, 84.82),
        },
    },
    ("Table 2", "LLaMA-1-7B"): {
        "counterfact": {
            "FT": (46.33, 75.88, 33.75, 47.01, 50.74, 46.69),
            "MEMIT": (99.6, 82.2, 94.42, 51.2, 81.86, 76.44),
            "ROME": (99.43, 79.08, 95.54, 51.45, 81.38, 76.04),
            "LoRA": (100.0, 55.30, 65.26, 48.68, 67.31, 62.55),
            "RASE": (93.40, 93.40, 80.89, 1.60, 67.32, 6.07),
            "IKE": (99.81, 82.38, 46.86, 49.82, 69.72, 62.92),
            "SERAC": (76.58, 26.20, 58.00, 18.00, 44.69, 32.25),
            "InstructEd": (98.01, 97.59, 76.46, 62.43, 83.62, 80.73),
            "InstructEd + Retrieval": (97.81, 88.91, 94.32, 61.60, 85.66, 82.80),
        },
        "zsre": {
            "FT": (59.38, 62.15, 97.18, 54.35, 68.27, 64.91),
            "MEMIT": (84.59, 80.48, 99.53, 52.59, 79.3, 75.03),
            "ROME": (83.88, 78.62, 99.5, 54.11, 79.03, 75.23),
            "LoRA": (66.01, 63.36, 96.5, 54.69, 70.14, 67.14),
            "IKE": (99.76, 99.62, 82.97, 64.76, 86.78, 84.11),
            "SERAC": (98.81, 80.75, 100.0, 11.11, 72.67, 32.65),
            "InstructEd": (98.16, 98.24, 80.73, 67.72, 86.21, 84.17),
            "InstructEd + Retrieval": (96.84, 83.30, 98.66, 64.92, 85.93, 83.56),
        },
    },
    ("Table 9", "GPT2-XL"): {
        "counterfact": {
            "FT": (97.38, 10.18, 81.38, 41.13, 57.52, 27.57),
            "MEMIT": (80.89, 46.17, 98.84, 43.02, 67.23, 59.36),
            "ROME": (99.71, 77.59, 86.91, 41.68, 76.47, 68.47),
            "LoRA": (100.0, 67.51, 44.03, 41.29, 63.20, 55.75),
            "IKE": (99.42, 68.77, 41.61, 42.86, 63.17, 55.58),
            "InstructEd": (100.0, 99.51, 61.16, 61.31, 80.49, 75.88),
            "InstructEd + Retrieval": (98.20, 91.35, 91.45, 60.68, 85.42, 82.40),
        },
        "zsre": {
            "FT": (56.0, 30.49, 85.31, 45.51, 54.33, 47.42),
            "MEMIT": (67.09, 52.82, 99.57, 47.96, 66.86, 61.79),
            "ROME": (99.92, 88.16, 94.91, 47.1, 82.52, 75.3),
            "LoRA": (52.53, 52.43, 96.77, 44.19, 61.48, 56.28),
            "IKE": (99.82, 95.52, 73.7, 53.26, 80.58, 75.71),
            "InstructEd": (97.88, 97.19, 45.10, 57.07, 74.31, 66.44),
            "InstructEd + Retrieval": (95.90, 78.37, 97.55, 54.44, 81.56, 77.21),
        },
    },
    # Table 5 (CounterFact, LLaMA-2-7B): "w/o Ins" = the unedited model, "w/ Ins" = the instruction without
    # prefixes (in-context); Rel, Gen, Loc, Hop; no Score / H printed.
    ("Table 5", "LLaMA-2-7B"): {
        "counterfact": {"w/o Ins": (11.71, 11.59, 100.0, 49.73, None, None),
                        "w/ Ins": (97.85, 69.96, 51.10, 55.02, None, None)},
    },
    ("Table 10", "LLaMA-2-13B"): {
        "counterfact": {"InstructEd": (99.85, 99.17, 82.88, 71.67, 88.39, 86.74)},
        "zsre": {"InstructEd": (97.83, 98.13, 73.47, 73.30, 85.68, 83.92)},
    },
}

#: InstructEd paper, Table 4 (ablations): (model, dataset) -> variant -> Rel, Gen, Loc, Por_hop, Score, H.
#: "w/o re-weight": attention not re-weighted; "w L:20-30": prefixes on layers 20-30; "w FFN": an FFN adapter instead.
INSTRUCTED_ABLATIONS: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("LLaMA-1-7B", "counterfact"): {
        "InstructEd": (98.01, 97.59, 76.46, 62.43, 83.62, 80.73), "w/o re-weight": (99.52, 100.0, 24.73, 74.62, 74.72, 54.14),
        "w L:20-30": (98.40, 89.19, 44.70, 50.76, 70.76, 63.05), "w FFN": (99.60, 98.74, 35.79, 69.82, 75.99, 64.07),
    },
    ("LLaMA-1-7B", "zsre"): {
        "InstructEd": (98.16, 98.24, 80.73, 67.72, 86.21, 84.17), "w/o re-weight": (99.38, 97.02, 61.80, 69.87, 82.02, 78.64),
        "w L:20-30": (98.97, 97.44, 33.15, 65.02, 73.64, 60.69), "w FFN": (99.73, 99.18, 56.64, 70.13, 81.42, 76.88),
    },
    ("LLaMA-2-7B", "counterfact"): {
        "InstructEd": (98.77, 98.32, 77.74, 65.85, 85.17, 82.74), "w/o re-weight": (95.34, 99.66, 35.26, 69.41, 74.92, 63.20),
        "w L:20-30": (98.04, 92.75, 55.09, 55.82, 75.42, 70.11), "w FFN": (98.26, 99.56, 34.16, 58.19, 72.54, 59.99),
    },
    ("LLaMA-2-7B", "zsre"): {
        "InstructEd": (98.70, 98.29, 75.57, 70.02, 85.65, 83.65), "w/o re-weight": (98.85, 97.65, 56.08, 70.19, 80.69, 76.28),
        "w L:20-30": (97.03, 95.44, 33.24, 66.16, 72.96, 60.62), "w FFN": (93.73, 93.28, 36.28, 46.65, 67.49, 56.83),
    },
}

#: InstructEd paper, Table 5 (CounterFact, LLaMA-2-7B): the model without any instruction ("w/o Ins",
#: the unedited model) and with the instruction but without prefixes ("w/ Ins", in-context).
#: Rel, Gen, Loc, Hop (one-hop Por), Multi-hop (Por_Nhop on MQuAKE-T), Hop-Acc.
INSTRUCTED_WITHOUT_PREFIXES: dict[str, tuple[float, ...]] = {
    "InstructEd": (98.07, 90.72, 94.38, 65.21, 80.62, 83.35),
    "w/o Ins": (11.71, 11.59, 100.0, 49.73, 49.81, 45.43),
    "w/ Ins": (97.85, 69.96, 51.10, 55.02, 73.84, 51.45),
}

#: InstructEd paper, Table 3 (MQuAKE-T, LLaMA-2-7B): method -> (Por_Nhop, Hop-Acc or None).
INSTRUCTED_MQUAKE_T: dict[str, tuple[float, float | None]] = {
    "FT": (47.32, None), "FT-CoT": (56.48, 33.89), "ROME-CoT": (28.96, None), "ROME": (24.89, 17.99),
    "MEMIT-CoT": (36.88, None), "MEMIT": (30.89, 23.98), "PokeMQA": (75.43, 60.44), "InstructEd": (80.62, 83.35),
}

#: InstructEd paper, Table 11: sequential editing of 100 edits, (dataset, model) -> method -> Rel, Gen, Loc, Por_hop, Score, H.
INSTRUCTED_SEQUENTIAL_100: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("counterfact", "LLaMA-1-7B"): {
        "MEMIT": (72.00, 53.33, 30.00, 22.83, 44.54, 36.44), "ROME": (99.50, 78.50, 90.50, 3.17, 67.92, 11.45),
        "SERAC": (92.00, 4.00, 100.0, 4.00, 50.00, 7.68), "InstructEd": (98.16, 100.0, 79.25, 67.72, 86.28, 84.08),
    },
    ("counterfact", "LLaMA-2-7B"): {
        "MEMIT": (6.25, 6.25, 14.75, 7.92, 8.79, 7.78), "ROME": (18.75, 21.92, 79.42, 16.42, 34.13, 23.20),
        "SERAC": (100.0, 11.17, 100.0, 12.33, 55.88, 20.98), "InstructEd": (99.00, 96.00, 73.50, 62.27, 82.69, 79.71),
    },
    ("zsre", "LLaMA-1-7B"): {
        "MEMIT": (34.19, 34.38, 5.34, 5.64, 19.89, 9.46), "ROME": (85.65, 82.16, 94.63, 53.97, 79.10, 75.55),
        "GRACE": (33.99, 33.66, 100.0, 51.13, 54.70, 45.10), "SERAC": (97.05, 81.07, 99.01, 8.92, 71.51, 27.62),
        "InstructEd": (97.97, 98.19, 74.48, 71.56, 85.55, 83.70),
    },
    ("zsre", "LLaMA-2-7B"): {
        "MEMIT": (54.89, 52.31, 36.94, 27.09, 42.81, 39.48), "ROME": (63.30, 61.62, 87.88, 51.01, 65.95, 63.48),
        "GRACE": (38.48, 37.27, 100.0, 58.29, 58.51, 50.02), "SERAC": (97.80, 78.21, 100.0, 10.51, 71.63, 31.21),
        "InstructEd": (98.36, 98.75, 81.28, 67.33, 86.43, 84.30),
    },
}

#: InstructEdit paper, Table 3: (setting, task, model) -> method -> Rel, Gen, Loc, Por (None: not reported).
#: Multi-task editing: editors trained on CounterFact + Recent + ConvSent; hold-out: tested on ZsRE.
INSTRUCTEDIT_TABLE3: dict[tuple[str, str, str], dict[str, tuple[float | None, ...]]] = {
    ("multi-task", "counterfact", "GPT2-XL"): {
        "Base": (0.00, 0.00, 100.0, 11.00), "FT-L": (0.40, 0.32, 43.73, 0.87), "CaliNet": (0.24, 0.12, 82.81, 3.64),
        "KE": (33.97, 8.70, 90.94, 27.41), "MEND": (74.26, 46.48, 58.68, 41.88), "GRACE": (96.31, 0.00, 99.99, 11.00),
        "InstructEdit": (80.81, 53.16, 67.83, 50.83),
    },
    ("multi-task", "counterfact", "LLaMA-2-7B"): {
        "Base": (0.00, 0.00, 100.0, 27.04), "FT-L": (0.00, 0.00, 70.66, 3.19), "CaliNet": (0.00, 0.00, 89.28, 26.93),
        "KE": (2.98, 0.00, 90.86, 33.43), "MEND": (84.15, 44.10, 91.18, 65.84), "GRACE": (54.35, 0.36, 99.75, 27.04),
        "InstructEdit": (84.39, 50.18, 88.04, 69.43),
    },
    ("multi-task", "recent", "GPT2-XL"): {
        "Base": (2.61, 1.58, 100.0, 17.19), "FT-L": (6.48, 2.21, 26.58, 16.78), "CaliNet": (11.53, 5.37, 83.87, 10.31),
        "KE": (49.37, 10.98, 87.12, 30.41), "MEND": (85.62, 52.76, 57.94, 42.26), "GRACE": (99.68, 1.58, 100.0, 17.73),
        "InstructEdit": (85.70, 51.66, 64.61, 47.36),
    },
    ("multi-task", "recent", "LLaMA-2-7B"): {
        "Base": (9.87, 7.27, 100.0, 43.52), "FT-L": (6.16, 3.87, 70.66, 3.15), "CaliNet": (9.79, 6.64, 89.28, 43.26),
        "KE": (15.88, 0.08, 88.88, 43.52), "MEND": (82.31, 54.66, 78.57, 60.84), "GRACE": (83.72, 7.35, 99.98, 44.13),
        "InstructEdit": (83.73, 55.92, 87.04, 62.39),
    },
    # ConvSent (GPT2-XL only): Rel, Loc and Fluency (not Gen / Por); stored as (Rel, None, Loc, None).
    ("multi-task", "convsent", "GPT2-XL"): {
        "Base": (40.74, None, 100.0, None), "FT-L": (7.48, None, 42.86, None), "CaliNet": (37.47, None, 87.47, None),
        "KE": (53.07, None, 94.58, None), "MEND": (54.67, None, 96.58, None), "GRACE": (40.74, None, 100.0, None),
        "InstructEdit": (65.43, None, 94.27, None),
    },
    ("hold-out", "zsre", "GPT2-XL"): {
        "Base": (0.00, 0.00, 100.0, 47.07), "FT-L": (0.11, 0.08, 74.06, 0.96), "CaliNet": (0.00, 0.10, 95.66, 0.39),
        "KE": (13.50, 10.13, 82.59, 43.90), "MEND": (40.79, 31.15, 94.79, 45.08), "GRACE": (0.00, 0.00, 100.0, 47.07),
        "InstructEdit": (82.83, 78.40, 94.57, 40.84),
    },
    ("hold-out", "zsre", "LLaMA-2-7B"): {
        "Base": (0.00, 0.00, 100.0, 56.66), "FT-L": (2.23, 1.93, 98.89, 0.54), "CaliNet": (0.00, 0.00, 99.66, 0.87),
        "KE": (2.70, 0.19, 95.15, 48.02), "MEND": (76.95, 67.89, 90.14, 58.63), "GRACE": (0.00, 0.00, 100.0, 56.66),
        "InstructEdit": (76.57, 70.11, 94.16, 58.19),
    },
}

#: InstructEdit paper, Table 3, ConvSent fluency (GPT2-XL): method -> Fluency.
INSTRUCTEDIT_CONVSENT_FLUENCY: dict[str, float] = {
    "Base": 613.13, "FT-L": 548.55, "CaliNet": 396.43, "KE": 615.61, "MEND": 601.93, "GRACE": 414.03, "InstructEdit": 617.65,
}

#: InstructEdit paper, Figure 3 (GPT2-XL; read from the figure's bar labels): task -> {seen, unseen} -> Rel, Gen, Loc, Por.
INSTRUCTEDIT_UNSEEN: dict[str, dict[str, tuple[float, ...]]] = {
    "recent": {"seen": (85.7, 51.6, 64.6, 47.3), "unseen": (84.7, 47.4, 64.9, 47.0)},
    "counterfact": {"seen": (80.8, 53.2, 67.8, 50.8), "unseen": (80.4, 49.9, 68.2, 51.0)},
}


def _cell(value: float | None) -> str:
    """A paper figure at the precision the paper prints it."""
    if value is None:
        return "–"
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


def reference_rows(dataset: str, paper_method: str,
                   sources: Iterable[tuple[str, str]] = (("Table 2", "LLaMA-2-7B"), ("Table 9", "GPT2-XL"),
                                                         ("Table 5", "LLaMA-2-7B")),
                   extra_cells: int = 0) -> list[str]:
    """Markdown rows ``| paper: <method> (<table>, <model>) | ... |`` for one method of the InstructEd paper.

    One row per ``(table, model)`` of ``sources`` that reports ``paper_method`` on ``dataset``, with
    its Rel, Gen, Loc, Por_hop, Score, H (``–`` where the table gives none); ``extra_cells`` empty
    cells go between the method cell and the figures (e.g. our ``n`` column).
    """
    rows = []
    for table, model in sources:
        figures = INSTRUCTED_ONE_HOP.get((table, model), {}).get(dataset, {}).get(paper_method)
        if figures is not None:
            rows.append(f"| *paper: {paper_method} ({table}, {model})* | " + "– | " * extra_cells
                        + " | ".join(_cell(v) for v in figures) + " |")
    return rows


#: Our one-hop method names (instructed_cpu, memory_editors) -> the InstructEd paper's name for the same method.
PAPER_NAMES = {
    "unedited": "w/o Ins", "in_context": "w/ Ins", "instructed_gold": "InstructEd",
    "instructed_retrieval": "InstructEd + Retrieval", "ft": "FT", "rome": "ROME", "ike": "IKE",
}

#: How the results markdowns introduce the paper rows.
REFERENCE_NOTE = (f"Rows in *italics* quote {HAN} (the table and the paper's model are named in each row) for the same "
                  "method, data files and columns; the paper's models are 7B / 1.5B, ours is Gemma-3-270M on CPU, so they are "
                  "a reference, not a reproduction. Table 5 gives no Score or H.")


#: Our InstructEdit benchmark's task / method names -> the InstructEdit paper's. ConvSent is left out: the
#: paper's ConvSent Reliability is a sentiment score, our ConvSent Rel a token accuracy (not the same measure).
INSTRUCTEDIT_TASKS = {"counterfact": ("multi-task", "counterfact"), "recent": ("multi-task", "recent"),
                      "zsre_holdout": ("hold-out", "zsre")}
INSTRUCTEDIT_METHODS = {"instructedit": "InstructEdit", "mend_multitask": "MEND"}


def instructedit_rows(task: str, method: str, unseen: bool = False) -> list[str]:
    """Markdown rows ``| <task> | *paper: ...* | Rel | Gen | Loc | Por | – | – |`` quoting the InstructEdit paper.

    Seen instructions: Table 3 (GPT2-XL and LLaMA-2-7B) for our ``instructedit`` and
    ``mend_multitask`` (the paper's MEND is trained on the same task mix); ``unseen``: Figure 3
    (GPT2-XL, CounterFact and Recent only).
    """
    theirs = INSTRUCTEDIT_METHODS.get(method)
    if theirs is None or task not in INSTRUCTEDIT_TASKS:
        return []
    if unseen:
        figures = INSTRUCTEDIT_UNSEEN.get(task, {}).get("unseen") if theirs == "InstructEdit" else None
        return [] if figures is None else [
            f"| {task} | *paper: InstructEdit, unseen (Figure 3, GPT2-XL)* | " + " | ".join(_cell(v) for v in figures) + " | – | – |"]
    setting, paper_task = INSTRUCTEDIT_TASKS[task]
    rows = []
    for model in ("GPT2-XL", "LLaMA-2-7B"):
        figures = INSTRUCTEDIT_TABLE3.get((setting, paper_task, model), {}).get(theirs)
        if figures is not None:
            rows.append(f"| {task} | *paper: {theirs} (Table 3, {model})* | " + " | ".join(_cell(v) for v in figures) + " | – | – |")
    return rows


INSTRUCTEDIT_NOTE = (f"Rows in *italics* quote {TIAN} (Table 3; unseen: Figure 3) for the same method and task, on the "
                     "paper's models (GPT2-XL, LLaMA-2-7B) and its full test sets; ours is Gemma-3-270M on CPU with a short "
                     "training budget, so they are a reference, not a reproduction. The paper prints no Score; its ConvSent "
                     "Reliability is a sentiment score, not our token-accuracy Rel, so ConvSent is not quoted.")


#: Our MQuAKE method names -> (the InstructEd paper's row, table) for Por_Nhop / Hop-Acc on MQuAKE-T, LLaMA-2-7B.
MQUAKE_NAMES = {"instructed": ("InstructEd", "Table 3"), "in_context": ("w/ Ins", "Table 5"),
                "unedited": ("w/o Ins", "Table 5")}


def mquake_rows(method: str) -> list[str]:
    """A markdown row quoting the InstructEd paper's Por_Nhop and Hop-Acc (MQuAKE-T, LLaMA-2-7B) for ``method``.

    The row fits ``examples/run_mquake.py``'s table: setting, method, Por_Nhop, then the release's Por_Nhop and
    the case rule (not reported by the paper), Hop-Acc, then four columns the paper does not report.
    """
    if method not in MQUAKE_NAMES:
        return []
    theirs, table = MQUAKE_NAMES[method]
    if table == "Table 3":
        por, hop_acc = INSTRUCTED_MQUAKE_T[theirs]
    else:
        por, hop_acc = INSTRUCTED_WITHOUT_PREFIXES[theirs][4:6]
    return [f"| *paper ({table}, MQuAKE-T, LLaMA-2-7B)* | *{theirs}* | {_cell(por)} | – | – | {_cell(hop_acc)} "
            "| – | – | – | – |"]


MQUAKE_NOTE = (f"Rows in *italics* quote {HAN} on MQuAKE-T with LLaMA-2-7B (Table 3; the rows without prefixes and "
               "without instructions from Table 5): the same metrics on another MQuAKE split and model, a reference only.")
