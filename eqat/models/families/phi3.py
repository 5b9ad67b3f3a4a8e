"""Phi-3 and Phi-4 (model type phi3): Llama's block with fused projections, `self_attn.qkv_proj`
(rows: q, then k, then v) and `mlp.gate_up_proj` (rows: gate, then up). eqat quantizes each fused
linear as one layer, which is how transformers and vLLM hold them. o_proj reads a slice of
qkv_proj and down_proj the up half of gate_up_proj, so no module absorbs a scale one to one:
SmoothQuant migrates at the two norms only; QLLM's reassembly applies at all three inputs."""

from eqat.models.families.spec import FamilySpec, Site, register_family

PHI3 = register_family(FamilySpec(
    name="phi3", model_types=("phi3",),
    sites=(Site("qkv", "input_layernorm", ("self_attn.qkv_proj",)),
           Site("o", None, ("self_attn.o_proj",)),
           Site("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",)),
           Site("down", None, ("mlp.down_proj",))),
    notes="fused qkv_proj and gate_up_proj, quantized as one layer each",
))
