"""The plain-torch reference path: unpack, dequantize, `F.linear`. Runs everywhere.

It is the oracle every fast kernel is tested against, so it favours clarity over speed:
the weight is dequantized in float32, then cast to the activations' dtype.

Training through packed weights (E2E-QP) goes through `PackedLinearFunction`: the forward
keeps only the packed codes, scales and zero-points for the backward (never a dequantized
weight), and the backward dequantizes again to return the gradients of the input, the
scales (and the zero-points and bias when they train). With W_hat = (q - z) * s per group:

    dL/dx = dL/dy @ W_hat                           [..., K]
    dL/ds[n, j] = sum_{k in group j} (q - z)[n, k] * G[n, k]      G = dL/dy^T @ x, [N, K]
    dL/dz[n, j] = -s[n, j] * sum_{k in group j} G[n, k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eqat.packing import unpack_int32
from eqat.quantizer import dequantize_codes


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int
) -> torch.Tensor:
    """qweight int32 [N, W], scales/zeros [N, G] -> float32 weight [N, in_features]."""
    codes = unpack_int32(qweight, bits, in_features)
    return dequantize_codes(codes, scales, zeros)


def _grid_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero-points as the forward uses them: rounded and clamped to the grid (a no-op for the
    integer-valued zero-points eqat stores; matters only while E2E-QP trains them)."""
    return torch.round(zeros.float()).clamp(0, (1 << bits) - 1)


class PackedLinearFunction(torch.autograd.Function):
    """y = x @ dequant(qweight, scales, zeros)^T + bias, differentiable in x, scales, zeros, bias.

    Rounding of the zero-points is straight-through. Saves x and the packed tensors only.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, qweight, scales, zeros, bias, bits: int, in_features: int):
        z = _grid_zeros(zeros, bits)
        w = dequantize_packed(qweight, scales, z, bits, in_features).to(x.dtype)
        ctx.save_for_backward(x, qweight, scales, zeros)
        ctx.bits, ctx.in_features, ctx.has_bias = bits, in_features, bias is not None
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, qweight, scales, zeros = ctx.saved_tensors
        need_x, _, need_s, need_z, need_b = ctx.needs_input_grad[:5]
        n, k = scales.shape[0], ctx.in_features
        groups = scales.shape[1]
        codes = unpack_int32(qweight, ctx.bits, k)
        z = _grid_zeros(zeros, ctx.bits)
        gx = gs = gz = gb = None
        if need_x:
            gx = grad_y @ dequantize_codes(codes, scales, z).to(grad_y.dtype)
        if need_s or need_z:
            # G = dL/dW_hat, one [N, K] float32 matrix for this layer, freed on return
            gw = (grad_y.reshape(-1, n).float().T @ x.reshape(-1, k).float()).view(n, groups, k // groups)
            if need_s:
                gs = ((codes.view(n, groups, -1).float() - z.unsqueeze(-1)) * gw).sum(-1).to(scales.dtype)
            if need_z:
                gz = (-scales.float() * gw.sum(-1)).to(zeros.dtype)
        if need_b and ctx.has_bias:
            gb = grad_y.reshape(-1, n).sum(0)
        return gx, None, gs, gz, gb, None, None


def quant_linear_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """y = x @ dequant(W)^T + b. x: [..., K] -> [..., N] in x's dtype.

    When a gradient is wanted (E2E-QP), runs `PackedLinearFunction`; otherwise plain torch.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, zeros, bias)):
        out = PackedLinearFunction.apply(x, qweight, scales, zeros, bias, bits, in_features)
        return out.to(x.dtype)
    w = dequantize_packed(qweight, scales, zeros, bits, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
