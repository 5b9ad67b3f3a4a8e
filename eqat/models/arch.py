"""Where the parts of a decoder-only causal LM are, described as data.

An `ArchSpec` names, as dotted paths from the top module, the token embedding, the list of
decoder blocks, the final norm, the rotary embedding (if the model computes it once for
all blocks) and the LM head. Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 share one spec;
for other families `arch_for` discovers the block list from `config.num_hidden_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from torch import nn

from eqat.errors import EqatInputError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"


LLAMA_LIKE = ArchSpec()
KNOWN_ARCHS: dict[str, ArchSpec] = {
    name: LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite")
}


def get_submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _discover_blocks(model: nn.Module) -> str:
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and len(m) == n_layers
    ]
    if len(candidates) != 1:
        raise EqatInputError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one ModuleList of "
            f"num_hidden_layers={n_layers} modules, found {candidates or 'none'}. "
            "Add an ArchSpec for this model type to eqat.models.arch.KNOWN_ARCHS."
        )
    return candidates[0]


def arch_for(model: nn.Module) -> ArchSpec:
    """The spec of `model`: a known family, or one discovered from its config."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = KNOWN_ARCHS.get(model_type or "")
    if spec is not None and get_submodule(model, spec.blocks) is not None:
        return spec
    blocks = _discover_blocks(model)
    prefix = blocks.rsplit(".", 1)[0] + "." if "." in blocks else ""
    rotary = prefix + "rotary_emb"
    return ArchSpec(
        blocks=blocks,
        embed=prefix + "embed_tokens",
        final_norm=prefix + "norm",
        rotary=rotary if get_submodule(model, rotary) is not None else None,
        lm_head="lm_head",
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_for(model).blocks)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of one decoder block, by their name inside the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks, by full module name (the LM head is left out)."""
    prefix = arch_for(model).blocks
    return {
        f"{prefix}.{i}.{name}": lin for i, block in enumerate(decoder_blocks(model)) for name, lin in block_linears(block).items()
    }


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


def model_skeleton(config: Any) -> nn.Module:
    """The causal LM of `config` with empty (meta) tensors: its structure and shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # under init_empty_weights transformers 5 leaves tied embeddings untied
    return model
