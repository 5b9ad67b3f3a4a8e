"""Qwen3-MoE: Qwen3's attention (q/k norms); sparse blocks hold a router (`mlp.gate`) and fused
3-D experts as Mixtral's do, and the blocks listed in `mlp_only_layers` a dense gated MLP
(nn.Linear, quantized). The experts stay in full precision for now (the coverage check refuses
unless --allow-unquantized)."""

from eqat.models.families.spec import FamilySpec, register_family
from eqat.models.families.mixtral import ATTENTION_SITES

QWEN3_MOE = register_family(FamilySpec(name="qwen3_moe", model_types=("qwen3_moe",), sites=ATTENTION_SITES,
                                       notes="experts (fused 3-D parameters) not quantized yet"))
