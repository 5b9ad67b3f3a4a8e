"""Triton kernels over eqat's packed layout: forward GEMM/GEMV and the two E2E-QP backwards.

Layout read here (eqat.core.packing): qweight int32 [N, W], codes packed along K as one bit stream,
code k of a row at stream bits [k*b, (k+1)*b), stream bit i = bit (i % 32) of word i // 32;
for b = 3, codes whose bits straddle two words take their high bits from the next word.
scales [N, G] (fp16/bf16/fp32), zeros [N, G] float32 integer-valued; W_hat = (q - z) * s with
group g = k // GROUP. Every kernel dequantizes tiles in registers: no dense weight in memory.

M_BUCKET (M rounded up to a power of two) is unused by the kernels: it keys the autotuner, so
a tuned configuration is shared by similar M instead of re-tuned for every prompt length.

Import this module only through `eqat.kernels.triton_ops`: `triton.jit` reads TRITON_INTERPRET
when a kernel is defined, so the choice between the GPU and the CPU interpreter is made here.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_2d(ptr, offs_r, offs_c, stride_r, stride_c, R, C):
    """The tile ptr[offs_r, offs_c] (0 outside [R, C])."""
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _group_param(ptr, offs_n, k0, N, K, G, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """A per-group scale or zero-point for the tile at k0, as float32: one value per row,
    [BLOCK_N, 1], when the tile lies inside one group (GROUP a multiple of BLOCK_K; tiles start
    at multiples of BLOCK_K), else gathered per element, [BLOCK_N, BLOCK_K]."""
    if GROUP % BLOCK_K == 0:  # a static branch: one return, whose shape depends on it
        # a tile past K (a split-K remainder) reads the last group; _centered_tile zeroes it
        v = tl.load(ptr + offs_n * G + tl.minimum(k0 // GROUP, G - 1), mask=offs_n < N, other=0.0)[:, None]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        v = tl.load(ptr + offs_n[:, None] * G + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _centered_tile(qw_ptr, z_ptr, offs_n, k0, N, K, W, G,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """(q - z) as float32 [BLOCK_N, BLOCK_K] for columns k0 .. k0 + BLOCK_K (0 outside [N, K])."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32)[None, :]
    row = qw_ptr + offs_n[:, None] * W
    w0 = tl.load(row + word[None, :], mask=mask, other=0)
    code = (w0 >> shift) & ((1 << BITS) - 1)
    if BITS == 3:
        # int32 shifts are arithmetic: keep only the code's low bits from the first word
        spill = (shift + BITS) > 32
        low_bits = tl.where(spill, 32 - shift, 1)
        w1 = tl.load(row + word[None, :] + 1, mask=mask & spill, other=0)
        low = (w0 >> shift) & tl.where(spill, (1 << low_bits) - 1, (1 << BITS) - 1)
        high = tl.where(spill, w1 << tl.where(spill, 32 - shift, 0), 0)
        code = (low | high) & ((1 << BITS) - 1)
    return tl.where(mask, code.to(tl.float32) - _group_param(z_ptr, offs_n, k0, N, K, G, GROUP, BLOCK_K), 0.0)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, W, G,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """W_hat = (q - z) * s as float32 [BLOCK_N, BLOCK_K] for columns k0 .. k0 + BLOCK_K."""
    s = _group_param(s_ptr, offs_n, k0, N, K, G, GROUP, BLOCK_K)
    return _centered_tile(qw_ptr, z_ptr, offs_n, k0, N, K, W, G, BITS, GROUP, BLOCK_K) * s


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """tl.dot with DOT = 0: the inputs' own precision (tensor cores, fp32 through TF32);
    1: IEEE fp32 (float32 activations); 2: both operands upcast to fp32 first (bfloat16 under
    the CPU interpreter, whose bfloat16 dot multiplies bit patterns: triton-lang/triton#11584;
    exact, since bf16 x bf16 products fit in fp32)."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def quant_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, W, G,
    stride_xm, stride_xk, stride_ym, stride_yn, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tiled GEMM y[M, N] = x[M, K] @ W_hat[N, K]^T (+ bias), for prefill and training."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: neighbouring programs share weight tiles in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_2d(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, W, G, BITS, GROUP, BLOCK_K)
        acc += _dot(x, tl.trans(w.to(x.dtype)), DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def quant_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, acc_ptr,
    M, N, K, W, G,
    stride_xm, stride_xk,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Decode path (M <= 16, BLOCK_M = 1 or 16): acc[M, N] (float32, zeroed when SPLIT_K > 1)
    += x @ W_hat^T over this program's share of K. Split-K spreads a skinny product over more programs; a weight is read once.
    Bias and the cast to the activations' dtype are left to the caller."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_2d(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, W, G, BITS, GROUP, BLOCK_K)
        if BLOCK_M == 1:  # one row: a multiply and a sum over K on CUDA cores
            acc += tl.sum(x.to(tl.float32) * w, axis=1)[None, :]
        else:  # 2..16 rows, padded to a 16-row tensor-core tile (the weight read dominates)
            acc += _dot(x, tl.trans(w.to(x.dtype)), DOT)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def quant_grad_input_kernel(
    gy_ptr, qw_ptr, s_ptr, z_ptr, gx_ptr,
    M, N, K, W, G,
    stride_gm, stride_gn, stride_xm, stride_xk, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/dx [M, K] = dL/dy [M, N] @ W_hat [N, K]; tiles over (M, K), reduces over N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gy = _load_2d(gy_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, pid_k * BLOCK_K, N, K, W, G, BITS, GROUP, BLOCK_K)
        acc += _dot(gy, w.to(gy.dtype), DOT)
    tl.store(gx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
             acc.to(gx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def quant_grad_scales_kernel(
    gy_ptr, x_ptr, qw_ptr, z_ptr, ps_ptr, pz_ptr,
    M, N, K, W, G, T,
    stride_gm, stride_gn, stride_xm, stride_xk, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-tile partial sums for the step-size (and zero-point) gradients, never forming the
    dense dL/dW_hat: with Gt = dL/dy^T @ x on this (N, K) tile (BLOCK_K divides GROUP, so the
    tile lies in one group), ps[n, t] = sum_k Gt[n, k] * (q - z)[n, k], pz[n, t] = sum_k Gt[n, k].
    ps, pz: float32 [N, T] with T = K // BLOCK_K; the caller sums the tiles of each group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        gy_t = _load_2d(gy_ptr, offs_n, offs_m, stride_gn, stride_gm, N, M)
        x = _load_2d(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        acc += _dot(gy_t, x.to(gy_t.dtype), DOT)
    q_minus_z = _centered_tile(qw_ptr, z_ptr, offs_n, pid_k * BLOCK_K, N, K, W, G, BITS, GROUP, BLOCK_K)
    mask_n = offs_n < N
    tl.store(ps_ptr + offs_n * T + pid_k, tl.sum(acc * q_minus_z, axis=1), mask=mask_n)
    tl.store(pz_ptr + offs_n * T + pid_k, tl.sum(acc, axis=1), mask=mask_n)
