"""Edit-request validation: clear errors for malformed input, nothing valid rejected."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import instructedit_plugin
from instructedit_plugin.errors import RequestError
from instructedit_plugin.compat.edit_arguments import validate_edit_arguments


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(prompts=[], target_new=[]), "`prompts` is empty"),
        (dict(prompts=["a", "b"], target_new=["x"]), "`target_new` has 1 item(s) but there are 2 prompt(s)"),
        (dict(prompts=["a"], target_new=None), "`target_new` is missing"),
        (dict(prompts=[3], target_new=["x"]), "`prompts[0]` must be a string"),
        (dict(prompts=["a"], target_new=["  "]), "`target_new[0]` is empty"),
        (dict(prompts=["a", "b"], target_new=["x", "y"], rephrase_prompts=["r"]), "`rephrase_prompts` has 1 item(s)"),
        (dict(prompts=["a b"], target_new=["x"], subject=["c"]), "does not occur in `prompts[0]`"),
        (dict(prompts=["a"], target_new=["x"], locality_inputs=["p"]), "`locality_inputs` must be a dict"),
        (dict(prompts=["a"], target_new=["x"], locality_inputs={"nq": {"prompt": ["p"]}}), "'prompt' and 'ground_truth'"),
        (dict(prompts=["a", "b"], target_new=["x", "y"], locality_inputs={"nq": {"prompt": ["p"], "ground_truth": ["q"]}}),
         "has 1 item(s) but there are 2 prompt(s)"),
        (dict(prompts=["a"], target_new=["x"], portability_inputs={"hop": {"prompt": ["p", "q"], "ground_truth": ["z"]}}),
         "2 prompt(s) but 1 ground_truth"),
    ],
)
def test_malformed_requests_name_the_argument(kwargs, fragment):
    with pytest.raises(RequestError) as info:
        validate_edit_arguments(**kwargs)
    assert fragment in str(info.value)


def test_easyedit_style_inputs_are_accepted():
    assert validate_edit_arguments("a", "x", ground_truth="g") == 1
    assert validate_edit_arguments(["a", "b"], ["x", "y"], ground_truth="g",
                                   locality_inputs={"nq": {"prompt": ["p", "q"], "ground_truth": ["1", "2"]}}) == 2
    assert validate_edit_arguments(["a"], ["x"], portability_inputs={"hop": {"prompt": "p", "ground_truth": "z"}}) == 1


text = st.text(min_size=1).filter(lambda s: s.strip())


@given(st.lists(st.tuples(text, text), min_size=1, max_size=6))
def test_any_well_formed_unicode_request_is_accepted(pairs):
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    assert validate_edit_arguments(prompts, targets, rephrase_prompts=list(prompts)) == len(pairs)


@given(st.lists(text, min_size=1, max_size=5), st.lists(text, min_size=0, max_size=5))
def test_length_mismatch_always_raises(prompts, targets):
    if len(prompts) == len(targets):
        targets = targets + ["extra"]
    with pytest.raises(RequestError):
        validate_edit_arguments(prompts, targets)


def test_base_editor_raises_request_error_before_editing(tiny_gpt2_dir):
    """A plugin algorithm's ``BaseEditor.edit`` validates its arguments (EasyEdit's own algorithms are left
    to EasyEdit: see tests/test_bridges.py)."""
    from easyeditor import BaseEditor

    from tests.toy_algorithm import TOY_SPEC, ToyEditHyperParams

    instructedit_plugin.register()
    instructedit_plugin.register_algorithm(TOY_SPEC)
    try:
        hparams = ToyEditHyperParams.from_dict({"alg_name": "ToyEdit", "model_name": str(tiny_gpt2_dir),
                                                "device": "cpu", "layer": 3})
        editor = BaseEditor.from_hparams(hparams)
        with pytest.raises(RequestError, match="`target_new` has 1 item"):
            editor.edit(prompts=["a", "b"], target_new=["x"])
    finally:
        instructedit_plugin.unregister_algorithm(TOY_SPEC.name)
