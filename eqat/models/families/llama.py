"""Llama and the families transformers lays out the same way: Mistral, Qwen2 (q/k/v bias),
Qwen3 (q/k norms), SmolLM3, Granite. Blocks `model.layers`, attention
`self_attn.{q,k,v,o}_proj`, gated MLP `mlp.{gate,up,down}_proj`, RMSNorm y = x_hat * w."""

from eqat.models.families.spec import FamilySpec, Site, register_family

LLAMA_SITES = (
    Site("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Site("o", "self_attn.v_proj", ("self_attn.o_proj",), rows="o_to_v"),
    Site("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Site("down", "mlp.up_proj", ("mlp.down_proj",)),
)

LLAMA = register_family(FamilySpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite"),
    sites=LLAMA_SITES,
))
