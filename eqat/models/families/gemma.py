"""Gemma, Gemma 2 and Gemma 3 (text). RMSNorm computes x_hat * (1 + w). Gemma 2/3 blocks are
sandwiched: `input_layernorm` -> attention -> `post_attention_layernorm` -> residual, then
`pre_feedforward_layernorm` -> MLP -> `post_feedforward_layernorm` -> residual; they alternate
sliding-window and global attention (`config.layer_types`), each with its own mask and rotary
embedding, which the block-wise engine takes per type. Gemma 2 soft-caps attention scores and
the final logits (`config.final_logit_softcapping`); activations exceed float16's range, so
streams stay bfloat16 or float32 (the engine's default is bfloat16)."""

from eqat.models.families.spec import FamilySpec, Site, register_family

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_O = Site("o", "self_attn.v_proj", ("self_attn.o_proj",), rows="o_to_v")
_DOWN = Site("down", "mlp.up_proj", ("mlp.down_proj",))

GEMMA = register_family(FamilySpec(
    name="gemma", model_types=("gemma",), norm_offset=1.0,
    sites=(Site("qkv", "input_layernorm", _QKV), _O,
           Site("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN),
))

GEMMA2 = register_family(FamilySpec(
    name="gemma2", model_types=("gemma2", "gemma3_text"), norm_offset=1.0,
    sites=(Site("qkv", "input_layernorm", _QKV), _O,
           Site("gate_up", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN),
    notes="sliding-window and global attention per config.layer_types",
))
