"""The plain-torch reference path: unpack, dequantize, `F.linear`. Runs everywhere.

It is the oracle every fast kernel is tested against, so it favours clarity over speed:
the weight is dequantized in float32, then cast to the activations' dtype.
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


def quant_linear_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """y = x @ dequant(W)^T + b. x: [..., K] -> [..., N] in x's dtype."""
    w = dequantize_packed(qweight, scales, zeros, bits, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
