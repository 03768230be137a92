"""oneDNN's linear kernel for the CPU: the same values and gradients as torch's linear, and used only where it applies."""

import pytest
import torch

import cdcl_hf.cpu_kernels as cpu_kernels
from cdcl_hf import CDCLConfig, CDCLModel
from cdcl_hf.cpu_kernels import OneDNNLinearMode, cpu_linear_kernel, onednn_linear_available

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear kernel")


def _linear_and_grads(input, weight, bias, kernel):
    input, weight = input.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if bias is not None else None
    with cpu_linear_kernel(kernel):
        output = torch.nn.functional.linear(input, weight, bias)
    output.mul(torch.linspace(-1, 1, output.shape[-1])).sum().backward()
    return output, input.grad, weight.grad, None if bias is None else bias.grad


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["rows", "tokens", "transposed_input"])
def test_values_and_gradients_match_float64(with_bias, layout):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(4, 9, 24, generator=generator, dtype=torch.float64)
    if layout == "rows":
        input = input.reshape(36, 24)
    if layout == "transposed_input":  # a non-contiguous input, as after a permute
        input = torch.randn(4, 24, 9, generator=generator, dtype=torch.float64).transpose(1, 2)
    weight = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    bias = torch.randn(40, generator=generator, dtype=torch.float64) if with_bias else None
    exact = _linear_and_grads(input, weight, bias, "blas")
    as_float = [t.float() if t is not None else None for t in (input, weight, bias)]
    onednn = _linear_and_grads(*as_float, "onednn")
    for name, got, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), onednn, exact, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), name


@needs_onednn
def test_every_linear_layer_of_the_model_runs_onednn_and_training_gradients_agree():
    config = CDCLConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                        patch_size=8, num_channels=3)
    torch.manual_seed(0)
    model = CDCLModel(config)
    pixels = torch.randn(2, 3, 32, 32)
    applied = []

    def count(module, args, output):
        applied.append(type(output.grad_fn).__name__)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    grads = {}
    for kernel in ("blas", "onednn"):
        model.zero_grad()
        with cpu_linear_kernel(kernel):
            model(pixel_values=pixels).pooler_output.square().sum().backward()
        grads[kernel] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for hook in hooks:
        hook.remove()
    linears = len(hooks)
    assert linears >= 8 and set(applied[linears:]) == {"OneDNNLinearFunctionBackward"}, applied
    assert "OneDNNLinearFunctionBackward" not in applied[:linears]
    for name, grad in grads["blas"].items():
        assert torch.allclose(grads["onednn"][name], grad, rtol=1e-4, atol=1e-6), name


@needs_onednn
def test_autocast_other_dtypes_and_other_devices_keep_torchs_own_linear():
    linear = torch.nn.Linear(8, 4)
    input = torch.randn(3, 8, requires_grad=True)
    with cpu_linear_kernel("onednn"):
        assert type(linear(input).grad_fn).__name__ == "OneDNNLinearFunctionBackward"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(input).dtype == torch.bfloat16  # autocast's cast still happens
        assert linear.double()(input.double()).dtype == torch.float64
        assert type(torch.nn.functional.linear(torch.randn(8), torch.randn(4, 8)).grad_fn).__name__ != (
            "OneDNNLinearFunctionBackward")
    assert isinstance(cpu_linear_kernel("auto", "cuda"), type(cpu_linear_kernel("blas")))
    assert isinstance(cpu_linear_kernel("auto", "cpu"), OneDNNLinearMode)


def test_kernel_choice_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="one of"):
        cpu_linear_kernel("mkl")
    monkeypatch.setattr(cpu_kernels, "_onednn_linear_op", lambda: None)
    with pytest.raises(RuntimeError, match="no oneDNN linear kernel.*use auto or blas"):
        cpu_linear_kernel("onednn")
    assert not isinstance(cpu_linear_kernel("auto"), OneDNNLinearMode)  # falls back to the BLAS


@needs_onednn
def test_inference_mode_forward_has_no_graph_and_the_same_values():
    linear = torch.nn.Linear(8, 4)
    input = torch.randn(5, 8)
    with torch.inference_mode(), cpu_linear_kernel():
        output = linear(input)
    assert output.grad_fn is None
    assert torch.allclose(output, torch.nn.functional.linear(input, linear.weight, linear.bias), atol=1e-6)
