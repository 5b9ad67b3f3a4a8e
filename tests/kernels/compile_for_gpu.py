"""Compile eqat's Triton kernels for NVIDIA targets without a GPU (ptxas ships with Triton).

The interpreter checks the arithmetic; this checks what only the compiler sees: that every
kernel lowers for sm_80 and sm_90 (tl.dot shapes and dtypes, static branches, atomics) and that
the autotuning candidates fit the chip's shared memory. Run in its own process without
TRITON_INTERPRET (the kernels must be real JIT functions); prints one JSON list.

    python tests/kernels/compile_for_gpu.py
"""

from __future__ import annotations

import json
import os

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from eqat.kernels import triton_kernels as k  # noqa: E402
from eqat.kernels.triton_ops import TUNING  # noqa: E402

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block, opt-in maximum


def pointers(act: str) -> dict[str, dict[str, str]]:
    return {
        "matmul": dict(x_ptr=act, qw_ptr="*i32", s_ptr=act, z_ptr="*fp32", b_ptr=act, y_ptr=act),
        "gemv": dict(x_ptr=act, qw_ptr="*i32", s_ptr=act, z_ptr="*fp32", acc_ptr="*fp32"),
        "grad_input": dict(gy_ptr=act, qw_ptr="*i32", s_ptr=act, z_ptr="*fp32", gx_ptr=act),
        "grad_scales": dict(gy_ptr=act, x_ptr=act, qw_ptr="*i32", z_ptr="*fp32", ps_ptr="*fp32", pz_ptr="*fp32"),
    }


FNS = {"matmul": k.quant_matmul_kernel, "gemv": k.quant_gemv_kernel, "grad_input": k.quant_grad_input_kernel,
       "grad_scales": k.quant_grad_scales_kernel}


def compile_one(kernel: str, act: str, bits: int, group: int, config: dict, arch: int, **extra) -> dict:
    fn = FNS[kernel]
    consts = {key: v for key, v in config.items() if key not in ("warps", "stages")}
    consts.update(BITS=bits, GROUP=group, DOT=1 if act == "*fp32" else 0, **extra)
    if kernel == "matmul":
        consts["HAS_BIAS"] = True
    if kernel == "grad_scales":
        consts["BLOCK_K"] = 64
    ptrs = pointers(act)[kernel]
    signature = {name: "constexpr" if name in consts else ptrs.get(name, "i32") for name in fn.arg_names}
    row = dict(kernel=kernel, act=act[1:], bits=bits, group=group, arch=arch,
               config={key: v for key, v in consts.items() if key.startswith(("BLOCK", "SPLIT"))})
    try:
        c = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=config["warps"], num_stages=config.get("stages", 3)))
        row.update(ok=True, shared=c.metadata.shared, fits=c.metadata.shared <= SHARED_LIMIT[arch])
    except Exception as exc:  # reported, the test fails on it
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-400:]}")
    return row


def main() -> None:
    rows = []
    # every autotuning candidate, fp16, 4-bit, group 128, on Hopper
    for kernel, space in TUNING.items():
        for config in space:
            extra = dict(BLOCK_M=1) if kernel == "gemv" else {}
            rows.append(compile_one(kernel, "*fp16", 4, 128, config, 90, **extra))
    # 3-bit (codes straddling words), bf16, fp32, the 16-row GEMV and Ampere, on the first candidate
    for kernel, space in TUNING.items():
        extra = dict(BLOCK_M=16) if kernel == "gemv" else {}
        for act, bits, arch in [("*fp16", 3, 90), ("*bf16", 3, 90), ("*fp32", 4, 90), ("*fp16", 3, 80)]:
            rows.append(compile_one(kernel, act, bits, 64, space[0], arch, **extra))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
