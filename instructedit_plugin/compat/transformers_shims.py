"""Names EasyEdit imports from ``transformers.modeling_utils`` that transformers 5 moved or removed.

EasyEdit (both the PyPI release and, for its BLIP-2 Q-Former, GitHub main) does
``from transformers.modeling_utils import apply_chunking_to_forward,
find_pruneable_heads_and_indices, prune_linear_layer``. Transformers 5 keeps the
first and last in ``transformers.pytorch_utils`` and dropped the middle one. We
only *add* missing attributes; anything transformers still defines is left alone.
"""
from __future__ import annotations

import torch


def find_pruneable_heads_and_indices(
    heads: list[int] | set[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """Heads still to prune (minus already pruned ones) and the flat indices of the dims to keep."""
    to_prune = set(heads) - set(already_pruned_heads)
    mask = torch.ones(n_heads, head_size)
    for head in to_prune:
        shift = sum(1 for pruned in already_pruned_heads if pruned < head)
        mask[head - shift] = 0
    keep = torch.arange(len(mask.view(-1)))[mask.view(-1).eq(1)].long()
    return to_prune, keep


def install_modeling_utils_shims() -> list[str]:
    """Add the three legacy names to ``transformers.modeling_utils``; return the names added."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    wanted = {
        "apply_chunking_to_forward": getattr(pytorch_utils, "apply_chunking_to_forward", None),
        "prune_linear_layer": getattr(pytorch_utils, "prune_linear_layer", None),
        "find_pruneable_heads_and_indices": find_pruneable_heads_and_indices,
    }
    added = []
    for name, value in wanted.items():
        if value is not None and not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, value)
            added.append(name)
    return added
