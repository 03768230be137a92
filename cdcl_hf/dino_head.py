"""DINO projection head and the multi-crop student/teacher forward.

The backbone is `cdcl_hf.modeling_cdcl.CDCLModel` (or any module called as
`backbone(pixel_values=x)`; its embedding is `cdcl_hf.embedding.pooled_embedding` of the output).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from .embedding import pooled_embedding

__all__ = [
    "DINOHead",
    "MultiCropModel",
    "make_teacher",
    "cancel_last_layer_gradients",
    "last_layer_parameters",
]


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to `out_dim` logits.

    The last layer is `weight_norm(Linear(bottleneck_dim, out_dim, bias=False))`. Freeze its direction
    for the first epoch(s) with `cancel_last_layer_gradients`.

    Args:
        in_dim (`int`):
            The dimension of the backbone features.
        out_dim (`int`):
            The number of logits.
        hidden_dim (`int`, *optional*, defaults to 2048):
            The width of the MLP's hidden layers.
        bottleneck_dim (`int`, *optional*, defaults to 256):
            The output dimension of the MLP.
        nlayers (`int`, *optional*, defaults to 3):
            The number of Linear layers of the MLP (GELU between them; the last maps to
            `bottleneck_dim`).
        norm_last_layer (`bool`, *optional*, defaults to `True`):
            Fix the last layer's magnitude (`original0`) at 1 so every logit is a cosine similarity
            to a prototype, which stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.norm_last_layer = norm_last_layer

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(features)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every `DINOHead.last_layer` inside `model` (e.g. a DDP-wrapped student)."""
    return [p for m in model.modules() if isinstance(m, DINOHead) for p in m.last_layer.parameters()]


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the last layer's gradients during the first `freeze_last_layer_epochs` epochs.

    Call after backward, before the optimizer step. Freezing it early avoids collapse while the
    prototypes are still random (authors: 1 epoch).

    Args:
        model (`nn.Module`):
            The model holding the `DINOHead`(s) (e.g. a DDP-wrapped student).
        epoch (`int`):
            The current epoch.
        freeze_last_layer_epochs (`int`):
            The number of epochs during which the last layer is frozen.
    """
    if epoch < freeze_last_layer_epochs:
        for param in last_layer_parameters(model):
            param.grad = None


class MultiCropModel(nn.Module):
    """Backbone + head applied to a list of views, one backbone call per resolution group.

    Consecutive views of equal size are concatenated and run through the backbone together (one
    call for all global crops, one for all local crops), then the head runs once on all features.

    Args:
        backbone (`nn.Module`):
            Called as `backbone(pixel_values=x)`; the features are
            `cdcl_hf.embedding.pooled_embedding` of its output.
        head (`nn.Module`):
            The projection head (e.g. `DINOHead`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(self.backbone(pixel_values=pixel_values))

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, return_features: bool = False):
        """Run the views through backbone and head.

        Args:
            views (`Sequence[torch.Tensor]` or `torch.Tensor`):
                (B,C,H,W) tensors in view order (global views first, then local ones; see
                `cdcl_hf.multicrop.stack_views`); a single tensor is one view.
            return_features (`bool`, *optional*, defaults to `False`):
                Whether to also return the backbone features.

        Returns:
            `torch.Tensor` of shape `(len(views) * B, out_dim)`: the view-major logits; with
            `return_features=True`, the tuple `(logits, features)`.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if len(views) == 0:
            raise ValueError("no views given")
        features = []
        start = 0
        while start < len(views):
            stop = start + 1
            while stop < len(views) and views[stop].shape[-2:] == views[start].shape[-2:]:
                stop += 1
            group = torch.cat(list(views[start:stop])) if stop - start > 1 else views[start]
            features.append(self.embed(group))
            start = stop
        features = torch.cat(features)
        logits = self.head(features)
        return (logits, features) if return_features else logits


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` (same weights) for EMA updates.

    Put in eval mode, which turns off dropout and drop-path: the authors use drop-path on the
    student only. Keep it in eval mode (do not call `.train()` on it).

    Args:
        student (`nn.Module`):
            The model to copy.
    """
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()
