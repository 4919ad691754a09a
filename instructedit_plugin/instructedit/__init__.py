"""InstructEdit (Tian et al. 2024): an instruction-conditioned, MEND-style editor network.

Importing this package registers the algorithm with the plugin registry
(``alg_name: InstructEdit``; EasyEdit trainer key ``INSTRUCTEDIT``).

Public API:

* :class:`InstructEditHyperParams` / :class:`InstructEditTrainingHparams`
* :class:`InstructEditDataset`, :func:`split_tasks`, :func:`make_datasets`
* :class:`InstructEditModel` (EasyEdit's ``ALG_TRAIN_DICT['INSTRUCTEDIT']``)
* :class:`InstructEditTrainer` (the documented training path)
* :func:`apply_to_model` (EasyEdit's ``ALG_DICT['InstructEdit']``)
"""
from __future__ import annotations

from ..registry import AlgorithmSpec, register_algorithm
from .instructedit_main import apply_to_model, editor_for, instructed_prompt, load_editor_for
from .checkpoint import load_editor, save_editor
from .dataset import InstructEditDataset, encode_pairs, make_datasets, split_tasks
from .editable import InstructEditModel, compute_edited_weights, token_nll_metrics
from .instructedit_hparams import ALG_NAME, InstructEditHyperParams, InstructEditTrainingHparams
from .hypernet import InstructEditHypernet, LayerSpec
from .trainer import InstructEditTrainer

SPEC = AlgorithmSpec(
    name=ALG_NAME,
    hparams_class=InstructEditHyperParams,
    apply_fn=apply_to_model,
    training_hparams_class=InstructEditTrainingHparams,
    train_module=InstructEditModel,
    batchable=True,
    exports={"InstructEditTrainer": InstructEditTrainer, "InstructEditDataset": InstructEditDataset},
)
register_algorithm(SPEC)

__all__ = [
    "ALG_NAME",
    "InstructEditDataset",
    "InstructEditHyperParams",
    "InstructEditHypernet",
    "InstructEditModel",
    "InstructEditTrainer",
    "InstructEditTrainingHparams",
    "LayerSpec",
    "SPEC",
    "apply_to_model",
    "compute_edited_weights",
    "editor_for",
    "encode_pairs",
    "instructed_prompt",
    "load_editor",
    "load_editor_for",
    "make_datasets",
    "save_editor",
    "split_tasks",
    "token_nll_metrics",
]
