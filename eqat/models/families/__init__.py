"""Model families as data: where a causal LM's parts are, what eqat quantizes, and what the
weight-activation methods need to know about its blocks.

A `FamilySpec` names, as dotted paths from the top module, the token embedding, the list of
decoder blocks, the final norm, the rotary embedding (when the model computes it once for all
blocks) and the LM head; and the *sites*
(`Site`) where activations enter linears, with the module whose output can absorb a per-channel
scale (SmoothQuant, QLLM). Each family is one module of this package that calls
`register_family`; `family_for(model)` picks the spec by `config.model_type` and refuses a model
type no spec names (docs/extending.md says how to add one).

Per-block call differences (Gemma 2/3 alternate sliding-window and global attention, each with
its own mask and rotary embedding) come from the model's own `config.layer_types`: the block-wise
engine captures the keyword arguments of the first block of each type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from eqat.errors import EqatInputError


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
    notes: str = ""  # what a user should know (reported by `eqat info`)


FAMILIES: dict[str, FamilySpec] = {}  # by model_type


def register_family(spec: FamilySpec) -> FamilySpec:
    for model_type in spec.model_types:
        if model_type in FAMILIES and FAMILIES[model_type] != spec:
            raise ValueError(f"model type '{model_type}' is declared by families {FAMILIES[model_type].name} and {spec.name}")
        FAMILIES[model_type] = spec
    return spec


def registered_families() -> dict[str, FamilySpec]:
    """Every spec by model type, once this package's family modules (each registers itself) are imported."""
    from eqat.models.families import gemma, llama, mixtral, olmo2, olmoe, phi3, qwen3_moe  # noqa: F401
    return FAMILIES


def family_for(model: nn.Module) -> FamilySpec:
    """The spec of `model`'s config.model_type; EqatInputError naming the fix for an unknown type
    or a model whose blocks are not where its spec says."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = registered_families().get(model_type or "")
    if spec is None:
        known = ", ".join(sorted(FAMILIES))
        raise EqatInputError(f"eqat has no family spec for model type '{model_type}' ({type(model).__name__}); "
                             f"it knows {known}. A spec is a few lines of data in eqat/models/families/ "
                             "(docs/extending.md, 'A model family').")
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise EqatInputError(f"{type(model).__name__} (model type '{model_type}') has no decoder blocks at "
                             f"'{spec.blocks}', where the {spec.name} family spec puts them; this checkpoint's layout "
                             "differs from the one transformers builds for that type (docs/extending.md).")
    return spec
