"""Every shipped YAML loads with its class; every invalid field raises a named, actionable error."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import instructedit_plugin
from instructedit_plugin.core.config import read_yaml
from instructedit_plugin.errors import HyperParamsError, PluginError
from instructedit_plugin.registry import load_hparams

from .toy_algorithm import ToyEditHyperParams

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted((REPO / "hparams").rglob("*.yaml"))


#: baselines only EasyEdit main has: its own hparams classes build them through the plugin's loader
#: (WISE's ``act_margin`` split into ``alpha``/``beta``/``gamma`` as main's ``from_hparams`` does);
#: the PyPI flavour has no such class and says so
EASYEDIT_MAIN_ONLY = {"GRACE", "WISE"}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    instructedit_plugin.register()


def test_hparams_folder_is_not_empty():
    assert len(YAMLS) >= 2


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO / "hparams")))
def test_every_shipped_yaml_loads_with_its_class(path):
    training = "TRAINING" in path.parts
    if path.parent.name in EASYEDIT_MAIN_ONLY and instructedit_plugin.register().flavour != "main":
        with pytest.raises(PluginError, match=rf"unknown alg_name '{path.parent.name}'.*Fix:"):
            load_hparams(str(path), training=training)
        return
    hparams = load_hparams(str(path), training=training)
    alg = getattr(hparams, "alg" if training else "alg_name")
    assert alg == path.parent.name or (training and alg.upper() == path.parent.name.upper())
    if path.parent.name == "WISE":
        margin = read_yaml(path)[0]["act_margin"]
        assert [hparams.alpha, hparams.beta, hparams.gamma] == [float(v) for v in margin]


@pytest.mark.parametrize("margin", ["[5.0, 20.0]", "'wide'", "[5.0, big, 10.0]"])
def test_wise_act_margin_must_be_three_numbers(margin):
    from instructedit_plugin.compat.hparams_bridge import load_easyedit_hparams

    @dataclasses.dataclass
    class WISEHyperParams:  # the fields EasyEdit main's class reads act_margin into
        alg_name: str
        alpha: float
        beta: float
        gamma: float

    good = load_easyedit_hparams(WISEHyperParams, {"alg_name": "WISE", "act_margin": [5, "2e1", 10]})
    assert (good.alpha, good.beta, good.gamma) == (5.0, 20.0, 10.0)
    with pytest.raises(HyperParamsError) as info:
        load_easyedit_hparams(WISEHyperParams, {"alg_name": "WISE", "act_margin": yaml.safe_load(margin)})
    assert info.value.field == "act_margin" and "Fix:" in str(info.value)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "hp.yaml"
    path.write_text(text)
    return str(path)


GOOD = "alg_name: ToyEdit\nmodel_name: some/model\nlayer: 1\n"


@pytest.mark.parametrize(
    "text,field,fragment",
    [
        (GOOD + "stpes: 3\n", "stpes", "did you mean 'steps'"),
        (GOOD + "steps: three\n", "steps", "expected an integer"),
        (GOOD + "steps: 0\n", "steps", "below the minimum 1"),
        (GOOD + "lr: -1e-3\n", "lr", "below the minimum"),
        (GOOD + "device: gpu\n", "device", "use 'cpu'"),
        (GOOD + "fp16: 'yes'\n", "fp16", "expected true or false"),
        ("alg_name: ToyEdit\nlayer: 1\n", "model_name", "required field is missing"),
        ("alg_name: FT\nmodel_name: m\nlayer: 1\n", "alg_name", "needs 'ToyEdit'"),
        ("- a\n- b\n", "<file>", "not a mapping"),
        ("alg_name: [unclosed\n", "<file>", "not valid YAML"),
    ],
)
def test_invalid_fields_raise_named_errors(tmp_path, text, field, fragment):
    with pytest.raises(HyperParamsError) as info:
        ToyEditHyperParams.from_hparams(_write(tmp_path, text))
    assert info.value.field == field
    assert fragment in str(info.value)
    assert "Fix:" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HyperParamsError, match="no hparams file"):
        ToyEditHyperParams.from_hparams(str(tmp_path / "nope"))


def test_yaml_suffix_is_optional_and_scientific_strings_become_floats(tmp_path):
    _write(tmp_path, GOOD + "lr: 5e-3\n")
    hparams = ToyEditHyperParams.from_hparams(str(tmp_path / "hp"))
    assert hparams.lr == pytest.approx(5e-3)


def test_unknown_alg_name_lists_known_algorithms(tmp_path):
    with pytest.raises(PluginError, match=r"unknown alg_name 'NoSuchAlg'.*FT"):
        load_hparams(_write(tmp_path, "alg_name: NoSuchAlg\nmodel_name: m\n"))


def test_instructed_training_reads_its_earlier_field_names_with_a_deprecation_warning(tmp_path, caplog):
    """EasyEdit's names (max_iters, accumulate_bs) are canonical; YAMLs written with InstructEd's earlier
    names (max_steps, gradient_accumulation_steps) still load, with a warning, into the same fields."""
    from instructedit_plugin.instructed.instructed_hparams import InstructEdTrainingHparams

    shipped = (REPO / "hparams" / "TRAINING" / "InstructEd" / "tiny.yaml").read_text()
    with caplog.at_level("WARNING"):
        current = InstructEdTrainingHparams.from_hparams(_write(tmp_path, shipped))
    assert "deprecated" not in caplog.text  # the shipped YAMLs use the canonical names
    old = shipped.replace("max_iters: 300", "max_steps: 77").replace("accumulate_bs: 1", "gradient_accumulation_steps: 3")
    assert old != shipped
    with caplog.at_level("WARNING"):
        loaded = InstructEdTrainingHparams.from_hparams(_write(tmp_path, old))
    assert (loaded.max_iters, loaded.accumulate_bs) == (77, 3) and (current.max_iters, current.accumulate_bs) == (300, 1)
    assert "'max_steps' is deprecated" in caplog.text and "'gradient_accumulation_steps' is deprecated" in caplog.text
    # both names with different values: which one is meant is unclear
    with pytest.raises(HyperParamsError) as info:
        InstructEdTrainingHparams.from_hparams(_write(tmp_path, old + "max_iters: 5\n"))
    assert info.value.field == "max_steps" and "Fix: keep only `max_iters:`" in str(info.value)


def test_every_algorithm_of_the_imported_easyedit_has_an_hparams_class():
    """``load_hparams`` must find the class of every name in EasyEdit's ``ALG_DICT`` (GRACE's is
    ``GraceHyperParams``, R-ROME's ``R_ROMEHyperParams``, ...), on whichever flavour is imported."""
    import sys

    from instructedit_plugin.registry import hparams_class_for

    alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    unresolved = []
    for name in alg_dict:
        try:
            cls = hparams_class_for(name)
        except PluginError:
            unresolved.append(name)
            continue
        assert dataclasses.is_dataclass(cls), (name, cls)
    assert not unresolved, f"no hparams class for {unresolved}"
