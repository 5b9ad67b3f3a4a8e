"""QLLM (Liu et al., ICLR 2024): adaptive channel reassembly and efficient low-rank tuning for
weight-activation quantization, one block at a time on the block-wise engine.

Per block:
  1. `calibrate_block`, at the inputs of q/k/v, of gate/up and of down_proj in turn (each after the
     previous sites are reassembled): the channel statistics of the site's input over the calibration
     windows; for each candidate threshold theta (within a budget of added channels, a fraction of K)
     the reassembly (eqat.methods.qllm_channels) and the block's loss with every linear quantized by
     RTN (weights and activations) on a few windows; the threshold of least loss is kept, or none
     when no reassembly beats leaving the site alone (`--qllm-theta search`). `--qllm-theta budget`
     takes the smallest threshold within the budget without searching.
  2. low-rank tuning: LoRA (A [r, K], B [N, r]; B starts at zero) on every linear plus the norm
     weights, trained against the full-precision block's output (MSE) with the weights fake-quantized
     after the merge (W + B A, min/max scales) and the inputs per token, as they will be packed.
  3. `freeze_block`: merge, quantize by RTN with min/max scales (exactly the training forward's), pack;
     the reassembly stays on the packed layer (index and scale tensors in the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eqat.core.dtypes import parse_dtype
from eqat.core.layer_schemes import SchemeLike, as_layer_schemes
from eqat.core.options import option
from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import fake_quantize, fake_quantize_tokens, init_minmax
from eqat.core.reassembly import reassemble, reassemble_weight
from eqat.core.scheme import QuantScheme
from eqat.engine.config import BlockwiseConfig, check_lr
from eqat.errors import EqatInputError
from eqat.methods.base import BlockwiseMethod, ParamGroup, register_method
from eqat.methods.block_ap import LOSSES, recon_loss
from eqat.methods.calibration import block_sites, check_sites, collect_inputs
from eqat.methods.smoothquant import smooth_block
from eqat.methods.qllm_channels import reassembly_at, smallest_theta, theta_candidates
from eqat.models.arch import block_linears, replace_module

THETA_MODES = ("search", "budget")


class QLLMLinear(nn.Module):
    """A block linear during QLLM: frozen weight (after the reassembly), optional reassembly of the
    input, optional LoRA, and a switch between full precision (calibration) and the quantized forward

        y = fake_quant(W + B A) applied to fake_quant_tokens(reassemble(x))   (+ bias)

    weight float32 [N, K]; lora_a [r, K], lora_b [N, r] (trainable when present)."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.storage = (
            linear.in_features, linear.out_features, scheme, storage)
        self.register_buffer("original", linear.weight.detach().float().clone())
        self.register_buffer("weight", self.original.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("reassembly_index", None)
        self.register_buffer("reassembly_scale", None)
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.quantized = False

    def set_reassembly(self, reassembly: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Reassemble the input by (index, scale) (None: no reassembly); the weight follows."""
        if reassembly is None:
            self.reassembly_index = self.reassembly_scale = None
            self.weight = self.original.clone()
        else:
            index, scale = reassembly
            self.reassembly_index, self.reassembly_scale = index.to(self.original.device), scale.to(self.original.device)
            self.weight = reassemble_weight(self.original, self.reassembly_index)

    def add_lora(self, rank: int, generator: torch.Generator) -> list[nn.Parameter]:
        """LoRA of rank `rank`: A with the uniform init of nn.Linear (peft's), B zero (step 0 is unchanged)."""
        bound = 1 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(self.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        return [self.lora_a, self.lora_b]

    def merged_weight(self) -> torch.Tensor:
        """W + B A, float32 [N, K] (W without LoRA)."""
        return self.weight if self.lora_a is None else self.weight + self.lora_b @ self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reassembly_index is not None:
            x = reassemble(x, self.reassembly_index, self.reassembly_scale)
        w = self.merged_weight()
        if self.quantized:
            if self.scheme.act is not None:
                x = fake_quantize_tokens(x, self.scheme.act)
            scale, zero = init_minmax(w.detach(), self.scheme)
            w = fake_quantize(w, scale, zero, self.scheme, self.storage)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self, dtype: torch.dtype) -> QuantLinear:
        """Merge, round with min/max scales stored in `dtype` (what the quantized forward computes), pack."""
        q = QuantLinear.from_weight(self.merged_weight(), self.scheme, bias=self.bias, dtype=dtype)
        if self.reassembly_index is not None:
            q.set_reassembly(self.reassembly_index.to(torch.int32).clone(), self.reassembly_scale.float().clone())
        return q


def _qllm_linears(block: nn.Module) -> dict[str, QLLMLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, QLLMLinear)}


def _norms(block: nn.Module) -> list[nn.Parameter]:
    return [m.weight for n, m in block.named_modules() if n.endswith("layernorm") and isinstance(m.weight, nn.Parameter)]


@dataclass
class QLLMConfig(BlockwiseConfig):
    """QLLM's parts, each switchable: reassembly (with its threshold search) and low-rank tuning."""

    reassembly: bool = option(True, "Channel disassembly and assembly at the q/k/v, gate/up and down_proj inputs.",
                              param="qllm_reassembly", flags=("--qllm-reassembly/--no-qllm-reassembly",))
    theta: str = option("search", "Threshold: search (the candidate of least block loss after RTN quantization, or none) "
                                  "or budget (the smallest within --qllm-budget, no search).", param="qllm_theta")
    budget: float = option(0.1, "Channels a site may add by disassembly, as a fraction of its channels, in (0, 1).",
                           param="qllm_budget")
    candidates: int = option(6, "Thresholds tried per site by --qllm-theta search.", param="qllm_candidates")
    search_samples: int = option(4, "Calibration windows the threshold search scores each candidate on.",
                                 param="qllm_search_samples")
    rank: int = option(4, "LoRA rank of the low-rank tuning (0: no tuning).", param="qllm_rank")
    lr: float = option(1e-3, "Learning rate of the LoRA factors.", param="qllm_lr")
    lr_norm: float = option(1e-4, "Learning rate of the norm weights (0: frozen).", param="qllm_lr_norm")
    smooth_alpha: float = option(0.0, "SmoothQuant's migration (this alpha) at every site before the reassembly "
                                      "and tuning; 0: none, the paper's QLLM (docs/qllm.md).",
                                 param="qllm_smooth_alpha")
    loss: str = option("mse", "Block loss of the threshold search and the tuning: mse (the paper), or relative, sink, "
                              "clamp (Block-AP's, which keep a massive-activation token from owning it; docs/block-ap.md).",
                       param="qllm_loss")

    def check(self) -> None:
        super().check()
        if not (isinstance(self.budget, (int, float)) and 0 < self.budget < 1):
            raise EqatInputError(f"--qllm-budget must be a fraction in (0, 1) of a site's channels, got {self.budget!r} "
                                 "(e.g. 0.1).")
        if self.theta not in THETA_MODES:
            raise EqatInputError(f"--qllm-theta must be search or budget, got '{self.theta}'.")
        if self.loss not in LOSSES:
            raise EqatInputError(f"--qllm-loss must be one of {', '.join(LOSSES)}, got '{self.loss}'.")
        if not (isinstance(self.smooth_alpha, (int, float)) and 0 <= self.smooth_alpha <= 1):
            raise EqatInputError(f"--qllm-smooth-alpha must be in [0, 1] (0: no smoothing), got {self.smooth_alpha!r}.")
        if self.candidates < 1 or self.search_samples < 1 or self.rank < 0:
            raise EqatInputError("need --qllm-candidates >= 1, --qllm-search-samples >= 1 and --qllm-rank >= 0.")
        check_lr("--qllm-lr", self.lr, "docs/qllm.md")
        if not (math.isfinite(self.lr_norm) and self.lr_norm >= 0):
            raise EqatInputError(f"--qllm-lr-norm must be a learning rate >= 0, got {self.lr_norm}.")


@register_method
class QLLM(BlockwiseMethod):
    name = "qllm"
    label = "QLLM"
    config = QLLMConfig
    quantizes_activations = True
    summary = "QLLM: adaptive channel reassembly of activation outliers, then LoRA + norm tuning per block (W-A)"

    @staticmethod
    def _wrap(block: nn.Module, scheme: SchemeLike, cfg: QLLMConfig) -> dict[str, QLLMLinear]:
        """Every nn.Linear of the block as a full-precision QLLMLinear, in place."""
        schemes, storage = as_layer_schemes(scheme), parse_dtype(cfg.storage_dtype)
        for name, lin in list(block_linears(block).items()):
            replace_module(block, name, QLLMLinear(lin, schemes(name), storage).to(lin.weight.device))
        return _qllm_linears(block)

    def check_model(self, model: nn.Module, cfg: QLLMConfig) -> None:
        if cfg.reassembly or cfg.smooth_alpha > 0:  # the low-rank tuning alone needs no sites
            check_sites(model, self.label)

    def calibrate_block(self, block: nn.Module, data: Any, scheme: SchemeLike, cfg: QLLMConfig) -> dict[str, Any]:
        smoothed = {"smoothing": smooth_block(block, data, cfg.smooth_alpha)} if cfg.smooth_alpha > 0 else {}
        self._wrap(block, scheme, cfg)
        if not cfg.reassembly:
            return smoothed
        sites = [s for s in block_sites(block, self.label, data.family) if s.name != "o"]  # the paper's three inputs
        search = range(data.train.start, min(data.train.start + cfg.search_samples, data.train.stop))
        return {**smoothed, **{site.name: self._reassemble_site(block, site, data, search, cfg) for site in sites}}

    def _reassemble_site(self, block: nn.Module, site: Any, data: Any, search: range, cfg: QLLMConfig) -> dict[str, Any]:
        linears = [block.get_submodule(n) for n in site.linears]
        stats = collect_inputs(block, [site.linears[0]], data.run, data.train, gram=True)[site.linears[0]]
        absmax = stats.absmax.cpu()
        stacked = torch.cat([lin.original for lin in linears]).double().cpu()
        w_gram = stacked.T @ stacked
        budget = int(cfg.budget * absmax.numel())
        thetas = [smallest_theta(absmax, budget)] if cfg.theta == "budget" else theta_candidates(absmax, budget, cfg.candidates)
        tried: list[dict[str, Any]] = []
        best: tuple[float, Any, dict[str, Any]] = (math.inf, None, {"theta": None, "added": 0})
        if cfg.theta == "search":
            best = (self._quantized_loss(block, data, search), None, {"theta": None, "added": 0})
            tried.append({"theta": None, "added": 0, "loss": best[0]})
        for theta in thetas:
            found = reassembly_at(absmax, stats.gram.cpu(), w_gram, theta)
            if found is None:
                continue
            index, scale, added = found
            for lin in linears:
                lin.set_reassembly((index, scale))
            loss = self._quantized_loss(block, data, search) if cfg.theta == "search" else 0.0
            tried.append({"theta": theta, "added": added, "loss": loss})
            if loss < best[0]:
                best = (loss, (index, scale), {"theta": theta, "added": added})
        for lin in linears:
            lin.set_reassembly(best[1])
        return {**best[2], "absmax": float(absmax.max()), "channels": absmax.numel(), "budget": budget,
                "tried": tried if cfg.theta == "search" else []}

    @staticmethod
    def _quantized_loss(block: nn.Module, data: Any, rows: range) -> float:
        mods = _qllm_linears(block).values()
        for m in mods:
            m.quantized = True
        try:
            return data.loss(block, rows)
        finally:
            for m in mods:
                m.quantized = False

    def prepare_block(self, block: nn.Module, scheme: SchemeLike, cfg: QLLMConfig) -> list[ParamGroup]:
        mods = _qllm_linears(block) or self._wrap(block, scheme, cfg)  # calibrate_block wraps them, unless skipped
        gen = torch.Generator().manual_seed(cfg.seed)
        lora: list[nn.Parameter] = []
        for m in mods.values():
            m.quantized = True
            if cfg.rank > 0 and cfg.epochs > 0:
                lora += m.add_lora(cfg.rank, gen)
        if not lora:
            return []
        norms = _norms(block) if cfg.lr_norm > 0 else []
        for p in norms:
            p.requires_grad_(True)
        return [ParamGroup("lora", lora, cfg.lr)] + ([ParamGroup("norms", norms, cfg.lr_norm)] if norms else [])

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: QLLMConfig) -> torch.Tensor:
        return recon_loss(out, target, cfg.loss)

    @torch.no_grad()
    def freeze_block(self, block: nn.Module, cfg: QLLMConfig, dtype: torch.dtype) -> None:
        for name, m in list(_qllm_linears(block).items()):
            replace_module(block, name, m.to_quant_linear(dtype))
        for p in _norms(block):
            p.requires_grad_(False)

    def describe(self, cfg: QLLMConfig, scheme: SchemeLike) -> dict[str, Any]:
        return {"loss": cfg.loss, "smooth_alpha": cfg.smooth_alpha, "reassembly": cfg.reassembly,
                "theta": cfg.theta if cfg.reassembly else None,
                "budget": cfg.budget if cfg.reassembly else None, "low_rank_tuning": cfg.rank > 0 and cfg.epochs > 0,
                "rank": cfg.rank}
