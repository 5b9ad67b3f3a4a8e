"""OLMoE: pre-norm blocks like Llama's (q/k norms in attention) with a sparse MoE MLP (router
`mlp.gate` in full precision; fused 3-D experts, split into per-expert Linears)."""

from eqat.models.families.spec import FamilySpec, register_family
from eqat.models.families.mixtral import ATTENTION_SITES

OLMOE = register_family(FamilySpec(name="olmoe", model_types=("olmoe",), sites=ATTENTION_SITES,
                                   experts="mlp.experts", router="mlp.gate"))
