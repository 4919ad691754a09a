"""The command line right after `pip install`: the shipped Gemma YAMLs work as they are.

* ``model_name: embedded`` resolves to the packaged Gemma-3-270M folder (every loader: the plugin's
  ``from_hparams`` / ``from_dict`` / ``registry.load_hparams`` and ``load_easyedit_hparams`` for
  EasyEdit's FT/ROME), and ``archive: default`` to the InstructEd prefixes shipped in the package;
* ``instructedit edit --hparams hparams/InstructEd/gemma-3-270m.yaml ...`` edits with them;
* a ``model_name`` that is no model folder is one line naming the field (never EasyEdit's
  ``NotImplementedError``), and on the command line a missing archive's fix names ``instructedit train``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import instructedit_plugin
from instructedit_plugin.cli import EXIT_ERROR, EXIT_OK, main
from instructedit_plugin.errors import HyperParamsError, PluginError, cli_context, on_cli

REPO = Path(__file__).resolve().parents[1]
EDIT_YAML = REPO / "hparams/InstructEd/gemma-3-270m.yaml"
PROMPT = "The Eiffel Tower is located in the city of"
GEMMA_YAMLS = ["InstructEd/gemma-3-270m.yaml", "InstructEdit/gemma-3-270m.yaml", "FT/gemma-3-270m.yaml",
               "ROME/gemma-3-270m.yaml", "TRAINING/InstructEd/gemma-3-270m.yaml",
               "TRAINING/InstructEdit/gemma-3-270m.yaml"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    instructedit_plugin.register()


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Any model load (plugin loader, EasyEdit's Auto classes) fails the test."""
    import transformers

    import instructedit_plugin.compat.editor_patches as patches
    import instructedit_plugin.models.loading as loading

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", boom)
    monkeypatch.setattr(patches, "load_causal_lm", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("instructedit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "NotImplementedError" not in err, err
    return err.strip()


# ---------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("extra", [[], ["--rephrase", "The Eiffel Tower stands in the city of"]],
                         ids=["as-typed", "with-rephrase"])
def test_edit_with_the_shipped_yaml_as_a_new_user_types_it(extra, embedded_model_dir, monkeypatch, capsys):
    from instructedit_plugin.instructed.shipped import shipped_prefixes_dir

    try:
        shipped = shipped_prefixes_dir()
    except PluginError as exc:  # a broken package, not an optional feature: fail, never skip
        pytest.fail(f"the package ships no InstructEd prefixes, so `archive: default` cannot work: {exc}", pytrace=False)
    assert (shipped / "manifest.json").is_file()
    monkeypatch.chdir(REPO)  # the command as in the README, from the repository root
    rc = main(["edit", "--hparams", "hparams/InstructEd/gemma-3-270m.yaml", "--prompt", PROMPT, "--target_new", "Rome",
               *extra])
    out = capsys.readouterr().out
    assert rc == EXIT_OK, out
    scores = {name: (float(pre), float(post))
              for name, pre, post in re.findall(r"^\s+(\w+): ([\d.]+) -> ([\d.]+)$", out, re.M)}
    print(out)
    assert "Rel" in scores and ("Gen" in scores) == bool(extra), out
    pre_rel, post_rel = scores["Rel"]
    assert post_rel == 100.0 and pre_rel < 100.0, out
    for name, (_, post) in scores.items():  # Gen too, whenever EasyEdit measured it
        assert post == 100.0, (name, out)


# ---------------------------------------------------------------------------------------- (b)
def test_a_missing_model_folder_is_one_line_naming_model_name(tmp_path, capsys, no_model_loading):
    # the YAML as it used to ship: a placeholder folder, with an archive that does exist
    text = EDIT_YAML.read_text().replace("model_name: embedded", 'model_name: "./hugging_cache/gemma-3-270m"')
    assert "./hugging_cache" in text
    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(text)
    archive = tmp_path / "archive"
    archive.mkdir()
    missing = tmp_path / "no-such-model"
    for argv in (
        ["edit", "--hparams", str(placeholder), "--archive", str(archive)],
        ["edit", "--hparams", str(EDIT_YAML), "--model_name", str(missing)],
        ["edit", "--hparams", str(REPO / "hparams/FT/gemma-3-270m.yaml"), "--model_name", str(missing)],  # EasyEdit's FT
    ):
        rc = main([*argv, "--prompt", PROMPT, "--target_new", "Rome"])
        err = _one_line_error(capsys)
        assert rc == EXIT_ERROR, argv
        assert "field 'model_name'" in err and "Fix:" in err and "--model_name embedded" in err, err


def test_a_folder_without_config_is_no_model(tmp_path, capsys, no_model_loading):
    (tmp_path / "weights-only").mkdir()
    rc = main(["edit", "--hparams", str(EDIT_YAML), "--model_name", str(tmp_path / "weights-only"),
               "--prompt", PROMPT, "--target_new", "Rome"])
    err = _one_line_error(capsys)
    assert rc == EXIT_ERROR and "field 'model_name'" in err and "without config.json" in err


def test_training_checks_the_model_folder_before_loading(tmp_path, capsys, no_model_loading):
    train = tmp_path / "counterfact-train.json"
    train.write_text('[{"case_id": 0, "prompt": "Ann lives in", "target_new": "Rome", "subject": "Ann", '
                     '"ground_truth": "Paris", "rephrase_prompt": "Ann is a resident of", '
                     '"locality_prompt": "The capital of France is", "locality_ground_truth": "Paris"}]')
    rc = main(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEd/gemma-3-270m.yaml"), "--train", str(train),
               "--model_name", str(tmp_path / "no-such-model")])
    err = _one_line_error(capsys)
    assert rc == EXIT_ERROR and "field 'model_name'" in err and "Fix:" in err


# ---------------------------------------------------------------------------------------- (c)
def test_model_name_embedded_resolves_in_every_loader(embedded_model_dir):
    from easyeditor import FTHyperParams, ROMEHyperParams

    from instructedit_plugin.compat import load_easyedit_hparams
    from instructedit_plugin.instructed import InstructEdHyperParams, InstructEdTrainingHparams
    from instructedit_plugin.instructed.shipped import shipped_prefixes_dir
    from instructedit_plugin.instructedit import InstructEditHyperParams, InstructEditTrainingHparams
    from instructedit_plugin.registry import load_hparams

    for name in GEMMA_YAMLS:
        assert re.search(r"(?m)^model_name: embedded\b", (REPO / "hparams" / name).read_text()), name
    expected = str(embedded_model_dir)
    hp = InstructEdHyperParams.from_hparams(EDIT_YAML)  # as a Python user loads it
    assert hp.model_name == expected
    assert Path(hp.archive) == shipped_prefixes_dir(must_exist=False)  # archive: default
    assert InstructEdTrainingHparams.from_hparams(REPO / "hparams/TRAINING/InstructEd/gemma-3-270m.yaml").model_name == expected
    assert InstructEditHyperParams.from_hparams(REPO / "hparams/InstructEdit/gemma-3-270m.yaml").model_name == expected
    assert InstructEditTrainingHparams.from_hparams(
        REPO / "hparams/TRAINING/InstructEdit/gemma-3-270m.yaml").model_name == expected
    assert load_easyedit_hparams(FTHyperParams, REPO / "hparams/FT/gemma-3-270m.yaml").model_name == expected
    assert load_easyedit_hparams(ROMEHyperParams, REPO / "hparams/ROME/gemma-3-270m.yaml").model_name == expected
    for name in GEMMA_YAMLS:
        loaded = load_hparams(str(REPO / "hparams" / name), training=name.startswith("TRAINING"))
        assert loaded.model_name == expected, name
    # from_dict too (and the word in any case); an override of the resolved value is kept as given
    assert InstructEdHyperParams.from_dict({**hp.to_dict(), "model_name": " Embedded "}).model_name == expected
    assert InstructEdHyperParams.from_dict({**hp.to_dict(), "archive": "/x/y"}).archive == "/x/y"


def test_archive_default_only_means_the_shipped_prefixes_for_instructed():
    from instructedit_plugin.core.config import resolve_named_values
    from instructedit_plugin.instructed.shipped import shipped_prefixes_dir

    data = {"model_name": "/some/folder", "archive": "default"}
    assert resolve_named_values(data) == data  # not an InstructEd editing config: left as written
    assert resolve_named_values(data, shipped_archive=True)["archive"] == str(shipped_prefixes_dir(must_exist=False))


def test_missing_shipped_prefixes_are_reported_by_field(tmp_path, monkeypatch):
    import instructedit_plugin.instructed.shipped as shipped
    from instructedit_plugin.instructed import InstructEdHyperParams

    monkeypatch.setattr(shipped, "ASSETS_DIR", tmp_path / "assets")
    hp = InstructEdHyperParams.from_dict({"alg_name": "InstructEd", "model_name": str(tmp_path), "archive": "default"})
    with pytest.raises(HyperParamsError, match=r"field 'archive': 'default' names the prefixes shipped") as info:
        hp.check_ready()
    assert "InstructEdTrainer" in info.value.fix  # Python wording outside the CLI


# ---------------------------------------------------------------------------------------- (d)
def test_missing_archives_name_instructedit_train_on_the_cli(embedded_model_dir, tmp_path, capsys, no_model_loading):
    rc = main(["edit", "--hparams", str(EDIT_YAML), "--archive", str(tmp_path / "no-prefixes"),
               "--prompt", PROMPT, "--target_new", "Rome"])
    err = _one_line_error(capsys)
    assert rc == EXIT_ERROR and "field 'archive'" in err
    fix = err.split("Fix: ", 1)[1]
    assert ("`instructedit train --hparams hparams/TRAINING/InstructEd/gemma-3-270m.yaml --train FILE`" in fix
            and "--archive <folder>" in fix and "--archive default" in fix), fix
    assert "InstructEdTrainer(" not in fix

    rc = main(["edit", "--hparams", str(REPO / "hparams/InstructEdit/gemma-3-270m.yaml"), "--archive",
               str(tmp_path / "no-editor"), "--prompt", PROMPT, "--target_new", "Rome"])
    err = _one_line_error(capsys)
    assert rc == EXIT_ERROR and "field 'archive'" in err
    fix = err.split("Fix: ", 1)[1]
    assert "`instructedit train --hparams hparams/TRAINING/InstructEdit/gemma-3-270m.yaml`" in fix and "--archive" in fix
    assert "InstructEditTrainer(" not in fix


def test_python_users_keep_the_python_fix(tmp_path):
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.instructedit.checkpoint import resolve_archive

    hp = InstructEdHyperParams.from_dict({"alg_name": "InstructEd", "model_name": str(tmp_path),
                                          "archive": str(tmp_path / "none")})
    assert not on_cli()
    with pytest.raises(HyperParamsError) as info:
        hp.check_ready()
    assert "InstructEdTrainer(" in info.value.fix and "instructedit train" not in info.value.fix
    with cli_context():
        assert on_cli()
        with pytest.raises(HyperParamsError) as info:
            hp.check_ready()
        assert "instructedit train --hparams hparams/TRAINING/InstructEd/<model>.yaml" in info.value.fix
        with pytest.raises(HyperParamsError, match="instructedit train --hparams hparams/TRAINING/InstructEdit/"):
            resolve_archive(None)
    assert not on_cli()  # the context is reset
    with pytest.raises(HyperParamsError, match="InstructEditTrainer"):
        resolve_archive(None)
