"""Hyperparameters of InstructEd: editing (``alg_name: InstructEd``) and training (``alg: InstructEd``).

Editing needs trained prefixes: ``archive`` names the checkpoint folder the
:class:`~instructedit_plugin.instructed.trainer.InstructEdTrainer` wrote (its ``best/``
sub-folder, or the results folder holding it), or is ``default``: the prefixes shipped inside the
package for the embedded Gemma-3-270M. Loading an editing config without an existing
archive raises a :class:`~instructedit_plugin.errors.HyperParamsError` naming ``archive`` and
saying how to train one, instead of failing halfway through an editing run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from ..errors import HyperParamsError, fix_for
from ..core.config import EditingHyperParams, PluginHyperParams, hp_field, training_yaml_hint
from .memory.gate import GATE_PADS, GATE_SCORES, GATE_STDS
from .encoder import ENCODER_BACKENDS, ENCODER_DTYPES
from .similarity import SIMILARITIES

LOG = logging.getLogger(__name__)

ALG_NAME = "InstructEd"
#: The paper's input layout; ``{instruction}`` is replaced by the edit's instruction, the question follows.
DEFAULT_TEMPLATE = "Instructions: {instruction}\nInput: "
#: Re-weighting modes a trainer accepts (see :mod:`.attention`; ``paper`` is the paper's Eq. 15).
TRAIN_REWEIGHT_CHOICES = ("paper", "release", "pre_softmax", "none", "question_rows")
#: Modes an edit accepts: the trainable ones and ``question_only`` (**not in the paper**, evaluation only: the rows
#: from the question's first token re-weighted, the whole template prefix cached; #15's query cost).
REWEIGHT_CHOICES = TRAIN_REWEIGHT_CHOICES + ("question_only",)
#: Modes whose instruction keys/values are cached per instruction (``instruction_cache``, ``sim_overlap``).
CACHED_REWEIGHT_MODES = ("question_rows", "question_only")
SOURCE_CHOICES = ("gold", "retrieval")
#: ``attention_kernel``: the fused SDPA kernel where it is exact (default) or the eager path everywhere (attention.py)
ATTENTION_KERNELS = ("fused", "eager")

TRAIN_HINT = (
    "train prefixes first, e.g. `InstructEdTrainer(InstructEdTrainingHparams.from_hparams("
    "'hparams/TRAINING/InstructEd/<model>.yaml'), train_requests).run()`, then set `archive:` to the "
    "printed checkpoint folder (<results_dir>/best)"
)


def train_hint(source: str | os.PathLike | None = None, *, offer_default: bool = True) -> str:
    """How to get trained prefixes: :data:`TRAIN_HINT` in Python, the ``instructedit train`` command
    (with the training YAML that goes with ``source``) on the command line."""
    cli = (f"train prefixes with `instructedit train --hparams {training_yaml_hint(source, ALG_NAME)} --train FILE` "
           "and pass --archive <folder> (the best_dir it prints)")
    if offer_default:
        cli += ", or pass --archive default for the prefixes shipped with the embedded Gemma-3-270M"
    return fix_for(TRAIN_HINT, cli)


def _check_template(obj: PluginHyperParams, template: str) -> None:
    if template.count("{instruction}") != 1:
        raise obj._error("template", f"{template!r} must contain '{{instruction}}' exactly once",
                         f"use e.g. {DEFAULT_TEMPLATE!r}")
    stripped = template.replace("{instruction}", "")
    if "{" in stripped or "}" in stripped:
        raise obj._error("template", f"{template!r} has other '{{...}}' fields", "keep only '{instruction}'")


def _check_layers(obj: PluginHyperParams, layers: Optional[list[int]]) -> None:
    if layers is None:
        return
    if not layers:
        raise obj._error("prefix_layers", "is empty", "list at least one layer index, or use null for the middle third")
    if len(set(layers)) != len(layers):
        raise obj._error("prefix_layers", f"{layers} has duplicates", "list each layer once")
    if any(i < 0 for i in layers):
        raise obj._error("prefix_layers", f"{layers} has negative indices", "use 0-based layer indices")
    ordered = sorted(layers)
    if ordered != list(range(ordered[0], ordered[-1] + 1)):
        raise obj._error("prefix_layers", f"{layers} is not a contiguous block of layers",
                         f"use a contiguous range such as {list(range(ordered[0], ordered[0] + len(layers)))}")


@dataclasses.dataclass(kw_only=True)
class InstructEdHyperParams(EditingHyperParams):
    """Editing with trained InstructEd prefixes (``alg_name: InstructEd``).

    ``prefix_layers`` / ``prefix_len`` may be left null: they are taken from the archive (when
    given they must match it). ``instruction_source: gold`` feeds every evaluated input its own
    request's instruction (the paper's single-edit setting); ``retrieval`` looks the instruction up
    in the instruction memory that accumulates the applied edits and leaves an input unedited unless
    the standard deviation of its ``top_k`` best retrieval scores exceeds ``retrieval_gate`` (the
    gate: a relevant instruction stands out from its neighbours; it is not a minimum cosine score),
    see :mod:`.memory.gate` (sequential and multi-hop editing).

    The gate's statistic: ``gate_score`` (``cosine``, default, or ``dot``: the encoder's raw dot
    product, as the public release scores with contriever), ``gate_std`` (``population``, default,
    or ``sample``: the release's ``torch.std``) and ``gate_pad`` (``zero``, default: a memory with
    fewer than ``top_k`` items counts the missing ones as score 0; ``none``: only the stored
    scores). ``retrieval_gate: calibrated`` uses the threshold that ``instructedit calibrate-gate``
    stored in the memory's manifest (``gate.threshold``) for the memory that is loaded
    (``load_memory``); that calibration's ``score`` / ``std`` / ``pad`` / ``top_k``
    must equal these fields, else the edit stops with an error naming the field (a threshold
    fitted to one statistic means nothing for another).
    """

    ALG_NAME = ALG_NAME
    SHIPPED_ARCHIVE = True  # archive: default -> the prefixes shipped in the package

    archive: Optional[str] = hp_field(None, help="trained prefixes: folder written by InstructEdTrainer, or "
                                                 "'default' (shipped with the package, for the embedded Gemma-3-270M)")
    prefix_layers: Optional[list[int]] = hp_field(None, layer_index=True, help="null: from the archive")
    prefix_len: Optional[int] = hp_field(None, min=1, help="null: from the archive")
    encoder: str = hp_field("default", help="sentence encoder: 'default', a name or a local path")
    encoder_dtype: str = hp_field("float32", choices=ENCODER_DTYPES,
                                  help="the sentence encoder's weights: float32 (the paper's) or bfloat16 (an option: "
                                       "about 0.6x the encoding time on CPU, sim within a few thousandths)")
    encoder_backend: str = hp_field("torch", choices=ENCODER_BACKENDS,
                                    help="the sentence encoder's runtime: torch (the default) or onnx (the same float32 "
                                         "weights and function in ONNX Runtime on the CPU: about 0.4x the encoding time "
                                         "with one thread, vectors within ~1e-7; needs the onnx extra)")
    reweight_mode: str = hp_field("paper", choices=REWEIGHT_CHOICES,
                                  help="paper (Eq. 15, the default), release, pre_softmax, none, question_rows, or "
                                       "question_only (not in the paper: only the question's rows re-weighted, the whole "
                                       "template prefix cached per instruction)")
    attention_kernel: str = hp_field("fused", choices=ATTENTION_KERNELS,
                                     help="fused: InstructEd layers run in torch's scaled_dot_product_attention where that is "
                                          "exact (paper, none, cached question_rows / question_only: the re-weighting moved "
                                          "onto the values; equal to eager up to float rounding); eager: the matmul / "
                                          "softmax / multiply path everywhere (results committed before the fused kernel)")
    similarity: str = hp_field("cosine", choices=SIMILARITIES,
                               help="sim that re-weights attention: cosine of question and instruction (the paper's) or "
                                    "subject_masked (the edit's subject removed from both first; needs the requests' "
                                    "subject; KnowEdit's same-subject locality)")
    relation_gate: Optional[float] = hp_field(
        None, min=-1.0, max=1.0, help="null (the paper): every input keeps its instruction; a threshold: an input whose "
                                      "similarity to its edit, with the edit's subject masked (needs the requests' "
                                      "subject), is below it is answered without the instruction, by the unedited model "
                                      "(KnowEdit's same-subject, other-relation locality; gold and retrieval)")
    instruction_source: str = hp_field("gold", choices=SOURCE_CHOICES)
    retrieval_gate: Union[float, Literal["calibrated"]] = hp_field(
        0.1, min=-1.0, max=1.0, help="gate threshold on the standard deviation of the top_k retrieval scores: the top-1 "
                                     "instruction is used when that spread exceeds it; 'calibrated': the threshold stored "
                                     "in the loaded memory's manifest by `instructedit calibrate-gate`")
    gate_score: str = hp_field("cosine", choices=GATE_SCORES, help="scores whose spread the gate measures: cosine or "
                                                                     "the encoder's raw dot product")
    gate_std: str = hp_field("population", choices=GATE_STDS, help="population or sample standard deviation")
    gate_pad: str = hp_field("zero", choices=GATE_PADS, help="fewer than top_k stored items: pad the scores with 0, or not")
    top_k: int = hp_field(5, min=1, help="number of best retrieval scores whose spread the gate measures")
    template: str = hp_field(DEFAULT_TEMPLATE)
    instruction_max_length: int = hp_field(128, min=1, help="token limit of one instruction")
    instruction_cache: int = hp_field(1024, min=0, help="reweight_mode question_rows / question_only only: instructions whose keys/"
                                      "values are kept per model for reuse by every question (0: off)")
    embedding_cache: int = hp_field(4096, min=0, help="instructions whose sentence embeddings (for sim) are kept per "
                                    "model and encoder, so a query encodes only its question (0: off)")
    warm_instruction_cache: bool = hp_field(False, help="question_rows / question_only: compute an edit's instruction keys/values "
                                            "(and its sentence embedding) at edit time (a longer edit, then every "
                                            "query is cached) instead of at its first query")
    use_prefixes: bool = hp_field(True, help="false: the instruction in context only (no prefixes, no re-weighting), "
                                              "the in-context baseline")
    sim_overlap: bool = hp_field(False, help="question_rows / question_only: compute a query's sim (its question's encoding) in a "
                                             "worker thread while the forward runs up to its first attention; "
                                             "bit-identical outputs, less wall clock where a second core is free")

    def validate_fields(self) -> None:
        super().validate_fields()
        if self.archive is None or not str(self.archive).strip():
            raise self._error("archive", "is missing; InstructEd edits with trained prefixes", train_hint(self._source))
        if not str(self.encoder).strip():
            raise self._error("encoder", "is empty", "use 'default' or a sentence-encoder name/path")
        _check_layers(self, self.prefix_layers)
        _check_template(self, self.template)
        if self.encoder_backend == "onnx" and self.encoder_dtype != "float32":
            raise self._error("encoder_backend", f"'onnx' runs the float32 weights, not encoder_dtype "
                              f"{self.encoder_dtype}", "set encoder_dtype: float32 (onnx is faster than bfloat16 torch) "
                              "or encoder_backend: torch")
        if self.sim_overlap and (self.reweight_mode not in CACHED_REWEIGHT_MODES or not self.instruction_cache
                                 or not self.use_prefixes):
            raise self._error("sim_overlap", "overlaps sim with the cached-instruction forward, which needs "
                              f"reweight_mode question_rows or question_only with instruction_cache > 0 and prefixes "
                              f"(got reweight_mode "
                              f"{self.reweight_mode}, instruction_cache {self.instruction_cache}, use_prefixes "
                              f"{self.use_prefixes})", "set reweight_mode: question_rows, or sim_overlap: false")

    def check_ready(self) -> None:
        path = Path(os.path.expanduser(str(self.archive)))
        if path.exists():
            return
        from .shipped import shipped_prefixes_dir

        if path == shipped_prefixes_dir(must_exist=False):  # archive: default, but this install lacks them
            raise self._error("archive", f"'default' names the prefixes shipped with the package, but {path} does "
                              "not exist", train_hint(self._source, offer_default=False))
        raise self._error("archive", f"{self.archive!r} does not exist", train_hint(self._source))


@dataclasses.dataclass(kw_only=True)
class InstructEdTrainingHparams(PluginHyperParams):
    """Prefix-training config read by :class:`~instructedit_plugin.instructed.trainer.InstructEdTrainer`.

    Batches hold ``batch_size`` edit examples (reliability / generalisation / portability inputs
    with their instruction, answered with the new target) and ``unmodified_batch_size`` unmodified
    examples (the instruction plus an unrelated question, answered with the unedited model's own
    prediction) -- the paper's 1:1 mix with 6 + 6.
    """

    ALG_NAME = ALG_NAME
    ALG_KEY = "alg"
    #: Earlier names of fields (EasyEdit's ``TrainingHparams`` names are the canonical ones):
    #: still read from YAML, with a deprecation warning.
    FIELD_ALIASES: ClassVar[dict[str, str]] = {"max_steps": "max_iters",
                                               "gradient_accumulation_steps": "accumulate_bs"}

    alg: str = hp_field(help="must be InstructEd")
    model_name: str = hp_field(help="local Hugging Face folder of the (frozen) base model")
    device: Union[int, str] = hp_field("cpu", help="'cpu', 'cuda', 'cuda:N' or a CUDA index")
    dtype: Optional[str] = hp_field(None, choices=(None, "float32", "float16", "bfloat16"))

    # Prefixes / method
    prefix_layers: Optional[list[int]] = hp_field(None, layer_index=True, help="null: the middle third of the layers")
    prefix_len: int = hp_field(5, min=1)
    encoder: str = hp_field("default")
    reweight_mode: str = hp_field("paper", choices=TRAIN_REWEIGHT_CHOICES,
                                  help="question_only is an evaluation-time option of the edit hparams, not trainable")
    similarity: str = hp_field("cosine", choices=SIMILARITIES, help="sim of the training examples: cosine (the "
                               "paper's) or subject_masked (the request's subject removed first)")
    template: str = hp_field(DEFAULT_TEMPLATE)
    init_std: float = hp_field(0.02, min=0.0)

    # Data
    max_length: int = hp_field(128, min=8, help="token limit of question + answer")
    instruction_max_length: int = hp_field(128, min=1)
    use_portability: bool = hp_field(True, help="train on portability inputs too")
    unrelated_locality: int = hp_field(1, min=0, help="extra unmodified examples per edit: its instruction + another edit's question")
    locality_gen_tokens: int = hp_field(4, min=1, help="greedy tokens of the unedited model for locality inputs without an answer")
    val_fraction: float = hp_field(0.1, min=0.0, max=0.9, help="edits held out for validation when no val set is given")

    # Optimisation (paper: AdamW, lr 9e-3, weight decay 0.02, warm-up, 10 epochs, 6 + 6)
    lr: float = hp_field(9e-3, min=0.0)
    weight_decay: float = hp_field(0.02, min=0.0)
    warmup_steps: int = hp_field(100, min=0)
    lr_schedule: str = hp_field("linear", choices=("linear", "constant"), help="after warm-up: linear decay to 0 or constant")
    grad_clip: float = hp_field(1.0, min=0.0, help="0 disables clipping")
    epochs: int = hp_field(10, min=1)
    max_iters: Optional[int] = hp_field(None, min=1, help="stop after this many steps (overrides epochs); "
                                                          "formerly max_steps")
    max_seconds: Optional[float] = hp_field(None, min=0.0, help="wall-clock safety cap of run(): save last and stop once "
                                            "spent; the schedule never depends on it (train by max_iters/epochs)")
    batch_size: int = hp_field(6, min=1, help="edit examples per batch (per process and micro-batch)")
    unmodified_batch_size: int = hp_field(6, min=0, help="unmodified examples per batch (per process and micro-batch)")
    val_batch_size: int = hp_field(16, min=1)
    accumulate_bs: int = hp_field(1, min=1, help="micro-batches per optimizer step; the step's loss is the token mean "
                                                 "over all of them (and over all processes); formerly "
                                                 "gradient_accumulation_steps")
    mixed_precision: Optional[str] = hp_field(None, choices=(None, "no", "bf16"),
                                              help="bf16: autocast where the device supports it; null: accelerate "
                                                   "launch's --mixed_precision, else no")
    seed: int = hp_field(0)

    # Bookkeeping
    results_dir: str = hp_field("./results/InstructEd")
    log_interval: int = hp_field(50, min=1)
    val_interval: int = hp_field(200, min=1, help="validate every N steps (and at the end)")
    early_stop_patience: Optional[int] = hp_field(None, min=1, help="stop after N validations without improvement")
    resume: bool = hp_field(False, help="continue from <results_dir>/last")
    progress: bool = hp_field(True, help="tqdm progress bar")

    # EasyEdit's EditTrainer (ALG_TRAIN_DICT['INSTRUCTED'], :mod:`.easyedit_training`) reads these; InstructEdTrainer does not
    model_class: str = hp_field("AutoModelForCausalLM", help="EditTrainer: transformers class EasyEdit's get_model loads")
    tokenizer_class: str = hp_field("AutoTokenizer", help="EditTrainer: tokenizer class of EasyEdit's datasets")
    tokenizer_name: Optional[str] = hp_field(None, help="EditTrainer: tokenizer folder (null: model_name)")
    archive: Optional[str] = hp_field(None, help="EditTrainer: EasyEdit archive to resume from (InstructEdTrainer: resume)")
    model_parallel: bool = hp_field(False, help="EditTrainer: device_map='auto'")
    dropout: Optional[float] = hp_field(None, min=0.0, max=1.0, help="EditTrainer: dropout EasyEdit's get_model sets "
                                                                     "(the base model runs in eval mode anyway)")
    inner_params: list[str] = hp_field(default_factory=list, help="EditTrainer: weights EasyEdit's get_model checks "
                                                                    "exist; InstructEd edits none")
    no_grad_layers: Optional[int] = hp_field(None, help="EditTrainer: EasyEdit's get_model option")
    half: bool = hp_field(False, help="EditTrainer: EasyEdit's get_model option")
    opt: str = hp_field("AdamW", help="EditTrainer: torch.optim class (its default weight decay; InstructEdTrainer: "
                                      "AdamW with weight_decay)")
    cedit: float = hp_field(1.0, min=0.0, help="EditTrainer: weight of the edit loss")
    cloc: float = hp_field(1.0, min=0.0, help="EditTrainer: weight of the locality KL (instruction + unrelated question)")
    cbase: float = hp_field(1.0, min=0.0, help="EditTrainer: weight of the base loss (unused: train_base is false)")
    train_base: bool = hp_field(False, help="EditTrainer: must stay false (the base model is frozen)")
    max_epochs: Optional[int] = hp_field(None, min=1, help="EditTrainer: epochs (else max_iters)")
    val_steps: int = hp_field(500, min=1, help="EditTrainer: validation batches")
    early_stop_key: str = hp_field("loss/total_edit_val", help="EditTrainer: statistic its early stopping watches")
    eval_only: bool = hp_field(False, help="EditTrainer: validate only")
    final_eval: bool = hp_field(True, help="EditTrainer: reload the best archive and validate at the end")
    debug: bool = hp_field(False, help="EditTrainer: debug mode (no saving unless save)")
    save: bool = hp_field(True, help="EditTrainer: save in debug mode")
    silent: bool = hp_field(False, help="EditTrainer: no step logs")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> InstructEdTrainingHparams:
        """As :meth:`PluginHyperParams.from_dict`, reading the earlier field names (:attr:`FIELD_ALIASES`) too."""
        if isinstance(data, dict):
            data = dict(data)
            for old, new in cls.FIELD_ALIASES.items():
                if old not in data:
                    continue
                value = data.pop(old)
                if new in data and data[new] != value:
                    raise HyperParamsError(old, f"is the earlier name of {new}, which is also given, with another "
                                           f"value ({value!r} vs {data[new]!r})", f"keep only `{new}:`", source)
                LOG.warning("%s: the training field '%s' is deprecated; it is read as '%s' (rename it in the YAML)",
                            source or "InstructEd training hparams", old, new)
                data[new] = value
        return super().from_dict(data, source)

    @property
    def alg_name(self) -> str:
        """``alg`` under the name EasyEdit's editing configs use (EasyEdit main's ``CounterFactDataset`` reads it)."""
        return self.alg

    def validate_fields(self) -> None:
        super().validate_fields()
        _check_layers(self, self.prefix_layers)
        _check_template(self, self.template)
        if self.train_base:
            raise self._error("train_base", "is true; InstructEd keeps the base model frozen", "set train_base: false")
        if self.batch_size + self.unmodified_batch_size < 1:
            raise self._error("batch_size", "no examples per batch", "use batch_size >= 1")
