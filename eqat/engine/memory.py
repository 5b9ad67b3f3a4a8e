"""Peak memory of one phase of a run (not of the whole process).

On CUDA: `torch.cuda.max_memory_allocated` after a reset at entry. On CPU: a background thread
samples the process's resident set size (RSS, /proc/self/statm) every `interval` seconds, so
the peak is of the phase alone; ru_maxrss cannot do that (it only grows). Sampling can miss a
spike shorter than `interval`; tensors that live for a whole step are seen.
"""

from __future__ import annotations

import os
import resource
import threading
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best available
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Context manager: `with PeakMemory(device) as pm: ...; pm.peak_bytes, pm.to_dict()`."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def to_dict(self) -> dict[str, Any]:
        kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "process RSS, sampled"
        return {"peak_bytes": self.peak_bytes, "start_bytes": self.start_bytes,
                "peak_over_start_bytes": self.peak_bytes - self.start_bytes, "measure": kind}
