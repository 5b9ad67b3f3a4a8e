"""Trainable stand-ins for a block's Linears during QAT, and the step that freezes them.

`FakeQuantLinear` holds the full-precision weight (trainable) and a `FakeQuantizer` (trainable
per-group scale and zero-point); its forward uses the fake-quantized weight, so gradients
reach all three through the straight-through estimators of `eqat.core.quantizer`. `freeze_block`
rounds to integers and swaps in packed `QuantLinear`s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eqat.models.arch import block_linears
from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import FakeQuantizer, fake_quantize_tokens
from eqat.core.layer_schemes import SchemeLike, as_layer_schemes
from eqat.core.scheme import QuantScheme
from eqat.models.arch import replace_module


class FakeQuantLinear(nn.Module):
    """y = x @ fake_quantize(W)^T + b, x fake-quantized per token first when the scheme quantizes
    activations. weight float32 [N, K] (trainable), bias frozen."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = linear.in_features, linear.out_features, scheme
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.quantizer = FakeQuantizer(self.weight, scheme, storage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.act is not None:  # as the packed QuantLinear does (weight-activation schemes)
            x = fake_quantize_tokens(x, self.scheme.act)
        w = self.quantizer(self.weight)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Round to integers with the learned (scale, zero), stored in `dtype`, and pack."""
        return QuantLinear.from_weight(
            self.weight.detach(), self.scheme, bias=self.bias, scale=self.quantizer.scale.detach(),
            zero=self.quantizer.zero.detach(), dtype=dtype,
        )


def wrap_block(block: nn.Module, scheme: SchemeLike, storage: torch.dtype | None = None) -> dict[str, FakeQuantLinear]:
    """Replace every nn.Linear of `block` by a FakeQuantLinear (RTN-initialised), in place. `scheme`:
    one QuantScheme, or a LayerSchemes with names inside the block; `storage`: the dtype the scales
    will be packed in (training then sees the stored scales, eqat.core.quantizer)."""
    wrapped, schemes = {}, as_layer_schemes(scheme)
    for name, lin in block_linears(block).items():
        schemes(name).check_layer(name, lin.in_features)
        wrapped[name] = FakeQuantLinear(lin, schemes(name), storage).to(lin.weight.device)
        replace_module(block, name, wrapped[name])
    return wrapped


def trainable_groups(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, quantization parameters) of the FakeQuantLinears in `block`."""
    weights, qparams = [], []
    for m in block.modules():
        if isinstance(m, FakeQuantLinear):
            weights.append(m.weight)
            qparams.extend(p for p in m.quantizer.parameters())
    return weights, qparams


@torch.no_grad()
def freeze_block(block: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, QuantLinear]:
    """Replace every FakeQuantLinear of `block` by its packed QuantLinear, in place."""
    frozen = {}
    for name, m in list(block.named_modules()):
        if isinstance(m, FakeQuantLinear):
            frozen[name] = m.to_quant_linear(dtype)
            replace_module(block, name, frozen[name])
    return frozen
