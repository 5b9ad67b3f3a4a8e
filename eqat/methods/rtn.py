"""Round-to-nearest: min/max scales and zero-points per group, no data. The baseline, and the
initialiser every trained method starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import dequantize_codes
from eqat.core.layer_schemes import SchemeLike, as_layer_schemes
from eqat.core.scheme import QuantScheme
from eqat.methods.base import DataFreeMethod, register_method
from eqat.models.arch import check_scheme, replace_module


def relative_error(weight: torch.Tensor, layer: QuantLinear) -> float:
    """||W - W_hat||^2 / ||W||^2 of one layer."""
    w = weight.detach().float()
    w_hat = dequantize_codes(layer.codes(), layer.scales, layer.zeros)
    return float(((w - w_hat) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


@torch.no_grad()
def quantize_rtn(
    model: nn.Module,
    scheme: SchemeLike,
    dtype: torch.dtype = torch.float16,
    on_layer: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Replace every block Linear of `model` by a round-to-nearest QuantLinear, in place.

    `scheme`: one QuantScheme, or a LayerSchemes giving some modules their own.
    Returns the relative weight error of each layer by name; `on_layer(name, error)` is called
    after each layer (progress reporting belongs to the caller).
    """
    errors, schemes = {}, as_layer_schemes(scheme)
    for name, lin in check_scheme(model, schemes).items():
        q = QuantLinear.from_linear(lin, schemes(name), dtype=dtype)
        errors[name] = relative_error(lin.weight, q)
        replace_module(model, name, q)
        if on_layer:
            on_layer(name, errors[name])
    return errors


@dataclass
class RTNConfig:
    """RTN has no options."""


@register_method
class RTN(DataFreeMethod):
    name = "rtn"
    label = "RTN"
    config = RTNConfig
    quantizes_activations = True  # the packed QuantLinear applies the scheme's activation quantization
    summary = "round to nearest with min/max scales, no data (seconds; the baseline)"

    def quantize(self, model: nn.Module, scheme: QuantScheme, cfg: RTNConfig, dtype: torch.dtype,
                 on_layer: Callable[[str, float], None] | None = None) -> dict[str, float]:
        return quantize_rtn(model, scheme, dtype=dtype, on_layer=on_layer)
