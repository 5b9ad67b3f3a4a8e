"""Machine-readable run reports (JSON) and plots, written next to a run's output."""

from __future__ import annotations

import json
import os
import platform
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def cpu_description() -> str:
    """The CPU's model name and its widest x86 vector extension (timings differ ~3x between
    AVX2-only and AVX-512 machines), e.g. 'AMD EPYC, avx512f'; the platform's name elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{name}, {widest}" if widest else name


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded in every report."""
    import transformers

    from eqat import __version__

    return {
        "eqat": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary sibling, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_layer_errors(errors: dict[str, float], path: str | Path, title: str) -> None:
    """Relative weight error per block, one line per Linear kind (q_proj, down_proj, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for name, err in errors.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if m:
            series[m.group(2).rsplit(".", 1)[-1]].append((int(m.group(1)), err))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative weight error  ||W - W_hat||² / ||W||²")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def plot_block_losses(blocks: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Block-AP: reconstruction loss per block at initialisation (RTN) and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [b["block"] for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(idx, [b["init_loss"] for b in blocks], marker="o", markersize=3, label="before training (RTN init)")
    ax.plot(idx, [b["final_loss"] for b in blocks], marker="o", markersize=3, label="after training (packed)")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block output MSE (held-out windows)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_e2e_losses(log: list[dict[str, Any]], path: str | Path, title: str,
                    val_before: float | None = None, val_after: float | None = None) -> None:
    """E2E-QP: training loss per optimizer step, with the held-out loss before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] + 1 for r in log], [r["loss"] for r in log], marker="o", markersize=3, label="train loss (step)")
    n = len(log)
    if val_before is not None:
        ax.axhline(val_before, color="tab:red", ls="--", label=f"held-out before {val_before:.3f}")
    if val_after is not None:
        ax.axhline(val_after, color="tab:green", ls="--", label=f"held-out after {val_after:.3f}")
    ax.set_xlabel(f"optimizer step (of {n})")
    ax.set_ylabel("next-token NLL (nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_sensitivity(section: dict[str, Any], default: str, path: str | Path, title: str) -> None:
    """--avg-bits: each layer's measured sensitivity at the default scheme, one line per Linear kind,
    the layers the allocator promoted ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    for name, by_scheme in section["per_layer"].items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if m and default in by_scheme:
            series[m.group(2).rsplit(".", 1)[-1]].append((int(m.group(1)), by_scheme[default], name in section["promoted"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, pts in sorted(series.items()):
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", markersize=3, label=kind)
        up = [p for p in pts if p[2]]
        ax.scatter([p[0] for p in up], [max(p[1], 1e-12) for p in up], s=80, facecolors="none",
                   edgecolors=line.get_color(), linewidths=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel(f"sensitivity at {default} ({section['sensitivity']})")
    ax.set_title(title + f"; ringed: promoted ({len(section['promoted'])})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)
