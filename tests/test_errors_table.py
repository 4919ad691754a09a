"""Every row of docs/errors.md is triggered here, and the table and the real errors cannot drift apart.

The test reads the table from ``docs/errors.md`` by its ``id`` column. For each row it runs the
matching trigger below (the case, made real), and checks that

* the exception raised (or the CLI's exit code) is the one the ``error`` column names,
* the message is the one in the ``message`` column (copied from a real run; ``<tmp>`` stands for
  the test's temporary folder and ``…`` for a part that varies, e.g. a list of known names),
* the message names the ``field`` and says how to fix it (``Fix:``, or pip's ``Install it with:``,
  or argparse's ``usage:`` line for command-line usage errors).

Every documented id has a trigger and every trigger a documented row. To print the messages of
all triggers, normalised as in the table: ``python -m tests.test_errors_table``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
SHARED_DATA = REPO.parent / "shared" / "data"
FIX_MARKERS = ("Fix:", "Install it with:", "usage:")


@dataclasses.dataclass
class Outcome:
    error: str  # exception class name (any class in its MRO matches), or "exit N" for the CLI
    message: str
    mro: tuple[str, ...] = ()
    extra: str = ""  # the CLI's usage line, for the fix check


@dataclasses.dataclass
class Ctx:
    tmp: Path
    data: Path

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path


def _raised(fn: Callable[[], object]) -> Outcome:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the point is to see what is raised
        return Outcome(type(exc).__name__, str(exc), tuple(c.__name__ for c in type(exc).__mro__))
    raise AssertionError("the trigger raised nothing")


def _cli(argv: list[str]) -> Outcome:
    from instructedit_plugin.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    errors = [line for line in err.getvalue().splitlines() if line.strip()]
    printed = [line for line in out.getvalue().splitlines() if line.strip()]
    usage = next((line for line in errors + printed if line.startswith("usage:")), "")
    # the error line argparse / the CLI writes last on stderr; else (no command) the help's first line
    message = errors[-1] if errors else (printed[0] if printed else "")
    return Outcome(f"exit {code}", message, extra=usage)


# ----------------------------------------------------------------------------------------------
# Builders shared by several triggers
# ----------------------------------------------------------------------------------------------
INSTRUCTED_YAML = (REPO / "hparams/InstructEd/tiny.yaml").read_text(encoding="utf-8")


def _model_dir(ctx: Ctx) -> Path:
    """A local 'model' folder with only a config.json (4 layers): enough for the layer checks."""
    folder = ctx.tmp / "model-4-layers"
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig

        LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128).save_pretrained(folder)
    return folder


def _archive(ctx: Ctx, model_type: str = "llama") -> Path:
    from instructedit_plugin.instructed.checkpoint import save_checkpoint
    from instructedit_plugin.instructed.prefix import PrefixBank

    folder = ctx.tmp / f"archive-{model_type}"
    if not (folder / "manifest.json").is_file():
        config = {"model_type": model_type, "num_hidden_layers": 4, "hidden_size": 32}
        save_checkpoint(folder, PrefixBank([1, 2], 5, 32), reweight_mode="paper",
                        template="Instructions: {instruction}\nInput: ", encoder="default", model_config=config)
    return folder


def _instructed_yaml(ctx: Ctx, name: str, replace: dict[str, str] | None = None, add: str = "",
                     model: bool = False) -> Path:
    text = INSTRUCTED_YAML
    for key, value in (replace or {}).items():
        text = re.sub(rf"(?m)^{key}:.*$", f"{key}: {value}" if value is not None else "", text)
    if model:
        text = re.sub(r'(?m)^model_name:.*$', f'model_name: "{_model_dir(ctx)}"', text)
    return ctx.write(f"{name}.yaml", text + add)


def _load_instructed(ctx: Ctx, name: str, **kwargs) -> Callable[[], object]:
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    path = _instructed_yaml(ctx, name, **kwargs)
    return lambda: InstructEdHyperParams.from_hparams(path)


def _data_error(ctx: Ctx, relpath: str, fmt: str, mutate: Callable[[list], None]) -> Callable[[], object]:
    """A copy of a real dataset file (its first 3 records) with one record broken by ``mutate``."""
    from instructedit_plugin.data import load_requests, read_records

    records = read_records(ctx.data / relpath, limit=3)
    mutate(records)
    path = ctx.tmp / "data" / fmt / Path(relpath).name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return lambda: load_requests(path, fmt=fmt)


def _validate(**kwargs) -> Callable[[], object]:
    from instructedit_plugin.compat.edit_arguments import validate_edit_arguments

    return lambda: validate_edit_arguments(**kwargs)


def _tampered_checkpoint(ctx: Ctx) -> Path:
    from instructedit_plugin.instructed.checkpoint import save_checkpoint
    from instructedit_plugin.instructed.prefix import PrefixBank

    folder = ctx.tmp / "tampered"
    save_checkpoint(folder, PrefixBank([1, 2], 5, 32), reweight_mode="paper",
                    template="Instructions: {instruction}\nInput: ", encoder="default",
                    model_config={"model_type": "llama", "hidden_size": 32})
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    return folder


def _saved_memory(ctx: Ctx, name: str):
    import torch

    from instructedit_plugin.instructed.memory import InstructionMemory

    memory = InstructionMemory(None)
    memory.add(["The capital of France is Rome."], embeddings=torch.eye(8)[:1])
    memory.save(ctx.tmp / name)
    return ctx.tmp / name


class _FakeEncoder:
    def __init__(self, tag: str, dim: int = 8):
        self.tag, self._dim = tag, dim

    dim = property(lambda self: self._dim)
    identity = property(lambda self: {"name": self.tag, "dim": self._dim, "weights_sha256": self.tag * 4,
                                      "config_sha256": "0"})

    def encode(self, texts):
        import torch

        return torch.nn.functional.normalize(torch.ones(len(texts), self._dim), dim=1)


def _ie_training_config(ctx: Ctx, results: Path, **overrides):
    from instructedit_plugin.instructedit import InstructEditTrainingHparams

    cfg = InstructEditTrainingHparams.from_hparams(REPO / "hparams/TRAINING/InstructEdit/tiny.yaml")
    cfg.model_name = str(ctx.tmp / "ie-tiny-gpt2")  # names the run folder only: the model is passed in
    cfg.results_dir = str(results)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _ie_model(n_head: int = 2):
    """A tiny random GPT-2 (4 layers, the tiny YAML's inner_params exist), built in milliseconds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=n_head, n_inner=64, vocab_size=128, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _ie_checkpoint(ctx: Ctx) -> Path:
    """An untrained InstructEdit editor for the tiny GPT-2, saved once per session as ``last/``
    (editor + optimiser state): a real checkpoint without any training step."""
    from instructedit_plugin.instructedit import InstructEditTrainer
    from instructedit_plugin.instructedit.trainer import run_dir

    cfg = _ie_training_config(ctx, ctx.tmp / "ie-results")
    last = run_dir(cfg) / "last"
    if not (last / "manifest.json").is_file():
        InstructEditTrainer(cfg, None, None, model=_ie_model()).save("last", None)
    return last


def _ie_copy(ctx: Ctx, name: str) -> Path:
    import shutil

    folder = ctx.tmp / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(_ie_checkpoint(ctx), folder)
    return folder


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # still a valid file of its kind, with other contents
    path.write_bytes(bytes(data))


class _MarkerPayload:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for arbitrary code in a crafted archive."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------------------
# Triggers, one per row of docs/errors.md
# ----------------------------------------------------------------------------------------------
def trig_hp_unknown_key(ctx):
    return _raised(_load_instructed(ctx, "unknown", add="prefix_lenght: 5\n"))


def trig_hp_unknown_key_no_match(ctx):
    return _raised(_load_instructed(ctx, "unknown2", add="colour: blue\n"))


def trig_hp_missing_key(ctx):
    from instructedit_plugin.instructed.instructed_hparams import InstructEdTrainingHparams

    path = ctx.write("train-missing.yaml", "alg: InstructEd\nprefix_len: 5\n")
    return _raised(lambda: InstructEdTrainingHparams.from_hparams(path))


def trig_hp_wrong_type(ctx):
    return _raised(_load_instructed(ctx, "wrongtype", replace={"prefix_len": "five"}))


def trig_hp_wrong_type_list(ctx):
    return _raised(_load_instructed(ctx, "wronglist", replace={"prefix_layers": "one"}))


def trig_hp_out_of_range(ctx):
    return _raised(_load_instructed(ctx, "range", replace={"retrieval_gate": "2.0"}))


def trig_hp_below_minimum(ctx):
    return _raised(_load_instructed(ctx, "below", replace={"top_k": "0"}))


def trig_hp_not_finite(ctx):
    return _raised(_load_instructed(ctx, "nan", replace={"retrieval_gate": ".nan"}))


def trig_hp_key_not_text(ctx):
    return _raised(_load_instructed(ctx, "intkey", add="1: 2\n"))


def trig_hp_bad_choice(ctx):
    return _raised(_load_instructed(ctx, "choice", replace={"reweight_mode": "sideways"}))


def trig_hp_bad_device(ctx):
    return _raised(_load_instructed(ctx, "device", replace={"device": "gpu"}))


def trig_hp_layers_beyond_model(ctx):
    return _raised(_load_instructed(ctx, "beyond", replace={"prefix_layers": "[3, 4]"}, model=True))


def trig_hp_layers_outside_model(ctx):
    return _raised(_load_instructed(ctx, "outside", replace={"prefix_layers": "[8, 9]"}, model=True))


def trig_hp_layers_not_contiguous(ctx):
    return _raised(_load_instructed(ctx, "gap", replace={"prefix_layers": "[0, 2]"}))


def trig_hp_layers_vs_archive(ctx):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams
    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model

    from instructedit_plugin.instructed.checkpoint import save_checkpoint
    from instructedit_plugin.instructed.prefix import PrefixBank

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(_model_dir(ctx)))
    archive = ctx.tmp / "archive-this-model"  # trained for this very model: only the layers disagree
    if not (archive / "manifest.json").is_file():
        save_checkpoint(archive, PrefixBank([1, 2], 5, model.config.hidden_size), reweight_mode="paper",
                        template="Instructions: {instruction}\nInput: ", encoder="default", model_config=model.config)
    hparams = InstructEdHyperParams.from_dict(dict(alg_name="InstructEd", model_name=str(_model_dir(ctx)),
                                                   archive=str(archive), device="cpu", prefix_layers=[0, 1]))
    request = {"prompt": "Where does Ann live?", "target_new": "Rome"}
    return _raised(lambda: apply_instructed_to_model(model, None, [request], hparams))


def trig_hp_template(ctx):
    return _raised(_load_instructed(ctx, "template", replace={"template": '"Fact: {fact} Question: "'}))


def trig_hp_alg_mismatch(ctx):
    return _raised(_load_instructed(ctx, "alg", replace={"alg_name": "MEND"}))


def trig_hp_archive_missing(ctx):
    return _raised(_load_instructed(ctx, "noarchive", replace={"archive": None}))


def trig_hp_archive_not_found(ctx):
    load = _load_instructed(ctx, "archive404", replace={"archive": f'"{ctx.tmp / "no-such-run" / "best"}"'})
    return _raised(lambda: load().check_ready())


def trig_hp_archive_default_missing(ctx):
    import instructedit_plugin.instructed.shipped as shipped

    saved = shipped.ASSETS_DIR
    shipped.ASSETS_DIR = ctx.tmp / "assets"  # an install without the shipped prefixes
    try:
        load = _load_instructed(ctx, "archive-default", replace={"archive": "default"})
        return _raised(lambda: load().check_ready())
    finally:
        shipped.ASSETS_DIR = saved


def trig_hp_model_missing(ctx):
    from instructedit_plugin.compat import make_editor
    from instructedit_plugin.registry import load_hparams

    hparams = load_hparams(str(REPO / "hparams/FT/tiny-gpt2.yaml"), model_name=str(ctx.tmp / "no-model"))
    return _raised(lambda: make_editor(hparams))


def trig_hp_archive_not_a_checkpoint(ctx):
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    (ctx.tmp / "empty-run").mkdir(exist_ok=True)
    return _raised(lambda: load_checkpoint(ctx.tmp / "empty-run"))


def trig_hp_archive_other_model(ctx):
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    return _raised(lambda: load_checkpoint(_archive(ctx, "gpt2"), model_config={"model_type": "llama", "hidden_size": 32}))


def trig_ckpt_corrupted(ctx):
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    folder = _tampered_checkpoint(ctx)
    return _raised(lambda: load_checkpoint(folder))


def trig_ckpt_pickle(ctx):
    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    folder = ctx.tmp / "pickled"
    (folder).mkdir(exist_ok=True)
    import shutil

    shutil.copytree(_archive(ctx), folder, dirs_exist_ok=True)
    data = b"\x80\x04\x95 not safetensors: a pickle"
    (folder / "adapter_model.safetensors").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    manifest["files"]["adapter_model.safetensors"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return _raised(lambda: load_checkpoint(folder))


def trig_ckpt_newer_format(ctx):
    import shutil

    from instructedit_plugin.instructed.checkpoint import load_checkpoint

    folder = ctx.tmp / "future"
    shutil.copytree(_archive(ctx), folder, dirs_exist_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    manifest["plugin_version"] = "9.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return _raised(lambda: load_checkpoint(folder))


# -- InstructEdit editor checkpoints
def trig_ie_archive_missing(ctx):
    from instructedit_plugin.instructedit import InstructEditHyperParams

    text = (REPO / "hparams/InstructEdit/tiny.yaml").read_text(encoding="utf-8")
    path = ctx.write("ie-noarchive.yaml", re.sub(r"(?m)^archive:.*$", "archive: null", text))
    hparams = InstructEditHyperParams.from_hparams(path)
    # a folder that is not an editor checkpoint is refused the same way (same field, a fix)
    (ctx.tmp / "ie-not-a-checkpoint").mkdir(exist_ok=True)
    hparams.archive = str(ctx.tmp / "ie-not-a-checkpoint")
    other = _raised(hparams.check_ready)
    assert "HyperParamsError" in other.mro and "field 'archive'" in other.message and "Fix:" in other.message, other
    hparams.archive = None
    return _raised(hparams.check_ready)


def trig_ie_archive_other_model(ctx):
    from instructedit_plugin.instructedit import load_editor_for

    folder = _ie_checkpoint(ctx)
    other = _ie_model(n_head=4)  # same weight shapes, another architecture
    return _raised(lambda: load_editor_for(other, folder))


def trig_ie_archive_tampered(ctx):
    from instructedit_plugin.instructedit import load_editor

    folder = _ie_copy(ctx, "ie-tampered")
    _flip_byte(folder / "editor.safetensors")
    return _raised(lambda: load_editor(folder))


def trig_ie_archive_pickle(ctx):
    import pickle

    import torch

    from instructedit_plugin.instructedit import load_editor

    control = ctx.tmp / "ie-pickle-control"
    pickle.loads(pickle.dumps(_MarkerPayload(control), protocol=2)).close()
    assert control.exists(), "the payload is not live under ordinary unpickling: the check below would prove nothing"
    marker = ctx.tmp / "ie-pickle-marker"
    marker.unlink(missing_ok=True)
    path = ctx.tmp / "ie-evil.pk"  # EasyEdit-style archive whose unpickling would create the marker file
    payload = {"model": {"instructedit_meta": _MarkerPayload(marker), "edit_lrs": torch.ones(2)}}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    outcome = _raised(lambda: load_editor(path))
    assert not marker.exists(), "the crafted archive's pickle payload ran"
    return outcome


def trig_ie_resume_broken(ctx):
    import shutil

    from instructedit_plugin.instructedit import InstructEditTrainer
    from instructedit_plugin.instructedit.trainer import run_dir

    cfg = _ie_training_config(ctx, ctx.tmp / "ie-resume", resume=True)
    last = run_dir(cfg) / "last"
    if last.exists():
        shutil.rmtree(last)
    shutil.copytree(_ie_checkpoint(ctx), last)
    _flip_byte(last / "trainer_state.safetensors")
    return _raised(lambda: InstructEditTrainer(cfg, None, None, model=_ie_model()))


def trig_hp_encoder_offline(ctx):
    from instructedit_plugin.instructed.encoder import SentenceEncoder

    return _raised(lambda: SentenceEncoder("some-org/not-in-the-local-cache"))


def trig_hp_encoder_folder(ctx):
    from instructedit_plugin.instructed.encoder import SentenceEncoder

    return _raised(lambda: SentenceEncoder(str(ctx.tmp / "no-encoder-here")))


def trig_hp_encoder_backend_dtype(ctx):
    return _raised(_load_instructed(ctx, "onnx-bf16", add="encoder_backend: onnx\nencoder_dtype: bfloat16\n"))


def trig_hp_encoder_backend_missing(ctx):
    from unittest import mock

    from instructedit_plugin.instructed.encoder import SentenceEncoder

    def load():
        with mock.patch.dict(sys.modules, {"onnxruntime": None}):  # as on an install without the onnx extra
            return SentenceEncoder(backend="onnx")

    return _raised(load)


def trig_hp_file_missing(ctx):
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    return _raised(lambda: InstructEdHyperParams.from_hparams(ctx.tmp / "nope.yaml"))


def trig_hp_yaml_syntax(ctx):
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    path = ctx.write("syntax.yaml", "alg_name: [InstructEd\nmodel_name: x\n")
    return _raised(lambda: InstructEdHyperParams.from_hparams(path))


def trig_hp_not_mapping(ctx):
    from instructedit_plugin.instructed.instructed_hparams import InstructEdHyperParams

    path = ctx.write("list.yaml", "- alg_name\n- model_name\n")
    return _raised(lambda: InstructEdHyperParams.from_hparams(path))


def trig_hp_alg_name_missing(ctx):
    from instructedit_plugin.registry import load_hparams

    path = ctx.write("noalg.yaml", "model_name: x\n")
    return _raised(lambda: load_hparams(str(path)))


def trig_alg_unknown(ctx):
    from instructedit_plugin.registry import load_hparams

    path = ctx.write("unknownalg.yaml", "alg_name: NoSuchAlg\nmodel_name: x\n")
    return _raised(lambda: load_hparams(str(path)))


def trig_alg_easyedit_missing_key(ctx):
    from instructedit_plugin.registry import load_hparams

    path = ctx.write("ft-missing.yaml", "alg_name: FT\nmodel_name: x\n")
    return _raised(lambda: load_hparams(str(path)))


# -- edit requests
def trig_req_empty(ctx):
    return _raised(_validate(prompts=[], target_new=[]))


def trig_req_not_list(ctx):
    return _raised(_validate(prompts=5, target_new=["x"]))


def trig_req_length_mismatch(ctx):
    return _raised(_validate(prompts=["a", "b"], target_new=["x"]))


def trig_req_missing_target(ctx):
    return _raised(_validate(prompts=["a"], target_new=None))


def trig_req_non_string_prompt(ctx):
    return _raised(_validate(prompts=[3], target_new=["x"]))


def trig_req_empty_target(ctx):
    return _raised(_validate(prompts=["a"], target_new=["  "]))


def trig_req_non_string_ground_truth(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], ground_truth=[None]))


def trig_req_rephrase_length(ctx):
    return _raised(_validate(prompts=["a", "b"], target_new=["x", "y"], rephrase_prompts=["r"]))


def trig_req_subject(ctx):
    return _raised(_validate(prompts=["Ann lives in"], target_new=["Rome"], subject=["Bob"]))


def trig_req_locality_not_dict(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], locality_inputs=["q"]))


def trig_req_locality_keys(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], locality_inputs={"nq": {"prompt": ["q"]}}))


def trig_req_locality_str_vs_list(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], locality_inputs={"nq": {"prompt": "q", "ground_truth": ["y"]}}))


def trig_req_locality_not_lists(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], locality_inputs={"nq": {"prompt": 1, "ground_truth": 2}}))


def trig_req_locality_one_for_many(ctx):
    return _raised(_validate(prompts=["a", "b"], target_new=["x", "y"],
                             locality_inputs={"nq": {"prompt": "q", "ground_truth": "y"}}))


def trig_req_locality_answers(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"],
                             locality_inputs={"nq": {"prompt": ["q", "r"], "ground_truth": ["y"]}}))


def trig_req_locality_per_edit(ctx):
    return _raised(_validate(prompts=["a", "b"], target_new=["x", "y"],
                             locality_inputs={"nq": {"prompt": ["q"], "ground_truth": ["y"]}}))


def trig_req_locality_item(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"], locality_inputs={"nq": {"prompt": [7], "ground_truth": ["y"]}}))


def trig_req_portability_answers(ctx):
    return _raised(_validate(prompts=["a"], target_new=["x"],
                             portability_inputs={"one_hop": {"prompt": ["p", "q"], "ground_truth": ["z"]}}))


def trig_req_instructed_no_instruction(ctx):
    from instructedit_plugin.instructed.templates import instruction_of

    return _raised(lambda: instruction_of({"target_new": "Rome"}))


def trig_req_instructedit_task(ctx):
    from instructedit_plugin.instructions import format_instruction

    return _raised(lambda: format_instruction("poetry", "Write about Paris."))


def trig_req_instructedit_placeholder(ctx):
    from instructedit_plugin.instructions import format_instruction

    return _raised(lambda: format_instruction("convsent", "What do you think of Paris?", description=0,
                                              record={"target_new": "I love it"}))


# -- data files
def _delete(path: str, index: int = 1) -> Callable[[list], None]:
    def mutate(records: list) -> None:
        *parents, leaf = path.split(".")
        node = records[index]
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[leaf]

    return mutate


def _set(path: str, value, index: int = 1) -> Callable[[list], None]:
    def mutate(records: list) -> None:
        *parents, leaf = path.split(".")
        node = records[index]
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value

    return mutate


def trig_data_knowedit(ctx):
    return _raised(_data_error(ctx, "counterfact/train_cf.json", "knowedit", _delete("target_new")))


def trig_data_knowedit_nested(ctx):
    return _raised(_data_error(ctx, "recent/recent_train.json", "knowedit",
                               _set("locality.Forgetfulness", [{"prompt": "q", "ground_truth": 3}])))


def trig_data_counterfact_mend(ctx):
    return _raised(_data_error(ctx, "counterfact/counterfact-train.json", "counterfact_mend", _set("prompt", 42)))


def trig_data_counterfact_rome(ctx):
    return _raised(_data_error(ctx, "counterfact/counterfact_portability_gpt4.json", "counterfact_rome",
                               _set("requested_rewrite.prompt", "Paris is the capital of")))


def trig_data_counterfact_rome_ins(ctx):
    return _raised(_data_error(ctx, "instructed/portability/One_Hop/counterfact_portability_gpt4_ins.json",
                               "counterfact_rome_ins", _delete("ins")))


def trig_data_counterfact_subject_replace(ctx):
    return _raised(_data_error(ctx, "instructed/portability/Subject_Replace/counterfact_subject_replace.json",
                               "counterfact_subject_replace", _set("requested_rewrite.target_new", "Rome")))


def trig_data_zsre_mend(ctx):
    return _raised(_data_error(ctx, "zsre/zsre_mend_eval_portability_gpt4.json", "zsre_mend", _delete("loc_ans")))


def trig_data_zsre_answers(ctx):
    return _raised(_data_error(ctx, "zsre/zsre_mend_eval_portability_gpt4.json", "zsre_mend", _set("answers", [])))


def trig_data_zsre_mend_ins(ctx):
    return _raised(_data_error(ctx, "instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_ins.json",
                               "zsre_mend_ins", _set("ins", ["a", "list"])))


def trig_data_zsre_mend_dec(ctx):
    return _raised(_data_error(ctx, "instructed/portability/One_Hop/zsre_mend_eval_portability_gpt4_dec.jsonl",
                               "zsre_mend_dec", _set("questions_dec", "one string")))


def trig_data_zsre_subject_replace(ctx):
    return _raised(_data_error(ctx, "instructed/portability/Subject_Replace/zsre_subject_replace.json",
                               "zsre_subject_replace", _delete("alter_subject_question")))


def trig_data_zsre_inverse_relation(ctx):
    return _raised(_data_error(ctx, "instructed/portability/Inverse_Relation/zsre_inverse_relation.json",
                               "zsre_inverse_relation", _delete("inverse question")))


def trig_data_convsent(ctx):
    return _raised(_data_error(ctx, "convsent/blender_test.json", "convsent", _set("pos", [])))


def trig_data_mquake(ctx):
    return _raised(_data_error(ctx, "mquake/MQuAKE-hard.json", "mquake", _delete("requested_rewrite.2.question")))


def trig_data_record_not_object(ctx):
    return _raised(_data_error(ctx, "convsent/blender_test.json", "convsent", lambda r: r.__setitem__(2, "oops")))


def trig_data_invalid_json(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.write("bad/counterfact-edit.json", '[{"case_id": 1,}]')
    return _raised(lambda: load_requests(path))


def trig_data_invalid_json_lines(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.write("bad/test_cf-x.jsonl", '{"subject": "s", "prompt": "p", "target_new": "t"}\n{broken\n')
    return _raised(lambda: load_requests(path))


def trig_data_not_array(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.write("bad/counterfact-val.json", '"just a string"')
    return _raised(lambda: load_requests(path))


def trig_data_not_utf8(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.tmp / "bad" / "counterfact-train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes('[{"prompt": "caf\u00e9"}]'.encode("latin-1"))
    return _raised(lambda: load_requests(path))


def trig_data_file_missing(ctx):
    from instructedit_plugin.data import load_requests

    return _raised(lambda: load_requests(ctx.tmp / "missing" / "counterfact-train.json"))


def trig_data_preflight_missing(ctx):
    from instructedit_plugin.data.preflight import check_data_files

    files = {"--train": "counterfact/counterfact-train.json", "--val": "counterfact/no-val.json",
             "--task recent": str(ctx.tmp / "missing" / "recent_train.json")}
    return _raised(lambda: check_data_files(files, data_dir=ctx.data))


def trig_data_unknown_format(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.write("bad/mystery.json", json.dumps([{"foo": 1}]))
    return _raised(lambda: load_requests(path))


def trig_data_unknown_fmt_name(ctx):
    from instructedit_plugin.data import load_requests

    path = ctx.write("bad/mystery2.json", json.dumps([{"foo": 1}]))
    return _raised(lambda: load_requests(path, fmt="counterfact"))


def trig_data_bad_limit(ctx):
    from instructedit_plugin.data import load_requests

    return _raised(lambda: load_requests(ctx.data / "counterfact/counterfact-train.json", limit=-1))


def trig_data_dir_unset(ctx):
    import os

    from instructedit_plugin.data import DATA_DIR_ENV, resolve_data_dir

    saved = os.environ.pop(DATA_DIR_ENV, None)
    try:
        return _raised(resolve_data_dir)
    finally:
        if saved is not None:
            os.environ[DATA_DIR_ENV] = saved


def trig_data_task_descriptions(ctx):
    from instructedit_plugin.data import load_task_descriptions

    data = json.loads((ctx.data / "instructedit/easyedit_task_descriptions.json").read_text(encoding="utf-8"))
    data["tasks"]["zsre"][3] = 3
    path = ctx.write("data/task_descriptions/easyedit_task_descriptions.json", json.dumps(data))
    return _raised(lambda: load_task_descriptions(path))


def trig_data_task_descriptions_not_records(ctx):
    from instructedit_plugin.data import load_requests

    return _raised(lambda: load_requests(ctx.data / "instructedit/easyedit_task_descriptions.json"))


# -- saved memories
def trig_mem_not_a_memory(ctx):
    from instructedit_plugin.instructed.memory import InstructionMemory

    (ctx.tmp / "not-a-memory").mkdir(exist_ok=True)
    return _raised(lambda: InstructionMemory.load(ctx.tmp / "not-a-memory"))


def trig_mem_tampered(ctx):
    from instructedit_plugin.instructed.memory import InstructionMemory

    folder = _saved_memory(ctx, "tampered-memory")
    victim = folder / "records.jsonl"
    victim.write_text(victim.read_text().replace("Rome", "Lyon"))
    return _raised(lambda: InstructionMemory.load(folder))


def trig_mem_encoder_mismatch(ctx):
    from instructedit_plugin.instructed.memory import InstructionMemory

    memory = InstructionMemory(_FakeEncoder("a"))
    memory.add(["The capital of France is Rome."])
    memory.save(ctx.tmp / "encoded-memory")
    return _raised(lambda: InstructionMemory.load(ctx.tmp / "encoded-memory", _FakeEncoder("b")))


# -- missing optional dependencies
def trig_dep_faiss(ctx):
    from instructedit_plugin.instructed.memory import InstructionMemory

    saved = sys.modules.get("faiss", "absent")
    sys.modules["faiss"] = None  # an import of faiss fails as if it were not installed
    try:
        return _raised(lambda: InstructionMemory(None, index="flat"))
    finally:
        if saved == "absent":
            del sys.modules["faiss"]
        else:
            sys.modules["faiss"] = saved


def trig_dep_easyedit_placeholder(ctx):
    from instructedit_plugin.compat.missing_modules import PlaceholderModule

    timm = PlaceholderModule("timm", "timm")
    return _raised(lambda: timm.create_model("vit_base_patch16_224"))


# -- command line
def trig_cli_no_command(ctx):
    return _cli([])


def trig_cli_unknown_command(ctx):
    return _cli(["frobnicate"])


def trig_cli_missing_argument(ctx):
    return _cli(["edit", "--prompt", "The capital of France is"])


def trig_cli_bad_number(ctx):
    return _cli(["evaluate", "--hparams", "h.yaml", "--data", "d.json", "--limit", "ten"])


def trig_cli_unknown_option(ctx):
    return _cli(["info", "--colour"])


def trig_cli_task_spec(ctx):
    return _cli(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEdit/tiny.yaml"), "--task", "oops"])


def trig_cli_train_file(ctx):
    return _cli(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEd/tiny.yaml")])


def trig_cli_data_missing(ctx):
    return _cli(["train", "--hparams", str(REPO / "hparams/TRAINING/InstructEd/tiny.yaml"),
                 "--train", str(ctx.tmp / "missing.json")])


def trig_cli_data_unparsable(ctx):
    text = (ctx.data / "counterfact/counterfact-edit.json").read_text(encoding="utf-8")[:600]  # cut inside record 1
    path = ctx.write("truncated/counterfact-edit.json", text)
    return _cli(["evaluate", "--hparams", str(REPO / "hparams/InstructEd/tiny.yaml"), "--data", str(path)])


def trig_cli_model_missing(ctx):
    return _cli(["edit", "--hparams", str(REPO / "hparams/InstructEd/gemma-3-270m.yaml"), "--model_name",
                 str(ctx.tmp / "no-model"), "--prompt", "The capital of France is", "--target_new", "Rome"])


def trig_cli_missing_archive_instructedit(ctx):
    return _cli(["edit", "--hparams", str(REPO / "hparams/InstructEdit/tiny.yaml"), "--model_name", str(_model_dir(ctx)),
                 "--archive", str(ctx.tmp / "no-editor"), "--prompt", "The capital of France is", "--target_new", "Rome"])


def trig_cli_bad_hparams(ctx):
    return _cli(["edit", "--hparams", str(_instructed_yaml(ctx, "cli-typo", add="prefix_lenght: 5\n")),
                 "--prompt", "The capital of France is", "--target_new", "Rome"])


def trig_cli_missing_archive(ctx):
    return _cli(["evaluate", "--hparams", str(REPO / "hparams/InstructEd/tiny.yaml"), "--model_name", str(_model_dir(ctx)),
                 "--archive", str(ctx.tmp / "no-such-run"), "--data", str(ctx.data / "counterfact/counterfact-edit.json"),
                 "--limit", "1"])


def trig_cli_bad_limit(ctx):
    return _cli(["evaluate", "--hparams", str(REPO / "hparams/InstructEd/tiny.yaml"), "--data",
                 str(ctx.data / "counterfact/counterfact-edit.json"), "--limit", "-1"])


def trig_cli_demo_data_missing(ctx):
    return _cli(["demo", "--data_dir", str(ctx.tmp / "empty")])


def trig_recipe_capped(ctx):
    from instructedit_plugin.data.demo_set import demo_data_dir
    from instructedit_plugin.instructed.recipes import QUICK, train_embedded_prefixes
    from tests.support.tiny_models import build_tiny_model_dir

    model = build_tiny_model_dir("llama", root=ctx.tmp / "tiny-models")
    # a schedule whose first validation no machine reaches within the 1 s the cap leaves to training (the 40 steps
    # of QUICK itself take about 1 s on a tiny model, so whether they finished first was a race)
    config = dataclasses.replace(QUICK, steps=100_000, val_interval=100_000)
    return _raised(lambda: train_embedded_prefixes(config=config, budget_minutes=1e-6, data_dir=demo_data_dir(),
                                                   cache_dir=ctx.tmp / "recipes", model_dir=model, dtype="float32",
                                                   n_train=12, n_val=2, progress=False))


TRIGGERS: dict[str, Callable[[Ctx], Outcome]] = {
    name[len("trig_"):].replace("_", "-"): fn for name, fn in sorted(globals().items()) if name.startswith("trig_")
}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
COLUMNS = ("id", "case", "raised in", "error", "field", "message", "fix")


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _code(cell: str) -> str:
    """The text of a markdown code span (`x` or `` x ``)."""
    match = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell, re.S)
    return match.group(2) if match else cell


def parse_table(text: str) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = _cells(line)
        if cells[0].lower() == "id":
            header = [c.lower() for c in cells]
            continue
        if header is None or set(cells[0]) <= set("-: "):
            continue
        assert tuple(header) == COLUMNS, f"docs/errors.md: table header must be {COLUMNS}, got {header}"
        assert len(cells) == len(COLUMNS), f"docs/errors.md: row {cells[0]!r} has {len(cells)} cells"
        row = dict(zip(COLUMNS, cells))
        row_id = _code(row["id"])
        assert row_id not in rows, f"docs/errors.md: duplicate id {row_id}"
        rows[row_id] = {k: _code(v) if k in ("id", "error", "field", "message") else v for k, v in row.items()}
    return rows


def normalise(message: str, ctx: Ctx) -> str:
    return message.replace(str(ctx.tmp), "<tmp>").replace(str(ctx.data), "<data>").replace(str(REPO), "<repo>")


def message_pattern(documented: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in documented.split("…")), re.S)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    import instructedit_plugin

    instructedit_plugin.register()
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}", pytrace=False)
    return Ctx(tmp_path_factory.mktemp("errors"), SHARED_DATA)


ROWS = parse_table(DOC.read_text(encoding="utf-8")) if DOC.is_file() else {}


def test_table_and_triggers_match():
    assert ROWS, "docs/errors.md has no error table"
    assert sorted(set(ROWS) - set(TRIGGERS)) == [], "documented rows without a trigger in this test"
    assert sorted(set(TRIGGERS) - set(ROWS)) == [], "triggers without a row in docs/errors.md"
    for row_id, row in ROWS.items():
        assert all(row[c] for c in COLUMNS), f"{row_id}: every column needs text"


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_documented_error(row_id, ctx):
    row = ROWS[row_id]
    outcome = TRIGGERS[row_id](ctx)
    message = normalise(outcome.message, ctx)
    if row["error"].startswith("exit "):
        assert outcome.error == row["error"], (row_id, outcome)
    else:
        assert row["error"] in outcome.mro, f"{row_id}: raised {outcome.error} ({outcome.mro}), table says {row['error']}"
    assert message_pattern(row["message"]).fullmatch(message), (
        f"{row_id}: the message changed; update docs/errors.md.\n documented: {row['message']}\n actual:     {message}")
    assert row["field"] in message, f"{row_id}: the message does not name {row['field']!r}: {message}"
    assert any(marker in message or marker in outcome.extra for marker in FIX_MARKERS), \
        f"{row_id}: the message says nothing about how to fix it: {message}"


if __name__ == "__main__":  # print every trigger's message, normalised as in the table
    import tempfile

    import instructedit_plugin

    instructedit_plugin.register()
    with tempfile.TemporaryDirectory() as tmp:
        context = Ctx(Path(tmp), SHARED_DATA)
        for key, trigger in TRIGGERS.items():
            result = trigger(context)
            print(f"{key}\t{result.error}\t{normalise(result.message, context)}")
