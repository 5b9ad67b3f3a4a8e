"""Kernel backends for `y = x @ dequant(W)^T`, chosen per call.

Each backend declares what it serves as data (`KernelBackend.supports`) so a refusal can say
why. Today eqat ships the torch reference; the Triton and BitBLAS paths plug in here.
`EQAT_KERNEL=<name>` forces a backend; an unknown or unavailable one is a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from eqat.errors import EqatInputError
from eqat.kernels.reference import dequantize_packed, quant_linear_torch


@dataclass(frozen=True)
class KernelBackend:
    name: str
    fn: Callable[..., torch.Tensor]
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    install_hint: str = ""

    def why_not(self, device: torch.device, bits: int) -> str | None:
        """None if this backend serves (device, bits), else the reason it does not."""
        if device.type not in self.devices:
            return f"kernel '{self.name}' runs on {'/'.join(self.devices)}, not {device.type}"
        if bits not in self.bits:
            return f"kernel '{self.name}' serves bits {self.bits}, not {bits}"
        return None


BACKENDS: dict[str, KernelBackend] = {
    "torch": KernelBackend("torch", quant_linear_torch, devices=("cpu", "cuda", "mps", "xpu"), bits=(2, 3, 4, 8)),
}


def select_backend(device: torch.device, bits: int) -> KernelBackend:
    """The backend for this call: `EQAT_KERNEL` if set, else the first that serves it."""
    forced = os.environ.get("EQAT_KERNEL", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise EqatInputError(
                f"EQAT_KERNEL={forced!r} is not a kernel backend of this eqat build; "
                f"available: {', '.join(BACKENDS)}. Unset EQAT_KERNEL or pick one of those."
            )
        reason = BACKENDS[forced].why_not(device, bits)
        if reason:
            raise EqatInputError(f"EQAT_KERNEL={forced}: {reason}. Unset EQAT_KERNEL to pick automatically.")
        return BACKENDS[forced]
    for backend in BACKENDS.values():
        if backend.why_not(device, bits) is None:
            return backend
    raise EqatInputError(f"no kernel backend serves {bits}-bit weights on {device.type}")


__all__ = ["BACKENDS", "KernelBackend", "select_backend", "dequantize_packed", "quant_linear_torch"]
