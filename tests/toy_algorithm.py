"""A small, real test-only editing algorithm used to prove the registration mechanism.

It fine-tunes one weight matrix on the edit prompt -> target_new (teacher-forced
NLL) and returns the original weights, exactly the contract EasyEdit's
``BaseEditor`` expects from an ``ALG_DICT`` entry.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from instructedit_plugin.core.config import EditingHyperParams, hp_field
from instructedit_plugin.registry import AlgorithmSpec


@dataclasses.dataclass(kw_only=True)
class ToyEditHyperParams(EditingHyperParams):
    ALG_NAME = "ToyEdit"
    layer: int = hp_field(layer_index=True)
    module_tmp: str = hp_field("transformer.h.{}.mlp.c_proj")
    steps: int = hp_field(30, min=1)
    lr: float = hp_field(1e-2, min=0.0)


class ToyTrainModule(torch.nn.Module):
    """Stands in for an EasyEdit editable-model class in ALG_TRAIN_DICT."""


def apply_toy_edit(model, tok, requests, hparams: ToyEditHyperParams, copy=False, return_orig_weights=False,
                   keep_original_weight=False, **kwargs: Any):
    name = hparams.module_tmp.format(hparams.layer) + ".weight"
    weight = dict(model.named_parameters())[name]
    weights_copy = {name: weight.detach().clone()}
    device = weight.device
    prompts = [r["prompt"] for r in requests]
    targets = [" " + r["target_new"] if not r["target_new"].startswith(" ") else r["target_new"] for r in requests]
    enc = tok([p + t for p, t in zip(prompts, targets)], return_tensors="pt", padding=True).to(device)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, (p, t) in enumerate(zip(prompts, targets)):
        n_target = len(tok(t)["input_ids"])
        keep = enc["attention_mask"][i].nonzero().flatten()[-n_target:]
        mask = torch.ones_like(labels[i], dtype=torch.bool)
        mask[keep] = False
        labels[i][mask] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(p is weight)
    opt = torch.optim.Adam([weight], lr=hparams.lr)
    for _ in range(hparams.steps):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(True)
    return model, weights_copy


TOY_SPEC = AlgorithmSpec(
    name="ToyEdit",
    hparams_class=ToyEditHyperParams,
    apply_fn=apply_toy_edit,
    train_module=ToyTrainModule,
    batchable=True,
)
