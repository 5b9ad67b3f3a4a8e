"""OLMoE: pre-norm blocks like Llama's (q/k norms in attention) with a sparse MoE MLP (router
`mlp.gate`, fused 3-D experts). The experts stay in full precision for now (the coverage check
refuses unless --allow-unquantized)."""

from eqat.models.families.spec import FamilySpec, register_family
from eqat.models.families.mixtral import ATTENTION_SITES

OLMOE = register_family(FamilySpec(name="olmoe", model_types=("olmoe",), sites=ATTENTION_SITES,
                                   notes="experts (fused 3-D parameters) not quantized yet"))
