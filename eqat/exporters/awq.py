"""AWQ checkpoints, GEMM version (vLLM `awq`/`awq_marlin`, GPTQModel, transformers). 4-bit only.

Per linear (K inputs, N outputs, group g, G = K / g):

    qweight  int32 [K, N / 8]   codes packed along N, 8 per word, interleaved
    qzeros   int32 [G, N / 8]   zero-points, the same packing (stored as is, no minus one)
    scales   fp16  [G, N]
    bias     fp16  [N]          when the layer has one

Interleaving: nibble i (bits 4i .. 4i + 3) of a word holds output column ORDER[i] of its block of
8 columns, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]. w[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n].
"""

from __future__ import annotations

from typing import Any

import torch

from eqat.exporters.base import Exporter, QuantizedLayer, register
from eqat.core.packing import to_int32, unpack_int32
from eqat.core.layer_schemes import LayerSchemes
from eqat.core.scheme import QuantScheme

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit values [R, N] -> int32 [R, N / 8] in AWQ's interleaved order."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    word = torch.zeros(v.shape[:2], dtype=torch.int64)
    for i, col in enumerate(ORDER):
        word |= v[..., col] << (4 * i)
    return to_int32(word)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq`: int32 [R, N / 8] -> int64 [R, N]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*w.shape, 8, dtype=torch.int64)
    for i, col in enumerate(ORDER):
        out[..., col] = (w >> (4 * i)) & 0xF
    return out.reshape(w.shape[0], -1)


def why_not(scheme: QuantScheme, shapes: dict[str, tuple[int, int]], options: dict) -> str | None:
    if scheme.bits != 4:
        return f"AWQ (GEMM) holds 4-bit codes only, not {scheme.bits}-bit; for 2/3/8 bits use gptq"
    if scheme.group_size == -1:
        return "AWQ loaders expect a group size (32, 64, 128); this checkpoint is per-channel; use gptq"
    for name, (n, k) in shapes.items():
        if n % 8:
            return f"layer '{name}' has {n} outputs; AWQ packs 8 output columns per int32 word"
    return None


def convert_layer(layer: QuantizedLayer, scheme: QuantScheme, options: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    codes = unpack_int32(layer.qweight, 4, layer.in_features)  # [N, K]
    out = {
        "qweight": pack_awq(codes.T),  # [K, N/8]
        "qzeros": pack_awq(torch.round(layer.zeros.float()).to(torch.int64).T),  # [G, N/8]
        "scales": layer.scales.to(torch.float16).T,  # [G, N]
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.to(torch.float16)
    return out, {}


def quantization_config(schemes: LayerSchemes, options: dict) -> dict[str, Any]:
    scheme = schemes.default  # one scheme per AWQ model (holds_mixed is False)
    return {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


AWQ = register(Exporter(
    name="awq",
    summary="AWQ GEMM checkpoint (4-bit, interleaved packing)",
    why_not=why_not, convert_layer=convert_layer, quantization_config=quantization_config,
    runtimes="vLLM (awq, CPU through CPUWNA16), GPTQModel, transformers; 4-bit only",
))
