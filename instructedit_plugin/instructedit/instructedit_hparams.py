"""Hyperparameters of InstructEdit: editing (``alg_name``) and training (``alg``) configs."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

from ..core.config import EditingHyperParams, PluginHyperParams, hp_field

ALG_NAME = "InstructEdit"

_HYPERNET_FIELDS = ("rank", "n_blocks", "act", "norm", "shared")


def config_dict(config: Any) -> dict[str, Any]:
    """The public fields of an hparams object (dataclass or EasyEdit-style), as plain JSON values."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        data = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(data, default=str))


@dataclasses.dataclass(kw_only=True)
class InstructEditHyperParams(EditingHyperParams):
    """Editing with a trained InstructEdit editor (``alg_name: InstructEdit``).

    ``archive`` is the checkpoint written by the trainer: a folder holding
    ``editor.safetensors`` + ``manifest.json`` (``editor_config.json`` in folders
    of earlier plugins; or that ``.safetensors`` file), or the archive EasyEdit's ``EditTrainer`` saved (read with
    ``torch.load(weights_only=True)`` only) / the ``.instructedit`` folder the
    plugin writes next to it. The editor must have been trained for the base
    model being edited (checked against the checkpoint's manifest).
    """

    ALG_NAME = ALG_NAME

    archive: Optional[str] = hp_field(
        help="trained editor checkpoint (folder, its editor.safetensors, or an EasyEdit EditTrainer archive)")
    inner_params: Optional[list[str]] = hp_field(
        None, help="edited weights; must match the checkpoint (null: take them from the checkpoint)")
    default_task: str = hp_field("counterfact", help="instruction task for requests without 'task'/'instruction'")
    instructions_dir: Optional[str] = hp_field(None, help="extra folder of instruction family YAML files")
    instructions: Optional[str] = hp_field(
        None, help="instruction library: 'plugin' (shipped), 'easyedit' (the paper's descriptions from the data "
                   "folder), or the path of a task-descriptions .json / family .yaml / folder (null: plugin)")
    description_index: Optional[int] = hp_field(
        None, min=0, help="description used at edit time (null: the family's first training description)")
    edit_max_length: int = hp_field(96, min=8, help="token limit of the instruction-prefixed edit input")
    use_instructions: bool = hp_field(True, help="false: edit with the plain prompt (editors trained without instructions)")

    def validate_fields(self) -> None:
        super().validate_fields()
        if self.archive is not None and not str(self.archive).strip():
            raise self._error("archive", "is empty", "give the folder or file written by the InstructEdit trainer")

    def check_ready(self) -> None:
        from .checkpoint import resolve_archive

        resolve_archive(self.archive, source=getattr(self, "_source", None))


@dataclasses.dataclass(kw_only=True)
class InstructEditTrainingHparams(PluginHyperParams):
    """Training config read by :class:`InstructEditTrainer` and by EasyEdit's ``EditTrainer``.

    Field names follow EasyEdit's MEND training configs so that EasyEdit's
    ``BaseTrainer``/``EditTrainer`` (both flavours) find everything they read.
    """

    ALG_NAME = ALG_NAME
    ALG_KEY = "alg"

    # Model
    alg: str = hp_field(help="must be InstructEdit")
    model_name: str = hp_field(help="local Hugging Face folder (or hub-style name) of the base model")
    model_class: str = hp_field("AutoModelForCausalLM", help="transformers class EasyEdit's get_model instantiates")
    tokenizer_class: str = hp_field("AutoTokenizer")
    tokenizer_name: Optional[str] = hp_field(None)
    inner_params: list[str] = hp_field(help="names of the Linear/Conv1D weights the editor edits")
    archive: Optional[str] = hp_field(None, help="EasyEdit path: torch archive to resume from (our trainer: use resume)")
    device: Union[int, str] = hp_field(0, help="CUDA index or 'cpu' / 'cuda:N' (no CUDA: runs on CPU)")
    model_parallel: bool = hp_field(False)
    dtype: Optional[str] = hp_field(None, choices=(None, "float32", "float16", "bfloat16"))

    # Editor (hypernetwork)
    rank: int = hp_field(1920, min=1, help="rank of the low-rank residual MLP blocks")
    n_blocks: int = hp_field(1, min=1, help="number of residual blocks per layer network")
    act: str = hp_field("relu", choices=("relu", "gelu", "silu", "tanh", "id"))
    norm: bool = hp_field(True, help="normalise u and delta with running statistics")
    shared: bool = hp_field(True, help="one network per weight shape, with per-layer scale/shift")
    edit_lr: float = hp_field(1e-4, min=0.0, help="initial per-layer edit learning rate")
    key_whitening: bool = hp_field(False, help="not in the paper: right-multiply each pseudo-gradient by the inverse "
                                   "second moment of the layer's inputs (ROME/MEMIT's C^-1 k), so an edit moves "
                                   "inputs that share the edited input's common direction less (locality)")
    whitening_ridge: float = hp_field(0.01, min=0.0, help="ridge added to the trace-normalised second moment before "
                                      "inverting it (key_whitening)")

    # Optimisation
    opt: str = hp_field("Adam")
    lr: float = hp_field(1e-6, min=0.0)
    lr_lr: float = hp_field(1e-4, min=0.0, help="learning rate of the per-layer edit lrs")
    grad_clip: float = hp_field(100.0, min=0.0)
    cedit: float = hp_field(0.1, min=0.0)
    cloc: float = hp_field(1.0, min=0.0)
    cbase: float = hp_field(1.0, min=0.0)
    train_base: bool = hp_field(False)
    dropout: Optional[float] = hp_field(None, min=0.0, max=1.0)
    no_grad_layers: Optional[int] = hp_field(None)
    half: bool = hp_field(False)
    seed: int = hp_field(0)

    # Data
    max_length: int = hp_field(96, min=8)
    task_proportions: Optional[dict] = hp_field(None, help="task -> weight; overrides task_mixing")
    task_mixing: str = hp_field("uniform", choices=("uniform", "records"),
                                help="records: tasks drawn in proportion to their training records (the paper, "
                                     "EasyEdit's concatenated data); uniform: every task equally often")
    convsent_subsample: Optional[int] = hp_field(
        None, min=1, help="train on a seeded subset of this many ConvSent records (the paper: 1427); null: all")
    val_fraction: float = hp_field(0.1, min=0.0, max=0.9)
    instruct_rephrase: bool = hp_field(True, help="prefix rephrased inputs with the instruction too")
    instruct_locality: bool = hp_field(False, help="prefix locality inputs with the instruction")
    raw_edit_loss: bool = hp_field(True, help="also train on the un-instructed edit prompt (what EasyEdit's metrics score)")
    val_description: str = hp_field("train", choices=("train", "held_out"))
    instructions_dir: Optional[str] = hp_field(None)
    instructions: Optional[str] = hp_field(
        None, help="instruction library: 'plugin' (shipped), 'easyedit' (the paper's 10 descriptions per task from "
                   "<data dir>/instructedit/easyedit_task_descriptions.json, the 10th held out), or a path (null: plugin)")
    use_instructions: bool = hp_field(True, help="false: train on plain prompts (multi-task MEND baseline)")

    # Schedule
    batch_size: int = hp_field(1, min=1)
    val_batch_size: int = hp_field(1, min=1)
    accumulate_bs: int = hp_field(2, min=1, help="micro-batches per optimizer step (Accelerate's gradient_accumulation_steps)")
    mixed_precision: Optional[str] = hp_field(None, choices=(None, "no", "bf16"),
                                              help="bf16: autocast where the device supports it; null: accelerate "
                                                   "launch's --mixed_precision, else no")
    max_iters: Optional[int] = hp_field(5000, min=0)
    max_epochs: Optional[int] = hp_field(None, min=1)
    max_seconds: Optional[float] = hp_field(None, min=0.0, help="our trainer: wall-clock safety cap; saves last and "
                                            "stops once spent (resume: true finishes the same run)")
    log_interval: int = hp_field(100, min=1)
    eval_log_interval: int = hp_field(100, min=1)
    val_interval: int = hp_field(500, min=1)
    val_steps: int = hp_field(500, min=1)
    early_stop_patience: int = hp_field(20000, min=1)
    early_stop_key: str = hp_field("loss/total_edit_val")
    eval_only: bool = hp_field(False)
    final_eval: bool = hp_field(True)
    results_dir: str = hp_field("./results")
    resume: bool = hp_field(False, help="our trainer: continue from results_dir's last checkpoint")
    progress: bool = hp_field(True, help="show a tqdm progress bar")
    debug: bool = hp_field(False)
    save: bool = hp_field(True)
    silent: bool = hp_field(False)
    verbose: bool = hp_field(True)
    model_save_pt: int = hp_field(5000, min=1)

    def validate_fields(self) -> None:
        super().validate_fields()
        if not self.inner_params:
            raise self._error("inner_params", "is empty", "list the weights to edit, e.g. transformer.h.3.mlp.c_proj.weight")
        if self.max_iters is None and self.max_epochs is None:
            raise self._error("max_iters", "max_iters and max_epochs are both null", "set max_iters")
        if self.task_proportions is not None:
            for key, value in self.task_proportions.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise self._error(f"task_proportions.{key}", f"weight {value!r} is not a number >= 0", "use non-negative numbers")
            if not any(v > 0 for v in self.task_proportions.values()):
                raise self._error("task_proportions", "all weights are zero", "give at least one task a positive weight")

    def hypernet_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _HYPERNET_FIELDS}

    @property
    def alg_name(self) -> str:
        """``alg`` under its editing-config name: EasyEdit main's ``CounterFactDataset`` batches read
        ``config.alg_name`` from the training config."""
        return self.alg
