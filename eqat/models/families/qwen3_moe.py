"""Qwen3-MoE: Qwen3's attention (q/k norms); sparse blocks hold a router (`mlp.gate`, full
precision) and fused 3-D experts as Mixtral's do, split into per-expert Linears; the blocks listed
in `mlp_only_layers` have a dense gated MLP (nn.Linear)."""

from eqat.models.families.spec import FamilySpec, register_family
from eqat.models.families.mixtral import ATTENTION_SITES

QWEN3_MOE = register_family(FamilySpec(name="qwen3_moe", model_types=("qwen3_moe",), sites=ATTENTION_SITES,
                                       experts="mlp.experts", router="mlp.gate"))
