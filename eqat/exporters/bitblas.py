"""BitBLAS checkpoints as GPTQModel serializes them (`checkpoint_format: "bitblas"`), read by
GPTQModel's BitBLAS backend (`BACKEND.GPTQ_BITBLAS`, CUDA) with no repacking at load. vLLM 0.32
has no BitBLAS path.

Per linear (K inputs, N outputs, b bits in 2/4/8, group g, G = K / g), GPTQModel 7.6's
`BitblasLinear` buffers:

    qweight  int8    BitBLAS's weight layout for its operator (shape from
                     `Matmul.retrieve_weight_shape()`, [N, K b / 8] without layout transforms),
                     produced by BitBLAS's own `weight_transform` from the codes [N, K]
    scales   fp16    [N, G]
    qzeros   int8    [G, N b / 8]  asymmetric only: zero-points packed along N, b bits each,
                     low bits first (`zeros_mode="quantized"`: w = (q - z) * s)
    bias     fp16    [N] when the layer has one

Symmetric schemes use BitBLAS's signed type (int b): it reads the stored unsigned code q as
q - 2^(b-1), which is eqat's fixed symmetric zero-point, so no zeros are stored.

The layout is BitBLAS's, so eqat does not rewrite it: the exporter builds GPTQModel's
`BitblasLinear` for each shape and hands it eqat's codes, scales and zero-points (the same call
GPTQModel makes when it repacks a GPTQ checkpoint at load). That needs `bitblas`, which needs
CUDA; elsewhere the format is refused with the alternative: a `gptq` export, which the same
backend repacks at load.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from eqat import __version__
from eqat.exporters.base import Exporter, QuantizedLayer, register
from eqat.core.packing import unpack_int32
from eqat.core.layer_schemes import LayerSchemes
from eqat.core.scheme import QuantScheme

BITS = (2, 4, 8)
GROUPS = (-1, 32, 64, 128)


def bitblas_linear_class() -> Any:
    """GPTQModel's BitblasLinear, or raise ImportError saying why it is unavailable."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        from gptqmodel.nn_modules.qlinear import bitblas as gm_bitblas
    except ImportError as e:
        raise ImportError(f"GPTQModel is not installed ({e}); pip install gptqmodel") from e
    if not gm_bitblas.BITBLAS_AVAILABLE:
        raise ImportError("bitblas does not import here (it needs CUDA and bitblas >= 0.1.0.post1)")
    return gm_bitblas.BitblasLinear


def why_not(scheme: QuantScheme, shapes: dict[str, tuple[int, int]], options: dict) -> str | None:
    if scheme.bits not in BITS:
        return f"BitBLAS (through GPTQModel) holds 2/4/8-bit codes, not {scheme.bits}-bit; use gptq"
    if scheme.group_size not in GROUPS:
        return f"GPTQModel's BitBLAS backend takes group sizes {GROUPS}, not {scheme.group_size}"
    for name, (n, k) in shapes.items():
        if n % 16 or k % 16:
            return f"layer '{name}' is {n} x {k}; BitBLAS needs both dimensions divisible by 16"
    try:
        bitblas_linear_class()
    except ImportError as e:
        return (f"the BitBLAS layout is produced by BitBLAS itself, and {e}; export gptq instead: GPTQModel's "
                "BitBLAS backend (BACKEND.GPTQ_BITBLAS) repacks it at load")
    return None


def convert_layer(layer: QuantizedLayer, scheme: QuantScheme, options: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    b, n, k = scheme.bits, layer.out_features, layer.in_features
    linear_cls = bitblas_linear_class()
    with torch.device("meta"):
        blas = linear_cls(bits=b, group_size=scheme.group_size, desc_act=False, sym=scheme.symmetric, in_features=k,
                          out_features=n, bias=layer.bias is not None, dtype=torch.float16)
    # int8 holding the unsigned b-bit patterns (8-bit codes above 127 read as negative; the bits are what count)
    codes = unpack_int32(layer.qweight, b, k).view(torch.int8)  # [N, K]
    zeros = None if scheme.symmetric else (
        torch.round(layer.zeros.float()).to(torch.uint8).view(torch.int8).T.contiguous())  # [G, N]
    blas._buffer_device = lambda: torch.device("cpu")  # keep the exported tensors on the host
    blas._load_bitblas_quant_state(codes, layer.scales.to(torch.float16), zeros,
                                   None if layer.bias is None else layer.bias.to(torch.float16))
    out = {"qweight": blas.qweight, "scales": blas.scales}
    if not scheme.symmetric:
        out["qzeros"] = blas.qzeros
    if layer.bias is not None:
        out["bias"] = blas.bias
    return out, {}


def quantization_config(schemes: LayerSchemes, options: dict) -> dict[str, Any]:
    scheme = schemes.default  # one scheme per BitBLAS model (holds_mixed is False)
    return {"quant_method": "gptq", "checkpoint_format": "bitblas", "bits": scheme.bits,
            "group_size": scheme.group_size, "desc_act": False, "sym": scheme.symmetric, "pack_dtype": "int32",
            "lm_head": False, "meta": {"quantizer": [f"eqat:{__version__}"]}}


BITBLAS = register(Exporter(
    name="bitblas",
    summary="GPTQModel's BitBLAS serialization (weights in BitBLAS's own layout; needs bitblas + CUDA to write)",
    why_not=why_not, convert_layer=convert_layer, quantization_config=quantization_config,
    runtimes="GPTQModel BACKEND.GPTQ_BITBLAS (CUDA; 2/4/8-bit)",
))
