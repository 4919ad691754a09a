"""InstructEd (Han et al. 2024, "Soft-Instruction Tuning for Model Editing with Hops").

The LLM stays frozen. An edit is a natural-language instruction stating the new fact; the model
reads ``Instructions: {instruction}\\nInput: {question}``, learnable prefixes in a contiguous block
of middle layers steer its attention, and ``sim = cos(Enc(question), Enc(instruction))`` re-weights
the attention to the prefixes and the instruction, so an unrelated question is barely affected.

Modules (one job each):

* :mod:`.attention`, :mod:`.prefix`, :mod:`.context` -- attention with prefixes and re-weighting;
* :mod:`.tuner` -- the prefixes as a PEFT method (``get_peft_model(model, InstructEdConfig(...))``);
* :mod:`.instructed_hparams` -- :class:`InstructEdHyperParams` (editing) and :class:`InstructEdTrainingHparams`;
* :mod:`.templates` -- the input layout and the instruction of a request;
* :mod:`.lm` -- :class:`InstructedLM`, the wrapper EasyEdit evaluates;
* :mod:`.data` -- training examples and the 1:1 batch mix;
* :mod:`.checkpoint` -- checkpoints: a PEFT adapter folder plus the plugin's manifest (format in
  :mod:`instructedit_plugin.core.checkpoint`);
* :mod:`.trainer` -- :class:`InstructEdTrainer` (``(config, train_set, val_set).run()``);
* :mod:`.easyedit_training` -- :class:`InstructEdTrainModule`, ``ALG_TRAIN_DICT['INSTRUCTED']``: the
  prefixes trained by EasyEdit's own ``EditTrainer``;
* :mod:`.instructed_main` -- EasyEdit's apply function and the per-model instruction memory;
* :mod:`.memory` -- the instruction memory (store, std gate, dense/FAISS index, persistence, chains);
* :mod:`.instruction_cache` -- instruction keys/values reused across questions (``question_rows`` / ``question_only`` modes);
* :mod:`.embedding_cache` -- instruction sentence embeddings reused across questions (every mode);
* :mod:`.encoder`, :mod:`.multihop`, :mod:`.answering` -- sentence encoder, MQuAKE evaluation;
* :mod:`.recipes`, :mod:`.shipped` -- CPU training recipes for the embedded Gemma, the shipped prefixes.

Importing this package registers ``InstructEd`` with the plugin registry (and with EasyEdit once
``instructedit_plugin.register()`` has run).
"""
from __future__ import annotations

from ..registry import AlgorithmSpec, register_algorithm
from .instructed_hparams import InstructEdHyperParams, InstructEdTrainingHparams
from .instructed_main import (
    InstructedEditor,
    apply_instructed_to_model,
    load_memory,
    release,
    reset_memory,
    save_memory,
)
from .lm import GoldInstructions, InstructedLM, RetrievedInstructions
from .trainer import InstructEdTrainer, InstructEdTrainModule
from .tuner import InstructEdConfig, InstructEdModel

__all__ = [
    "InstructEdConfig",
    "InstructEdModel",
    "InstructEdHyperParams",
    "InstructEdTrainingHparams",
    "InstructEdTrainer",
    "InstructedLM",
    "InstructedEditor",
    "GoldInstructions",
    "RetrievedInstructions",
    "apply_instructed_to_model",
    "load_memory",
    "save_memory",
    "reset_memory",
    "release",
    "SPEC",
]

SPEC = AlgorithmSpec(
    name="InstructEd",
    hparams_class=InstructEdHyperParams,
    apply_fn=apply_instructed_to_model,
    training_hparams_class=InstructEdTrainingHparams,
    train_module=InstructEdTrainModule,
    batchable=True,
    exports={"InstructEdTrainer": InstructEdTrainer},
)

register_algorithm(SPEC)
