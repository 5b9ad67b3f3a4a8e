"""Vision-language models: eqat quantizes the language model's decoder blocks and keeps the vision
tower and the projector in full precision (`keep`, listed in exporters' ignore lists). transformers 5
builds them with AutoModelForImageTextToText and names the language model `model.language_model`;
`save_pretrained` writes the names published checkpoints have, which compressed-tensors exports
write too (GPTQ keeps eqat's names, which GPTQModel reads).

- LLaVA (`llava`): CLIP/SigLIP vision tower `model.vision_tower`, projector
  `model.multi_modal_projector`, a Llama-like language model (Llama, Mistral, Qwen2, Vicuna: Llama's
  sites); saved as `language_model.model.layers...`, `language_model.lm_head`, `vision_tower...`,
  `multi_modal_projector...`.
- Qwen2-VL and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`): vision tower and merger `model.visual`, a Qwen2
  language model with multimodal rotary positions (M-RoPE, computed once by the language model from
  the position ids; text-only calibration gives every token the same position on all three axes);
  saved as `model.layers...`, `visual...`, `lm_head`.
"""

from eqat.models.families.llama import LLAMA_SITES
from eqat.models.families.spec import FamilySpec, register_family

_LM = "model.language_model"
_PARTS = dict(blocks=f"{_LM}.layers", embed=f"{_LM}.embed_tokens", final_norm=f"{_LM}.norm",
              rotary=f"{_LM}.rotary_emb", lm_head="lm_head", sites=LLAMA_SITES, auto_class="image-text-to-text")

LLAVA = register_family(FamilySpec(
    name="llava", model_types=("llava",), keep=("model.vision_tower", "model.multi_modal_projector"),
    saved_names=((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                 (r"^model\.vision_tower\.", "vision_tower."),
                 (r"^model\.multi_modal_projector\.", "multi_modal_projector.")),
    notes="vision tower and projector kept in full precision", **_PARTS,
))

QWEN2_VL = register_family(FamilySpec(
    name="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl"), keep=("model.visual",),
    saved_names=((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")),
    notes="vision tower (visual) kept in full precision; M-RoPE positions", **_PARTS,
))
