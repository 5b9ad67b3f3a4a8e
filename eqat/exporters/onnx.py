"""ONNX graphs whose quantized linears are onnxruntime's `MatMulNBits` (domain com.microsoft).

The folder holds `model.onnx` (weights inside, or in `model.onnx.data` when over 1.5 GB), the
config, tokenizer and card. Graph: inputs `input_ids` int64 [batch, seq] and `attention_mask`
int64 [batch, seq] (1 = token, 0 = padding); output `logits` float32 [batch, seq, vocab]; no KV
cache (one pass over the whole sequence: scoring, perplexity, validation). Every other op is
float32.

Per quantized linear (K inputs, N outputs, b bits, block size B, n = K / B blocks per row):

    B            uint8  [N, n, B b / 8]          codes, per row one little-end-first bit stream:
                                                 code j in bits [j b, (j + 1) b) (eqat's word
                                                 stream, read byte by byte)
    scales       float32 [N * n]                 step sizes, row-major
    zero_points  uint8  [N * ceil(n b / 8)]      asymmetric (or widened) only: per row the n zero-points packed
                                                 the same way, each row padded to whole bytes
    attributes   K, N, bits, block_size          (accuracy_level 0: float32 arithmetic)

    w[r, k] = (q[r, k] - zp[r, k // B]) * scales[r * n + k // B]; without zero_points zp = 2^(b-1)

onnxruntime requires B to be a power of two >= 16 and bits 2, 4 or 8. Groups of another size,
and per-channel schemes, are written with B the largest such power dividing the group (scales
and zero-points repeated per block: the same weights). onnxruntime 1.32 refuses 3-bit
("Only 2b, 4b and 8b quantization is supported"): 3-bit codes are widened to 4-bit codes (same
values, same weights, a third more storage), counted in the report as `widened_3_to_4_bit`;
option `widen_3bit=false` refuses instead. 6-bit codes are widened to 8-bit codes the same way
(`widened_6_to_8_bit`).

Weight-activation models run as such: before its MatMulNBits node, a layer whose scheme quantizes
activations quantizes and dequantizes its input per token with plain graph operations
(ReduceMin/ReduceMax, Div, Round, Clip, Sub, Mul: eqat.core.quantizer.quantize_tokens, at any of 4/6/8
bits; QuantizeLinear has no 4/6-bit type at opset 17), in float32 like eqat's forward. A layer with
QLLM's channel reassembly gathers and averages its input first (Gather, Add, Mul), from two more
initializers per layer: `reassembly_index` int64 [2, K] and `reassembly_scale` float32 [K].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat.exporters.base import Exporter, QuantizedLayer, register
from eqat.core.packing import pack_int32, unpack_int32
from eqat.core.layer_schemes import LayerSchemes
from eqat.core.quantizer import fake_quantize_tokens
from eqat.core.reassembly import reassemble
from eqat.core.scheme import ActScheme, QuantScheme

OPSET = 17
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB ceiling, with room for the graph


def onnx_bits(scheme: QuantScheme, options: dict) -> int:
    """The width MatMulNBits stores: 3-bit codes widened to 4 (with widen_3bit), 6-bit to 8 (always)."""
    if scheme.bits == 6:
        return 8
    return 4 if scheme.bits == 3 and options["widen_3bit"] else scheme.bits


def block_size(group: int) -> int:
    """Largest power of two <= 256 dividing `group` (0 when it is below 16)."""
    b = 256
    while b >= 16 and group % b:
        b //= 2
    return b if b >= 16 else 0


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [R, L] -> uint8 [R, ceil(L b / 8)], a little-end-first bit stream per row."""
    words = pack_int32(codes, bits).to(torch.int64) & 0xFFFFFFFF  # [R, W]
    stream = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1).reshape(codes.shape[0], -1)
    return stream[:, : -(-codes.shape[1] * bits // 8)].to(torch.uint8)


def unpack_bytes(data: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_bytes`: uint8 [R, ceil(L b / 8)] -> uint8 codes [R, L]."""
    shifts = torch.arange(0, 8, bits)
    per_byte = (data.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, bytes, 8 / b]
    return per_byte.reshape(data.shape[0], -1)[:, :length].to(torch.uint8)


def why_not(scheme: QuantScheme, shapes: dict[str, tuple[int, int]], options: dict) -> str | None:
    if scheme.bits == 3 and not options["widen_3bit"]:
        return "onnxruntime's MatMulNBits runs 2, 4 and 8 bits, not 3; export with widen_3bit=true (lossless, 4-bit storage) or use gptq"
    for name, (n, k) in shapes.items():
        if not block_size(scheme.group_size_for(k)):
            return (f"layer '{name}': MatMulNBits needs a block size that is a power of two >= 16 dividing the group "
                    f"({scheme.group_size_for(k)} inputs); quantize with group 32, 64 or 128")
    return None


def convert_layer(layer: QuantizedLayer, scheme: QuantScheme, options: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    bits, n, k = onnx_bits(scheme, options), layer.out_features, layer.in_features
    group = scheme.group_size_for(k)
    block = block_size(group)
    repeat = group // block
    codes = unpack_int32(layer.qweight, scheme.bits, k)  # [N, K]
    out = {
        "B": pack_bytes(codes, bits).reshape(n, k // block, block * bits // 8),
        "scales": layer.scales.float().repeat_interleave(repeat, dim=1).reshape(-1),
    }
    if not scheme.symmetric or bits != scheme.bits:  # a widened symmetric scheme keeps zero-point 4, not 8
        zeros = torch.round(layer.zeros.float()).to(torch.int64).repeat_interleave(repeat, dim=1)  # [N, n]
        out["zero_points"] = pack_bytes(zeros, bits).reshape(-1)
    if layer.bias is not None:
        out["bias"] = layer.bias.float()
    if layer.reassembly is not None:
        out["reassembly_index"] = layer.reassembly[0].to(torch.int64)
        out["reassembly_scale"] = layer.reassembly[1].float()
    notes = {"widened_3_to_4_bit": int(scheme.bits == 3 and bits == 4)}
    return out, notes | ({"widened_6_to_8_bit": 1} if scheme.bits == 6 else {})


def unpack_onnx(tensors: dict[str, torch.Tensor], bits: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MatMulNBits layer's (codes uint8 [N, K], zero-points int64 [N, n], scales float32 [N, n])."""
    n, blocks, _ = tensors["B"].shape
    codes = unpack_bytes(tensors["B"].reshape(n, -1), bits, k)
    scales = tensors["scales"].reshape(n, blocks)
    if "zero_points" in tensors:
        zeros = unpack_bytes(tensors["zero_points"].reshape(n, -1), bits, blocks).to(torch.int64)
    else:
        zeros = torch.full((n, blocks), 1 << (bits - 1), dtype=torch.int64)
    return codes, zeros, scales


class _MatMulNBits(torch.autograd.Function):
    """y = x W^T (+ bias) with W held as MatMulNBits tensors. Eager: dequantize and multiply.
    Traced by the ONNX exporter: one com.microsoft::MatMulNBits node (and an Add for the bias)."""

    @staticmethod
    def forward(ctx, x, qb, scales, zeros, bias, k, n, bits, block):  # type: ignore[override]
        codes, zp, s = unpack_onnx({"B": qb, "scales": scales, **({"zero_points": zeros} if zeros.numel() else {})}, bits, k)
        w = (codes.float().reshape(n, -1, block) - zp.unsqueeze(-1)) * s.unsqueeze(-1)
        y = x @ w.reshape(n, k).T
        return y + bias if bias.numel() else y

    @staticmethod
    def symbolic(g, x, qb, scales, zeros, bias, k, n, bits, block):  # type: ignore[override]
        inputs = [x, qb, scales] + ([zeros] if _numel(zeros) else [])
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        sizes = x.type().varyingSizes()  # tell the tracer the output's shape: [..., N]
        y.setType(x.type().with_sizes(sizes[:-1] + [n]) if sizes else x.type())
        return g.op("Add", y, bias) if _numel(bias) else y


def _numel(value) -> int:
    t = value.type()
    sizes = t.sizes() if hasattr(t, "sizes") else None
    if sizes is None:
        raise RuntimeError("MatMulNBits export needs static shapes for its weight tensors")
    out = 1
    for s in sizes:
        out *= s
    return out


class MatMulNBitsLinear(nn.Module):
    """A linear stored as MatMulNBits tensors (buffers, so they become ONNX initializers)."""

    def __init__(self, tensors: dict[str, torch.Tensor], in_features: int, bits: int) -> None:
        super().__init__()
        n, blocks, _ = tensors["B"].shape
        self.k, self.n, self.bits, self.block = in_features, n, bits, in_features // blocks
        self.register_buffer("qb", tensors["B"])
        self.register_buffer("scales", tensors["scales"])
        self.register_buffer("zero_points", tensors.get("zero_points", torch.zeros(0, dtype=torch.uint8)))
        self.register_buffer("bias", tensors.get("bias", torch.zeros(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMulNBits.apply(x, self.qb, self.scales, self.zero_points, self.bias, self.k, self.n, self.bits, self.block)


class QuantizedInput(nn.Module):
    """A MatMulNBitsLinear behind its input's reassembly (QLLM) and per-token activation quantization,
    traced to plain ONNX operations."""

    def __init__(self, inner: MatMulNBitsLinear, act: ActScheme | None, index: torch.Tensor | None,
                 scale: torch.Tensor | None) -> None:
        super().__init__()
        self.inner, self.act = inner, act
        self.register_buffer("reassembly_index", index)
        self.register_buffer("reassembly_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reassembly_index is not None:
            x = reassemble(x, self.reassembly_index, self.reassembly_scale)
        if self.act is not None:
            x = fake_quantize_tokens(x, self.act)
        return self.inner(x)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def write_model(src: Path, state: dict[str, torch.Tensor], out: Path, schemes: LayerSchemes, options: dict) -> None:
    """Trace the eqat model, its quantized linears swapped for `MatMulNBitsLinear`, to `out/model.onnx`."""
    import onnx

    from eqat.io.checkpoint import load_quantized

    model, _, meta = load_quantized(src)
    model.config._attn_implementation = "eager"  # sdpa and flex do not trace to ONNX
    model.float()
    for name in meta["quantized_modules"]:  # each node has its own bits (mixed precision)
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        tensors = {t: state[f"{name}.{t}"] for t in ("B", "scales", "zero_points", "bias", "reassembly_index",
                                                     "reassembly_scale") if f"{name}.{t}" in state}
        new: nn.Module = MatMulNBitsLinear(tensors, old.in_features, onnx_bits(schemes(name), options))
        if schemes(name).act is not None or "reassembly_index" in tensors:
            new = QuantizedInput(new, schemes(name).act, tensors.get("reassembly_index"), tensors.get("reassembly_scale"))
        setattr(model.get_submodule(parent), child, new)
    ids = torch.zeros(1, 8, dtype=torch.int64)
    path = out / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings are about shapes it keeps dynamic below
        torch.onnx.export(_Logits(model.eval()), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=OPSET, do_constant_folding=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch", 1: "sequence"}})
    graph = onnx.load(str(path))
    graph.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    external = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    onnx.save_model(graph, str(path), save_as_external_data=external, location="model.onnx.data")


def quantization_config(schemes: LayerSchemes, options: dict) -> dict[str, Any]:
    """The default scheme's fields; `modules` lists the nodes with their own (each MatMulNBits node
    carries its bits and block size, so the graph needs nothing else)."""
    scheme = schemes.default
    modules = {name: {"bits": onnx_bits(s, options), "source_bits": s.bits, "group_size": s.group_size,
                      "symmetric": s.symmetric, **({} if s.act is None else {"activations": s.act.to_dict()})}
               for name, s in schemes.layers.items()}
    return {"quant_method": "onnx-matmulnbits", "bits": onnx_bits(scheme, options), "source_bits": scheme.bits,
            "group_size": scheme.group_size, "symmetric": scheme.symmetric,
            "activations": None if scheme.act is None else scheme.act.to_dict(), "opset": OPSET,
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "kv_cache": False,
            **({"modules": modules} if modules else {})}


ONNX = register(Exporter(
    name="onnx",
    summary="ONNX graph with com.microsoft::MatMulNBits linears (onnxruntime, CPU)",
    why_not=why_not, convert_layer=convert_layer, quantization_config=quantization_config,
    options={"widen_3bit": True}, write_model=write_model, holds_mixed=True, holds_activations=True,
    holds_reassembly=True, holds_mixed_activations=True,
    runtimes="onnxruntime (CPU; 2/4/8-bit, 3-bit widened to 4-bit, 6-bit to 8-bit; activations quantized per token "
             "and QLLM's reassembly as graph operations)",
))
