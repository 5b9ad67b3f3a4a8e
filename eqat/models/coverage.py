"""How much of a model a run quantizes, and a refusal when too much would stay in full precision.

The rule: the *quantizable parameters* are the weight matrices inside the decoder blocks, i.e.
every parameter of ndim >= 2 (a Linear's weight, a fused MoE expert tensor [E, N, K], a router).
1-D tensors (norm weights, biases) stay in full precision by design and are counted apart
(`block_vector_params`); so are the parameters outside the blocks (embeddings, final norm, LM
head), which eqat never quantizes. The share is quantized / quantizable parameters.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from torch import nn

from eqat.models.arch import arch_for, model_skeleton, quantizable_linears
from eqat.io.checkpoint import is_eqat_checkpoint, read_eqat_config
from eqat.errors import EqatInputError

MAX_UNQUANTIZED = 0.10  # a run that leaves more of the block matrices in full precision is refused
ALLOW_FLAG = "--allow-unquantized"


def _group(prefix: str, name: str) -> str:
    """'model.layers.3.mlp.experts.down_proj' -> 'model.layers.*.mlp.experts.down_proj'."""
    return re.sub(rf"^{re.escape(prefix)}\.\d+\.", f"{prefix}.*.", name)


def coverage(model: nn.Module, quantized: Iterable[str]) -> dict[str, Any]:
    """Coverage of `model` when the modules named in `quantized` (full names, Linear or QuantLinear)
    are quantized: quantizable parameters in the blocks, how many are quantized, the share, and the
    matrices left in full precision grouped over the blocks (largest first)."""
    prefix = arch_for(model).blocks
    names = set(quantized)
    total = done = vectors = 0
    left: dict[str, dict[str, Any]] = {}
    for mod_name, module in model.get_submodule(prefix).named_modules(prefix=prefix):
        if mod_name in names:
            n = module.in_features * module.out_features
            total, done = total + n, done + n
        for p_name, p in module.named_parameters(recurse=False):
            if p.ndim < 2:
                vectors += p.numel()
            elif mod_name not in names:
                total += p.numel()
                g = left.setdefault(_group(prefix, f"{mod_name}.{p_name}"), {"count": 0, "params": 0, "shape": list(p.shape)})
                g["count"] += 1
                g["params"] += p.numel()
    block_ids = {id(p) for p in model.get_submodule(prefix).parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in block_ids)
    groups = sorted(({"tensors": k, **v, "share": v["params"] / max(total, 1)} for k, v in left.items()),
                    key=lambda g: -g["params"])
    return {"rule": "parameters of ndim >= 2 inside the decoder blocks", "quantized_modules": len(names),
            "block_matrix_params": total, "quantized_params": done, "share": done / total if total else 1.0,
            "unquantized": groups, "block_vector_params": vectors, "outside_block_params": outside}


def describe(cov: dict[str, Any], limit: int = 8) -> str:
    """'model.layers.*.mlp.experts.gate_up_proj (2 tensors of shape [4, 256, 64], 59.1%), ...': the groups
    left out, the largest `limit` of them."""
    parts = [f"{g['tensors']} ({g['count']} tensor{'s' * (g['count'] != 1)} of shape {g['shape']}, {g['share']:.1%})"
             for g in cov["unquantized"][:limit]]
    rest = len(cov["unquantized"]) - limit
    return ", ".join(parts) + (f" and {rest} more groups" if rest > 0 else "")


def summary(cov: dict[str, Any], would: bool = False) -> str:
    """One line for people: the share, and what stays in full precision when it is below 100%."""
    if "error" in cov:
        return f"quantized share unknown: {cov['error']}"
    text = (f"{'eqat would quantize' if would else 'quantized'} {cov['share']:.1%} of the decoder blocks' weight-matrix "
            f"parameters ({cov['quantized_params']:,} of {cov['block_matrix_params']:,})")
    return text + (f"; left in full precision: {describe(cov)}" if cov["unquantized"] else "")


def check_coverage(cov: dict[str, Any], allow: bool = False) -> None:
    """Raise EqatInputError when more than MAX_UNQUANTIZED of the block matrices would stay in full
    precision, unless `allow` (the CLI's --allow-unquantized)."""
    if allow or 1 - cov["share"] <= MAX_UNQUANTIZED:
        return
    raise EqatInputError(
        f"only {cov['share']:.1%} of the decoder blocks' weight-matrix parameters would be quantized "
        f"({cov['quantized_params']:,} of {cov['block_matrix_params']:,}; eqat quantizes nn.Linear layers). "
        f"Left in full precision: {describe(cov)}. Pass {ALLOW_FLAG} to quantize the Linear layers anyway "
        f"and keep these in full precision (the report records the share).")


def folder_coverage(path: Any) -> dict[str, Any]:
    """`coverage` of a model folder from its config alone (a skeleton, no weights read): of an eqat
    checkpoint, its quantized modules; of a Hugging Face folder, what eqat would quantize."""
    from transformers import AutoConfig

    model = model_skeleton(AutoConfig.from_pretrained(path))
    names = read_eqat_config(path)["quantized_modules"] if is_eqat_checkpoint(path) else quantizable_linears(model)
    return coverage(model, names)
