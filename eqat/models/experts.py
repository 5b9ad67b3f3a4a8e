"""MoE experts as per-expert Linears, so that every method and exporter quantizes them as it does
any other Linear.

transformers 5 stores the experts of Mixtral, Qwen3-MoE and OLMoE as two fused 3-D parameters of
one module (`mlp.experts`): `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj`
[E, H, I], with a routed forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]).
`unfuse_experts` replaces that module by `ExpertLinears`: expert e is `experts.{e}.gate_proj`
[I, H], `experts.{e}.up_proj` [I, H] and `experts.{e}.down_proj` [H, I], the names GPTQModel and
vLLM read, and the same routed forward (the same arithmetic, so the model's function is
unchanged). Each expert counts the tokens routed to it while `counting` is on, so a run can report
the experts calibration never reached.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eqat.errors import EqatInputError


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)). gate/up [I, H], down [H, I], no bias."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as a list of `ExpertMLP`, with transformers' routed forward.

    `routed` [E] int64 counts the (token, expert) assignments seen while `counting` is True."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.counting = False
        self.routed = torch.zeros(len(experts), dtype=torch.int64)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; top_k_index [T, k] int; top_k_weights [T, k] -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hits = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[: self.num_experts]
            if self.counting:
                self.routed += hits.cpu()
        for e in hits.nonzero().flatten().tolist():
            token, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers 5 experts module with fused 3-D `gate_up_proj` and `down_proj`."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.ndim == 3 and down.ndim == 3


def is_expert_list(module: nn.Module | None) -> bool:
    """True for experts already stored per expert: a ModuleList whose items hold nn.Linear layers."""
    return (isinstance(module, nn.ModuleList) and not isinstance(module, ExpertLinears) and len(module) > 0
            and all(any(isinstance(m, nn.Linear) for m in e.modules()) for e in module))


def _check_layout(name: str, module: nn.Module) -> None:
    """Refuse a fused layout that `unfuse_experts` would misread."""
    e, two_i, h = module.gate_up_proj.shape
    layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}
    odd = [f"{k}={getattr(module, k)}" for k, want in layout.items() if getattr(module, k, want) != want]
    if odd or two_i % 2 or tuple(module.down_proj.shape) != (e, h, two_i // 2) or not hasattr(module, "act_fn"):
        raise EqatInputError(
            f"the experts at '{name}' ({type(module).__name__}, gate_up_proj {list(module.gate_up_proj.shape)}, down_proj "
            f"{list(module.down_proj.shape)}{', ' + ', '.join(odd) if odd else ''}) are not in the layout eqat splits "
            "(gate_up_proj [E, 2I, H] as gate rows then up rows, down_proj [E, H, I], no bias); its family spec needs an "
            "experts layout of its own (docs/extending.md, 'A model family').")


@torch.no_grad()
def split_fused(module: nn.Module) -> ExpertLinears:
    """`ExpertLinears` holding the weights of a fused experts module (meta tensors stay meta)."""
    e, two_i, h = module.gate_up_proj.shape
    inter, gate_up, down = two_i // 2, module.gate_up_proj, module.down_proj
    meta = gate_up.is_meta
    experts = []
    for i in range(e):
        mlp = ExpertMLP(h, inter, module.act_fn, device="meta" if meta else gate_up.device, dtype=gate_up.dtype)
        if not meta:
            mlp.gate_proj.weight.copy_(gate_up[i, :inter])
            mlp.up_proj.weight.copy_(gate_up[i, inter:])
            mlp.down_proj.weight.copy_(down[i])
        experts.append(mlp)
    return ExpertLinears(experts)


def unfuse_experts(model: nn.Module, blocks: str) -> list[str]:
    """Replace every fused experts module inside `model.<blocks>` by its `ExpertLinears`, in
    place; returns the replaced modules' full names (empty for a dense model)."""
    done = []
    for name, module in list(model.get_submodule(blocks).named_modules(prefix=blocks)):
        if is_fused_experts(module):
            _check_layout(name, module)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, split_fused(module))
            done.append(name)
    return done


def routing_counts(block: nn.Module) -> dict[str, list[int]]:
    """Tokens routed to each expert of each `ExpertLinears` in `block` while counting was on."""
    return {n: m.routed.tolist() for n, m in block.named_modules() if isinstance(m, ExpertLinears)}


def set_counting(module: nn.Module, on: bool, reset: bool = False) -> None:
    for m in module.modules():
        if isinstance(m, ExpertLinears):
            m.counting = on
            if reset:
                m.routed.zero_()
