"""One FT edit through EasyEdit's own ``BaseEditor.edit``, run as a fresh process by
``tests/test_easyedit_main.py``; prints ``RESULT <json>`` with the metrics and a hash of the edited weights.

    python tests/_easyedit_ft_run.py EASYEDIT_SRC MODEL_DIR FT_YAML (plain|plugin)

``plain`` never imports ``instructedit_plugin``; ``plugin`` imports it and registers it before
editing. Both import EasyEdit the same way first: EasyEdit imports multimodal packages (timm,
torchvision, ...) at import time that are not installed here, so while ``easyeditor`` is imported
empty stand-in modules serve those names, and three helpers transformers 5 moved are put back
where EasyEdit looks for them. Everything else is EasyEdit's own: ``FTHyperParams`` built from the
YAML's fields, ``BaseEditor.from_hparams``, ``edit``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import types

OPTIONAL = ("timm", "torchvision", "iopath", "fairscale", "cv2", "av", "qwen_vl_utils", "zhipuai")
REQUESTS = {
    "prompts": ["The capital of France is", "The Eiffel Tower stands in"],
    "target_new": ["Rome", "Berlin"],
    "ground_truth": ["Paris", "Paris"],
    "rephrase_prompts": ["France's capital city is", "The Eiffel Tower is located in"],
    "locality_inputs": {"neighborhood": {"prompt": ["The capital of Spain is", "Water boils at"],
                                         "ground_truth": ["Madrid", "100 degrees"]}},
}


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        return None


def import_easyedit(src: str):
    sys.path.insert(0, src)
    import torch  # noqa: F401 - before the stand-ins, so that availability checks see the truth
    from transformers import modeling_utils, pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name, lambda *a, **k: None))
    finder = _StandIns({n for n in OPTIONAL if importlib.util.find_spec(n) is None})
    sys.meta_path.append(finder)
    try:
        import easyeditor
    finally:
        sys.meta_path.remove(finder)
    return easyeditor


def ft_hparams(easyeditor, yaml_file: str, model_dir: str):
    import yaml

    with open(yaml_file, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    fields = {f.name for f in dataclasses.fields(easyeditor.FTHyperParams)}
    data = {k: (float(v) if isinstance(v, str) and re.fullmatch(r"[0-9.]+e-?[0-9]+", v) else v)
            for k, v in data.items() if k in fields}
    data.update(model_name=model_dir, device="cpu")
    return easyeditor.FTHyperParams(**data)


def main(src: str, model_dir: str, yaml_file: str, mode: str) -> None:
    easyeditor = import_easyedit(src)
    if mode == "plugin":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's plugin
        import instructedit_plugin

        instructedit_plugin.register()
        assert "InstructEd" in sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    else:
        assert mode == "plain" and not any(m.startswith("instructedit_plugin") for m in sys.modules)
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every run
    torch.manual_seed(0)
    editor = easyeditor.BaseEditor.from_hparams(ft_hparams(easyeditor, yaml_file, model_dir))
    metrics, edited, _ = editor.edit(**REQUESTS, sequential_edit=True, verbose=False)
    digest = hashlib.sha256()
    for name, tensor in sorted(edited.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for record in metrics:  # wall-clock times differ between any two runs
        record.pop("time", None)
        for side in ("pre", "post"):
            record.get(side, {}).pop("time", None)
    out = {"metrics": metrics, "weights": digest.hexdigest(),
           "plugin_imported": any(m.startswith("instructedit_plugin") for m in sys.modules)}
    print("RESULT " + json.dumps(out, default=repr))


if __name__ == "__main__":
    main(*sys.argv[1:5])
