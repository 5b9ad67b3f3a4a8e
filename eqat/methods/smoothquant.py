"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights, then round to nearest.

At each site of a block (eqat.methods.calibration: q/k/v, o, gate/up, down) the input channel j
is divided by a smoothing factor and the weights reading it multiplied by it, which leaves the block's
function unchanged:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)        X' = X / s,  W' = W * s (columns)

`1 / s` is folded into what produces X: the RMSNorm weight (q/k/v, gate/up), the rows of v_proj
(o_proj; with grouped-query attention each v channel feeds one o channel per query head of its
group, so their maxima are pooled and they share one factor) or of up_proj (down_proj, through
act(gate) * up). The maxima come from the block's calibration inputs, which on the block-wise
engine are the already-quantized model's (the sequential pipeline of llm-compressor); then every
linear is quantized by RTN (weights and activations). Untrained: a block takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eqat.core.dtypes import parse_dtype
from eqat.core.layer_schemes import SchemeLike
from eqat.core.options import option
from eqat.engine.config import BlockwiseConfig
from eqat.errors import EqatInputError
from eqat.methods.base import BlockwiseMethod, ParamGroup, register_method
from eqat.methods.block_ap import recon_loss
from eqat.methods.calibration import Site, block_sites, check_sites, collect_inputs, o_to_v_channels
from eqat.methods.fakequant import freeze_block, wrap_block


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = act_max^alpha / weight_max^(1 - alpha) (float32); 1 where either is 0."""
    a, w = act_max.float(), weight_max.float()
    s = a.pow(alpha) / w.pow(1 - alpha).clamp_min(1e-12)
    return torch.where((a > 0) & (w > 0), s.clamp_min(1e-5), torch.ones_like(s))


@torch.no_grad()
def smooth_site(block: nn.Module, site: Site, act_max: torch.Tensor, alpha: float,
                norm_offset: float = 0.0) -> dict[str, float]:
    """Migrate site's input scale into its weights, in place, given its input's per-channel maxima
    `act_max` [K]; returns the largest input maximum before and after. A norm source computes
    x_hat * (norm_offset + w) (Gemma: 1 + w), so w' = (norm_offset + w) / s - norm_offset."""
    linears = [block.get_submodule(n) for n in site.linears]
    weight_max = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0)  # [K]
    source = block.get_submodule(site.source)
    if site.source_is_norm:
        s = smoothing_factors(act_max, weight_max, alpha)
        w = source.weight
        w.copy_(((norm_offset + w.float()) / s - norm_offset).to(w.dtype))
    else:
        if site.rows == "o_to_v":  # pool the o channels of each v channel (GQA), one factor per v channel
            to_v = o_to_v_channels(block)
            width = source.out_features
            pooled_a = torch.zeros(width).scatter_reduce(0, to_v, act_max.float(), "amax")
            pooled_w = torch.zeros(width).scatter_reduce(0, to_v, weight_max, "amax")
            s_src = smoothing_factors(pooled_a, pooled_w, alpha)
            s = s_src[to_v]
        else:
            s = s_src = smoothing_factors(act_max, weight_max, alpha)
        source.weight.div_(s_src.to(source.weight.dtype)[:, None])
        if source.bias is not None:
            source.bias.div_(s_src.to(source.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return {"act_max_before": float(act_max.max()), "act_max_after": float((act_max / s).max())}


def smooth_block(block: nn.Module, data: Any, alpha: float) -> dict[str, dict[str, float]]:
    """SmoothQuant's migration at every site of `block` that has a source to fold into, in place,
    from the per-channel input maxima over `data`'s calibration windows; the block's function is
    unchanged (up to rounding). Returns each site's largest input maximum before and after."""
    sites = [s for s in block_sites(block, "SmoothQuant", data.family) if s.source is not None]
    stats = collect_inputs(block, [s.linears[0] for s in sites], data.run, data.train)
    return {site.name: smooth_site(block, site, stats[site.linears[0]].absmax.cpu(), alpha, data.family.norm_offset)
            for site in sites}


@dataclass
class SmoothQuantConfig(BlockwiseConfig):
    """SmoothQuant's migration strength; the engine's epochs do not apply (nothing trains)."""

    alpha: float = option(0.5, "Migration strength in [0, 1]: 0 leaves activations alone, 1 moves all of their range "
                               "into the weights (the paper: 0.5 for most models).", param="sq_alpha")

    def check(self) -> None:
        super().check()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise EqatInputError(f"--sq-alpha must be in [0, 1], got {self.alpha!r}.")


@register_method
class SmoothQuant(BlockwiseMethod):
    name = "smoothquant"
    label = "SmoothQuant"
    config = SmoothQuantConfig
    quantizes_activations = True
    summary = "SmoothQuant: activation outliers migrated into the weights (folded into norms, v_proj, up_proj), then RTN"

    def check_model(self, model: nn.Module, cfg: SmoothQuantConfig) -> None:
        check_sites(model, self.label)

    def calibrate_block(self, block: nn.Module, data: Any, scheme: SchemeLike, cfg: SmoothQuantConfig) -> dict[str, Any]:
        return smooth_block(block, data, cfg.alpha)

    def prepare_block(self, block: nn.Module, scheme: SchemeLike, cfg: SmoothQuantConfig) -> list[ParamGroup]:
        wrap_block(block, scheme, parse_dtype(cfg.storage_dtype))  # RTN initialised; nothing trains
        return []

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: SmoothQuantConfig) -> torch.Tensor:
        return recon_loss(out, target, "mse")

    def freeze_block(self, block: nn.Module, cfg: SmoothQuantConfig, dtype: torch.dtype) -> None:
        freeze_block(block, dtype)

    def describe(self, cfg: SmoothQuantConfig, scheme: SchemeLike) -> dict[str, Any]:
        return {"alpha": cfg.alpha}
