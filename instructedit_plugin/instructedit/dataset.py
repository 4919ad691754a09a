"""Multi-task, instruction-prefixed training data for InstructEdit.

Input is ``{task: [request dict, ...]}`` (the request dicts of
:mod:`instructedit_plugin.data`: ``prompt``, ``target_new``, optional
``rephrase_prompt``, ``locality``, ``portability``, ConvSent's ``topic``/``pos``/``neg``);
file formats are not this module's business.

* :func:`split_tasks` makes a seeded validation split per task, by record
  *identity* (task, prompt, target, subject): duplicated records land on the same side.
* :class:`InstructEditDataset` in ``train`` mode draws a task by the configured
  proportions (``task_proportions``; else ``mixing``: ``"uniform"``, every task
  equally often, or ``"records"``, in proportion to the task's records as when the
  tasks' records are concatenated, the paper's mixing; ``convsent_subsample`` first
  keeps a seeded subset of ConvSent's records), then a record uniformly, then a
  *fresh* training description for every draw; the family's held-out description
  is never used. In ``val`` mode items are fixed (every record once, with a
  deterministic training description, or the held-out one for the
  unseen-instruction evaluation).
* Batches (:meth:`InstructEditDataset.collate`, also exposed as
  ``collate_gpt_fn`` for EasyEdit's trainers) are right-padded token tensors with
  Hugging Face style ``labels``: -100 on prompt and padding positions.

Batch layout::

    edit_inner  instruction + edit prompt -> target     (input of the edit)
    edit_outer  rows the post-edit loss is computed on: edit_inner, the
                rephrased prompt (instructed when instruct_rephrase) and, with
                raw_edit_loss, the plain prompt -> target
    edit_rephrase, edit_raw, port   the same rows by kind (or None)
    loc         unrelated prompt -> answer, for the locality KL
    cond        None (EasyEdit's trainers pass it to edit())
    tasks, raw  task names and the drawn items
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..core.devices import resolve_device
from ..errors import PluginError
from ..instructions import InstructionLibrary, canonical_task, default_library, load_instructions

LOG = logging.getLogger(__name__)

Request = dict[str, Any]


def record_identity(task: str, record: Mapping[str, Any]) -> str:
    """Stable identity of a record: hash of task, prompt, target, subject."""
    key = [task, record.get("prompt"), record.get("target_new"), record.get("subject")]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def split_tasks(
    tasks: Mapping[str, Sequence[Request]],
    val_fraction: float = 0.1,
    seed: int = 0,
    val_size: int | None = None,
) -> tuple[dict[str, list[Request]], dict[str, list[Request]]]:
    """Seeded train/validation split per task, disjoint by record identity."""
    train: dict[str, list[Request]] = {}
    val: dict[str, list[Request]] = {}
    for task, records in tasks.items():
        groups: dict[str, list[Request]] = {}
        for record in records:
            groups.setdefault(record_identity(task, record), []).append(record)
        keys = sorted(groups)
        random.Random(f"{seed}:{task}").shuffle(keys)
        n_val = val_size if val_size is not None else int(round(len(keys) * val_fraction))
        n_val = min(max(n_val, 0), len(keys) - 1) if len(keys) > 1 else 0
        val_keys = set(keys[:n_val])
        train[task] = [r for k in keys if k not in val_keys for r in groups[k]]
        val[task] = [r for k in keys if k in val_keys for r in groups[k]]
    return train, val


def subsample(records: Sequence[Request], n: int | None, seed: int = 0) -> list[Request]:
    """A seeded random subset of ``n`` records, in their original order (all of them when ``n`` is None or larger)."""
    records = list(records)
    if n is None or n >= len(records):
        return records
    keep = sorted(random.Random(f"{seed}:subsample").sample(range(len(records)), n))
    return [records[i] for i in keep]


def canonical_tasks(tasks: Mapping[str, Sequence[Request]]) -> dict[str, list[Request]]:
    """``tasks`` under the plugin's task names (``wikirecent`` -> ``recent``); records of aliases are joined."""
    out: dict[str, list[Request]] = {}
    for task, records in tasks.items():
        out.setdefault(canonical_task(task), []).extend(records)
    return out


MIXINGS = ("uniform", "records")


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _pairs(block: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a locality/portability dict."""
    out = []
    for entry in (block or {}).values():
        if not isinstance(entry, Mapping):
            continue
        prompts, answers = entry.get("prompt"), entry.get("ground_truth")
        if isinstance(prompts, str):
            prompts, answers = [prompts], [answers]
        for prompt, answer in zip(prompts or [], answers or []):
            answer = _first(answer)
            if isinstance(prompt, str) and isinstance(answer, str) and prompt and answer:
                out.append((prompt, answer))
    return out


class InstructEditDataset(Dataset):
    """Instruction-prefixed multi-task edit examples; see the module docstring."""

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Request]],
        tokenizer: Any,
        *,
        mode: str = "train",
        proportions: Mapping[str, float] | None = None,
        mixing: str = "uniform",
        convsent_subsample: int | None = None,
        library: InstructionLibrary | None = None,
        max_length: int = 96,
        instruct_rephrase: bool = True,
        instruct_locality: bool = False,
        raw_edit_loss: bool = True,
        description: str = "train",
        seed: int = 0,
        epoch_size: int | None = None,
        device: Any = "cpu",
        config: Any = None,
        use_instructions: bool = True,
    ):
        if mode not in ("train", "val"):
            raise PluginError(f"mode must be 'train' or 'val', got {mode!r}")
        if description not in ("train", "held_out"):
            raise PluginError(f"description must be 'train' or 'held_out', got {description!r}")
        if mixing not in MIXINGS:
            raise PluginError(f"task_mixing must be one of {MIXINGS}, got {mixing!r}. Fix: 'records' (the paper) or 'uniform'")
        self.library = library or default_library()
        self.tasks = {t: list(rs) for t, rs in canonical_tasks(tasks).items() if rs}
        if not self.tasks:
            raise PluginError("no task has any records")
        if mode == "train" and convsent_subsample is not None and "convsent" in self.tasks:
            self.tasks["convsent"] = subsample(self.tasks["convsent"], convsent_subsample, seed)
        for task in self.tasks:
            self.library.get(task)  # unknown task -> InstructionError listing known ones
            for i, record in enumerate(self.tasks[task]):
                if not isinstance(record.get("prompt"), str) or not isinstance(record.get("target_new"), str):
                    raise PluginError(f"task '{task}' record {i} needs string 'prompt' and 'target_new'")
        self.task_names = sorted(self.tasks)
        if proportions is not None:
            weights = {canonical_task(t): float(w) for t, w in proportions.items()}
        elif mixing == "records":
            weights = {t: float(len(self.tasks[t])) for t in self.task_names}
        else:
            weights = {t: 1.0 for t in self.task_names}
        self.mixing = "proportions" if proportions is not None else mixing
        unknown = sorted(set(weights) - set(self.task_names))
        if unknown:
            raise PluginError(f"task_proportions names tasks without data: {unknown}; tasks: {self.task_names}")
        self.weights = [float(weights.get(t, 0.0)) for t in self.task_names]
        if not any(w > 0 for w in self.weights):
            raise PluginError("task proportions are all zero")
        self.tok = tokenizer
        if getattr(self.tok, "pad_token_id", None) is None:
            self.tok.pad_token = self.tok.eos_token
        self.mode = mode
        self.max_length = max_length
        self.instruct_rephrase = instruct_rephrase
        self.instruct_locality = instruct_locality
        self.raw_edit_loss = raw_edit_loss
        self.description_mode = description
        #: False: inputs are the plain prompts (the multi-task MEND baseline without instructions)
        self.use_instructions = bool(use_instructions)
        self.seed = seed
        self.device = device
        self.config = config
        self._rng = random.Random(seed)
        self._fixed = [(t, i) for t in self.task_names for i in range(len(self.tasks[t]))]
        self.epoch_size = epoch_size if epoch_size is not None else len(self._fixed)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return self.epoch_size if self.mode == "train" else len(self._fixed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mode == "train":
            return self.draw(self._rng)
        task, i = self._fixed[index]
        family = self.library.get(task)
        if self.description_mode == "held_out" and family.held_out_index is not None:
            desc = family.held_out_index
        else:
            desc = family.sample_index(random.Random(f"{self.seed}:{task}:{i}"))
        return self.make_item(task, i, desc, random.Random(f"{self.seed}:loc:{task}:{i}"))

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """One training example: task by proportions, record uniformly, fresh training description."""
        task = rng.choices(self.task_names, weights=self.weights)[0]
        i = rng.randrange(len(self.tasks[task]))
        desc = self.library.get(task).sample_index(rng)
        return self.make_item(task, i, desc, rng)

    def sample_batch(self, batch_size: int, rng: random.Random) -> dict[str, Any]:
        return self.collate([self.draw(rng) for _ in range(batch_size)])

    def _unrelated(self, task: str, i: int, rng: random.Random) -> tuple[str, str]:
        """A prompt/answer pair from another record, for records without locality data."""
        pool = self._fixed
        for _ in range(10):
            t, j = pool[rng.randrange(len(pool))]
            if (t, j) != (task, i) or len(pool) == 1:
                other = self.tasks[t][j]
                answer = other.get("ground_truth") or other["target_new"]
                return other["prompt"], _first(answer) if not isinstance(answer, str) else answer
        other = self.tasks[task][i]
        return other["prompt"], other["target_new"]

    def make_item(self, task: str, i: int, desc_index: int, rng: random.Random) -> dict[str, Any]:
        record = self.tasks[task][i]
        family = self.library.get(task)
        description = family.description(desc_index, record)

        def instruct(text: str) -> str:
            return family.render(text, description) if self.use_instructions else text

        target = record["target_new"]
        item: dict[str, Any] = {
            "task": task,
            "index": i,
            "description_index": desc_index,
            "edit": (instruct(record["prompt"]), target),
            "raw": (record["prompt"], target),
        }
        rephrase = record.get("rephrase_prompt")
        if isinstance(rephrase, list):
            rephrase = rephrase[rng.randrange(len(rephrase))] if rephrase else None
        item["rephrase"] = (instruct(rephrase) if self.instruct_rephrase else rephrase, target) if rephrase else None
        loc = _pairs(record.get("locality"))
        loc_prompt, loc_answer = loc[rng.randrange(len(loc))] if loc else self._unrelated(task, i, rng)
        item["loc"] = (instruct(loc_prompt) if self.instruct_locality else loc_prompt, loc_answer)
        port = _pairs(record.get("portability"))
        item["port"] = [(instruct(p), a) for p, a in port]
        return item

    # --------------------------------------------------------------- batching
    def encode(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        return encode_pairs(self.tok, pairs, self.max_length)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        edit = [it["edit"] for it in items]
        rephrase = [it["rephrase"] for it in items if it["rephrase"]]
        raw = [it["raw"] for it in items]
        outer = list(edit) + rephrase + (raw if self.raw_edit_loss else [])
        port = [p for it in items for p in it["port"]]
        batch = {
            "edit_inner": self.encode(edit),
            "edit_outer": self.encode(outer),
            "edit_rephrase": self.encode(rephrase) if rephrase else None,
            "edit_raw": self.encode(raw),
            "loc": self.encode([it["loc"] for it in items]),
            "port": self.encode(port) if port else None,
            "cond": None,
            "tasks": [it["task"] for it in items],
            "raw": list(items),
        }
        return batch_to(batch, self.device)

    def collate_gpt_fn(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What EasyEdit's trainers call for causal LMs (moves the batch to ``config.device``)."""
        device = getattr(self.config, "device", None) if self.config is not None else None
        batch = self.collate(items)
        return batch_to(batch, resolve_device(device)) if device is not None else batch

    collate_fn = collate_gpt_fn


#: The last line of the instruction template; what follows it is the record's own input.
INPUT_MARKER = "\nInput:"


def _cut_prompt(tok: Any, prompt: str, full: list[int], n_prompt: int, cut: int) -> tuple[list[int], int]:
    """Drop ``cut`` tokens of ``full`` (prompt + answer ids): from the start of the input that follows
    the instruction's ``Input:`` line when the input is long enough, else from the very start (no
    instruction, or the instruction alone is too long). The answer is never cut."""
    at = prompt.rfind(INPUT_MARKER)
    if at >= 0:
        head = tok(prompt[: at + len(INPUT_MARKER)], add_special_tokens=True)["input_ids"]
        n_head = len(head)
        if full[:n_head] == head and n_prompt - n_head >= cut:
            return full[:n_head] + full[n_head + cut:], n_prompt - cut
    return full[cut:], max(n_prompt - cut, 0)


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + ' ' + answer`` rows with labels on the answer tokens only.

    ``labels`` are as long as ``input_ids`` (Hugging Face style): -100 on prompt
    and padding positions. Rows longer than ``max_length`` lose the start of the
    *input* (after the instruction's ``Input:`` line, see :func:`_cut_prompt`), never the
    instruction the editor was trained to read nor the answer; a warning says how many.
    """
    rows, labels = [], []
    truncated = 0
    for prompt, answer in pairs:
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        full = tok(prompt + " " + answer, add_special_tokens=True)["input_ids"]
        n_prompt = len(p_ids)
        if full[:n_prompt] != p_ids:  # the tokenizer merged across the boundary: encode the pieces separately
            full = p_ids + tok(" " + answer, add_special_tokens=False)["input_ids"]
        if len(full) > max_length:
            full, n_prompt = _cut_prompt(tok, prompt, full, n_prompt, len(full) - max_length)
            truncated += 1
        rows.append(full)
        labels.append([-100] * n_prompt + full[n_prompt:])
    if truncated:
        LOG.warning("%d of %d edit inputs are longer than max_length=%d tokens: the start of their input was cut "
                    "(instruction and answer kept); raise max_length to keep them whole", truncated, len(rows), max_length)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, : len(ids)] = 1
        label_t[r, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}


def batch_to(batch: Any, device: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: (batch_to(v, device) if k != "raw" else v) for k, v in batch.items()}
    return batch


def make_datasets(
    tasks: Mapping[str, Sequence[Request]],
    tokenizer: Any,
    config: Any,
    library: InstructionLibrary | None = None,
    val_tasks: Mapping[str, Sequence[Request]] | None = None,
) -> tuple[InstructEditDataset, InstructEditDataset]:
    """Train and validation datasets from one config (``InstructEditTrainingHparams``)."""
    if library is None and getattr(config, "instructions", None):
        library = load_instructions(config.instructions)
    if library is None and getattr(config, "instructions_dir", None):
        from ..instructions import load_instruction_library

        library = load_instruction_library([config.instructions_dir])
    if val_tasks is None:
        train_tasks, val_tasks = split_tasks(tasks, config.val_fraction, config.seed)
    else:
        train_tasks = dict(tasks)
    common = dict(
        library=library, max_length=config.max_length, instruct_rephrase=config.instruct_rephrase,
        instruct_locality=config.instruct_locality, raw_edit_loss=config.raw_edit_loss, seed=config.seed,
        device=resolve_device(config.device), config=config,
        use_instructions=bool(getattr(config, "use_instructions", True)),
    )
    # EasyEdit's trainers size epochs by len(train_set) (PyPI rounds max_iters / len to whole epochs, so a
    # short run on a big set would train zero epochs); training items are drawn afresh on every access, so
    # one "epoch" may as well cover the whole run.
    n_train = sum(len(v) for v in train_tasks.values())
    epoch_size = int(config.max_iters) * config.batch_size if config.max_iters else n_train
    train = InstructEditDataset(train_tasks, tokenizer, mode="train", proportions=config.task_proportions,
                                mixing=getattr(config, "task_mixing", "uniform"),
                                convsent_subsample=getattr(config, "convsent_subsample", None),
                                epoch_size=epoch_size, **common)
    val = InstructEditDataset(val_tasks, tokenizer, mode="val", description=config.val_description, **common)
    return train, val
