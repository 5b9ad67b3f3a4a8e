"""What weight-activation methods (SmoothQuant, QLLM) need to know about a decoder block: where its
activations enter linears (the *sites*), and statistics of those activations over calibration data.

A site is a group of linears that read one input: q/k/v after the attention norm, gate/up after the
MLP norm, o_proj after attention, down_proj after the gated product. Its `source` is what produces
that input and can absorb a per-channel scale exactly: an RMSNorm (y = x_hat * w), or a linear whose
output rows feed the site one to one (v_proj -> o_proj through attention, up_proj -> down_proj
through act(gate) * up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqat.errors import EqatInputError


@dataclass(frozen=True)
class Site:
    name: str  # how reports name it: "qkv", "gate_up", "o", "down"
    source: str  # the module that produces the input (a norm or a linear), inside the block
    linears: tuple[str, ...]  # the linears reading it, inside the block

    @property
    def source_is_norm(self) -> bool:
        return self.source.endswith("layernorm")


# Llama, Mistral, Qwen2/3, SmolLM: the layout every Llama-like block of transformers shares
LLAMA_SITES = (
    Site("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Site("o", "self_attn.v_proj", ("self_attn.o_proj",)),
    Site("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Site("down", "mlp.up_proj", ("mlp.down_proj",)),
)


def block_sites(block: nn.Module, method: str, sites: tuple[Site, ...] = LLAMA_SITES) -> tuple[Site, ...]:
    """`sites`, checked against `block` (EqatInputError naming what is missing): every source and
    linear exists, and the norms are plain RMSNorms (Gemma's (1 + w) norms would need another fold)."""
    for site in sites:
        for name in (site.source, *site.linears):
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise EqatInputError(f"{method} knows Llama-like blocks (input_layernorm, self_attn.q/k/v/o_proj, "
                                     f"post_attention_layernorm, mlp.gate/up/down_proj) and this block has no '{name}'; "
                                     "use rtn or block-ap for this model.") from None
            if name == site.source and site.source_is_norm:
                kind = type(module).__name__
                if "Gemma" in kind or not isinstance(getattr(module, "weight", None), torch.Tensor):
                    raise EqatInputError(f"{method} folds scales into RMSNorm weights (y = x_hat * w); '{name}' is a "
                                         f"{kind}, which it cannot fold into; use rtn or block-ap for this model.")
    return sites


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
