"""A toy method, the one docs/extending.md walks through: block-wise training of the quantization
parameters only. The weights stay frozen at full precision; each block's scales and zero-points
learn to reconstruct the full-precision block's output, then the weights are rounded with them.

It lives in the tests and touches no other module: importing it registers it, and from then on
`eqat quantize --method toy-scales-only` runs it through the block-wise engine (capture, streams,
resume, guard, progress) and tests/methods/test_conformance.py checks it like every other method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqat.core.options import option
from eqat.core.scheme import QuantScheme
from eqat.engine.config import BlockwiseConfig
from eqat.methods.base import BlockwiseMethod, ParamGroup, register_method
from eqat.methods.fakequant import freeze_block, trainable_groups, wrap_block


@dataclass
class ScalesOnlyConfig(BlockwiseConfig):
    lr: float = option(2e-3, "Learning rate of the scales and zero-points.")


@register_method
class ScalesOnly(BlockwiseMethod):
    name = "toy-scales-only"
    config = ScalesOnlyConfig
    cli_prefix = "toy_"  # its own field `lr` is the flag --toy-lr
    summary = "toy (tests/methods): block-wise training of scales and zero-points only"

    def prepare_block(self, block: nn.Module, scheme: QuantScheme, cfg: ScalesOnlyConfig) -> list[ParamGroup]:
        wrap_block(block, scheme)  # FakeQuantLinears, RTN-initialised
        weights, qparams = trainable_groups(block)
        for w in weights:
            w.requires_grad_(False)
        return [ParamGroup("quant", qparams, cfg.lr)]

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: ScalesOnlyConfig) -> torch.Tensor:
        return (out.float() - target.float()).pow(2).mean(-1)  # per token [..., T]

    def freeze_block(self, block: nn.Module, cfg: ScalesOnlyConfig, dtype: torch.dtype) -> None:
        freeze_block(block, dtype)
