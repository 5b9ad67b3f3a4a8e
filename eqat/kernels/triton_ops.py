"""Launchers for eqat's Triton kernels (eqat/kernels/triton_kernels.py) and `TritonOps`.

`TritonOps` has the same three methods as `eqat.kernels.reference.TorchOps`, so one autograd
function (`PackedLinearFunction`) trains through either. Which layers Triton serves is stated
by `triton_why_not`, the dispatcher's source of refusals.

On CUDA the kernels are autotuned (once per shape bucket); under `TRITON_INTERPRET=1` (CPU,
for tests) one fixed configuration runs, since the interpreter executes every candidate.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from types import SimpleNamespace

import torch

GEMV_MAX_M = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def scale_grad_block_k(group: int) -> int:
    """Largest power of two <= 128 dividing `group` (0 if none >= 16): the K tile of the
    step-size gradient kernel, which must lie inside one group."""
    block = 128
    while block >= 16:
        if group % block == 0:
            return block
        block //= 2
    return 0


def triton_why_not(device: torch.device, bits: int, group: int, dtype: torch.dtype) -> str | None:
    """None if the Triton kernels serve this layer and call, else the reason they do not."""
    if not triton_installed():
        return "Triton is not installed: pip install 'eqat[triton]' (CUDA machines ship it with torch)"
    if device.type == "cpu" and not interpreting():
        return "Triton kernels run on CUDA; on CPU only under TRITON_INTERPRET=1 (the interpreter, for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA, not {device.type}"
    if bits not in (2, 3, 4, 8):
        return f"the Triton kernels serve bits 2/3/4/8, not {bits}"
    if dtype not in DTYPES:
        return f"the Triton kernels take float16/bfloat16/float32 activations, not {dtype}"
    if not scale_grad_block_k(group):
        return (f"the Triton kernels need a group size with a power-of-two divisor >= 16 (32, 64, 128, "
                f"or per-channel with in_features such as 576); this layer's group is {group}")
    return None


# Autotuning candidates on CUDA (tile sizes, warps, pipeline stages). Each compiles for sm_80
# and sm_90 within their shared memory (tests/kernels/test_triton_compile.py checks).
TUNING: dict[str, list[dict]] = {
    "matmul": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, warps=w, stages=st)
               for bm, bn, bk, w, st in [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                         (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 3)]],
    "gemv": [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, warps=w)
             for bn, bk, sk, w in [(32, 128, 1, 4), (64, 128, 1, 4), (32, 256, 2, 4), (64, 64, 4, 4),
                                   (32, 128, 4, 4), (16, 256, 8, 2), (64, 128, 8, 4), (128, 64, 2, 4)]],
    "grad_input": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, warps=w, stages=st)
                   for bm, bn, bk, w, st in [(128, 64, 64, 8, 3), (128, 32, 64, 4, 4), (64, 64, 64, 4, 4),
                                             (64, 32, 128, 4, 3)]],
    "grad_scales": [dict(BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=st)
                    for bm, bn, w, st in [(64, 128, 8, 3), (32, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3)]],
}


def _configs(space: list[dict]) -> list:
    """triton.Config objects from dicts of tile sizes plus `warps` and optional `stages`."""
    import triton

    configs = []
    for c in space:
        tiles = {key: v for key, v in c.items() if key not in ("warps", "stages")}
        configs.append(triton.Config(tiles, num_warps=c["warps"], num_stages=c.get("stages", 3)))
    return configs


@lru_cache(maxsize=None)
def kernels() -> SimpleNamespace:
    """The jitted kernels, autotuned on CUDA; imported on first use (see the module note)."""
    import triton

    from eqat.kernels import triton_kernels as k

    if interpreting():
        return SimpleNamespace(matmul=k.quant_matmul_kernel, gemv=k.quant_gemv_kernel,
                               grad_input=k.quant_grad_input_kernel, grad_scales=k.quant_grad_scales_kernel,
                               tuned=False, cdiv=triton.cdiv)
    key = ["M_BUCKET", "N", "K", "BITS", "GROUP"]
    return SimpleNamespace(
        matmul=triton.autotune(_configs(TUNING["matmul"]), key=key)(k.quant_matmul_kernel),
        gemv=triton.autotune(_configs(TUNING["gemv"]), key=["M", "N", "K", "BITS", "GROUP"],
                             reset_to_zero=["acc_ptr"])(k.quant_gemv_kernel),
        grad_input=triton.autotune(_configs(TUNING["grad_input"]), key=key)(k.quant_grad_input_kernel),
        grad_scales=triton.autotune(_configs(TUNING["grad_scales"]), key=key)(k.quant_grad_scales_kernel),
        tuned=True, cdiv=triton.cdiv,
    )


def _dot_mode(dtype: torch.dtype) -> int:
    """The kernels' DOT constexpr for these activations (see triton_kernels._dot)."""
    if dtype == torch.float32:
        return 1
    return 2 if dtype == torch.bfloat16 and interpreting() else 0


def _m_bucket(m: int) -> int:
    return min(1 << max(m - 1, 0).bit_length(), 8192)


def _layout(qweight: torch.Tensor, per_group: torch.Tensor, in_features: int) -> tuple[int, int, int, int, int]:
    """(N, K, words per row, groups, group size) of a packed layer; per_group: scales or zeros [N, G]."""
    n, words = qweight.shape
    groups = per_group.shape[1]
    return n, in_features, words, groups, in_features // groups


def _tuning(ks: SimpleNamespace, m: int, **fixed: int) -> dict:
    """The autotuner's key (M_BUCKET), plus the fixed tiles the untuned (interpreter) path runs."""
    return {"M_BUCKET": _m_bucket(m), **({} if ks.tuned else fixed)}


class TritonOps:
    """The three primitives of a packed linear on Triton; 2-D inputs, shapes as in TorchOps."""

    name = "triton"

    @staticmethod
    def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, bits: int, in_features: int) -> torch.Tensor:
        """x [M, K] -> y [M, N] in x's dtype. zeros: float32 [N, G], integer-valued."""
        ks = kernels()
        m = x.shape[0]
        qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
        n, k, words, groups, group = _layout(qweight, scales, in_features)
        if m == 0:
            return x.new_empty(0, n)
        if m <= GEMV_MAX_M:
            acc = torch.zeros(m, n, device=x.device, dtype=torch.float32)
            fixed = {} if ks.tuned else dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)

            def grid(meta):
                return (ks.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

            ks.gemv[grid](x, qweight, scales, zeros, acc, m, n, k, words, groups, x.stride(0), x.stride(1),
                          BITS=bits, GROUP=group, DOT=_dot_mode(x.dtype), BLOCK_M=1 if m == 1 else 16, **fixed)
            if bias is not None:
                acc += bias.float()
            return acc.to(x.dtype)
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)

        def grid(meta):
            return (ks.cdiv(m, meta["BLOCK_M"]) * ks.cdiv(n, meta["BLOCK_N"]),)

        extra = _tuning(ks, m, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
        ks.matmul[grid](x, qweight, scales, zeros, bias if bias is not None else y, y, m, n, k, words, groups,
                        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                        BITS=bits, GROUP=group, HAS_BIAS=bias is not None, DOT=_dot_mode(x.dtype), **extra)
        return y

    @staticmethod
    def grad_input(grad_y: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, in_features: int) -> torch.Tensor:
        """dL/dy [M, N] -> dL/dx [M, K] in dL/dy's dtype."""
        ks = kernels()
        m = grad_y.shape[0]
        qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
        n, k, words, groups, group = _layout(qweight, scales, in_features)
        gx = torch.empty(m, k, device=grad_y.device, dtype=grad_y.dtype)

        def grid(meta):
            return (ks.cdiv(m, meta["BLOCK_M"]), ks.cdiv(k, meta["BLOCK_K"]))

        extra = _tuning(ks, m, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
        ks.grad_input[grid](grad_y, qweight, scales, zeros, gx, m, n, k, words, groups,
                            grad_y.stride(0), grad_y.stride(1), gx.stride(0), gx.stride(1),
                            BITS=bits, GROUP=group, DOT=_dot_mode(grad_y.dtype), **extra)
        return gx

    @staticmethod
    def grad_scales(grad_y: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                    bits: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_k G (q - z), sum_k G) per group, both float32 [N, G], with G = dL/dy^T @ x."""
        ks = kernels()
        m = grad_y.shape[0]
        qweight, zeros = qweight.contiguous(), zeros.contiguous()
        n, k, words, groups, group = _layout(qweight, zeros, in_features)
        block_k = scale_grad_block_k(group)
        tiles = k // block_k
        ps = torch.empty(n, tiles, device=x.device, dtype=torch.float32)
        pz = torch.empty_like(ps)
        dtype = grad_y.dtype if grad_y.dtype == x.dtype else torch.float32
        gy, xx = grad_y.to(dtype), x.to(dtype)

        def grid(meta):
            return (ks.cdiv(n, meta["BLOCK_N"]), tiles)

        extra = _tuning(ks, m, BLOCK_M=32, BLOCK_N=32)
        ks.grad_scales[grid](gy, xx, qweight, zeros, ps, pz, m, n, k, words, groups, tiles,
                             gy.stride(0), gy.stride(1), xx.stride(0), xx.stride(1),
                             BITS=bits, GROUP=group, DOT=_dot_mode(dtype), BLOCK_K=block_k, **extra)
        return ps.view(n, groups, -1).sum(-1), pz.view(n, groups, -1).sum(-1)

