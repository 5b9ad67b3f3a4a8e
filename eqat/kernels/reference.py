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

from eqat.core.packing import unpack_int32
from eqat.core.quantizer import dequantize_codes


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


class TorchOps:
    """The three primitives of a packed linear in plain torch; the oracle for TritonOps.

    2-D inputs. zeros: float32 [N, G] on the grid (see `_grid_zeros`).
    """

    name = "torch"

    @staticmethod
    def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, bits: int, in_features: int) -> torch.Tensor:
        """x [M, K] -> y [M, N] in x's dtype."""
        w = dequantize_packed(qweight, scales, zeros, bits, in_features).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def grad_input(grad_y: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, in_features: int) -> torch.Tensor:
        """dL/dy [M, N] -> dL/dx [M, K] in dL/dy's dtype."""
        return grad_y @ dequantize_packed(qweight, scales, zeros, bits, in_features).to(grad_y.dtype)

    @staticmethod
    def grad_scales(grad_y: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                    bits: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_k G (q - z), sum_k G) per group, both float32 [N, G], with G = dL/dy^T @ x."""
        n, groups = zeros.shape
        codes = unpack_int32(qweight, bits, in_features)
        # G = dL/dW_hat, one [N, K] float32 matrix for this layer, freed on return
        gw = (grad_y.float().T @ x.float()).view(n, groups, -1)
        return ((codes.view(n, groups, -1).float() - zeros.unsqueeze(-1)) * gw).sum(-1), gw.sum(-1)


class PackedLinearFunction(torch.autograd.Function):
    """y = x @ dequant(qweight, scales, zeros)^T + bias, differentiable in x, scales, zeros, bias.

    `ops` (TorchOps or TritonOps) does the arithmetic on 2-D views. Rounding of the zero-points
    is straight-through. Saves x and the packed tensors only.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, qweight, scales, zeros, bias, bits: int, in_features: int, ops):
        z = _grid_zeros(zeros, bits)
        y = ops.forward(x.reshape(-1, in_features), qweight, scales, z, bias, bits, in_features)
        ctx.save_for_backward(x, qweight, scales, zeros)
        ctx.bits, ctx.in_features, ctx.has_bias, ctx.ops = bits, in_features, bias is not None, ops
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, qweight, scales, zeros = ctx.saved_tensors
        need_x, _, need_s, need_z, need_b = ctx.needs_input_grad[:5]
        bits, k, ops = ctx.bits, ctx.in_features, ctx.ops
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        z = _grid_zeros(zeros, bits)
        gx = gs = gz = gb = None
        if need_x:
            gx = ops.grad_input(gy, qweight, scales, z, bits, k).view(x.shape)
        if need_s or need_z:
            sum_gq, sum_g = ops.grad_scales(gy, x.reshape(-1, k), qweight, z, bits, k)
            gs = sum_gq.to(scales.dtype) if need_s else None
            gz = (-scales.float() * sum_g).to(zeros.dtype) if need_z else None
        if need_b and ctx.has_bias:
            gb = gy.sum(0)
        return gx, None, gs, gz, gb, None, None, None


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None, bits: int, in_features: int, ops=TorchOps) -> torch.Tensor:
    """y = x @ dequant(W)^T + b with `ops`. x: [..., K] -> [..., N] in x's dtype.

    When a gradient is wanted (E2E-QP), runs `PackedLinearFunction`; otherwise `ops.forward`.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scales, zeros, bias)):
        return PackedLinearFunction.apply(x, qweight, scales, zeros, bias, bits, in_features, ops).to(x.dtype)
    y = ops.forward(x.reshape(-1, in_features), qweight, scales, _grid_zeros(zeros, bits), bias, bits, in_features)
    return y.view(*x.shape[:-1], -1)


def quant_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bias: torch.Tensor | None, bits: int, in_features: int) -> torch.Tensor:
    """`packed_linear` on the torch reference. x: [..., K] -> [..., N] in x's dtype."""
    return packed_linear(x, qweight, scales, zeros, bias, bits, in_features, TorchOps)
