"""LR-QAT (Bondarenko et al., arXiv 2406.06385): low-rank adapters inside the rounding.

Every block Linear becomes a `LowRankQuantLinear` (eqat.methods.lowrank): a frozen grid U = W0/s0 + z0
stored downcast (int8 fixed point by default), a rank-r product A @ B added before rounding, and
trainable step sizes. Only A, B and the scales train (the zero-points as an option); embeddings,
norms and the LM head stay frozen. At the end the codes clamp(round(U + (alpha/r) A @ B)) are packed
into ordinary `QuantLinear`s, so the checkpoint is a plain eqat checkpoint.

Two methods share the layer:
- `lr-qat` (end to end, the paper's setting): the whole model on the next-token loss, or distilled
  from the full-precision model (`--e2e-loss kd/mix`, eqat.methods.distill). It starts from the
  full-precision model (`--method lr-qat`, U with its fraction) or from a packed one (after
  `lr-qat-block` or any method, or `eqat train-e2e --method lr-qat`: U = the integer codes).
- `lr-qat-block` (block-wise): one decoder block at a time on the reconstruction loss of the
  block-wise engine, as Block-AP does, e.g. `--method lr-qat-block+lr-qat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eqat.core.layer_schemes import SchemeLike, as_layer_schemes
from eqat.core.options import option
from eqat.core.quantizer import SCALE_MAX, SCALE_MIN
from eqat.engine.config import BlockwiseConfig, EndToEndConfig, check_lr
from eqat.errors import EqatInputError
from eqat.io.checkpoint import quantized_modules
from eqat.methods.base import BlockwiseMethod, ParamGroup, register_method
from eqat.methods.block_ap import recon_loss
from eqat.methods.e2e_qp import DistillOptions, E2EQP
from eqat.methods.lowrank import INITS, LowRankQuantLinear, check_phi0
from eqat.models.arch import block_linears, quantizable_linears, replace_module

# Scaled for eqat's CPU budgets (tens of steps): 50x the paper's 1e-3 / 1e-5, which are for 10k
# steps on 7B models; measured in docs/lr-qat.md.
LR_LOWRANK = 5e-2
LR_SCALE = 5e-4


@dataclass
class LowRankOptions:
    """The options of the LR-QAT layer, shared by both methods (one `--lr-qat-*` flag sets both)."""

    rank: int = option(32, "Rank r of the adapter A [out, r] @ B [r, in] inside the rounding.", param="lr_qat_rank")
    alpha: float = option(1.0, "The adapter is scaled by alpha / r.", param="lr_qat_alpha")
    phi0: str = option("int8", "Storage of the frozen grid W0/s0 + z0: int8 (fixed point, 8 - bits fractional bits; "
                               "2-4 bits), bfloat16, float16 or float32.", param="lr_qat_phi0")
    init: str = option("minmax", "Initial scales: minmax (eqat's RTN, so step 0 equals it) or lp (L4 grid search per "
                                 "group, the paper's).", param="lr_qat_init")
    lr: float | None = option(None, "Learning rate of A and B; default 5e-2, the paper 1e-3 (docs/lr-qat.md).", param="lr_qat_lr")
    lr_scale: float | None = option(None, "Learning rate of the scales; default 5e-4, the paper 1e-5 (docs/lr-qat.md).", param="lr_qat_lr_scale")
    train_zeros: bool = option(False, "Also train the zero-points (asymmetric schemes; kept on the integer grid).", param="lr_qat_train_zeros")

    def check_lowrank(self, prefix: str = "--lr-qat-") -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise EqatInputError(f"{prefix}rank must be a positive integer, got {self.rank!r}.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise EqatInputError(f"{prefix}alpha must be a positive number, got {self.alpha!r}.")
        check_phi0(self.phi0, 2)  # the storage name; against each layer's bits in check_shapes
        if self.init not in INITS:
            raise EqatInputError(f"{prefix}init must be one of {', '.join(INITS)}, got '{self.init}'.")
        check_lr(f"{prefix}lr", self.lr, "docs/lr-qat.md")
        check_lr(f"{prefix}lr-scale", self.lr_scale, "docs/lr-qat.md")

    def check_shapes(self, shapes: dict[str, tuple[int, int]], schemes: list) -> None:
        """The rank against every layer, and the grid storage against every bit width."""
        for scheme in schemes:
            check_phi0(self.phi0, scheme.bits)
        if shapes:
            name, (n, k) = min(shapes.items(), key=lambda kv: min(kv[1]))
            if self.rank > min(n, k):
                raise EqatInputError(f"--lr-qat-rank {self.rank} does not fit {name} ({n} x {k}): use 1 to {min(n, k)}, "
                                     "the smaller side of the smallest layer.")

    def lowrank_kw(self, storage: torch.dtype | None) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "phi0": self.phi0, "storage": storage,
                "train_zeros": self.train_zeros}


def wrap_linears(model: nn.Module, linears: dict[str, nn.Module], schemes, opts: LowRankOptions,
                 storage: torch.dtype | None, generator: torch.Generator) -> dict[str, LowRankQuantLinear]:
    """Replace each of `linears` (nn.Linear: from full precision under `schemes(name)`; QuantLinear:
    from its codes) by a LowRankQuantLinear, in place, in their order (B draws from `generator`)."""
    wrapped = {}
    for name, lin in linears.items():
        kw = {**opts.lowrank_kw(storage), "generator": generator}
        if isinstance(lin, nn.Linear):
            scheme = schemes(name)
            scheme.check_layer(name, lin.in_features)
            layer = LowRankQuantLinear.from_linear(lin, scheme, opts.init, **kw)
            device = lin.weight.device
        else:
            layer = LowRankQuantLinear.from_quant_linear(lin, **{**kw, "storage": lin.scales.dtype})
            device = lin.qweight.device
        wrapped[name] = layer.to(device)
        replace_module(model, name, wrapped[name])
    return wrapped


def lowrank_groups(layers: list[LowRankQuantLinear], opts: LowRankOptions) -> list[ParamGroup]:
    lr_ab = opts.lr if opts.lr is not None else LR_LOWRANK
    lr_s = opts.lr_scale if opts.lr_scale is not None else LR_SCALE
    groups = [ParamGroup("lowrank", [p for m in layers for p in (m.lora_a, m.lora_b)], lr_ab),
              ParamGroup("scales", [m.scale for m in layers], lr_s)]
    zeros = [m.zero for m in layers if isinstance(m.zero, nn.Parameter)]
    return groups + ([ParamGroup("zeros", zeros, lr_s)] if zeros else [])


@torch.no_grad()
def clamp_scales(module: nn.Module) -> None:
    """Keep trained scales in [SCALE_MIN, SCALE_MAX] (a scale crossing zero would flip its group)."""
    for m in module.modules():
        if isinstance(m, LowRankQuantLinear):
            m.scale.clamp_(SCALE_MIN, SCALE_MAX)


@torch.no_grad()
def freeze_lowrank(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every LowRankQuantLinear of `module` by its packed QuantLinear, in place (scales in
    `dtype`, default the storage the layer trained against)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LowRankQuantLinear):
            replace_module(module, name, m.to_quant_linear(dtype or m.storage or torch.float16))


class LowRankChecks:
    """Both LR-QAT methods refuse, before any work, layers their rank or grid storage cannot hold."""

    def check_layers(self, shapes: dict[str, tuple[int, int]], schemes: list, cfg: LowRankOptions) -> None:
        cfg.check_shapes(shapes, schemes)


@dataclass
class LRQATConfig(EndToEndConfig, DistillOptions, LowRankOptions):
    """End-to-end LR-QAT: the engine's data and schedule, E2E-QP's losses (nll, kd, mix) and teacher
    (`--e2e-*`), and the layer's options (`--lr-qat-*`)."""

    def check(self) -> None:
        super().check()
        self.check_distill()
        self.check_lowrank()


@register_method
class LRQAT(LowRankChecks, E2EQP):
    name = "lr-qat"
    label = "LR-QAT"
    config = LRQATConfig
    cli_prefix = "e2e_"  # the distillation flags are E2E-QP's; the layer's carry their own names
    summary = "LR-QAT: a low-rank adapter inside the rounding and the step sizes, end to end, over a frozen int8 grid"
    from_full_precision = True
    quantizes_activations = False  # its LowRankQuantLinear is weight-only (E2E-QP's is not)
    schemes = None  # set by start_from_full_precision: LayerSchemes of the full-precision linears
    storage_dtype = None

    def start_from_full_precision(self, schemes: Any, storage: torch.dtype) -> None:
        self.schemes, self.storage_dtype = schemes, storage

    def prepare_model(self, model: nn.Module, cfg: LRQATConfig) -> list[ParamGroup]:
        for p in model.parameters():
            p.requires_grad_(False)
        packed = quantized_modules(model)
        linears = packed or quantizable_linears(model)
        schemes = self.schemes
        if not packed and schemes is None:
            raise EqatInputError("lr-qat from full precision needs a scheme: run it through `eqat quantize --method "
                                 "lr-qat`.")
        self.storage = next(iter(packed.values())).scales.dtype if packed else self.storage_dtype
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 20)
        layers = wrap_linears(model, linears, schemes, cfg, None if packed else self.storage, gen)
        return lowrank_groups(list(layers.values()), cfg)

    def after_step(self, model: nn.Module) -> None:
        clamp_scales(model)

    def finalize_model(self, model: nn.Module, cfg: LRQATConfig) -> None:
        self.teacher = None
        freeze_lowrank(model, self.storage)


@dataclass
class LRQATBlockConfig(BlockwiseConfig, LowRankOptions):
    """Block-wise LR-QAT: the block-wise engine's epochs, batches and selection, MSE reconstruction."""

    def check(self) -> None:
        super().check()
        self.check_lowrank()


@register_method
class LRQATBlock(LowRankChecks, BlockwiseMethod):
    name = "lr-qat-block"
    label = "LR-QAT block"
    config = LRQATBlockConfig
    summary = "LR-QAT block by block: adapters and step sizes of each block trained by reconstruction (MSE)"

    def prepare_block(self, block: nn.Module, scheme: SchemeLike, cfg: LRQATBlockConfig) -> list[ParamGroup]:
        from eqat.core.dtypes import parse_dtype

        schemes = as_layer_schemes(scheme)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + id_of(block))
        layers = wrap_linears(block, block_linears(block), schemes, cfg, parse_dtype(cfg.storage_dtype), gen)
        return lowrank_groups(list(layers.values()), cfg)

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: LRQATBlockConfig) -> torch.Tensor:
        return recon_loss(out, target, "mse")

    def freeze_block(self, block: nn.Module, cfg: LRQATBlockConfig, dtype: torch.dtype) -> None:
        freeze_lowrank(block, dtype)


def id_of(block: nn.Module) -> int:
    """The block's index in its model (transformers sets `layer_idx` on attention), else 0: seeds B."""
    for m in block.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            return m.layer_idx
    return 0
