"""GPTQ checkpoints (GPTQModel, transformers through optimum + gptqmodel, vLLM for 4/8-bit symmetric).

Per linear (K inputs, N outputs, b bits, group g, G = K / g groups):

    qweight  int32 [K * b / 32, N]  codes packed along K, one bit stream per output column
                                    (the stream order of eqat.core.packing: eqat's [N, W] transposed)
    qzeros   int32 [G, N * b / 32]  zero-points packed along N, same stream order
    scales   fp16  [G, N]
    g_idx    int32 [K]              k // g (desc_act is false)
    bias     fp16  [N]              when the layer has one

    w[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]

checkpoint_format "gptq" (v1, what vLLM and most loaders expect) stores z - 1; "gptq_v2" stores
z. The default, "auto", is v1 for symmetric schemes (every module's, in a mixed-precision folder) (vLLM reads only those, and only v1) and v2
for asymmetric ones: vLLM refuses asymmetric GPTQ whatever the version, and GPTQModel 7.6
refuses asymmetric v1 unless its own metadata says GPTQModel >= 0.9 wrote it (older writers
corrupted zero-points of 0), while it reads v2 as is. A zero-point of 0 has no v1 encoding. eqat keeps v1 lossless by rewriting such a group
exactly: with qmax = 2^b - 1, (q - 0) * s == ((qmax - q) - qmax) * (-s), so the group is
stored with codes qmax - q, zero-point qmax and scale -s. The weights a loader computes are
bit-for-bit the same; the report counts the rewritten groups (`flipped_groups`); v2 stores
every group as is. `unpack_gptq` reads a layer back (tests, validate).

Mixed precision: modules with their own scheme are listed in `dynamic` (GPTQModel's per-module
overrides, `+:^<full name>$`), which GPTQModel and vLLM read; transformers (through optimum) drops
`dynamic`, so it cannot load such a folder.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eqat import __version__
from eqat.exporters.base import Exporter, QuantizedLayer, register
from eqat.core.packing import pack_int32, unpack_int32
from eqat.core.layer_schemes import LayerSchemes, fused_group
from eqat.core.scheme import QuantScheme

FORMATS = ("gptq", "gptq_v2")


def resolved_format(scheme: QuantScheme, options: dict) -> str:
    """The checkpoint_format written: the option, with "auto" -> v1 if symmetric else v2."""
    fmt = options["checkpoint_format"]
    return ("gptq" if scheme.symmetric else "gptq_v2") if fmt == "auto" else fmt


def why_not(scheme: QuantScheme, shapes: dict[str, tuple[int, int]], options: dict) -> str | None:
    if options["checkpoint_format"] not in FORMATS + ("auto",):
        return f"checkpoint_format must be auto, gptq or gptq_v2, not {options['checkpoint_format']!r}"
    if scheme.bits not in (2, 3, 4, 8):
        return f"GPTQ holds 2/3/4/8-bit codes, not {scheme.bits}-bit"
    per_word = 32 if scheme.bits == 3 else 32 // scheme.bits  # codes that fill whole int32 words
    for name, (n, k) in shapes.items():
        if k % per_word or n % per_word:
            return (f"layer '{name}' is {n} x {k}; GPTQ packs {scheme.bits}-bit codes {per_word} to a run of "
                    f"words along both K (qweight) and N (qzeros), so both must be multiples of {per_word}")
    return None


def convert_layer(layer: QuantizedLayer, scheme: QuantScheme, options: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    b, k, n = scheme.bits, layer.in_features, layer.out_features
    group = scheme.group_size_for(k)
    qmax = (1 << b) - 1
    codes = unpack_int32(layer.qweight, b, k).to(torch.int64)  # [N, K]
    zeros = torch.round(layer.zeros.float()).to(torch.int64)  # [N, G]
    scales = layer.scales.to(torch.float16)
    flipped = 0
    if resolved_format(scheme, options) == "gptq":
        flip = zeros == 0
        flipped = int(flip.sum())
        if flipped:
            codes = torch.where(flip.repeat_interleave(group, dim=1), qmax - codes, codes)
            zeros = torch.where(flip, qmax, zeros)
            scales = torch.where(flip, -scales, scales)
        zeros = zeros - 1
    out = {
        "qweight": pack_int32(codes, b).T,  # [K*b/32, N]
        "qzeros": pack_int32(zeros.T.contiguous(), b),  # [G, N*b/32]
        "scales": scales.T,  # [G, N]
        "g_idx": (torch.arange(k) // group).to(torch.int32),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.to(torch.float16)
    return out, {"flipped_groups": flipped}


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, in_features: int, checkpoint_format: str = "gptq"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GPTQ layer's (codes uint8 [N, K], zero-points int64 [N, G], scales fp16 [N, G])."""
    n = tensors["scales"].shape[1]
    codes = unpack_int32(tensors["qweight"].T.contiguous(), bits, in_features)
    zeros = unpack_int32(tensors["qzeros"], bits, n).T.to(torch.int64)  # [N, G]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return codes, zeros, tensors["scales"].T


def resolve_options(schemes: LayerSchemes, options: dict) -> dict:
    """One checkpoint_format for the whole folder: "auto" is v1 only when every module is symmetric."""
    if options["checkpoint_format"] != "auto":
        return options
    every = [schemes.default, *schemes.layers.values()]
    return {**options, "checkpoint_format": "gptq" if all(s.symmetric for s in every) else "gptq_v2"}


def dynamic_rules(schemes: LayerSchemes) -> dict[str, dict[str, Any]]:
    """GPTQModel's per-module overrides: `+:^<exact name>$` -> that module's fields. GPTQModel matches
    full module names; vLLM matches its fused names (qkv_proj, gate_up_proj), so a fused group whose
    members share a scheme gets a rule under the fused name too."""
    def fields(s: QuantScheme) -> dict[str, Any]:
        return {"bits": s.bits, "group_size": s.group_size, "sym": s.symmetric, "desc_act": False}

    rules = {f"+:^{re.escape(name)}$": fields(s) for name, s in schemes.layers.items()}
    for name, s in schemes.layers.items():
        group = fused_group(name)
        if group and all(schemes(m) == s for m in group[1]):
            rules[f"+:^{re.escape(group[0])}$"] = fields(s)
    return rules


def quantization_config(schemes: LayerSchemes, options: dict) -> dict[str, Any]:
    scheme = schemes.default
    return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size, "desc_act": False,
            "sym": scheme.symmetric, "checkpoint_format": resolved_format(scheme, options), "pack_dtype": "int32",
            "lm_head": False, "true_sequential": True, "damp_percent": 0.01,
            **({"dynamic": dynamic_rules(schemes)} if not schemes.uniform else {}),
            "meta": {"quantizer": [f"eqat:{__version__}"]}}


GPTQ = register(Exporter(
    name="gptq",
    summary="GPTQ v1 (or v2) checkpoint: qweight/qzeros/scales/g_idx",
    why_not=why_not, convert_layer=convert_layer, quantization_config=quantization_config,
    options={"checkpoint_format": "auto"}, resolve_options=resolve_options, holds_mixed=True, holds_experts=True,
    runtimes="GPTQModel and transformers at 2/3/4/8 bits; vLLM only 4/8-bit symmetric",
))
