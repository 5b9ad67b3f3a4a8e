"""The packed training path (`PackedLinearFunction`) against autograd through a dense reference."""

import pytest
import torch
import torch.nn.functional as F

from eqat.kernels.reference import PackedLinearFunction, TorchOps, quant_linear_torch
from eqat.core.packing import pack_int32
from eqat.core.quantizer import dequantize_codes


def _case(bits: int, n: int, k: int, group: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group
    scales = (torch.rand(n, groups, generator=g) * 0.05 + 0.01).float()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).float()
    b = torch.randn(n, generator=g).float() if bias else None
    x = torch.randn(3, 5, k, generator=g).float()
    return codes, pack_int32(codes, bits), scales, zeros, b, x


def _grads(out: torch.Tensor, tensors, seed: int = 1):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], gy)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group,bias", [(7, 96, 32, True), (5, 160, 32, False), (4, 64, -1, True)])
def test_gradients_match_dense_autograd(bits, n, k, group, bias):
    """Odd group counts (3, 5), per-channel, with and without bias; x, scales, zeros, bias."""
    group = k if group == -1 else group
    codes, qweight, scales, zeros, b, x = _case(bits, n, k, group, bias)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, scales, zeros, b)]
    xr, sr, zr, br = leaves
    ref = F.linear(xr, dequantize_codes(codes, sr, zr), br)
    ref_grads = _grads(ref, leaves)

    leaves2 = [t.clone().requires_grad_() if t is not None else None for t in (x, scales, zeros, b)]
    xp, sp, zp, bp = leaves2
    out = PackedLinearFunction.apply(xp, qweight, sp, zp, bp, bits, k, TorchOps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, leaves2), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_scales_train_no_input_grad():
    """The E2E-QP case: x needs no gradient (first layer), zero-points frozen."""
    codes, qweight, scales, zeros, _, x = _case(2, 6, 128, 64, False)
    s = scales.clone().requires_grad_()
    out = quant_linear_torch(x, qweight, s, zeros, None, 2, 128)
    (gs,) = _grads(out, [s])
    s_ref = scales.clone().requires_grad_()
    (gs_ref,) = _grads(F.linear(x, dequantize_codes(codes, s_ref, zeros)), [s_ref])
    torch.testing.assert_close(gs, gs_ref, rtol=1e-4, atol=1e-4)


def test_saves_no_dense_weight():
    """Only x and the packed tensors are kept for the backward, never an [N, K] float matrix."""
    codes, qweight, scales, zeros, _, x = _case(4, 64, 256, 64, False)
    s = scales.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quant_linear_torch(x, qweight, s, zeros, None, 4, 256)
    assert all(t.shape != (64, 256) or t.dtype == torch.int32 for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 64 * 256 * 4 / 2


def test_trained_zeros_round_straight_through():
    """A fractional zero-point acts as its rounded value; its gradient passes straight through."""
    codes, qweight, scales, zeros, _, x = _case(3, 4, 64, 32, False)
    z = (zeros + 0.3).requires_grad_()
    out = PackedLinearFunction.apply(x, qweight, scales, z, None, 3, 64, TorchOps)
    torch.testing.assert_close(out, F.linear(x, dequantize_codes(codes, scales, zeros)))
    (gz,) = _grads(out, [z])
    zr = zeros.clone().requires_grad_()
    (gz_ref,) = _grads(F.linear(x, dequantize_codes(codes, scales, zr)), [zr])
    torch.testing.assert_close(gz, gz_ref, rtol=1e-4, atol=1e-4)
