"""Block-AP (EfficientQAT phase 1): every parameter of a block trains by block reconstruction.

The block's Linears become FakeQuantLinears (RTN-initialised, eqat.methods.fakequant); weights,
scales and zero-points train together (two AdamW groups: weights at `weight_lr`, scale and zero
at `lr_quant`) to minimise the MSE between the block's output and the full-precision block's;
then the weights are rounded with the learned scale and zero and packed. The block-wise engine
(eqat.engine.blockwise) does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from eqat.core.dtypes import parse_dtype
from eqat.core.options import option
from eqat.core.layer_schemes import SchemeLike, as_layer_schemes, step_ratio
from eqat.core.scheme import QuantScheme
from eqat.engine.blockwise import BlockRecord, BlockwiseEngine
from eqat.engine.config import BlockwiseConfig, check_lr
from eqat.errors import EqatInputError
from eqat.methods.base import BlockwiseMethod, ParamGroup, get_method, register_method
from eqat.methods.fakequant import freeze_block, trainable_groups, wrap_block

LOSSES = ("mse", "relative", "sink", "clamp")


def _typical_rms(target: torch.Tensor) -> torch.Tensor:
    """Median over each window's tokens of the per-token RMS, [..., 1, 1] (float32)."""
    return target.pow(2).mean(-1).sqrt().median(-1).values[..., None, None]


def recon_loss(out: torch.Tensor, target: torch.Tensor, kind: str, outlier_ratio: float = 20.0,
               sink_weight: float = 1.0) -> torch.Tensor:
    """Per-token reconstruction loss [..., T] of block outputs [..., T, H] (computed in float32).

    "mse": mean squared error over the hidden size (the paper's loss, up to a constant).
    "relative": ||out - target||^2 / ||target||^2 per token.
    Some tokens (attention sinks, often the first of a window) carry "massive activations"
    hundreds of times larger than the rest (channel 507 of SmolLM2 reaches 2.4e4 after block 11,
    typical tokens have an RMS of ~6); under plain MSE they are ~98% of the loss, so later blocks
    learn nothing else (docs/block-ap.md). Two losses keep plain MSE for ordinary tokens and
    count only the relative error of the outliers, measured against `m`, each window's median
    token RMS:
    "sink": a token whose RMS exceeds `outlier_ratio * m` counts `sink_weight` times a typical
    token with the same relative error (its squared error scaled by sink_weight * (m / rms)^2).
    "clamp": per entry, the squared error of an entry larger than `outlier_ratio * m` is scaled
    by (outlier_ratio * m / |target|)^2, so the sink token's ordinary channels keep their weight.
    """
    out, target = out.float(), target.float()
    err = (out - target).pow(2)
    if kind == "mse":
        return err.mean(-1)
    if kind == "relative":
        return err.sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
    typical = _typical_rms(target)
    limit = outlier_ratio * typical
    if kind == "clamp":
        return (err * (limit / target.abs().clamp_min(1e-12)).pow(2).clamp(max=1.0)).mean(-1)
    rms = target.pow(2).mean(-1, keepdim=True).sqrt()
    weight = torch.where(rms > limit, sink_weight * (typical / rms.clamp_min(1e-12)).pow(2), 1.0)
    return (err * weight).mean(-1)


@dataclass
class BlockAPConfig(BlockwiseConfig):
    """AdamW, no weight decay, cosine to lr/20 and 2 epochs as in the paper; learning rates raised
    for ~64 steps per block instead of the paper's thousands (measured, see docs/block-ap.md)."""

    lr_weight: float | None = option(None, "Weight learning rate; default 3e-3 at 2 bits, 1e-3 at 3/4/8 "
                                           "(docs/block-ap.md).")
    lr_quant: float = option(1e-3, "Learning rate of scales and zero-points.")
    loss: str = option("mse", "Block reconstruction loss: mse (the paper), relative (per token), sink or clamp "
                              "(MSE, with outlier tokens or entries counted by relative error; docs/block-ap.md).")
    outlier_ratio: float = option(20.0, "For --loss sink/clamp: a token (sink) or entry (clamp) is an outlier above "
                                        "this multiple of the window's median token RMS.")
    sink_weight: float = option(1.0, "For --loss sink: an outlier token counts this many typical tokens with the same "
                                     "relative error.")

    def weight_lr(self, bits: int) -> float:
        if self.lr_weight is not None:
            return self.lr_weight
        return 3e-3 if bits <= 2 else 1e-3

    def check(self) -> None:
        super().check()
        if self.loss not in LOSSES:
            raise EqatInputError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'.")
        for flag, value in (("--outlier-ratio", self.outlier_ratio), ("--sink-weight", self.sink_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise EqatInputError(f"{flag} must be a positive number, got {value!r}.")
        check_lr("--lr-weight", self.lr_weight, "docs/block-ap.md")
        check_lr("--lr-quant", self.lr_quant, "docs/block-ap.md")


@register_method
class BlockAP(BlockwiseMethod):
    name = "block-ap"
    label = "Block-AP"
    config = BlockAPConfig
    summary = "EfficientQAT phase 1: weights, scales and zero-points of each block trained by reconstruction"

    def prepare_block(self, block: nn.Module, scheme: SchemeLike, cfg: BlockAPConfig) -> list[ParamGroup]:
        """Mixed precision: per bit width, the weights at that width's learning rate and the scales at
        lr_quant scaled to the width's step size (eqat.core.layer_schemes.step_ratio)."""
        wrapped = wrap_block(block, scheme, parse_dtype(cfg.storage_dtype))
        weights, qparams = trainable_groups(block)
        widths = {m.scheme for m in wrapped.values()}
        if len(widths) == 1:
            bits = next(iter(widths)).bits
            return [ParamGroup("weights", weights, cfg.weight_lr(bits)), ParamGroup("quant", qparams, cfg.lr_quant)]
        default = as_layer_schemes(scheme).default
        groups: list[ParamGroup] = []
        for s in sorted(widths, key=lambda s: (s.bits, s.name)):
            mods = [m for m in wrapped.values() if m.scheme == s]
            groups.append(ParamGroup(f"weights_{s.name}", [m.weight for m in mods], cfg.weight_lr(s.bits)))
            groups.append(ParamGroup(f"scales_{s.name}", [m.quantizer.scale for m in mods],
                                     cfg.lr_quant * step_ratio(default, s)))
        zeros = [m.quantizer.zero for m in wrapped.values() if isinstance(m.quantizer.zero, nn.Parameter)]
        return groups + ([ParamGroup("zeros", zeros, cfg.lr_quant)] if zeros else [])

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: BlockAPConfig) -> torch.Tensor:
        return recon_loss(out, target, cfg.loss, cfg.outlier_ratio, cfg.sink_weight)

    def freeze_block(self, block: nn.Module, cfg: BlockAPConfig, dtype: torch.dtype) -> None:
        freeze_block(block, dtype)

    def describe(self, cfg: BlockAPConfig, scheme: SchemeLike) -> dict[str, Any]:
        schemes = as_layer_schemes(scheme)
        bits = sorted({schemes.default.bits, *(s.bits for s in schemes.layers.values())})
        lrs = {f"w{b}": cfg.weight_lr(b) for b in bits}
        by = {f"w{s.bits}": cfg.lr_quant * step_ratio(schemes.default, s) for s in {schemes.default, *schemes.layers.values()}}
        return {"weight_lr": cfg.weight_lr(schemes.default.bits),
                **({"weight_lr_by_bits": lrs, "scale_lr_by_bits": by} if len(bits) > 1 else {})}


class BlockAPTrainer(BlockwiseEngine):
    """Block-AP through the block-wise engine, with the argument order of eqat 0.1."""

    def __init__(self, model: nn.Module, scheme: QuantScheme, config: BlockAPConfig, state_dir: str | Path,
                 device: str | torch.device = "cpu", fingerprint: dict[str, Any] | None = None, progress: bool = True,
                 on_block: Callable[[BlockRecord], None] | None = None) -> None:
        super().__init__(model, get_method("block-ap"), config, scheme, state_dir, device, fingerprint, progress, on_block)
