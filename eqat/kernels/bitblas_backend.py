"""BitBLAS inference path (optional extra `eqat[bitblas]`, CUDA only).

eqat's W_hat = (q - z) * s with float zero-points is BitBLAS's `zeros_mode="original"`
(target = (dequantize_weight - zero_point) * scale, zero_point in the scale's dtype), with
unsigned codes: W_dtype "uint2" / "uint4". BitBLAS takes float16 activations only; it has
no 3- or 8-bit unsigned weight type, so those layers stay on the other backends.

Once per layer (on its first BitBLAS forward, or through `prepare_bitblas(model)` at load)
the codes are unpacked and transformed into BitBLAS's layout; the result is cached on the
layer and rebuilt only if the codes change (they are frozen after Block-AP). Scales and
zero-points are read at each call, so trained step sizes take effect at once. Operators are
shared by layers of one shape.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

W_DTYPES = {2: "uint2", 4: "uint4"}
OPT_M = [1, 16, 32, 64, 128, 256, 512, 1024]  # BitBLAS's dynamic-M buckets; larger M is chunked
INSTALL_HINT = "pip install 'eqat[bitblas]' on a CUDA machine"


@lru_cache(maxsize=None)
def bitblas_installed() -> bool:
    return importlib.util.find_spec("bitblas") is not None


def bitblas_why_not(device: torch.device, bits: int, group: int, dtype: torch.dtype) -> str | None:
    """None if BitBLAS serves this layer and call, else the reason it does not."""
    if device.type != "cuda":
        return f"BitBLAS runs on CUDA only, not {device.type}"
    if not bitblas_installed():
        return f"BitBLAS is not installed: {INSTALL_HINT}"
    if bits not in W_DTYPES:
        return f"BitBLAS has unsigned {'/'.join(map(str, W_DTYPES))}-bit weights with zero-points, not {bits}-bit"
    if dtype != torch.float16:
        return f"BitBLAS takes float16 activations, not {dtype}: load the model in float16"
    return None


@lru_cache(maxsize=None)
def _operator(n: int, k: int, bits: int, group: int) -> Any:
    import bitblas

    config = bitblas.MatmulConfig(
        M=OPT_M, N=n, K=k, A_dtype="float16", W_dtype=W_DTYPES[bits], accum_dtype="float32",
        out_dtype="float16", layout="nt", with_bias=False, group_size=group,
        with_scaling=True, with_zeros=True, zeros_mode="original",
    )
    return bitblas.Matmul(config=config)


@dataclass
class BitBLASWeights:
    """A layer's codes in BitBLAS's layout, and which qweight they came from."""

    op: Any
    weight: torch.Tensor
    source: tuple[int, int]  # (data_ptr, _version) of the layer's qweight


def _source(layer: Any) -> tuple[int, int]:
    return (layer.qweight.data_ptr(), layer.qweight._version)


def transform_layer(layer: Any) -> BitBLASWeights:
    """Unpack a QuantLinear's codes and hand them to BitBLAS's weight transform."""
    k = layer.in_features
    op = _operator(layer.out_features, k, layer.scheme.bits, layer.scheme.group_size_for(k))
    codes = layer.codes().to(torch.int8)  # [N, K], values in [0, 2^b)
    return BitBLASWeights(op, op.transform_weight(codes), _source(layer))


def bitblas_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W_hat^T (+ bias) through BitBLAS, float16."""
    state = getattr(layer, "_bitblas", None)
    if state is None or state.source != _source(layer):
        state = layer._bitblas = transform_layer(layer)
    scales, zeros = layer.scales.detach().half(), layer.zeros.detach().half()
    x2 = x.reshape(-1, layer.in_features).half()
    parts = [state.op(p.contiguous(), state.weight, scale=scales, zeros=zeros) for p in x2.split(OPT_M[-1])]
    y = torch.cat(parts) if parts else x2.new_empty(0, layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.half()
    return y.view(*x.shape[:-1], -1)


def prepare_bitblas(model: torch.nn.Module) -> int:
    """Transform every QuantLinear that BitBLAS serves, at load; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "scheme"):
            reason = bitblas_why_not(module.qweight.device, module.scheme.bits,
                                     module.scheme.group_size_for(module.in_features), torch.float16)
            if reason is None:
                module._bitblas = transform_layer(module)
                count += 1
    return count
