"""One pooled embedding per image from whatever a vision model returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .cpu_kernels import cpu_linear_kernel


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


# A cell in a crop or a field has no preferred orientation, and training draws flips and quarter turns of every
# view; averaging an image's embedding over those symmetries removes what the model did not learn to ignore.
TEST_TIME_AUGMENTATIONS = ("none", "flips", "dihedral")


def symmetry_views(pixel_values: torch.Tensor, augmentation: str = "none") -> list[torch.Tensor]:
    """The views of ``pixel_values`` (batch, channels, height, width) that ``augmentation`` averages over.

    ``"none"``: the images as they are. ``"flips"``: also mirrored left-right, top-bottom and both (4 views).
    ``"dihedral"``: the 8 symmetries of the square (4 quarter turns, each also mirrored); needs square images.

    Raises:
        ValueError: An unknown ``augmentation``, or ``"dihedral"`` on images that are not square.
    """
    if augmentation not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"test-time augmentation must be one of {TEST_TIME_AUGMENTATIONS}, got {augmentation!r}")
    if augmentation == "none":
        return [pixel_values]
    if augmentation == "flips":
        return [pixel_values, pixel_values.flip(-1), pixel_values.flip(-2), pixel_values.flip((-2, -1))]
    height, width = pixel_values.shape[-2:]
    if height != width:
        raise ValueError(
            f"dihedral test-time augmentation turns images by quarter turns, which needs square images, got "
            f"{height} x {width}; use flips, or let the processor resize / crop to a square"
        )
    return [torch.rot90(view, turns, dims=(-2, -1))
            for view in (pixel_values, pixel_values.flip(-1)) for turns in range(4)]


def augmented_embedding(model: Callable[..., Any], pixel_values: torch.Tensor, augmentation: str = "none") -> torch.Tensor:
    """The (batch, dim) pooled embedding of ``pixel_values``, averaged over the views of :func:`symmetry_views`.

    ``model``: the model, or anything called like it (e.g. :func:`compiled_for_inference`'s result).

    All views go through the model in one forward pass (``len(views)`` times the batch), then each image's views
    are averaged; with ``"none"`` this is ``pooled_embedding(model(pixel_values=pixel_values))``.
    """
    views = symmetry_views(pixel_values, augmentation)
    pooled = pooled_embedding(model(pixel_values=torch.cat(views) if len(views) > 1 else views[0]))
    return pooled.reshape(len(views), pixel_values.shape[0], -1).mean(dim=0)


def inductor_cpp_compiler() -> tuple[str, bool]:
    """The C++ compiler inductor's CPU code is built with (``$CXX``, else ``g++``) and whether it is on PATH."""
    import os
    import shutil

    compiler = os.environ.get("CXX", "g++")
    return compiler, shutil.which(compiler) is not None


def compiled_for_inference(model: torch.nn.Module):
    """``model`` compiled for embedding: ``torch.compile(model, dynamic=True)`` with inductor's weight freezing.

    Frozen weights are packed once for the CPU's GEMM kernel, and with dynamic shapes the linear layers run oneDNN's
    kernel: on an AMD EPYC, where the BLAS of the PyTorch wheels (MKL) takes its AVX2 code, that is ~2x the eager
    forward in fp32 (`python benchmarks/bench_inference.py --compiled`). The first call compiles (20-43 s for
    ViT-S/16 on one core of the benchmark machine), so it pays on large screens and fields, not on a few crops. Freezing is switched on only
    while the returned callable runs; it applies to inference-mode calls only, and the model's own weights are not
    changed (changing them afterwards is not seen by the compiled function).

    Returns:
        A callable with the model's call signature.

    Raises:
        FileNotFoundError: No C++ compiler for inductor's CPU code (``$CXX`` or ``g++``).
    """
    import torch._inductor.config as inductor_config

    compiler, found = inductor_cpp_compiler()
    if not found:
        raise FileNotFoundError(
            f"compiling the model needs a C++ compiler for inductor's CPU code, and {compiler!r} is not on PATH; "
            "install one (e.g. g++) or embed without compiling"
        )
    compiled = torch.compile(model, dynamic=True)

    def forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return forward


def inference_forward(model: torch.nn.Module, compile_model: bool = False, linear_kernel: str = "auto"):
    """The callable that embeds with ``model``: compiled (:func:`compiled_for_inference`) or eager.

    Eager calls run the linear layers on the kernel ``linear_kernel`` names (:func:`cdcl_hf.cpu_kernels.cpu_linear_kernel`:
    by default oneDNN's for fp32 on the CPU, 1.3-1.9x the BLAS for a ViT-S/16 on an AMD CPU). A compiled model
    picks its own kernels.

    Raises:
        ValueError / RuntimeError: An unknown ``linear_kernel``, or ``"onednn"`` where torch has no such kernel.
        FileNotFoundError: ``compile_model`` without a C++ compiler.
    """
    if compile_model:
        return compiled_for_inference(model)
    device = next(model.parameters()).device
    cpu_linear_kernel(linear_kernel, device)  # refuses a bad choice now, not at the first batch

    def forward(*args, **kwargs):
        with cpu_linear_kernel(linear_kernel, device):
            return model(*args, **kwargs)

    return forward
