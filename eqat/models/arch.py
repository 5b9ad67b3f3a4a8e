"""Where the parts of a decoder-only causal LM are: the family spec of its model type
(`eqat.models.families`), and the linears eqat quantizes inside its decoder blocks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from eqat.errors import EqatInputError
from eqat.models.experts import ExpertLinears, is_expert_list, unfuse_experts
from eqat.models.families import FamilySpec, family_for, registered_families


def get_submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def arch_for(model: nn.Module) -> FamilySpec:
    """The family spec of `model` (EqatInputError for a model type eqat has no spec for)."""
    return family_for(model)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_for(model).blocks)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of one decoder block, by their name inside the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks, by full module name (the LM head is left out)."""
    spec = arch_for(model)
    blocks = model.get_submodule(spec.blocks)
    return {f"{spec.blocks}.{i}.{name}": lin for i, block in enumerate(blocks)
            for name, lin in block_linears(block).items()}


def check_scheme(model: nn.Module, scheme: Any) -> dict[str, nn.Linear]:
    """Validate `scheme` (a QuantScheme or LayerSchemes) against every quantizable Linear before
    anything changes; returns those Linears by full name."""
    from eqat.core.layer_schemes import as_layer_schemes

    linears = quantizable_linears(model)
    as_layer_schemes(scheme).check({name: (lin.out_features, lin.in_features) for name, lin in linears.items()})
    return linears


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted) of `model` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def split_experts(model: nn.Module) -> list[str]:
    """Split the fused MoE experts of `model` into per-expert Linears (eqat.models.experts), in
    place, when its family declares experts; returns the experts modules split. Experts already stored
    as per-expert Linears (older transformers, or transformers after GPTQModel's Defuser patched the
    family in this process) are quantized as they are, without routing counts. A model type no
    family names is left alone (what reads its blocks refuses it). EqatInputError when the family
    declares experts that no block holds."""
    spec = registered_families().get(getattr(getattr(model, "config", None), "model_type", None) or "")
    if spec is None or spec.experts is None:
        return []
    done = unfuse_experts(model, spec.blocks)
    if not any(isinstance(get_submodule(b, spec.experts), ExpertLinears) or is_expert_list(get_submodule(b, spec.experts))
               for b in model.get_submodule(spec.blocks)):
        raise EqatInputError(f"the {spec.name} family spec puts the MoE experts at '{spec.experts}' of each sparse "
                             f"block, but no block of this {type(model).__name__} has experts there; its layout differs "
                             "from the one transformers 5 builds for that type (docs/extending.md, 'A model family').")
    return done


def model_class(config: Any) -> Any:
    """The transformers Auto class that builds `config`'s model: AutoModelForImageTextToText for a
    vision-language family (FamilySpec.auto_class), else AutoModelForCausalLM."""
    import transformers

    spec = registered_families().get(getattr(config, "model_type", None) or "")
    vlm = spec is not None and spec.auto_class == "image-text-to-text"
    return transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM


def model_skeleton(config: Any) -> nn.Module:
    """The model of `config` with empty (meta) tensors: its structure and shapes, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(config).from_config(config)
    model.tie_weights()  # under init_empty_weights transformers 5 leaves tied embeddings untied
    split_experts(model)
    return model
