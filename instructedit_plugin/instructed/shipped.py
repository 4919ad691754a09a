"""InstructEd prefixes shipped inside the package.

The default demo recipe's prefixes for the embedded Gemma-3-270M are a few kilobytes, so the
package carries them (``instructedit_plugin/assets/instructed/<model id>/``: the checkpoint's files --
the format-1 ``prefixes.safetensors`` + ``instructed_config.json`` today, a PEFT adapter folder once
regenerated --, ``manifest.json`` with the base-model fingerprint, and ``recipe.json``
with the recipe key and what training reached). ``archive: default`` in an InstructEd YAML and
``instructedit demo`` (without ``--train``) use them.

Regenerate them whenever the recipe changes::

    python -m instructedit_plugin.instructed.shipped --regenerate

which trains the default recipe (:data:`~.recipes.DEFAULT`, a fixed number of steps) on the
packaged demo data set and puts the result here in one atomic folder swap
(:func:`~instructedit_plugin.core.durable.atomic_dir`): interrupted, the package keeps the previous
prefixes, whole.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..errors import PluginError

LOG = logging.getLogger(__name__)

__all__ = ["ASSETS_DIR", "DEFAULT_MODEL_ID", "DEFAULT_ARCHIVE", "shipped_prefixes_dir", "is_default_archive",
           "shipped_recipe_info"]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "instructed"
DEFAULT_MODEL_ID = "gemma-3-270m"
#: The word an ``archive:`` setting uses to name the shipped prefixes.
DEFAULT_ARCHIVE = "default"
RECIPE_FILE = "recipe.json"


def is_default_archive(value: Any) -> bool:
    return isinstance(value, str) and value.strip() == DEFAULT_ARCHIVE


def shipped_prefixes_dir(model_id: str = DEFAULT_MODEL_ID, *, must_exist: bool = True) -> Path:
    """The folder of the prefixes shipped for ``model_id`` (only the embedded Gemma-3-270M has them)."""
    folder = ASSETS_DIR / model_id
    if must_exist and not (folder / "manifest.json").is_file():
        raise PluginError(
            f"no shipped InstructEd prefixes for {model_id!r} (looked in {folder}). Fix: train them with "
            "`instructedit demo --train` (the default recipe) or `instructedit train --hparams "
            "hparams/TRAINING/InstructEd/gemma-3-270m.yaml --train FILE`, and pass the folder it prints as --archive")
    return folder


def shipped_recipe_info(model_id: str = DEFAULT_MODEL_ID) -> dict[str, Any]:
    """``recipe.json`` of the shipped prefixes: recipe key, configuration, steps, validation."""
    return json.loads((shipped_prefixes_dir(model_id) / RECIPE_FILE).read_text())


def regenerate(model_id: str = DEFAULT_MODEL_ID, device: str = "cpu", budget_minutes: float | None = None) -> Path:
    """Train the default recipe on the packaged demo data set and copy its archive into the package."""
    from ..core import durable
    from ..data.demo_set import demo_data_dir
    from .recipes import DEFAULT, recipe_info, train_embedded_prefixes

    if model_id != DEFAULT_MODEL_ID:
        raise PluginError(f"only {DEFAULT_MODEL_ID!r} has shipped prefixes. Fix: pass --model_id {DEFAULT_MODEL_ID}")
    archive = train_embedded_prefixes(config=DEFAULT, data_dir=demo_data_dir(), device=device, progress=True,
                                      budget_minutes=budget_minutes)
    info = recipe_info(archive)
    keep = {k: info[k] for k in ("key", "recipe", "recipe_version", "model_identity", "steps", "planned_steps",
                                 "stopped_by_budget", "best_val_loss", "history", "train_edits", "val_edits", "data")
            if k in info}
    keep["data_dir"] = "<packaged demo data set>"
    target = ASSETS_DIR / model_id
    from .checkpoint import MANIFEST_FILE, read_manifest

    with durable.atomic_dir(target) as staging:  # the old folder stays whole until the new one is swapped in
        for name in [*read_manifest(archive)["files"], MANIFEST_FILE]:  # a best/ folder: no trainer state
            shutil.copy2(archive / name, staging / name)
        durable.atomic_write_json(staging / RECIPE_FILE, keep)
    LOG.info("shipped prefixes written to %s (recipe key %s)", target, info.get("key"))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the InstructEd prefixes shipped in the package.")
    parser.add_argument("--regenerate", action="store_true", required=True,
                        help="train the default recipe on the packaged demo data and copy it into the package")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget_minutes", type=float,
                        help="wall-clock safety cap (default: the recipe's); a capped run resumes on the next call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(regenerate(device=args.device, budget_minutes=args.budget_minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
