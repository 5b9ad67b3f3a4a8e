"""eqat's Triton kernels against the torch reference (TorchOps).

On a machine without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set
before the kernels are first defined); with CUDA, on the GPU. Shapes are small but cover each
path: GEMV with M = 1 (broadcast) and M = 16 (dot), tiled GEMM with ragged M and N, 2/3/4/8
bits, odd group counts, per-channel over 576 inputs, bias, non-contiguous input, and the
three activation dtypes. The oracle takes the same rounding the kernels take (the weight
dequantized in float32, cast to the activations' dtype) and computes in float64.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():  # before triton's first import: it reads this as it loads
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from eqat.kernels.reference import PackedLinearFunction, TorchOps, dequantize_packed  # noqa: E402
from eqat.kernels.triton_ops import TritonOps, scale_grad_block_k  # noqa: E402
from eqat.core.packing import pack_int32  # noqa: E402
from eqat.core.qlinear import QuantLinear  # noqa: E402
from eqat.core.scheme import QuantScheme  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, N, K, group, bias): GEMV broadcast, GEMV dot (M = 16, 3 groups of 16), GEMM (3 groups),
# GEMM per-channel over 576 inputs (nine 64-wide tiles reduced into one scale per row)
SHAPES = [(1, 24, 96, 32, True), (16, 40, 48, 16, False), (37, 33, 192, 64, True), (40, 20, 576, 576, False)]


def _layer(bits, n, k, group, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group
    scales = (torch.rand(n, groups, generator=g) * 0.04 + 0.01).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).float()
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(pack_int32(codes, bits)), to(scales), to(zeros), to(b)


def _close(got, want, dtype):
    """Within two units in the last place of `dtype`, relative to the output's magnitude."""
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale)


def _oracle_forward(x, qweight, scales, zeros, bias, bits, k):
    w = dequantize_packed(qweight, scales, zeros, bits, k).to(x.dtype).double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# forward only, also: GEMV per-channel (one scale per tile row; a split-K tile that starts past K)
# and 5 rows (GEMV padded to a dot tile, whole-group tiles)
@pytest.mark.parametrize("m,n,k,group,bias", SHAPES + [(1, 24, 576, 576, False), (5, 24, 128, 64, True)])
def test_forward_matches_reference(bits, m, n, k, group, bias, dtype):
    qweight, scales, zeros, b = _layer(bits, n, k, group, bias, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y = TritonOps.forward(x, qweight, scales, zeros, b, bits, k)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y, _oracle_forward(x, qweight, scales, zeros, b, bits, k), dtype)
    if dtype == torch.float32:  # and the reference itself agrees with the oracle
        _close(TorchOps.forward(x, qweight, scales, zeros, b, bits, k), _oracle_forward(x, qweight, scales, zeros, b, bits, k), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m,n,k,group,bias", [SHAPES[1], SHAPES[2], SHAPES[3]])
def test_backward_matches_reference(bits, m, n, k, group, bias, dtype):
    """Gradients of x, scales, zero-points and bias through PackedLinearFunction, Triton vs torch."""
    qweight, scales, zeros, b = _layer(bits, n, k, group, bias, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, m, k, generator=g).to(DEVICE, dtype)
    gy = torch.randn(2, m, n, generator=g).to(DEVICE, dtype)
    grads = {}
    for ops in (TorchOps, TritonOps):
        leaves = [t.clone().float().to(dtype).requires_grad_() if t is not None else None for t in (x, scales, zeros, b)]
        out = PackedLinearFunction.apply(leaves[0], qweight, leaves[1], leaves[2], leaves[3], bits, k, ops)
        grads[ops.name] = (out, torch.autograd.grad(out, [t for t in leaves if t is not None], gy))
    (y_t, g_t), (y_r, g_r) = grads["triton"], grads["torch"]
    _close(y_t, _oracle_forward(x, qweight, scales, zeros, b, bits, k), dtype)
    assert len(g_t) == len(g_r) == (4 if bias else 3)
    for name, got, want in zip(["x", "scales", "zeros", "bias"], g_t, g_r):
        assert got.dtype == want.dtype, name
        _close(got, want, dtype)


def test_noncontiguous_and_batched_input_through_quantlinear(monkeypatch):
    """EQAT_KERNEL=triton through QuantLinear: a transposed input and a [B, T, K] input."""
    monkeypatch.setenv("EQAT_KERNEL", "triton")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 24), QuantScheme(3, 32), dtype=torch.float32).to(DEVICE)
    x = torch.randn(64, 5, device=DEVICE).t()
    assert not x.is_contiguous()
    w = layer.dequantize()
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 20, 64, device=DEVICE)  # 40 rows: the GEMM path
    torch.testing.assert_close(layer(x3), x3 @ w.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_e2e_qp_step_is_the_same_on_triton(monkeypatch):
    """One scale-only training step of a QuantLinear: identical updates on both backends."""
    torch.manual_seed(0)
    base = QuantLinear.from_linear(torch.nn.Linear(128, 48, bias=False), QuantScheme(2, 64), dtype=torch.float32)
    x = torch.randn(4, 24, 128)
    new_scales = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv("EQAT_KERNEL", kernel)
        layer = QuantLinear(128, 48, QuantScheme(2, 64), dtype=torch.float32)
        layer.load_state_dict(base.state_dict())
        layer = layer.to(DEVICE)
        layer.scales.requires_grad_(True)
        opt = torch.optim.SGD([layer.scales], lr=1e-2)
        layer(x.to(DEVICE)).square().mean().backward()
        opt.step()
        new_scales[kernel] = layer.scales.detach().cpu()
    assert not torch.equal(new_scales["torch"], base.scales)
    torch.testing.assert_close(new_scales["triton"], new_scales["torch"], rtol=1e-5, atol=1e-7)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4, 8]), m=st.integers(1, 40), n=st.integers(1, 40),
       groups=st.integers(1, 4), group=st.sampled_from([16, 32, 48, 64]), bias=st.booleans())
def test_random_shapes_forward_and_backward(bits, m, n, groups, group, bias):
    """Ragged shapes drawn by hypothesis (float32, both GEMV and GEMM, and the backward)."""
    k = groups * group
    qweight, scales, zeros, b = _layer(bits, n, k, group, bias, torch.float32, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _close(TritonOps.forward(x, qweight, scales, zeros, b, bits, k), _oracle_forward(x, qweight, scales, zeros, b, bits, k),
           torch.float32)
    gy = torch.randn(m, n, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _close(TritonOps.grad_input(gy, qweight, scales, zeros, bits, k), TorchOps.grad_input(gy, qweight, scales, zeros, bits, k),
           torch.float32)
    for got, want in zip(TritonOps.grad_scales(gy, x, qweight, zeros, bits, k), TorchOps.grad_scales(gy, x, qweight, zeros, bits, k)):
        _close(got, want, torch.float32)


def test_scale_gradient_tile_divides_the_group():
    assert [scale_grad_block_k(g) for g in (16, 32, 48, 64, 96, 128, 256, 576, 24, 100)] == \
        [16, 32, 16, 64, 32, 128, 128, 64, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_whole_model_logits_agree_across_backends(monkeypatch, dtype):
    """A tiny Llama quantized to w3g32, run end to end on each backend: same logits."""
    from eqat.methods.rtn import quantize_rtn
    from tests.conftest import tiny_model

    model = tiny_model("llama", hidden=64, layers=2)
    quantize_rtn(model, QuantScheme(3, 32))
    model = model.to(DEVICE, dtype)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv("EQAT_KERNEL", kernel)
        with torch.no_grad():
            logits[kernel] = model(ids).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=tol, atol=tol)
    assert (logits["triton"].argmax(-1) == logits["torch"].argmax(-1)).float().mean() > 0.95
