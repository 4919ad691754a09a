"""Fail fast on data: every command checks every file it will read before a model is loaded.

For `instructedit train` (both algorithms), `evaluate`, `analyze` and the example scripts, a
missing data file -- and one that exists but does not parse (truncated JSON) -- ends the run in
under 2 seconds with exit code 1 and one line naming the file and the fix, and no model is loaded
(the model loaders and the embedded model's resolution are replaced by functions that fail the test).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ._scripts import load_script

import instructedit_plugin
from instructedit_plugin.cli import EXIT_ERROR, main, run_script
from instructedit_plugin.data.preflight import CheckedFile, DataFilesError, check_data_files
from instructedit_plugin.errors import DataSchemaError, PluginError

REPO = Path(__file__).resolve().parents[1]
HP = REPO / "hparams"
FAST_S = 2.0


@pytest.fixture(scope="module", autouse=True)
def _registered():
    instructedit_plugin.register()


def _load_example(name: str):
    return load_script(REPO / "examples" / f"{name}.py", f"example_{name}")


def _boom(*args, **kwargs):
    raise AssertionError("a model was loaded (or the embedded model resolved) before the data check")


@pytest.fixture()
def no_model_loading(monkeypatch):
    import transformers

    import instructedit_plugin.compat.editor_patches as patches
    import instructedit_plugin.models.embedded as embedded
    import instructedit_plugin.models.loading as loading

    for module in (loading, patches):
        monkeypatch.setattr(module, "load_causal_lm", _boom)
    monkeypatch.setattr(embedded, "embedded_model_dir", _boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _boom)
    for name in ("run_instructed", "run_instructedit", "run_mquake"):
        module = _load_example(name)
        if hasattr(module, "load_causal_lm"):
            monkeypatch.setattr(module, "load_causal_lm", _boom)
    return monkeypatch


def _truncated_copy(src: Path, dst: Path) -> Path:
    """The first two records of ``src`` as a JSON array, cut off inside the second record."""
    from instructedit_plugin.data import read_records

    text = json.dumps(read_records(src, limit=2))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text[: len(text) - 40], encoding="utf-8")
    return dst


# --------------------------------------------------------------------------------- the helper
def test_missing_files_are_listed_together_and_nothing_is_parsed(tmp_path, shared_data_dir):
    calls = []

    def loader(path, limit=None):
        calls.append(path)
        return []

    files = {"--train": "counterfact/counterfact-train.json", "--val": "counterfact/nope.json",
             "--task recent": str(tmp_path / "also-missing.json")}
    with pytest.raises(DataFilesError) as info:
        check_data_files(files, data_dir=shared_data_dir, loader=loader)
    message = str(info.value)
    assert calls == []  # existence first: a missing file is reported before anything is read
    assert "\n" not in message and message.startswith("2 data files not found: ")
    assert "--val counterfact/nope.json" in message and f"--task recent {tmp_path / 'also-missing.json'}" in message
    assert "--train" not in message
    assert message.split("Fix: ", 1)[1].endswith(f"under {shared_data_dir} (--data_dir / INSTRUCTEDIT_DATA_DIR)")
    assert info.value.missing == {"--val": "counterfact/nope.json", "--task recent": str(tmp_path / "also-missing.json")}


def test_found_files_come_back_with_their_records(shared_data_dir, monkeypatch):
    monkeypatch.delenv("INSTRUCTEDIT_DATA_DIR", raising=False)
    checked = check_data_files({"cf": "counterfact/counterfact-train.json", "zsre": "zsre/ZsRE-test-all.json"},
                               data_dir=shared_data_dir, limit={"cf": 3, "zsre": 2})
    assert checked["cf"] == CheckedFile("cf", shared_data_dir / "counterfact/counterfact-train.json", checked["cf"].records)
    assert len(checked["cf"].records) == 3 and len(checked["zsre"].records) == 2
    assert checked["cf"].records[0]["prompt"] and checked["cf"].records[0]["target_new"]
    # the environment variable works like --data_dir; a plain list is labelled by the paths
    monkeypatch.setenv("INSTRUCTEDIT_DATA_DIR", str(shared_data_dir))
    listed = check_data_files(["counterfact/counterfact-val.json"], limit=1)
    assert list(listed) == ["counterfact/counterfact-val.json"] and len(listed["counterfact/counterfact-val.json"].records) == 1


def test_a_truncated_file_is_named_with_the_loaders_reason(tmp_path, shared_data_dir):
    bad = _truncated_copy(shared_data_dir / "counterfact/counterfact-train.json", tmp_path / "counterfact-train.json")
    with pytest.raises(DataFilesError) as info:
        check_data_files({"--train": bad})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data file --train does not parse: {bad}: record 1: key '<json>'")
    assert message.count("Fix:") == 1 and message.split("Fix: ", 1)[1].startswith("repair the file")
    assert isinstance(info.value, PluginError) and list(info.value.unreadable) == ["--train"]
    # two bad files (one a folder): both named, one fix part each
    with pytest.raises(DataFilesError, match=r"^2 data files do not parse \(.*--val: .* is a folder") as info:
        check_data_files({"--train": bad, "--val": tmp_path})
    assert str(info.value).count("Fix:") == 1


def test_a_bad_limit_is_reported_as_such(tmp_path):
    with pytest.raises(PluginError, match=r"^limit must be None or an integer >= 0, got -1\. Fix:"):
        check_data_files([tmp_path / "x.json"], limit=-1)


def test_the_loader_is_chosen_by_the_caller(shared_data_dir):
    from instructedit_plugin.data import MQuAKECase, load_mquake

    checked = check_data_files({"mq": shared_data_dir / "mquake/MQuAKE-hard.json"}, limit=2, loader=load_mquake)
    assert len(checked["mq"].records) == 2 and isinstance(checked["mq"].records[0], MQuAKECase)
    with pytest.raises(DataFilesError, match="does not parse"):  # MQuAKE cases checked with the MQuAKE schema
        check_data_files({"mq": shared_data_dir / "counterfact/counterfact-train.json"}, limit=2, loader=load_mquake)
    assert issubclass(DataSchemaError, PluginError)


# ------------------------------------------------------------------------------- the commands
def _cli(argv: list[str]) -> Callable[[], int]:
    return lambda: main(argv)


def _script(name: str, argv: list[str]) -> Callable[[], int]:
    return lambda: run_script(name, _load_example(name).main, argv)


def _data_dir_with(tmp: Path, shared: Path, files: list[str], truncated: str | None) -> Path:
    """A data folder holding ``files`` (links to the shared ones) and, if given, a truncated ``truncated``."""
    root = tmp / "data"
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(shared / rel)
    if truncated:
        _truncated_copy(shared / truncated, root / truncated)
    root.mkdir(exist_ok=True)
    return root


IE_FILES = ["counterfact/train_cf.json", "recent/recent_train.json", "convsent/blender_val.json",
            "counterfact/test_cf-generate-10.jsonl", "convsent/blender_test.json", "zsre/zsre_mend_eval_portability_gpt4.json"]


def _case_args(case: str, broken: str, tmp: Path, shared: Path) -> tuple[Callable[[], int], str, str]:
    """``(run, prog, name of the file the message must name)`` for one command and one kind of broken file."""
    truncated = broken == "truncated"

    def file_(rel: str) -> Path:  # a missing file, or a truncated copy of the shared one
        target = tmp / "in" / Path(rel).name
        return _truncated_copy(shared / rel, target) if truncated else target

    if case == "train-instructed":
        f = file_("counterfact/counterfact-train.json")
        return _cli(["train", "--hparams", str(HP / "TRAINING/InstructEd/gemma-3-270m.yaml"), "--train", str(f)]), \
            "instructedit", str(f)
    if case == "train-instructed-val":
        f = file_("counterfact/counterfact-val.json")
        return _cli(["train", "--hparams", str(HP / "TRAINING/InstructEd/gemma-3-270m.yaml"), "--data_dir", str(shared),
                     "--train", "counterfact/counterfact-train.json", "--val", str(f), "--limit", "5"]), "instructedit", str(f)
    if case == "train-instructedit-task":
        f = file_("recent/recent_train.json")
        return _cli(["train", "--hparams", str(HP / "TRAINING/InstructEdit/gemma-3-270m.yaml"), "--data_dir", str(shared),
                     "--task", "counterfact=counterfact/counterfact-train.json", "--task", f"recent={f}", "--limit", "5"]), \
            "instructedit", str(f)
    if case == "train-instructedit-defaults":
        present = ["counterfact/counterfact-train.json", "convsent/blender_val.json"]
        root = _data_dir_with(tmp, shared, present, "recent/recent_train.json" if truncated else None)
        return _cli(["train", "--hparams", str(HP / "TRAINING/InstructEdit/gemma-3-270m.yaml"), "--data_dir", str(root),
                     "--limit", "5"]), "instructedit", "recent/recent_train.json"
    if case == "evaluate":
        f = file_("counterfact/counterfact-edit.json")
        return _cli(["evaluate", "--hparams", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data", str(f), "--limit", "5"]), \
            "instructedit", str(f)
    if case == "analyze":
        f = file_("convsent/blender_test.json")
        return _cli(["analyze", "--archive", str(tmp / "editor"), "--data_dir", str(shared), "--n_per_task", "3",
                     "--tasks", f"counterfact,convsent={f}"]), "instructedit", str(f)
    if case == "run_instructed":
        root = _data_dir_with(tmp, shared, [], "zsre/ZsRE-test-all.json" if truncated else None)
        return _script("run_instructed", ["--hparams_dir", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data_dir", str(root),
                                          "--data_type", "zsre", "--archive", str(tmp / "prefixes")]), \
            "run_instructed", "zsre/ZsRE-test-all.json"
    if case == "run_instructed-training":
        f = file_("counterfact/counterfact-train.json")
        return _script("run_instructed", ["--hparams_dir", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data_dir",
                                          str(shared), "--data_type", "zsre", "--ds_size", "3", "--train_data", str(f)]), \
            "run_instructed", str(f)
    if case == "run_instructedit":
        present = [rel for rel in IE_FILES if rel != "recent/recent_train.json" or truncated]
        if truncated:
            present.remove("convsent/blender_test.json")
        root = _data_dir_with(tmp, shared, present, "convsent/blender_test.json" if truncated else None)
        return _script("run_instructedit", ["--data_dir", str(root), "--hparams_dir",
                                            str(HP / "TRAINING/InstructEdit/gemma-3-270m.yaml"), "--ds_size", "3",
                                            "--train_size", "3"]), \
            "run_instructedit", "convsent/blender_test.json" if truncated else "recent/recent_train.json"
    if case == "run_mquake":
        root = _data_dir_with(tmp, shared, [], "mquake/MQuAKE-hard.json" if truncated else None)
        return _script("run_mquake", ["--hparams_dir", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data_dir", str(root),
                                      "--archive", str(tmp / "prefixes")]), "run_mquake", "mquake/MQuAKE-hard.json"
    raise AssertionError(case)


CASES = ["train-instructed", "train-instructed-val", "train-instructedit-task", "train-instructedit-defaults",
         "evaluate", "analyze", "run_instructed", "run_instructed-training", "run_instructedit", "run_mquake"]


@pytest.mark.parametrize("broken", ["missing", "truncated"])
@pytest.mark.parametrize("case", CASES)
def test_a_broken_data_file_fails_fast_before_any_model(case, broken, tmp_path, shared_data_dir, no_model_loading, capsys):
    run, prog, named = _case_args(case, broken, tmp_path, shared_data_dir)
    capsys.readouterr()
    started = time.perf_counter()
    rc = run()
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_ERROR, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert named in lines[0] and "Fix:" in lines[0], lines[0]
    assert ("not found" if broken == "missing" else "does not parse") in lines[0], lines[0]
    assert elapsed < FAST_S, f"{case}: {elapsed:.2f}s"


def test_defaults_name_every_missing_file_at_once(tmp_path, no_model_loading, capsys):
    rc = main(["train", "--hparams", str(HP / "TRAINING/InstructEdit/gemma-3-270m.yaml"), "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.startswith("instructedit: error: 3 data files not found: ")
    for task, rel in (("counterfact", "counterfact/counterfact-train.json"), ("recent", "recent/recent_train.json"),
                      ("convsent", "convsent/blender_val.json")):
        assert f"task {task} (default) {rel}" in err
    rc = main(["analyze", "--archive", str(tmp_path / "editor"), "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.startswith("instructedit: error: 4 data files not found: ")


def test_example_main_raises_the_plugin_error_in_python(tmp_path, no_model_loading):
    run = _load_example("run_mquake")
    with pytest.raises(DataFilesError, match=r"data file not found: MQuAKE file .*MQuAKE-hard\.json.*Fix:"):
        run.main(["--hparams_dir", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data_dir", str(tmp_path)])


def test_run_mquake_checks_the_notes_file_too(tmp_path, shared_data_dir, no_model_loading, capsys):
    started = time.perf_counter()
    rc = run_script("run_mquake", _load_example("run_mquake").main,
                    ["--hparams_dir", str(HP / "InstructEd/gemma-3-270m.yaml"), "--data_dir", str(shared_data_dir),
                     "--ds_size", "2", "--notes", str(tmp_path / "notes.md")])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and "--notes" in err and "notes.md" in err and "Fix:" in err, err
    assert time.perf_counter() - started < FAST_S


def test_good_files_get_past_the_check(tmp_path, shared_data_dir, no_model_loading, capsys):
    """The check lets good data through: the run goes on to the model (which the fixture refuses)."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", "--hparams", str(HP / "TRAINING/InstructEd/gemma-3-270m.yaml"), "--data_dir", str(shared_data_dir),
              "--train", "counterfact/counterfact-train.json", "--limit", "5"])
