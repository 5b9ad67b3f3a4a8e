"""What weight-activation methods (SmoothQuant, QLLM) need to know about a decoder block: where its
activations enter linears (the *sites*), and statistics of those activations over calibration data.

A site is a group of linears that read one input: q/k/v after the attention norm, gate/up after the
MLP norm, o_proj after attention, down_proj after the gated product. Its `source` is what produces
that input and can absorb a per-channel scale exactly: an RMSNorm (y = x_hat * w), or a linear whose
output rows feed the site one to one (v_proj -> o_proj through attention, up_proj -> down_proj
through act(gate) * up).
"""

from __future__ import annotations

import torch
from torch import nn

from eqat.errors import EqatInputError
from eqat.models.arch import arch_for, decoder_blocks
from eqat.models.families import FamilySpec, Site

__all__ = ["Site", "block_sites", "check_sites", "attention_heads", "o_to_v_channels", "InputStats", "collect_inputs"]


def block_sites(block: nn.Module, method: str, family: FamilySpec) -> tuple[Site, ...]:
    """`family`'s sites, checked against `block` (EqatInputError naming what is missing): every
    source and linear exists, and each norm source has a weight to fold a scale into."""
    if not family.sites:
        raise EqatInputError(f"{method} needs the norm -> linear layout of a block, and the {family.name} family spec "
                             f"declares none ({family.notes or 'no sites'}); use rtn or block-ap for this model.")
    for site in family.sites:
        for name in (site.source, *site.linears):
            if name is None:
                continue
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise EqatInputError(f"{method}: the {family.name} family spec puts '{name}' in every block, and this "
                                     f"block ({type(block).__name__}) has none; its layout differs from the one "
                                     "transformers builds for that model type.") from None
            if name == site.source and site.source_is_norm and not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise EqatInputError(f"{method} folds scales into norm weights, and '{name}' ({type(module).__name__}) "
                                     "has none; use rtn or block-ap for this model.")
    return family.sites


def check_sites(model: nn.Module, method: str) -> None:
    """`block_sites` on the first decoder block of `model`: a method's check before any work."""
    block_sites(decoder_blocks(model)[0], method, arch_for(model))


def attention_heads(block: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Llama-like block's self_attn."""
    attn = block.get_submodule("self_attn")
    head_dim = int(attn.head_dim)
    heads = attn.o_proj.in_features // head_dim
    kv = attn.v_proj.out_features // head_dim
    return heads, kv, head_dim


def o_to_v_channels(block: nn.Module) -> torch.Tensor:
    """For each input channel of o_proj [heads * d], the v_proj output channel [kv * d] it reads
    (grouped-query attention: query head h reads key/value head h // (heads / kv))."""
    heads, kv, d = attention_heads(block)
    c = torch.arange(heads * d)
    return (c // d) // (heads // kv) * d + c % d


class InputStats:
    """Running statistics of the inputs x [..., K] of some linears, over calibration windows:
    `absmax` float32 [K] (max |x| per channel) and, if asked, `gram` float64 [K, K] (sum of x^T x)."""

    def __init__(self, gram: bool = False) -> None:
        self.absmax: torch.Tensor | None = None
        self.gram_wanted, self.gram = gram, None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.abs().amax(0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.gram_wanted:
            g = x.double().T @ x.double()
            self.gram = g if self.gram is None else self.gram + g
        self.tokens += x.shape[0]


def collect_inputs(block: nn.Module, linears: list[str], run, rows: range, gram: bool = False) -> dict[str, InputStats]:
    """InputStats of the input of each named linear of `block` over windows `rows` (`run(block, rows)`
    is eqat.engine.blockwise.BlockData.run)."""
    stats = {name: InputStats(gram) for name in linears}
    handles = [block.get_submodule(name).register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
               for name in linears]
    try:
        run(block, rows)
    finally:
        for h in handles:
            h.remove()
    return stats
