"""One pooled embedding per image from whatever a vision model returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _field(output: Any, name: str) -> Any:
    # transformers' ModelOutput is a Mapping whose unset fields are absent; plain dicts work the same way.
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def pooled_embedding(output: Any) -> torch.Tensor:
    """The (batch, dim) pooled embedding of a model output.

    A plain tensor is taken as the embedding; otherwise ``pooler_output`` when the output has one (CDCL,
    ViT with a pooler, ResNet), else the first (CLS) token of ``last_hidden_state`` (DINOv2 without its
    pooler, ViT with ``add_pooling_layer=False``). Trailing dimensions are flattened, so a CNN's
    (batch, dim, 1, 1) pooler output becomes (batch, dim).

    Args:
        output (`torch.Tensor`, `transformers.utils.ModelOutput` or `Mapping`):
            What the model's forward returned for a batch (with ``return_dict=True``).

    Returns:
        `torch.Tensor`: The embeddings, (batch, dim), same dtype and device as the model's output.

    Raises:
        TypeError: The output has neither ``pooler_output`` nor ``last_hidden_state``.
    """
    if isinstance(output, torch.Tensor):
        pooled = output
    else:
        pooled = _field(output, "pooler_output")
        if pooled is None:
            hidden = _field(output, "last_hidden_state")
            if hidden is None:
                raise TypeError(
                    f"cannot pool a {type(output).__name__}: it has neither pooler_output nor last_hidden_state "
                    "(call the model with return_dict=True)"
                )
            pooled = hidden[:, 0]
    return pooled.reshape(pooled.shape[0], -1)
