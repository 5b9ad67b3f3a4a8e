"""Mixtral: Llama's attention; the MLP is a sparse MoE block (`mlp.gate`, the router, and
`mlp.experts`, which transformers 5 stores as fused 3-D parameters `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I], not nn.Linear). eqat quantizes the attention linears; the experts stay in
full precision, which the coverage check reports and refuses unless --allow-unquantized."""

from eqat.models.families.spec import FamilySpec, Site, register_family
from eqat.models.families.llama import LLAMA_SITES

ATTENTION_SITES: tuple[Site, ...] = tuple(s for s in LLAMA_SITES if s.name in ("qkv", "o"))

MIXTRAL = register_family(FamilySpec(name="mixtral", model_types=("mixtral",), sites=ATTENTION_SITES,
                                     notes="experts (fused 3-D parameters) not quantized yet"))
