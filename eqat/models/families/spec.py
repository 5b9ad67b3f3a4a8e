"""The data a family declares (`FamilySpec`, `Site`) and the registry it goes into; the family
modules of this package import it, and `eqat.models.families` imports them."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """A group of linears that read one input, and the module producing that input."""

    name: str  # how reports name it: "qkv", "gate_up", "o", "down"
    # the module that produces the input (a norm or a linear) inside the block; None where no module
    # can absorb a scale exactly (Phi-3's o_proj reads a slice of the fused qkv_proj): SmoothQuant
    # leaves the site alone, QLLM's reassembly (explicit, no fold) still applies
    source: str | None
    linears: tuple[str, ...]  # the linears reading it, inside the block
    # how the source's output rows map to the input channels: None is one to one; "o_to_v" is
    # attention's grouped-query map from o_proj's input to v_proj's output rows
    rows: str | None = None

    @property
    def source_is_norm(self) -> bool:
        return self.source is not None and self.source.endswith("layernorm")


@dataclass(frozen=True)
class FamilySpec:
    name: str  # the module that declares it: "llama", "gemma", "phi3"
    model_types: tuple[str, ...]  # config.model_type values it covers
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"
    sites: tuple[Site, ...] = ()  # empty: SmoothQuant and QLLM refuse the family
    # RMSNorm computes x_hat * (norm_offset + w): 0 for Llama, 1 for Gemma. Folding a scale s into
    # it sets w' = (norm_offset + w) / s - norm_offset.
    norm_offset: float = 0.0
    # MoE: the experts module inside a sparse block (transformers 5's fused 3-D parameters, which eqat
    # splits into per-expert Linears, eqat.models.experts); None for a dense family
    experts: str | None = None
    router: str | None = None  # MoE: the router inside a sparse block (full precision; formats that target Linears ignore it)
    # eqat's tensor names (transformers 5's module names) -> the names transformers' save_pretrained
    # writes, as (regex, replacement) applied in order, for exporters with `saved_names` (LLaVA:
    # model.language_model.layers -> language_model.model.layers, as published checkpoints are named)
    saved_names: tuple[tuple[str, str], ...] = ()
    # the same for MoE experts (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2); GPTQModel reads eqat's
    expert_saved_names: tuple[tuple[str, str], ...] = ()
    # vision-language models: the transformers Auto class that builds the model ("causal":
    # AutoModelForCausalLM, "image-text-to-text": AutoModelForImageTextToText), and the parts outside the
    # language model's blocks kept in full precision (vision tower, projector), which exporters' configs ignore
    auto_class: str = "causal"
    keep: tuple[str, ...] = ()
    notes: str = ""  # what a user should know (reported by `eqat info`)


def saved_name(spec: FamilySpec, name: str) -> str:
    """`name` (eqat's, e.g. model.layers.0.mlp.experts.3.gate_proj.weight) as transformers saves it."""
    for pattern, replacement in (*spec.saved_names, *spec.expert_saved_names):
        name = re.sub(pattern, replacement, name)
    return name


FAMILIES: dict[str, FamilySpec] = {}  # by model_type


def register_family(spec: FamilySpec) -> FamilySpec:
    for model_type in spec.model_types:
        if model_type in FAMILIES and FAMILIES[model_type] != spec:
            raise ValueError(f"model type '{model_type}' is declared by families {FAMILIES[model_type].name} and {spec.name}")
        FAMILIES[model_type] = spec
    return spec
