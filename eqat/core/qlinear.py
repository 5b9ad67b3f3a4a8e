"""`QuantLinear`: a Linear whose weight is stored as packed integer codes.

Storage (eqat's canonical layout, see docs/checkpoint-format.md):
    qweight  int32 [N, packed_length(K, b)]  codes packed along K (eqat.core.packing)
    scales   fp16/bf16 [N, G]                 step size per (row, group)
    zeros    fp16/bf16 [N, G]                 integer-valued zero-point per (row, group)
    bias     [N] (optional)
    reassembly_index int32 [2, K], reassembly_scale float32 [K]   (optional: QLLM's channel
             reassembly of the input, eqat.core.reassembly; applied before activation quantization)

`scales` and `zeros` are Parameters with requires_grad=False so E2E-QP can switch the
scales on without changing the module. The forward dispatches to `eqat.kernels`.
"""

from __future__ import annotations

import torch
from torch import nn

from eqat.kernels import select_backend
from eqat.kernels.reference import dequantize_packed
from eqat.core.packing import pack_int32, packed_length, unpack_int32
from eqat.core.reassembly import check_reassembly, reassemble
from eqat.core.quantizer import fake_quantize_tokens, init_minmax, quantize_codes, valid_scale, valid_zero
from eqat.core.scheme import QuantScheme


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        scheme.check_layer("QuantLinear", in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.num_groups(in_features)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_length(in_features, scheme.bits), dtype=torch.int32, device=device)
        )
        self.scales = nn.Parameter(torch.ones(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.zeros = nn.Parameter(torch.zeros(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("reassembly_index", None)
        self.register_buffer("reassembly_scale", None)

    @property
    def reassembled(self) -> bool:
        return self.reassembly_index is not None

    def set_reassembly(self, index: torch.Tensor, scale: torch.Tensor) -> "QuantLinear":
        """Give the layer a channel reassembly of its input (index int32 [2, K], scale float32 [K])."""
        if index.device.type != "meta":
            check_reassembly(index, scale, self.in_features, "QuantLinear")
        self.reassembly_index, self.reassembly_scale = index, scale
        return self

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        scheme: QuantScheme,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> "QuantLinear":
        """Quantize `weight [N, K]` with (scale, zero) [N, G] (min/max init when None).

        The scale is clamped to its valid range (`valid_scale`, as in the fake-quant forward) and
        rounded to `dtype` *before* the codes are computed, so the packed module dequantizes to
        exactly what a fake-quant forward with the stored scale gives.
        """
        n, k = weight.shape
        if scale is None or zero is None:
            scale, zero = init_minmax(weight, scheme)
        layer = cls(k, n, scheme, bias=bias is not None, dtype=dtype, device=weight.device)
        stored_scale = valid_scale(scale.detach()).to(dtype)
        stored_zero = valid_zero(zero.detach(), scheme)
        codes = quantize_codes(weight, stored_scale, stored_zero, scheme)
        layer.qweight.copy_(pack_int32(codes, scheme.bits))
        layer.scales.data.copy_(stored_scale)
        layer.zeros.data.copy_(stored_zero.to(dtype))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, dtype: torch.dtype = torch.float16) -> "QuantLinear":
        return cls.from_weight(linear.weight, scheme, bias=linear.bias, dtype=dtype)

    def codes(self) -> torch.Tensor:
        """uint8 codes [N, K]."""
        return unpack_int32(self.qweight, self.scheme.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 weight [N, K]."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.scheme.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype, on the backend
        `eqat.kernels.select_backend` picks (EQAT_KERNEL overrides). A scheme with activation
        quantization fake-quantizes x per token first (`fake_quantize_tokens`), after the channel
        reassembly when the layer has one."""
        out_dtype = x.dtype
        if self.scheme.act is not None:
            # in float32, whatever x's dtype: the integer GEMM this stands for (int8 x int8 -> int32, then
            # both scales) rounds nothing, and a bf16 product of codes and scales would (~1% perplexity)
            x = x.float()
        if self.reassembly_index is not None:
            x = reassemble(x, self.reassembly_index, self.reassembly_scale)
        if self.scheme.act is not None:
            x = fake_quantize_tokens(x, self.scheme.act)
        return self._matmul(x).to(out_dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.scales, self.zeros, self.bias))
        group = self.scheme.group_size_for(self.in_features)
        return select_backend(x.device, self.scheme.bits, group, x.dtype, needs_grad).forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"bias={self.bias is not None}, dtype={self.scales.dtype}" + (", reassembled" if self.reassembled else "")
        )
