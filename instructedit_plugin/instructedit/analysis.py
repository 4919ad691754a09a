"""Editing-gradient analysis: do instructions steer the editor into task-specific directions?

For every edit the editor turns the gradient factors ``(u, delta)`` of each
edited layer into ``(u~, delta~)``; the update direction is ``∇~ = delta~ u~^T``
(summed over tokens). :func:`collect_edit_gradients` records that matrix per
chosen layer, flattened and L2-normalised per layer, for edits with and without
the task instruction. :func:`analyze_gradient_vectors` then

* measures separation per task pair: mean cosine similarity within each task
  (intra) vs between the two tasks (inter), and ``separation = mean intra - inter``;
* projects the directions to 2-D with PCA and t-SNE (scikit-learn) and computes
  the silhouette score of the task labels in each projection (and in the full
  space, cosine distance);
* does all of that separately for edits with and without instruction, and
  writes a PNG (matplotlib, Agg backend: projections coloured by task, marker by
  instruction; and coloured by with/without instruction) and a JSON file.

Large layers are sketched before analysis (``project_dim``): the update of an
``out x in`` weight is mapped to ``R1 ∇~ R2^T`` with fixed Gaussian ``R1``
(k x out) and ``R2`` (k x in), ``k = sqrt(project_dim)``, a Kronecker-structured
random projection that approximately preserves inner products, computed from
the matrix without materialising a huge projection.

CLI: :func:`add_analyze_arguments` and :func:`run_analyze` (``instructedit analyze``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.durable import atomic_write_file, atomic_write_text
from ..instructions import InstructionLibrary, default_library
from .instructedit_main import LoadedEditor, load_editor_for
from .dataset import encode_pairs
from .editable import compute_edited_weights
from .evaluate import edit_prompt, family_for

LOG = logging.getLogger(__name__)

__all__ = [
    "add_analyze_arguments", "analyze_edit_gradients", "analyze_gradient_vectors", "collect_edit_gradients",
    "gradient_separation", "run_analyze",
]


# --------------------------------------------------------------------- collecting
class _Sketch:
    """Fixed Kronecker Gaussian sketch per weight shape (seeded)."""

    def __init__(self, project_dim: int | None, seed: int = 0):
        self.project_dim = project_dim
        self.seed = seed
        self._mats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().float().cpu()
        if self.project_dim is None or g.numel() <= self.project_dim:
            return g.flatten()
        k = max(2, math.isqrt(self.project_dim))
        key = tuple(g.shape)
        if key not in self._mats:
            gen = torch.Generator().manual_seed(self.seed + 7919 * key[0] + key[1])
            self._mats[key] = (torch.randn(min(k, key[0]), key[0], generator=gen) / math.sqrt(k),
                               torch.randn(min(k, key[1]), key[1], generator=gen) / math.sqrt(k))
        r1, r2 = self._mats[key]
        return (r1 @ g @ r2.T).flatten()


def _normalise(v: torch.Tensor) -> np.ndarray:
    n = float(v.norm())
    return (v / n).numpy() if n > 0 else v.numpy()


def collect_edit_gradients(
    model: nn.Module,
    tok: Any,
    editor: LoadedEditor,
    tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    layers: Sequence[str] | None = None,
    n_per_task: int = 20,
    modes: Sequence[str] = ("seen", "none"),
    project_dim: int | None = 4096,
    max_length: int = 96,
    library: InstructionLibrary | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One entry per edit and mode: ``{"task", "index", "instructed", "mode", "layers": {name: unit vector}}``.

    ``modes``: ``"seen"`` (a training description), ``"unseen"`` (the held-back one)
    and/or ``"none"`` (no instruction). ``layers``: edited weight names (default: all).
    """
    library = library or default_library()
    names = list(layers) if layers else [s.name for s in editor.specs]
    unknown = sorted(set(names) - {s.name for s in editor.specs})
    if unknown:
        raise ValueError(f"layers {unknown} are not edited by this editor; edited: {[s.name for s in editor.specs]}")
    sketch = _Sketch(project_dim, seed)
    device = next(model.parameters()).device
    out = []
    model.eval()
    for task, requests in tasks.items():
        for i, request in enumerate(list(requests)[:n_per_task]):
            request = dict(request, task=family_for(task))
            for mode in modes:
                prompt = edit_prompt(request, task, mode, i, library, seed)
                batch = encode_pairs(tok, [(prompt, request["target_new"])], max_length)
                batch = {k: v.to(device) for k, v in batch.items()}
                captured: dict[str, torch.Tensor] = {}
                compute_edited_weights(model, editor.hypernet, editor.edit_lrs, editor.specs, batch,
                                       sparse_logits=True, capture=captured)
                out.append({"task": task, "index": i, "mode": mode, "instructed": mode != "none",
                            "layers": {n: _normalise(sketch(captured[n])) for n in names}})
    return out


# ----------------------------------------------------------------------- analysis
def _cos_matrix(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    y = x / np.where(norms > 0, norms, 1.0)
    return y @ y.T


def _silhouette(x: np.ndarray, labels: Sequence[str], metric: str = "euclidean") -> float | None:
    from sklearn.metrics import silhouette_score

    if len(set(labels)) < 2 or len(labels) <= len(set(labels)):
        return None
    return float(silhouette_score(x, list(labels), metric=metric))


def gradient_separation(vectors: np.ndarray, tasks: Sequence[str]) -> dict[str, Any]:
    """Intra- vs inter-task cosine similarity per task pair, and the full-space silhouette (cosine)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    tasks = list(tasks)
    cos = _cos_matrix(vectors)
    names = sorted(set(tasks))
    idx = {t: [i for i, x in enumerate(tasks) if x == t] for t in names}

    def intra(t: str) -> float | None:
        ii = idx[t]
        if len(ii) < 2:
            return None
        block = cos[np.ix_(ii, ii)]
        return float((block.sum() - np.trace(block)) / (len(ii) * (len(ii) - 1)))

    intra_cos = {t: intra(t) for t in names}
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        inter = float(cos[np.ix_(idx[a], idx[b])].mean())
        within = [v for v in (intra_cos[a], intra_cos[b]) if v is not None]
        mean_intra = sum(within) / len(within) if within else None
        pairs[f"{a}|{b}"] = {"intra_cosine": mean_intra, "inter_cosine": inter,
                             "separation": None if mean_intra is None else mean_intra - inter}
    return {"intra_cosine": intra_cos, "pairs": pairs, "silhouette_cosine": _silhouette(vectors, tasks, "cosine")}


def _project(vectors: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = vectors.shape[0]
    out = {"pca": PCA(n_components=2, random_state=seed).fit_transform(vectors)}
    if n >= 4:
        perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
        out["tsne"] = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
    return out


def analyze_gradient_vectors(
    vectors: np.ndarray,
    tasks: Sequence[str],
    instructed: Sequence[bool],
    out_dir: str | Path,
    *,
    name: str = "edit_gradients",
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Separation figures, PCA/t-SNE projections, ``<name>.png`` and ``<name>.json`` in ``out_dir``.

    ``vectors`` (n, d): one normalised direction per edit. Statistics are
    computed for all edits and separately per instruction group
    (``with_instruction`` / ``without_instruction``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or not np.isfinite(vectors).all() or not np.abs(vectors).sum(axis=1).any():
        # all-zero or non-finite directions (an editor whose output is zero, a broken checkpoint) make the
        # projections meaningless, and scikit-learn's Barnes-Hut t-SNE crashes the process on them
        from ..errors import PluginError

        problem = "not finite" if vectors.ndim == 2 and not np.isfinite(vectors).all() else "all zero"
        raise PluginError(f"the editing-gradient directions of {len(vectors)} edits are {problem}, so there is nothing "
                          "to project. Fix: check the editor (archive): an untrained or broken editor makes no edit")
    tasks = list(tasks)
    instructed = [bool(x) for x in instructed]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {"all": list(range(len(tasks))),
              "with_instruction": [i for i, f in enumerate(instructed) if f],
              "without_instruction": [i for i, f in enumerate(instructed) if not f]}
    report: dict[str, Any] = {"n_edits": len(tasks), "tasks": sorted(set(tasks)), "dim": int(vectors.shape[1]),
                              "groups": {}, **dict(meta or {})}
    projections: dict[str, dict[str, np.ndarray]] = {}
    for group, ii in groups.items():
        if len(ii) < 3:
            continue
        sub, sub_tasks = vectors[ii], [tasks[i] for i in ii]
        stats = gradient_separation(sub, sub_tasks)
        proj = _project(sub, seed)
        projections[group] = proj
        stats["silhouette"] = {k: _silhouette(v, sub_tasks) for k, v in proj.items()}
        stats["n_edits"] = len(ii)
        report["groups"][group] = stats

    # figure: rows = projections, columns = (all edits coloured by task, marker = instruction),
    # (all edits coloured by instruction), then per instruction group coloured by task
    task_names = sorted(set(tasks))
    cmap = plt.get_cmap("tab10")
    colour = {t: cmap(i % 10) for i, t in enumerate(task_names)}
    kinds = [k for k in ("pca", "tsne") if k in projections.get("all", {})]
    cols = [("all", "task"), ("all", "instruction")] + [(g, "task") for g in ("with_instruction", "without_instruction")
                                                       if g in projections and any(instructed) and not all(instructed)]
    fig, axes = plt.subplots(len(kinds) or 1, len(cols), figsize=(4.2 * len(cols), 3.8 * max(len(kinds), 1)), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, (group, colour_by) in enumerate(cols):
            ax = axes[r][c]
            pts = projections[group][kind]
            ii = groups[group]
            for j, i in enumerate(ii):
                if colour_by == "task":
                    ax.scatter(pts[j, 0], pts[j, 1], s=18, color=colour[tasks[i]], marker="o" if instructed[i] else "x")
                else:
                    ax.scatter(pts[j, 0], pts[j, 1], s=18, color="black" if instructed[i] else "darkgray",
                               marker="o" if instructed[i] else "x")
            sil = report["groups"][group]["silhouette"].get(kind)
            ax.set_title(f"{kind.upper()} · {group.replace('_', ' ')} · by {colour_by}"
                         + (f"\nsilhouette(task) = {sil:.2f}" if sil is not None else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], color=colour[t], marker="o", linestyle="", label=t) for t in task_names]
    handles += [plt.Line2D([], [], color="black", marker="o", linestyle="", label="with instruction"),
                plt.Line2D([], [], color="darkgray", marker="x", linestyle="", label="without instruction")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    png = out_dir / f"{name}.png"
    atomic_write_file(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    report["png"] = str(png)
    json_path = out_dir / f"{name}.json"
    report["json"] = str(json_path)
    atomic_write_text(json_path, json.dumps(report, indent=2, default=float) + "\n")
    return report


def analyze_edit_gradients(
    model: nn.Module,
    tok: Any,
    editor: LoadedEditor | str | Path,
    tasks: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    layers: Sequence[str] | None = None,
    n_per_task: int = 20,
    with_and_without: bool = True,
    project_dim: int | None = 4096,
    seed: int = 0,
    name: str = "edit_gradients",
) -> dict[str, Any]:
    """Collect normalised editing-gradient directions and analyse them (see the module docstring).

    Per edit, the chosen layers' unit vectors are concatenated and divided by
    sqrt(#layers) (each layer weighs the same); the JSON also holds per-layer
    separation figures under ``per_layer``.
    """
    if not isinstance(editor, LoadedEditor):
        editor = load_editor_for(model, editor)
    modes = ("seen", "none") if with_and_without else ("seen",)
    entries = collect_edit_gradients(model, tok, editor, tasks, layers=layers, n_per_task=n_per_task, modes=modes,
                                     project_dim=project_dim, seed=seed)
    names = list(entries[0]["layers"]) if entries else []
    vectors = np.stack([np.concatenate([e["layers"][n] for n in names]) / math.sqrt(len(names)) for e in entries])
    task_labels = [e["task"] for e in entries]
    instructed = [e["instructed"] for e in entries]
    per_layer = {}
    for n in names:
        layer_vecs = np.stack([e["layers"][n] for e in entries])
        per_layer[n] = {g: gradient_separation(layer_vecs[ii], [task_labels[i] for i in ii])
                        for g, ii in (("with_instruction", [i for i, f in enumerate(instructed) if f]),
                                      ("without_instruction", [i for i, f in enumerate(instructed) if not f]))
                        if len(ii) >= 2}
    meta = {"layers": names, "project_dim": project_dim, "n_per_task": n_per_task, "per_layer": per_layer,
            "editor": str(editor.path)}
    return analyze_gradient_vectors(vectors, task_labels, instructed, out_dir, name=name, seed=seed, meta=meta)


# ---------------------------------------------------------------------------- CLI
DEFAULT_FILES = {
    "counterfact": "counterfact/test_cf-generate-10.jsonl",
    "recent": "recent/recent_train.json",
    "convsent": "convsent/blender_test.json",
    "zsre_holdout": "zsre/zsre_mend_eval_portability_gpt4.json",
}


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``instructedit analyze``."""
    parser.add_argument("--archive", required=True, help="trained editor checkpoint (folder or editor.safetensors)")
    parser.add_argument("--model", default="embedded",
                        help="local Hugging Face folder of the base model, or 'embedded' (Gemma-3-270M)")
    parser.add_argument("--data_dir", default=None, help="dataset folder (default: $INSTRUCTEDIT_DATA_DIR)")
    parser.add_argument("--tasks", default="counterfact,recent,convsent,zsre_holdout",
                        help="comma-separated tasks; task=path.json to choose the file (relative to --data_dir)")
    parser.add_argument("--n_per_task", type=int, default=20)
    parser.add_argument("--layers", default=None, help="comma-separated edited weight names (default: all edited)")
    parser.add_argument("--project_dim", type=int, default=4096, help="sketch size per layer (0: exact, large)")
    parser.add_argument("--no_without", action="store_true", help="only edits with instruction")
    parser.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
    parser.add_argument("--out_dir", default="results/analysis")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    """Handler of ``instructedit analyze``; prints the separation summary, returns an exit code."""
    from ..data import resolve_data_dir
    from ..data.preflight import check_data_files
    from ..models.loading import load_causal_lm
    from .checkpoint import resolve_archive

    # every file first (data and the editor checkpoint): a missing one fails before a model loads
    data_dir = resolve_data_dir(args.data_dir)
    files = {}
    for item in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task, _, path = item.partition("=")
        path = path or DEFAULT_FILES.get(task)
        if not path:
            LOG.error("no default file for task %r; give task=path", task)
            return 2
        files[task] = data_dir / path
    checked = check_data_files({f"--tasks {task}": path for task, path in files.items()}, limit=args.n_per_task)
    tasks = {task: checked[f"--tasks {task}"].records for task in files}
    resolve_archive(args.archive)
    if args.model == "embedded":
        from ..models.embedded import embedded_model_dir

        model_dir = embedded_model_dir()
    else:
        model_dir = Path(args.model)
    model, tok = load_causal_lm(model_dir, dtype=args.dtype)
    layers = [x.strip() for x in args.layers.split(",")] if args.layers else None
    report = analyze_edit_gradients(model, tok, args.archive, tasks, args.out_dir, layers=layers,
                                    n_per_task=args.n_per_task, with_and_without=not args.no_without,
                                    project_dim=args.project_dim or None, seed=args.seed)
    for group, stats in report["groups"].items():
        sil = ", ".join(f"{k} {v:.3f}" for k, v in stats["silhouette"].items() if v is not None)
        print(f"{group}: silhouette {sil}")
        for pair, s in stats["pairs"].items():
            print(f"  {pair}: intra {s['intra_cosine']:.3f} inter {s['inter_cosine']:.3f}")
    print(f"wrote {report['png']} and {report['json']}")
    return 0
