"""Model families as data: where a causal LM's parts are, what eqat quantizes, and what the
weight-activation methods need to know about its blocks.

A `FamilySpec` names, as dotted paths from the top module, the token embedding, the list of
decoder blocks, the final norm, the rotary embedding (when the model computes it once for all
blocks) and the LM head; and the *sites* (`Site`) where activations enter linears, with the
module whose output can absorb a per-channel scale (SmoothQuant, QLLM). Each family is one module
of this package that calls `register_family` (eqat/models/families/spec.py); `family_for(model)` picks the spec by `config.model_type` and refuses a model
type no spec names (docs/extending.md says how to add one).

Per-block call differences (Gemma 2/3 alternate sliding-window and global attention, each with
its own mask and rotary embedding) come from the model's own `config.layer_types`: the block-wise
engine captures the keyword arguments of the first block of each type.
"""

from __future__ import annotations

from torch import nn

from eqat.errors import EqatInputError
from eqat.models.families.spec import FAMILIES, FamilySpec, Site, register_family
from eqat.models.families import gemma, llama, mixtral, olmo2, olmoe, phi3, qwen3_moe, vlm  # noqa: F401  (each registers)

__all__ = ["FAMILIES", "FamilySpec", "Site", "register_family", "registered_families", "family_for"]


def registered_families() -> dict[str, FamilySpec]:
    """Every spec by model type (each family module of this package registers its own)."""
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
        vlm = ("cannot locate the language model of this vision-language model: "
               if spec.auto_class == "image-text-to-text" else "")
        raise EqatInputError(f"{vlm}{type(model).__name__} (model type '{model_type}') has no decoder blocks at "
                             f"'{spec.blocks}', where the {spec.name} family spec puts them; this checkpoint's layout "
                             "differs from the one transformers builds for that type (docs/extending.md).")
    return spec
