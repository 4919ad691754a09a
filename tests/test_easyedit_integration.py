"""The plugin's ground floor: EasyEdit imports, registration works, BaseEditor runs on CPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import instructedit_plugin
from instructedit_plugin.compat import load_easyedit_hparams
from instructedit_plugin.errors import HyperParamsError, MissingDependencyError, PluginError

from .toy_algorithm import TOY_SPEC, ToyEditHyperParams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def easyedit():
    return instructedit_plugin.register()


@pytest.fixture()
def toy_registered(easyedit):
    instructedit_plugin.register_algorithm(TOY_SPEC)
    yield TOY_SPEC
    instructedit_plugin.unregister_algorithm(TOY_SPEC.name)


def _rewrite_acc(metrics: list[dict], phase: str) -> float:
    values = [m[phase]["rewrite_acc"] for m in metrics]
    flat = [float(torch.tensor(v, dtype=torch.float).mean()) for v in values]
    return sum(flat) / len(flat)


FACTS = dict(
    prompts=["The capital of France is", "The sky is"],
    target_new=["Rome", "green"],
    ground_truth=["Paris", "blue"],
)


def test_flavour_detected_and_legacy_names_present(easyedit):
    import transformers.modeling_utils as mu

    assert easyedit.flavour in ("pypi", "main")
    assert sys.modules["easyeditor"] is easyedit.module
    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        assert callable(getattr(mu, name))


def test_missing_multimodal_module_fails_clearly_on_use(easyedit):
    if not easyedit.stubbed_modules or "timm" not in easyedit.stubbed_modules:
        pytest.skip("timm is really installed here, so no placeholder is used")
    dist_utils = sys.modules["easyeditor.trainer.blip2_models.common.dist_utils"]
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        dist_utils.timm_hub.download_cached_file("x")
    # Other libraries still see the truth: the placeholder is not importable afterwards.
    assert importlib.util.find_spec("timm") is None
    from transformers.utils import import_utils

    assert import_utils.is_torchvision_available() == (importlib.util.find_spec("torchvision") is not None)


def test_registration_is_visible_everywhere(toy_registered, easyedit):
    import easyeditor

    alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
    editor_mod = sys.modules["easyeditor.editors.editor"]
    assert alg_dict["ToyEdit"] is TOY_SPEC.apply_fn
    assert editor_mod.ALG_DICT is alg_dict  # BaseEditor reads the very dict we mutated
    assert train_dict["TOYEDIT"] is TOY_SPEC.train_module
    assert easyeditor.ToyEditHyperParams is ToyEditHyperParams
    from easyeditor.editors.batch_editor import BatchEditor

    assert BatchEditor.is_batchable_method("ToyEdit")
    assert BatchEditor.is_batchable_method("FT")
    assert not BatchEditor.is_batchable_method("NoSuchAlg")


def test_register_is_idempotent_and_unregister_cleans_up(easyedit):
    alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    instructedit_plugin.register_algorithm(TOY_SPEC)
    before = dict(alg_dict)
    instructedit_plugin.register()
    instructedit_plugin.register()
    assert dict(alg_dict) == before
    instructedit_plugin.unregister_algorithm("ToyEdit")
    import easyeditor

    assert "ToyEdit" not in alg_dict
    assert not hasattr(easyeditor, "ToyEditHyperParams")
    assert "TOYEDIT" not in sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT


def test_conflicting_registration_is_refused(toy_registered):
    import dataclasses

    other = dataclasses.replace(TOY_SPEC, apply_fn=lambda *a, **k: None)
    with pytest.raises(PluginError, match="already registered"):
        instructedit_plugin.register_algorithm(other)


MLP_OUT = {"gpt2": "transformer.h.{}.mlp.c_proj", "llama": "model.layers.{}.mlp.down_proj",
           "gemma3": "model.layers.{}.mlp.down_proj", "qwen2": "model.layers.{}.mlp.down_proj"}


@pytest.mark.parametrize("arch", sorted(MLP_OUT))
def test_registered_toy_algorithm_edits_any_local_model_through_base_editor(toy_registered, request, arch):
    """Any local HF folder works (folder names carry no 'gpt'/'llama' for EasyEdit to sniff)."""
    from easyeditor import BaseEditor

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    hparams = ToyEditHyperParams.from_dict(
        {"alg_name": "ToyEdit", "model_name": str(model_dir), "device": "cpu", "layer": 1, "steps": 80, "lr": 0.02,
         "module_tmp": MLP_OUT[arch]}
    )
    editor = BaseEditor.from_hparams(hparams)
    assert editor.model_name == str(model_dir)  # path restored for EasyEdit's metrics
    assert editor.tok.padding_side == "left"
    original = {k: v.clone() for k, v in editor.model.state_dict().items()}
    metrics, edited, _ = editor.edit(**FACTS, keep_original_weight=True, verbose=False)
    assert _rewrite_acc(metrics, "pre") < 1.0
    assert _rewrite_acc(metrics, "post") == 1.0
    # EasyEdit restored the weights from the copy our apply function returned.
    for key, value in editor.model.state_dict().items():
        assert torch.equal(value, original[key]), key
    # The redirect is scoped to the call: torch is untouched afterwards.
    assert "to" not in vars(torch.Tensor)


def test_toy_batch_edit_passes_easyedit_batch_check(toy_registered, tiny_gpt2_dir):
    from easyeditor import BaseEditor

    hparams = ToyEditHyperParams.from_dict(
        {"alg_name": "ToyEdit", "model_name": str(tiny_gpt2_dir), "device": "cpu", "layer": 3, "steps": 40,
         "lr": 0.02, "batch_size": 2}
    )
    editor = BaseEditor.from_hparams(hparams)
    metrics, _, _ = editor.batch_edit(**FACTS, verbose=False)
    assert len(metrics) == 2
    assert _rewrite_acc(metrics, "post") == 1.0


def test_layer_index_validated_against_model(tiny_gpt2_dir):
    with pytest.raises(HyperParamsError, match=r"field 'layer'.*out of range for a model with 4 layers.*0 to 3"):
        ToyEditHyperParams.from_dict({"alg_name": "ToyEdit", "model_name": str(tiny_gpt2_dir), "layer": 7})


@pytest.mark.parametrize("arch_fixture,yaml_name", [("tiny_gpt2_dir", "tiny-gpt2"), ("tiny_llama_dir", "tiny-llama")])
def test_easyedit_ft_edits_tiny_model_on_cpu(easyedit, request, arch_fixture, yaml_name):
    """EasyEdit's own FT method through the real BaseEditor.edit and compute_edit_quality; make_editor
    loads the neutrally named local folder that EasyEdit's own name sniffing refuses."""
    from easyeditor import FTHyperParams

    from instructedit_plugin.compat import make_editor

    model_dir = request.getfixturevalue(arch_fixture)
    hparams = load_easyedit_hparams(FTHyperParams, REPO / "hparams" / "FT" / f"{yaml_name}.yaml",
                                    model_name=str(model_dir))
    editor = make_editor(hparams)
    assert next(editor.model.parameters()).device.type == "cpu"
    kwargs = {"keep_original_weight": True} if easyedit.flavour == "pypi" else {"sequential_edit": False}
    metrics, _, _ = editor.edit(
        prompts=FACTS["prompts"][:1], target_new=FACTS["target_new"][:1], ground_truth=FACTS["ground_truth"][:1],
        verbose=False, **kwargs,
    )
    assert _rewrite_acc(metrics, "pre") < 1.0
    assert _rewrite_acc(metrics, "post") == 1.0


def test_easyedit_hparams_bridge_reports_missing_field(easyedit):
    from easyeditor import FTHyperParams

    with pytest.raises(HyperParamsError, match="field 'layers'"):
        load_easyedit_hparams(FTHyperParams, {"alg_name": "FT", "model_name": "x"})
