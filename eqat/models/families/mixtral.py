"""Mixtral: Llama's attention; the MLP is a sparse MoE block: a router (`mlp.gate`, a bare weight
[E, H] that stays in full precision) and `mlp.experts`, which transformers 5 stores as fused 3-D
parameters and eqat splits into per-expert Linears (`mlp.experts.{e}.gate_proj/up_proj/down_proj`,
eqat.models.experts) that every method quantizes. transformers saves the block as
`block_sparse_moe` with experts `w1` (gate), `w3` (up) and `w2` (down); vLLM and compressed-tensors
loaders read those names. SmoothQuant/QLLM sites: attention only (the MLP
input also feeds the router, which a folded scale would have to follow)."""

from eqat.models.families.spec import FamilySpec, Site, register_family
from eqat.models.families.llama import LLAMA_SITES

ATTENTION_SITES: tuple[Site, ...] = tuple(s for s in LLAMA_SITES if s.name in ("qkv", "o"))

MIXTRAL = register_family(FamilySpec(name="mixtral", model_types=("mixtral",), sites=ATTENTION_SITES,
                                     experts="mlp.experts", router="mlp.gate",
                                     expert_saved_names=((r"\.mlp\.(experts|gate)\.", r".block_sparse_moe.\1."),
                                                         (r"(\.experts\.\d+\.)gate_proj\.", r"\1w1."),
                                                         (r"(\.experts\.\d+\.)up_proj\.", r"\1w3."),
                                                         (r"(\.experts\.\d+\.)down_proj\.", r"\1w2."))))
