"""Quantizer maths (the "how"): pure tensor functions plus one learnable module.

Asymmetric uniform quantization per group of `g` consecutive input channels of each output
row of a weight `W [N, K]`, with `G = K / g` groups:

    q     = clamp(round(W / s) + z, 0, 2^b - 1)      codes, [N, K]
    W_hat = (q - z) * s                               s, z: [N, G], broadcast over each group

Training uses straight-through estimators (STE): `round` passes the gradient unchanged, and so
does the clamp of `s` to [SCALE_MIN, SCALE_MAX] (the gradient flows as if unclamped, so a scale
pushed below the floor can still come back); `z` is rounded and clamped to the grid in the
forward pass, both through STE. The clamp of `q` is an ordinary clamp: clipped weights get no
gradient through the rounding path, as in LSQ/EfficientQAT.

Valid range of a scale: [SCALE_MIN, SCALE_MAX] = [2^-16, 2^14]. A group whose weights are all
equal (a dead row, or padding) has range 0 and would get s = 0 and divide by zero; the floor
keeps it finite. 2^-16 (1.5e-5) is small enough not to coarsen any real group of a trained LLM
(typical steps are 1e-3 to 1e-1). Both limits are powers of two, exact in fp16 and bf16, so a
clamped scale survives the cast to the storage dtype unchanged. `valid_scale` and `valid_zero`
are the one definition of the clamps: the training forward (`fake_quantize`, through STE), the
codes (`quantize_codes`) and the packed layer (`QuantLinear.from_weight`) all apply them, so the
packed layer computes what training saw, whatever the optimizer did to the scales.
"""

from __future__ import annotations

import torch
from torch import nn

from eqat.core.scheme import ActScheme, QuantScheme

SCALE_MIN = 2.0**-16
SCALE_MAX = 2.0**14


def valid_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` clamped to [SCALE_MIN, SCALE_MAX], float32 (NaN stays NaN: the guards catch it)."""
    return scale.float().clamp(SCALE_MIN, SCALE_MAX)


def valid_zero(zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`zero` rounded to the integer grid [0, 2^b - 1], float32."""
    return torch.round(zero.float()).clamp(0, scheme.qmax)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) in the forward pass, identity gradient."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient (as if unclamped)."""
    return x + (x.clamp(lo, hi) - x).detach()


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g]."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def init_minmax(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest initialisation from each group's min and max.

    w: [N, K] float. Returns (scale, zero), both float32 [N, G]; zero is integer-valued.
    The range always includes 0 so the zero-point lies on the grid [0, 2^b - 1].
    Symmetric schemes use the GPTQ convention: s = 2 * absmax / (2^b - 1), z = 2^(b-1).
    """
    g = scheme.group_size_for(w.shape[1])
    wg = _grouped(w.detach().float(), g)
    wmin = wg.amin(dim=-1).clamp(max=0)
    wmax = wg.amax(dim=-1).clamp(min=0)
    if scheme.symmetric:
        absmax = torch.maximum(-wmin, wmax)
        scale = (2 * absmax / scheme.qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
    else:
        scale = ((wmax - wmin) / scheme.qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.round(-wmin / scale).clamp(0, scheme.qmax)
    return scale, zero


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                  storage: torch.dtype | None = None) -> torch.Tensor:
    """Differentiable W_hat = (q - z) * s with STE; gradients reach w, scale and zero.

    w: [N, K]; scale, zero: [N, G]. Returns [N, K] in w's dtype (computed in float32).
    `storage` (float16/bfloat16): use the scale rounded to the dtype it will be stored in, as the
    packed layer does (straight-through), so training sees exactly the codes and weights that
    packing produces; without it a weight near a rounding boundary can change code when packed.
    """
    g = scheme.group_size_for(w.shape[1])
    s, z = scale.float(), zero.float()
    stored = valid_scale(s) if storage is None else valid_scale(s).to(storage).float()
    s = (s + (stored - s).detach()).unsqueeze(-1)  # the clamps of valid_* and the storage cast, straight-through
    z = (z + (valid_zero(z, scheme) - z).detach()).unsqueeze(-1)
    q = torch.clamp(round_ste(_grouped(w.float(), g) / s) + z, 0, scheme.qmax)
    return ((q - z) * s).reshape(w.shape).to(w.dtype)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes of `w`: uint8 [N, K]. Uses exactly the arithmetic of `fake_quantize`."""
    g = scheme.group_size_for(w.shape[1])
    s = valid_scale(scale.detach()).unsqueeze(-1)
    z = valid_zero(zero.detach(), scheme).unsqueeze(-1)
    q = torch.clamp(torch.round(_grouped(w.detach().float(), g) / s) + z, 0, scheme.qmax)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W_hat = (codes - z) * s in float32. codes: [N, K] integer; scale, zero: [N, G]."""
    n, k = codes.shape
    g = k // scale.shape[1]
    w = (_grouped(codes.float(), g) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(n, k)


def quantize_tokens(x: torch.Tensor, act: ActScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of activations x [..., K]: (codes, scale, zero), float32, with
    scale and zero [..., 1] from each token's own range (which always includes 0).

    Asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s), codes in [0, 2^b - 1].
    Symmetric: s = absmax / (2^(b-1) - 1), z = 0, codes in [-2^(b-1), 2^(b-1) - 1] (int8 GEMM's grid).
    An all-zero token gets s = SCALE_MIN (its codes are all z, so it stays zero).
    """
    xf = x.float()
    if act.symmetric:
        qpos = (1 << (act.bits - 1)) - 1
        scale = (xf.abs().amax(-1, keepdim=True) / qpos).clamp_min(SCALE_MIN)
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(xf / scale), -qpos - 1, qpos)
    else:
        qmax = (1 << act.bits) - 1
        lo, hi = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp_min(SCALE_MIN)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        codes = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
    return codes, scale, zero


def fake_quantize_tokens(x: torch.Tensor, act: ActScheme) -> torch.Tensor:
    """x [..., K] quantized per token and dequantized, in x's dtype; the gradient passes straight
    through (the dynamic range holds every value, so nothing is clipped)."""
    codes, scale, zero = quantize_tokens(x, act)
    x_hat = ((codes - zero) * scale).to(x.dtype)
    return x + (x_hat - x).detach() if x.requires_grad else x_hat


class FakeQuantizer(nn.Module):
    """Learnable per-group scale and zero-point for one weight matrix (Block-AP, LR-QAT).

    Holds `scale` and `zero` as float32 parameters [N, G], initialised by `init_minmax`.
    For symmetric schemes the zero-point is a fixed buffer.
    """

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.scheme, self.storage = scheme, storage
        scale, zero = init_minmax(weight, scheme)
        self.scale = nn.Parameter(scale)
        if scheme.symmetric:
            self.register_buffer("zero", zero)
        else:
            self.zero = nn.Parameter(zero)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, self.zero, self.scheme, self.storage)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, self.scale, self.zero, self.scheme)
