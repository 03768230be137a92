"""The kernel that runs the linear layers on the CPU: oneDNN's, where the BLAS of the PyTorch wheels is half speed.

Eager ``nn.Linear`` on the CPU calls the BLAS the wheels are built with, MKL. On AMD CPUs MKL takes its AVX2 code
even where the CPU has AVX-512: on the benchmark machine's AMD EPYC (Zen 5) one core reaches ~100 GFLOP/s in fp32
through MKL and ~225 through oneDNN's linear kernel, which the same wheels ship (it is what ``torch.compile`` uses
for frozen inference graphs). A ViT's forward and backward are ~80 % linear layers, so routing them to oneDNN makes
a ViT-S/16 training step 1.7x faster there and an eager ViT-S/16 forward 1.7-1.9x at batch 8-32
(``benchmarks/bench_training_step.py``, ``bench_inference.py``); in fp32 both kernels agree with float64 to ~1e-6
relative.

:func:`cpu_linear_kernel` gives a context in which every fp32 ``torch.nn.functional.linear`` call on CPU tensors
runs oneDNN's kernel for its forward and both gradients (:class:`OneDNNLinearFunction`). It is used around the
training step (``cdcl-train --cpu_linear_kernel``) and around eager embedding (``cdcl-embed`` / ``cdcl-evaluate``).
Everything else (GPU tensors, other dtypes, autocast, code being compiled) runs as it would without it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "LINEAR_KERNELS",
    "LINEAR_KERNEL_HELP",
    "OneDNNLinearFunction",
    "OneDNNLinearMode",
    "cpu_linear_kernel",
    "onednn_linear",
    "onednn_linear_available",
]

# "auto": oneDNN where this torch build has its linear kernel and the device is the CPU, else the BLAS.
LINEAR_KERNELS = ("auto", "onednn", "blas")
# The help of every command's --cpu_linear_kernel.
LINEAR_KERNEL_HELP = (
    "on the CPU, the linear layers' kernel: auto (default) runs oneDNN's where torch has it, 1.7-1.9x the BLAS for a "
    "ViT on an AMD CPU, whose BLAS (MKL) takes its AVX2 code; blas: torch's default"
)


def _onednn_linear_op():
    if not torch.backends.mkldnn.is_available():
        return None
    # Not part of torch's public API (inductor calls it for frozen graphs); its absence falls back to the BLAS.
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    return _onednn_linear_op() is not None


def onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T + bias`` through oneDNN's linear kernel (``a``: (..., k), ``b``: (n, k)); needs
    :func:`onednn_linear_available`."""
    return _onednn_linear_op()(a, b, bias, "none", [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """``torch.nn.functional.linear`` with its forward and both gradients computed by oneDNN's linear kernel.

    The three GEMMs of a linear layer are each written as ``a @ b.T``, the form the kernel takes:
    output = input @ weight.T, grad_input = grad @ (weight.T).T, grad_weight = grad.T @ (input.T).T.
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = onednn_linear(grad_rows, weight.t()).reshape(input.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_linear(grad_rows.t(), input.reshape(-1, input.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(dim=0)
        return grad_input, grad_weight, grad_bias


def _runs_on_onednn(input, weight, bias) -> bool:
    tensors = [input, weight] + ([bias] if bias is not None else [])
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and input.dim() >= 2
        and input.numel() > 0
        # Autocast casts a linear's inputs inside the dispatcher, after this mode would have taken the call: leave
        # mixed precision (and what torch.compile traces) to the ops it expects.
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class OneDNNLinearMode(TorchFunctionMode):
    """Routes fp32 CPU ``torch.nn.functional.linear`` calls (every ``nn.Linear``) to :class:`OneDNNLinearFunction`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            input = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _runs_on_onednn(input, weight, bias):
                return OneDNNLinearFunction.apply(input, weight, bias)
        return func(*args, **kwargs)


def cpu_linear_kernel(kernel: str = "auto", device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """A context in which the linear layers of models on ``device`` run the chosen kernel (see the module).

    Args:
        kernel (`str`, defaults to `"auto"`):
            ``"onednn"``: oneDNN's linear kernel for fp32 CPU tensors. ``"blas"``: torch's default (the BLAS).
            ``"auto"``: ``"onednn"`` when ``device`` is the CPU and this torch build has the kernel, else ``"blas"``.
        device (`torch.device` or `str`, defaults to `"cpu"`):
            Where the model runs; off the CPU every kernel choice is torch's default.

    Raises:
        ValueError: An unknown ``kernel``.
        RuntimeError: ``"onednn"`` asked for on a torch build without oneDNN's linear kernel.
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"the CPU linear kernel must be one of {LINEAR_KERNELS}, got {kernel!r}")
    if kernel == "onednn" and not onednn_linear_available():
        raise RuntimeError(
            f"--cpu_linear_kernel onednn: this torch build ({torch.__version__}) has no oneDNN linear kernel; "
            "use auto or blas"
        )
    on_cpu = torch.device(device).type == "cpu"
    if kernel == "blas" or not on_cpu or not onednn_linear_available():
        return contextlib.nullcontext()
    return OneDNNLinearMode()
