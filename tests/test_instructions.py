"""The InstructEdit instruction library: shipped families, templating, placeholders, user folders."""
from __future__ import annotations

import random

import pytest

from instructedit_plugin.errors import PluginError, RequestError
from instructedit_plugin.instructions import (
    INSTRUCTIONS_DIR_ENV,
    InstructionError,
    default_library,
    format_instruction,
    load_instruction_library,
)

SHIPPED = ("convsent", "counterfact", "recent", "zsre")


def test_shipped_families_load_with_ten_descriptions_and_a_held_out_one():
    library = load_instruction_library()
    assert set(SHIPPED) <= set(library.tasks)
    for task in SHIPPED:
        family = library.get(task)
        assert len(family.descriptions) == 10
        assert len(set(family.descriptions)) == 10
        assert family.held_out_index is not None
        assert len(family.training_indices) == 9
        assert family.held_out_index not in family.training_indices
        assert "{input}" in family.template


def test_template_layout():
    text = format_instruction("counterfact", "The capital of France is", 2)
    family = default_library().get("counterfact")
    assert text == f"Task: counterfact\nDescription: {family.descriptions[2]}\nInput: The capital of France is"
    # None -> the first training description; aliases resolve to the family
    assert format_instruction("wiki_recent", "Q?") == f"Task: recent\nDescription: {default_library().get('recent').descriptions[0]}\nInput: Q?"


def test_rng_draws_only_training_descriptions():
    family = default_library().get("zsre")
    rng = random.Random(0)
    texts = {format_instruction("zsre", "x", rng) for _ in range(300)}
    assert family.held_out_description not in "".join(texts)
    assert len(texts) == 9


def test_convsent_placeholders_are_filled_from_the_record():
    record = {"topic": "cats", "target_new": "I really dislike them.", "pos": ["I love them."], "neg": ["I really dislike them."]}
    for index in range(10):
        text = format_instruction("convsent", "What do you think of cats?", index, record)
        assert "[" not in text and "cats" in text and "negative" in text
    positive = dict(record, target_new="I love them.")
    assert "positive" in format_instruction("convsent", "What do you think of cats?", 0, positive)
    explicit = {"label": "neutral", "subject": "dogs"}
    text = format_instruction("convsent", "What do you think of dogs?", 0, explicit)
    assert "neutral" in text and "dogs" in text


def test_missing_placeholder_value_is_a_request_error():
    with pytest.raises(RequestError, match=r"\[TOPIC\]"):
        format_instruction("convsent", "What do you think of it?", 0, {"label": "positive"})


def test_unknown_task_lists_known_ones():
    with pytest.raises(InstructionError) as info:
        format_instruction("no_such_task", "x")
    message = str(info.value)
    for task in SHIPPED:
        assert task in message
    assert isinstance(info.value, PluginError)


def test_user_folder_adds_and_overrides_families(tmp_path, monkeypatch):
    (tmp_path / "medical.yaml").write_text(
        "task: medical\ntemplate: \"[{task}] {description} :: {input}\"\nheld_out_index: 0\n"
        "descriptions:\n  - held back\n  - Update a medical fact.\n  - Change a drug fact.\n",
        encoding="utf-8",
    )
    (tmp_path / "zsre.yaml").write_text("task: zsre\nheld_out_index: null\ndescriptions: [one, two]\n", encoding="utf-8")
    library = load_instruction_library(extra_dirs=[tmp_path])
    assert "medical" in library and "counterfact" in library
    assert library.format("medical", "Aspirin treats", None) == "[medical] Update a medical fact. :: Aspirin treats"
    assert library.get("zsre").descriptions == ("one", "two")
    # the same folder through the environment variable
    monkeypatch.setenv(INSTRUCTIONS_DIR_ENV, str(tmp_path))
    assert "medical" in default_library()
    assert format_instruction("medical", "x", 1).startswith("[medical] Update")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("task: t\n", "descriptions"),
        ("descriptions: [a, b]\n", "task"),
        ("task: t\ndescriptions: [only]\n", "at least two"),
        ("task: t\ndescriptions: [a, b]\nheld_out_index: 5\n", "held_out_index"),
        ("task: t\ndescriptions: [a, b]\ntemplate: 'no input here {task}'\n", "template"),
        ("task: t\ndescriptions: [a, b]\ncolour: red\n", "colour"),
    ],
)
def test_malformed_family_files_are_rejected(tmp_path, body, needle):
    (tmp_path / "bad.yaml").write_text(body, encoding="utf-8")
    with pytest.raises(InstructionError, match=needle):
        load_instruction_library([tmp_path])


def test_placeholder_values_are_inserted_verbatim():
    """A record value that contains a placeholder is not filled a second time."""
    from instructedit_plugin.instructions import default_library

    family = default_library().get("convsent")
    text = family.fill("Talk about [TOPIC] in a [LABEL] way.", {"topic": "the [LABEL] band", "label": "positive"})
    assert text == "Talk about the [LABEL] band in a positive way."
