"""One device resolver, one YAML reader, one file writer, and EasyEdit bridges scoped to the plugin.

* :func:`~instructedit_plugin.core.devices.resolve_device` maps every spelling to the right device
  (with and without CUDA) and names the field on a bad value; the trainers use this one function.
* :func:`~instructedit_plugin.core.config.read_yaml` appends ``.yaml``, and every hparams loader
  (plugin classes, EasyEdit's classes through the bridge, ``load_hparams``, the command line)
  reports a missing or broken file the same way.
* Writes interrupted mid-way (``os.replace`` or the folder swap failing, a renderer failing) leave
  the previous cache file/folder, report, benchmark result and shipped prefixes intact.
* The ``BaseEditor`` wrappers call EasyEdit's own function with the caller's very arguments for an
  algorithm that is not the plugin's (the PyPI ``cuda`` redirect being the one exception), and
  validate arguments for the plugin's algorithms. (EasyEdit main end to end:
  ``tests/test_easyedit_main.py``.)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instructedit_plugin.core import devices, durable
from instructedit_plugin.core.config import read_yaml, yaml_path
from instructedit_plugin.errors import HyperParamsError, RequestError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def easyedit():
    import instructedit_plugin

    return instructedit_plugin.register()


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "auto", 0, "0", 3, "cuda", "cuda:1", " CUDA:0 ", "cpu", torch.device("cuda", 2)])
def test_every_cuda_spelling_lands_on_the_cpu_without_cuda(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device(value) == torch.device("cpu")


@pytest.mark.parametrize("value,expected", [
    (None, torch.device("cuda", 0)), ("auto", torch.device("cuda", 0)), (0, torch.device("cuda", 0)),
    ("2", torch.device("cuda", 2)), ("cuda", torch.device("cuda")), ("cuda:1", torch.device("cuda", 1)),
    ("cpu", torch.device("cpu")), (torch.device("cuda", 3), torch.device("cuda", 3)),
])
def test_cuda_spellings_keep_their_index_with_cuda(monkeypatch, value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device(value) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:", -1, True, 1.5, ["cpu"], ""])
def test_a_value_that_is_no_device_names_the_field(value):
    with pytest.raises(HyperParamsError) as info:
        devices.resolve_device(value, field="device", source="hp.yaml")
    assert info.value.field == "device" and "Fix:" in str(info.value) and "hp.yaml" in str(info.value)


def test_the_trainers_and_the_pypi_shim_use_the_one_resolver(monkeypatch):
    from instructedit_plugin.compat import devices as compat_devices
    from instructedit_plugin.instructed import trainer as instructed_trainer
    from instructedit_plugin.instructedit import dataset as instructedit_dataset

    assert instructed_trainer.resolve_device is devices.resolve_device
    assert instructedit_dataset.resolve_device is devices.resolve_device
    assert not hasattr(instructedit_dataset, "_torch_device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compat_devices.map_device("cuda:cpu") == "cpu"  # PyPI's f"cuda:{device}" on `device: cpu`
    assert compat_devices.map_device("cuda:1") == torch.device("cpu")
    assert compat_devices.map_device(torch.float16) is torch.float16  # not a device: untouched


# ----------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------
def test_read_yaml_appends_the_suffix_only_when_missing(tmp_path):
    (tmp_path / "qwen2.5-7b.yaml").write_text("alg_name: FT\n")
    (tmp_path / "other.yml").write_text("alg_name: ROME\n")
    assert yaml_path(tmp_path / "qwen2.5-7b") == tmp_path / "qwen2.5-7b.yaml"
    assert read_yaml(tmp_path / "qwen2.5-7b") == ({"alg_name": "FT"}, str(tmp_path / "qwen2.5-7b.yaml"))
    assert read_yaml(tmp_path / "other.yml")[0] == {"alg_name": "ROME"}


def _loaders():
    from easyeditor import FTHyperParams

    from instructedit_plugin.cli import _peek_alg
    from instructedit_plugin.compat import load_easyedit_hparams
    from instructedit_plugin.instructed import InstructEdHyperParams
    from instructedit_plugin.registry import load_hparams

    return {
        "plugin class": InstructEdHyperParams.from_hparams,
        "load_hparams": load_hparams,
        "EasyEdit class": lambda path: load_easyedit_hparams(FTHyperParams, path),
        "cli": lambda path: _peek_alg(path) or (_ for _ in ()).throw(LookupError("unreadable")),
    }


@pytest.mark.parametrize("text,problem", [(None, "no hparams file"), ("alg_name: [unclosed\n", "not valid YAML"),
                                          ("- a\n- b\n", "not a mapping")])
def test_every_hparams_loader_reports_a_bad_file_the_same_way(tmp_path, easyedit, text, problem):
    if text is not None:
        (tmp_path / "hp.yaml").write_text(text)
    for name, load in _loaders().items():
        if name == "cli":  # the command line only peeks: an unreadable file is None, load_hparams reports it
            with pytest.raises(LookupError):
                load(tmp_path / "hp")
            continue
        with pytest.raises(HyperParamsError) as info:
            load(tmp_path / "hp")  # no suffix: ".yaml" is appended
        assert info.value.field == "<file>" and problem in str(info.value), name
        assert "Fix:" in str(info.value) and str(tmp_path / "hp.yaml") in str(info.value), name


def test_every_hparams_loader_appends_yaml(tmp_path, easyedit):
    text = (REPO / "hparams/FT/tiny-gpt2.yaml").read_text().replace("set-by-test", "some/hub-model")
    (tmp_path / "ft.yaml").write_text(text + "alg: FT\n")
    from easyeditor import FTHyperParams

    for name, load in _loaders().items():
        if name == "plugin class":
            continue  # an FT file is not an InstructEd file (covered by tests/test_hparams.py)
        loaded = load(tmp_path / "ft")
        if name == "cli":
            assert loaded == "FT"
        else:
            assert isinstance(loaded, FTHyperParams) and loaded.layers == [2, 3], name


# ----------------------------------------------------------------------------------------------
# Interrupted writes keep the previous version
# ----------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _failing_replace(monkeypatch, fail_at: int = 1):
    real, calls = os.replace, {"n": 0}

    def replace(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("disk full (simulated)")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_cache_file_survives_an_interrupted_rewrite(tmp_path, monkeypatch):
    from instructedit_plugin.models import cache

    target = tmp_path / "info.json"
    cache.write_json(target, {"generation": 1})
    before = target.read_bytes()
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        cache.write_json(target, {"generation": 2})
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        cache.atomic_write_file(target, lambda tmp: tmp.write_text("half"))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["info.json"]  # no temp file left behind
    cache.write_json(target, {"generation": 2})
    assert cache.read_json(target) == {"generation": 2}


@pytest.mark.parametrize("swap", ["exchange", "move-aside"])
def test_cache_folder_survives_an_interrupted_rebuild(tmp_path, monkeypatch, swap):
    from instructedit_plugin.models import cache

    final = tmp_path / "model"
    with cache.atomic_dir(final) as tmp:
        (tmp / "config.json").write_text('{"generation": 1}')
        (tmp / "weights.bin").write_bytes(b"\x01" * 1000)
    before = _snapshot(final)
    if swap == "exchange":  # the atomic swap itself fails
        monkeypatch.setattr(durable, "exchange_paths", lambda a, b: (_ for _ in ()).throw(OSError("simulated")))
    else:  # no atomic swap here, and the rename of the new folder into place fails
        monkeypatch.setattr(durable, "exchange_paths", lambda a, b: False)
        _failing_replace(monkeypatch, fail_at=3)  # 1: replace onto the existing folder, 2: old aside, 3: new in
    with pytest.raises(OSError, match="simulated"), cache.atomic_dir(final) as tmp:
        (tmp / "config.json").write_text('{"generation": 2}')
        (tmp / "weights.bin").write_bytes(b"\x02" * 10)
    monkeypatch.undo()
    assert _snapshot(final) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or set-aside folder left behind


def test_cache_folder_swap_is_atomic_and_replaces_the_old_folder(tmp_path):
    from instructedit_plugin.models import cache

    final = tmp_path / "model"
    for generation in (1, 2):
        with cache.atomic_dir(final) as tmp:
            (tmp / f"g{generation}.txt").write_text(str(generation))
            assert not (final / f"g{generation}.txt").exists()  # nothing visible before the block ends
    assert _snapshot(final) == {"g2.txt": b"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_report_survives_an_interrupted_rewrite(tmp_path, monkeypatch):
    from instructedit_plugin.evaluation import report

    rows = {"FT": {"Rel": 50.0, "Gen": 40.0}, "InstructEd": {"Rel": 90.0, "Gen": 80.0}}
    report.write_report(tmp_path, "results", {"generation": 1}, rows=rows, title="first")
    before = _snapshot(tmp_path)
    assert sorted(before) == ["results.json", "results.md", "results.png"]
    new_rows = {"FT": {"Rel": 10.0}}

    _failing_replace(monkeypatch)  # the first file's rename fails
    with pytest.raises(OSError, match="simulated"):
        report.write_report(tmp_path, "results", {"generation": 2}, rows=new_rows, title="second")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before

    monkeypatch.setattr(report, "bar_chart_png", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("renderer")))
    with pytest.raises(RuntimeError, match="renderer"):  # rendering fails before any file is touched
        report.write_report(tmp_path, "results", {"generation": 2}, rows=new_rows, title="second")
    assert _snapshot(tmp_path) == before


def test_evaluation_results_and_benchmark_results_survive_an_interrupted_rewrite(tmp_path, monkeypatch):
    from benchmarks.results_io import write_results
    from instructedit_plugin.instructedit.evaluate import save_results

    def render(out):
        return f"# {out['generation']}\n"

    save_results({"generation": 1}, tmp_path / "eval.json", tmp_path / "eval.md")
    write_results(tmp_path / "bench.json", {"generation": 1}, render, ["generation"])
    before = _snapshot(tmp_path)
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_results({"generation": 2}, tmp_path / "eval.json", tmp_path / "eval.md")
    _failing_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_results(tmp_path / "bench.json", {"generation": 2}, render, ["generation"])
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    write_results(tmp_path / "bench.json", {"generation": 2}, render, ["generation"])
    assert (tmp_path / "bench.md").read_text() == "# 2\n"
    assert json.loads((tmp_path / "bench.json").read_text()) == {"generation": 2}


def test_shipped_prefixes_survive_an_interrupted_regenerate(tmp_path, monkeypatch):
    from instructedit_plugin.instructed import checkpoint, recipes, shipped

    files = ("adapter_model.safetensors", "adapter_config.json")

    def fake_archive(generation: int) -> Path:
        folder = tmp_path / f"run{generation}"
        folder.mkdir()
        for name in (*files, checkpoint.MANIFEST_FILE):
            (folder / name).write_bytes(f"{name} {generation}".encode() * 50)
        return folder

    monkeypatch.setattr(checkpoint, "read_manifest", lambda archive: {"files": {name: "sha" for name in files}})

    monkeypatch.setattr(shipped, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setattr(recipes, "recipe_info", lambda archive: {"key": archive.name, "steps": 3})
    monkeypatch.setattr(recipes, "train_embedded_prefixes", lambda **kw: fake_archive(1))
    target = shipped.regenerate()
    before = _snapshot(target)
    assert sorted(before) == sorted([*files, checkpoint.MANIFEST_FILE, shipped.RECIPE_FILE])
    assert json.loads(before[shipped.RECIPE_FILE])["key"] == "run1"

    monkeypatch.setattr(recipes, "train_embedded_prefixes", lambda **kw: fake_archive(2))
    monkeypatch.setattr(durable, "exchange_paths", lambda a, b: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        shipped.regenerate()
    assert _snapshot(target) == before
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [target.name]

    monkeypatch.setattr(durable, "exchange_paths", _real_exchange)
    shutil.rmtree(tmp_path / "run2")
    shipped.regenerate()
    assert json.loads((target / shipped.RECIPE_FILE).read_text())["key"] == "run2"


_real_exchange = durable.exchange_paths


# ----------------------------------------------------------------------------------------------
# BaseEditor wrappers: the plugin's algorithms only
# ----------------------------------------------------------------------------------------------
def _spy():
    """A stand-in for EasyEdit's ``edit``/``batch_edit`` (same parameters) that records its call."""
    calls = []

    def method(self, prompts, target_new, ground_truth=None, rephrase_prompts=None, locality_inputs=None,
               portability_inputs=None, sequential_edit=False, verbose=True, **kwargs):
        calls.append((self, (prompts, target_new), dict(kwargs, sequential_edit=sequential_edit,
                                                       locality_inputs=locality_inputs),
                      "to" in vars(torch.Tensor)))  # last: was the cuda redirect active?
        return "easyedit's result"

    return method, calls


def _init_spy():
    calls = []

    def __init__(self, hparams):
        calls.append((self, (hparams,), {}, "to" in vars(torch.Tensor)))

    return __init__, calls


PLUGIN = {"ToyEdit"}


@pytest.mark.parametrize("flavour", ["main", "pypi"])
@pytest.mark.parametrize("name", ["edit", "batch_edit"])
def test_edit_wrappers_call_easyedit_straight_through_for_its_own_algorithms(flavour, name):
    from instructedit_plugin.compat.editor_patches import _validating

    method, calls = _spy()
    wrapped = _validating(flavour, name, lambda alg: alg in PLUGIN)(method)
    editor = SimpleNamespace(alg_name="FT", hparams=SimpleNamespace(device="cpu"))
    prompts, targets, extra = ["a", "b"], ["x"], {"locality_inputs": {"nq": {"prompt": "p"}}}  # invalid for the plugin
    assert wrapped(editor, prompts, targets, sequential_edit=True, **extra) == "easyedit's result"
    (self_, args, kwargs, redirected), = calls
    assert self_ is editor and args[0] is prompts and args[1] is targets
    assert kwargs == {"sequential_edit": True, **extra} and kwargs["locality_inputs"] is extra["locality_inputs"]
    assert redirected == (flavour == "pypi")  # PyPI's hard-coded cuda devices: the one change for everyone

    calls.clear()
    with pytest.raises(RequestError, match="`target_new` has 1 item"):  # the plugin's own algorithm: validated
        wrapped(SimpleNamespace(alg_name="ToyEdit", hparams=SimpleNamespace(device="cpu")), prompts, targets)
    assert calls == []


@pytest.mark.parametrize("flavour", ["main", "pypi"])
def test_editor_init_calls_easyedit_straight_through_for_its_own_algorithms(flavour, tmp_path):
    from instructedit_plugin.compat.editor_patches import _editor_init

    init, calls = _init_spy()
    wrapped = _editor_init(flavour, lambda alg: alg in PLUGIN)(init)
    hparams = SimpleNamespace(alg_name="FT", model_name=str(tmp_path / "no-model"), device="cpu")
    editor = object()
    wrapped(editor, hparams)  # a model name the plugin would refuse: EasyEdit decides
    (self_, args, kwargs, redirected), = calls
    assert self_ is editor and args == (hparams,) and kwargs == {}
    assert hparams.model_name == str(tmp_path / "no-model")
    assert redirected == (flavour == "pypi")

    plugin_hparams = SimpleNamespace(alg_name="ToyEdit", model_name=str(tmp_path / "no-model"), device="cpu")
    with pytest.raises(HyperParamsError, match="model_name"):
        wrapped(object(), plugin_hparams)
    assert len(calls) == 1


def test_installed_wrappers_wrap_easyedit_functions(easyedit):
    from easyeditor import BaseEditor

    for name in ("__init__", "edit", "batch_edit"):
        original = BaseEditor.__dict__[name].__wrapped_original__
        assert original.__module__ == "easyeditor.editors.editor", name
