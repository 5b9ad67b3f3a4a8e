"""Activation streams for block-wise training: n samples x [T, H] hidden states.

A stream lives in a raw file (`<name>.bin`, row-major [n, T, H] in `dtype`) so a run can
resume from it. With `offload="cpu"` the tensor is held in memory and written to its file
with `save()`; with `offload="disk"` it is memory-mapped (`torch.from_file(shared=True)`):
writes go to the page cache and the file, and only the pages in use stay in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

OFFLOADS = ("cpu", "disk")


class ActivationStream:
    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: torch.dtype, offload: str, tensor: torch.Tensor):
        self.path, self.shape, self.dtype, self.offload, self.data = path, shape, dtype, offload, tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int, int], dtype: torch.dtype, offload: str) -> "ActivationStream":
        """A new zero-filled stream. Disk streams get their file now; cpu streams on save()."""
        if offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
        n = shape[0] * shape[1] * shape[2]
        if offload == "disk":
            from eqat.io.checkpoint import check_free_space

            check_free_space(path.parent, n * torch.empty((), dtype=dtype).element_size(), f"the activation stream {path.name}")
            with open(path, "wb") as f:
                f.truncate(n * torch.empty((), dtype=dtype).element_size())
            data = torch.from_file(str(path), shared=True, size=n, dtype=dtype).view(shape)
        else:
            data = torch.zeros(shape, dtype=dtype)
        return cls(path, shape, dtype, offload, data)

    @classmethod
    def open(cls, path: Path, shape: tuple[int, int, int], dtype: torch.dtype, offload: str) -> "ActivationStream":
        """An existing stream file (to resume a run)."""
        n = shape[0] * shape[1] * shape[2]
        expected = n * torch.empty((), dtype=dtype).element_size()
        if not path.is_file() or path.stat().st_size != expected:
            raise FileNotFoundError(f"activation file {path} is missing or has the wrong size (expected {expected} bytes)")
        data = torch.from_file(str(path), shared=offload == "disk", size=n, dtype=dtype).view(shape)
        return cls(path, shape, dtype, offload, data)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.data[idx]

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.to(self.dtype)

    def save(self) -> None:
        """Make the file hold the data (atomically for in-memory streams)."""
        if self.offload == "disk":
            return  # already the file; the kernel writes dirty pages back even if we are killed
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.data.contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, self.path)

    def release(self) -> None:
        self.data = None  # type: ignore[assignment]
