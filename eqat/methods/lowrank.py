"""LR-QAT's layer: a low-rank adapter inside the rounding, over a frozen, downcast weight grid.

For a weight W0 [N, K] under a scheme of b bits in G groups of g input channels, at the start:

    s0, z0 = min/max (eqat's RTN) or an L_p grid search, per group      [N, G]
    U      = W0 / s0 + z0              the weight on the integer grid, with its fraction  [N, K]

U is stored frozen (the paper's Phi0 = W0 / s0, shifted by the integer zero-point so that it lies
in [0, 2^b - 1] for symmetric and asymmetric grids alike) and the float weight is dropped. Then

    V     = U + (alpha / r) * A @ B      A [N, r] zeros at the start, B [r, K] Kaiming-uniform
    q     = clamp(round(V) - z0 + z, 0, 2^b - 1)          z = z0 unless the zero-points train
    W_hat = s * (q - z)

so step 0 is RTN exactly. A, B and s train (z as an option, on the integer grid through STE).

Storage of U (`phi0`): "int8" is 8-bit fixed point with 8 - b fractional bits (Q4.4 at 4 bits, as
the paper), held as uint8 because U >= 0; "bfloat16"/"float16" cast it; "float32" keeps it. Where
downcasting would move U across a rounding boundary (so that round(U) would differ from the RTN
code), the integer code itself is stored instead, so the downcast never changes the start.

The forward (`LowRankQuantFn`) keeps only x, U, A, B, s and z for the backward and recomputes
W_hat there (the memory point of LR-QAT: no [N, K] float tensor per layer lives between forward
and backward). Gradients are the straight-through ones of eqat.core.quantizer: round passes the
gradient, the clamp of q stops it, the clamp and storage cast of s pass it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eqat.core.packing import pack_int32
from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import SCALE_MAX, SCALE_MIN, init_minmax, valid_scale, valid_zero
from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError

PHI0_STORAGE = ("int8", "bfloat16", "float16", "float32")
INITS = ("minmax", "lp")


def check_phi0(storage: str, bits: int) -> None:
    """Refuse a U storage that cannot hold a `bits`-bit grid with a fraction (EqatInputError)."""
    if storage not in PHI0_STORAGE:
        raise EqatInputError(f"--lr-qat-phi0 must be one of {', '.join(PHI0_STORAGE)}, got '{storage}'.")
    if storage == "int8" and bits >= 8:
        raise EqatInputError(f"--lr-qat-phi0 int8 keeps 8 - b fractional bits, none at {bits} bits: the frozen weights "
                             "would be the RTN codes. Use --lr-qat-phi0 bfloat16 (or float16/float32) at 8 bits.")


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def _expand(t: torch.Tensor, g: int) -> torch.Tensor:
    """[N, G] -> [N, G * g] (each group's value repeated over its channels)."""
    return t.repeat_interleave(g, dim=1)


def init_lp(w: torch.Tensor, scheme: QuantScheme, p: float = 4.0, grid: int = 100,
            max_shrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (scale, zero) [N, G] float32 among min/max ranges shrunk by 1 - i / grid
    (i < max_shrink * grid) that minimises sum |W - W_hat|^p over the group (the paper's L_p init)."""
    g = scheme.group_size_for(w.shape[1])
    wg = _grouped(w.detach().float(), g)
    best_scale, best_zero = init_minmax(w, scheme)
    best_err = torch.full_like(best_scale, float("inf"))
    wmin, wmax = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    for i in range(int(max_shrink * grid)):
        t = 1 - i / grid
        lo, hi = wmin * t, wmax * t
        if scheme.symmetric:
            scale = (2 * torch.maximum(-lo, hi) / scheme.qmax).clamp(SCALE_MIN, SCALE_MAX)
            zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
        else:
            scale = ((hi - lo) / scheme.qmax).clamp(SCALE_MIN, SCALE_MAX)
            zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, scheme.qmax)
        err = ((q - zero[..., None]) * scale[..., None] - wg).abs().pow(p).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def frac_bits(bits: int) -> int:
    return 8 - bits


def store_grid(u: torch.Tensor, codes: torch.Tensor, storage: str, bits: int) -> torch.Tensor:
    """U [N, K] float32 in its storage form: uint8 fixed point (`int8`, 8 - bits fractional bits)
    or a float dtype. `codes` (the RTN codes round-clamp(U)) replace any entry whose downcast would
    round to another code."""
    if storage == "int8":
        f = 2.0 ** frac_bits(bits)
        stored = torch.round(u * f).clamp(0, 255)
        moved = torch.round(stored / f).clamp(0, (1 << bits) - 1) != codes
        return torch.where(moved, codes * f, stored).to(torch.uint8)
    dtype = getattr(torch, storage)
    stored = u.to(dtype)
    moved = torch.round(stored.float()).clamp(0, (1 << bits) - 1) != codes
    return torch.where(moved, codes.to(dtype), stored)


def load_grid(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """U as float32 from its storage form (exact: every stored value is representable)."""
    if stored.dtype == torch.uint8:
        return stored.float() / 2.0 ** frac_bits(bits)
    return stored.float()


def lowrank_weight(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   zero0: torch.Tensor, c: float, scheme: QuantScheme,
                   storage: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_hat, q - z, inside, stored scale s) float32 [N, K] / [N, G]: the forward formula without
    autograd. `inside` is where round(V) - z0 + z lies on the grid (where gradients pass)."""
    g = scheme.group_size_for(u.shape[1])
    s = valid_scale(scale) if storage is None else valid_scale(scale).to(storage).float()
    z = valid_zero(zero, scheme)
    shift = _expand(z - zero0.float(), g)
    raw = torch.round(u + c * (a.float() @ b.float())) + shift
    inside = (raw >= 0) & (raw <= scheme.qmax)
    qz = raw.clamp(0, scheme.qmax) - _expand(z, g)
    return qz * _expand(s, g), qz, inside, s


class LowRankQuantFn(torch.autograd.Function):
    """y = x @ W_hat^T + bias, W_hat recomputed in the backward instead of saved."""

    @staticmethod
    def forward(ctx, x, phi0, a, b, scale, zero, zero0, bias, c, scheme, storage):
        w, _, _, _ = lowrank_weight(load_grid(phi0, scheme.bits), a, b, scale, zero, zero0, c, scheme, storage)
        ctx.save_for_backward(x, phi0, a, b, scale, zero, zero0)  # the stored grid (uint8 for int8), not U or W_hat
        ctx.c, ctx.scheme, ctx.storage, ctx.has_bias = c, scheme, storage, bias is not None
        y = F.linear(x.reshape(-1, x.shape[-1]), w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return y.view(*x.shape[:-1], -1)  # 2-D as the packed layer's reference path, so A = 0 matches it bit for bit

    @staticmethod
    def backward(ctx, gy):
        x, phi0, a, b, scale, zero, zero0 = ctx.saved_tensors
        scheme, c = ctx.scheme, ctx.c
        g = scheme.group_size_for(phi0.shape[1])
        w, qz, inside, s = lowrank_weight(load_grid(phi0, scheme.bits), a, b, scale, zero, zero0, c, scheme, ctx.storage)
        gx = (gy.float() @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # [N, K]
        gscale = _grouped(gw * qz, g).sum(-1) if ctx.needs_input_grad[4] else None
        gws = gw * _expand(s, g)
        gv = gws * inside  # through round (STE) and the clamp of q
        ga = c * (gv @ b.float().T) if ctx.needs_input_grad[2] else None
        gb = c * (a.float().T @ gv) if ctx.needs_input_grad[3] else None
        # z enters as s * (clamp(round(V) - z0 + z) - z): d/dz = s * (inside - 1), z rounded by STE
        gzero = _grouped(gws * (inside.float() - 1), g).sum(-1) if ctx.needs_input_grad[5] else None
        gbias = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[7] else None
        return gx, None, ga, gb, gscale, gzero, None, gbias, None, None, None


class LowRankQuantLinear(nn.Module):
    """A Linear trained by LR-QAT: frozen grid U (buffer `phi0`), trainable `lora_a` [N, r],
    `lora_b` [r, K] and `scale` [N, G] (float32), zero-point `zero` [N, G] (a buffer, or a
    Parameter with `train_zeros`)."""

    def __init__(self, u: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, scheme: QuantScheme, rank: int, alpha: float, phi0: str,
                 storage: torch.dtype | None, train_zeros: bool, generator: torch.Generator) -> None:
        super().__init__()
        n, k = u.shape
        check_phi0(phi0, scheme.bits)
        if not 1 <= rank <= min(n, k):
            raise EqatInputError(f"--lr-qat-rank {rank} does not fit a {n} x {k} layer: use 1 to {min(n, k)} "
                                 "(the smaller side of the smallest layer).")
        self.in_features, self.out_features, self.scheme = k, n, scheme
        self.rank, self.alpha, self.phi0_storage, self.storage = rank, alpha, phi0, storage
        self.register_buffer("phi0", store_grid(u, codes, phi0, scheme.bits))
        self.register_buffer("zero0", zero.detach().float().clone())
        if bias is not None:  # frozen, and as the packed layer will store it
            bias = bias.detach().to(storage).float() if storage is not None else bias.detach().float().clone()
        self.register_buffer("bias", bias)
        self.scale = nn.Parameter(scale.detach().float().clone())
        z = zero.detach().float().clone()
        if train_zeros and not scheme.symmetric:
            self.zero = nn.Parameter(z)
        else:
            self.register_buffer("zero", z)
        self.lora_a = nn.Parameter(torch.zeros(n, rank, device=u.device))
        bound = 1 / math.sqrt(k)  # Kaiming-uniform with a = sqrt(5), as nn.Linear, peft and the reference code
        self.lora_b = nn.Parameter((torch.rand(rank, k, generator=generator) * 2 - 1).mul_(bound).to(u.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, init: str = "minmax", **kw) -> "LowRankQuantLinear":
        """From full precision: U = W0 / s0 + z0 with (s0, z0) by min/max or the L_p search."""
        w = linear.weight.detach().float()
        scale, zero = init_minmax(w, scheme) if init == "minmax" else init_lp(w, scheme)
        g = scheme.group_size_for(w.shape[1])
        s = valid_scale(scale) if kw.get("storage") is None else valid_scale(scale).to(kw["storage"]).float()
        ratio = w / _expand(s, g)
        u = ratio + _expand(zero, g)
        codes = (torch.round(ratio) + _expand(zero, g)).clamp(0, scheme.qmax)  # eqat's RTN codes, bit for bit
        return cls(u, codes, s, zero, linear.bias, scheme, **kw)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, **kw) -> "LowRankQuantLinear":
        """From a packed layer: U = its codes (integers, exact in every storage), s and z its own."""
        codes = layer.codes().float()
        return cls(codes, codes, layer.scales.float(), layer.zeros.float(), layer.bias, layer.scheme, **kw)

    @property
    def c(self) -> float:
        return self.alpha / self.rank

    def grid(self) -> torch.Tensor:
        """U as float32 [N, K]."""
        return load_grid(self.phi0, self.scheme.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LowRankQuantFn.apply(x, self.phi0, self.lora_a, self.lora_b, self.scale, self.zero, self.zero0,
                                    self.bias, self.c, self.scheme, self.storage)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes the packed layer will hold: uint8 [N, K]."""
        _, qz, _, _ = lowrank_weight(self.grid(), self.lora_a, self.lora_b, self.scale, self.zero, self.zero0,
                                     self.c, self.scheme, self.storage)
        g = self.scheme.group_size_for(self.in_features)
        return (qz + _expand(valid_zero(self.zero, self.scheme), g)).round().to(torch.uint8)

    @torch.no_grad()
    def to_quant_linear(self, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """The packed layer: codes clamp(round(U + c A B) - z0 + z), the learned scale stored in `dtype`."""
        layer = QuantLinear(self.in_features, self.out_features, self.scheme, bias=self.bias is not None, dtype=dtype,
                            device=self.phi0.device)
        layer.qweight.copy_(pack_int32(self.codes(), self.scheme.bits))
        layer.scales.data.copy_(valid_scale(self.scale).to(dtype))
        layer.zeros.data.copy_(valid_zero(self.zero, self.scheme).to(dtype))
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.to(dtype))
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"rank={self.rank}, alpha={self.alpha}, phi0={self.phi0_storage}")
