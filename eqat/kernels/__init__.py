"""Kernel backends for `y = x @ dequant(W)^T`, chosen per call by `select_backend`.

    triton   eqat's Triton kernels (GEMV for M <= 16, tiled GEMM, E2E-QP backward); CUDA, or
             CPU under TRITON_INTERPRET=1 (tests only). Picked automatically on CUDA.
    bitblas  BitBLAS (optional extra, CUDA, 2/4-bit, float16), inference only; used only when
             asked for (EQAT_KERNEL=bitblas), weights transformed into its layout once per layer.
    torch    the plain-torch reference: unpack, dequantize, F.linear. Runs everywhere.

Each backend states what it serves through `why_not(device, bits, group, dtype)`, so a refusal
says why. `EQAT_KERNEL=torch|triton|bitblas` forces one; one that cannot serve the call is a
clear error, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from eqat.errors import EqatInputError
from eqat.kernels.bitblas_backend import bitblas_forward, bitblas_why_not
from eqat.kernels.reference import TorchOps, dequantize_packed, packed_linear, quant_linear_torch
from eqat.kernels.triton_ops import TritonOps, triton_why_not


def _torch_why_not(device: torch.device, bits: int, group: int, dtype: torch.dtype) -> str | None:
    return None if bits in (2, 3, 4, 6, 8) else f"kernel 'torch' serves bits 2/3/4/6/8, not {bits}"


def _layer_forward(ops: type) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    def forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, layer.qweight, layer.scales, layer.zeros, layer.bias,
                             layer.scheme.bits, layer.in_features, ops)

    return forward


@dataclass(frozen=True)
class KernelBackend:
    name: str
    forward: Callable[[Any, torch.Tensor], torch.Tensor]  # (QuantLinear, x [..., K]) -> y [..., N]
    why_not: Callable[[torch.device, int, int, torch.dtype], str | None]
    auto_devices: tuple[str, ...]  # device types on which it is picked without EQAT_KERNEL
    trains: bool = True  # has a backward (E2E-QP)


BACKENDS: dict[str, KernelBackend] = {
    "triton": KernelBackend("triton", _layer_forward(TritonOps), triton_why_not, auto_devices=("cuda",)),
    "bitblas": KernelBackend("bitblas", bitblas_forward, bitblas_why_not, auto_devices=(), trains=False),
    "torch": KernelBackend("torch", _layer_forward(TorchOps), _torch_why_not, auto_devices=("cpu", "cuda", "mps", "xpu")),
}


def select_backend(device: torch.device, bits: int, group: int, dtype: torch.dtype,
                   needs_grad: bool = False) -> KernelBackend:
    """The backend for this call: `EQAT_KERNEL` if set, else the first that serves it.

    group: the layer's effective group size (in_features when per-channel).
    """
    forced = os.environ.get("EQAT_KERNEL", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise EqatInputError(
                f"EQAT_KERNEL={forced!r} is not a kernel backend of this eqat build; "
                f"available: {', '.join(BACKENDS)}. Unset EQAT_KERNEL or pick one of those."
            )
        backend = BACKENDS[forced]
        reason = backend.why_not(device, bits, group, dtype)
        if reason is None and needs_grad and not backend.trains:
            reason = f"kernel '{forced}' is inference-only and has no backward for E2E-QP"
        if reason:
            raise EqatInputError(f"EQAT_KERNEL={forced}: {reason}. Unset EQAT_KERNEL to pick automatically.")
        return backend
    for backend in BACKENDS.values():
        if (device.type in backend.auto_devices and (backend.trains or not needs_grad)
                and backend.why_not(device, bits, group, dtype) is None):
            return backend
    raise EqatInputError(f"no kernel backend serves {bits}-bit weights with {dtype} activations on {device.type}")


__all__ = ["BACKENDS", "KernelBackend", "select_backend", "dequantize_packed", "packed_linear", "quant_linear_torch"]
