"""SHA-256 of the tensors of `model.safetensors` (and the report's perplexities) for fixed-seed runs
on a tiny model: the record a refactor that must not change numerics is compared against (issue 18).

The hash is over the tensors (sorted names, dtype, shape, bytes), not the file: safetensors writes
its `__metadata__` map in an order that varies from process to process (seen: the same tensors
gave 2 different file hashes in 3 runs), so a file hash is not reproducible.

    python benchmarks/numerics_hashes.py [--name numerics_hashes]

Runs `eqat quantize` for rtn, block-ap and block-ap+e2e-qp at w2g32 and w4g32 on the tiny Llama
of tests/conftest.py (2 blocks, hidden 64, seed 0, the tokenizer trained in code), calibrating on
the first 20,000 characters of the carried WikiText-2 text. Float results of matrix products can
differ between CPUs (AVX2 vs AVX-512 kernels), so the CPU flags are recorded with the hashes.
Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"rtn": ["--method", "rtn"], "block-ap": ["--skip-e2e"], "block-ap+e2e-qp": []}
COMMON = ["--nsamples", "8", "--val-samples", "2", "--calib-seqlen", "32", "--batch-size", "4", "--epochs", "2",
          "--e2e-nsamples", "8", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-epochs", "2",
          "--e2e-grad-accum", "1", "--eval-data", "EVAL", "--seqlen", "32", "--max-windows", "4", "--seed", "0", "-q"]


def tensors_sha256(path: Path) -> str:
    """SHA-256 over the tensors of a safetensors file: for each name in order, name, dtype, shape, bytes."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))


def make_inputs(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import save_tiny_inputs

    model, calib, _ = save_tiny_inputs(folder)
    return model, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="numerics_hashes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqat-hashes-") as tmp:
        model, calib = make_inputs(Path(tmp))
        for scheme in ("w2g32", "w4g32"):
            for method, flags in METHODS.items():
                out, t = Path(tmp) / f"{method}-{scheme}", time.time()
                common = [str(calib) if a == "EVAL" else a for a in COMMON]
                cmd = [sys.executable, "-m", "eqat", "quantize", "--model", str(model), "--scheme", scheme, *flags,
                       "--calib-data", str(calib), "--e2e-data", str(calib), *common, "--out", str(out)]
                subprocess.run(cmd, check=True, capture_output=True)
                report = json.loads((out / "report.json").read_text())
                sha = tensors_sha256(out / "model.safetensors")
                rows.append({"method": method, "scheme": scheme, "sha256": sha, "ppl": report["perplexity"]["ppl"],
                             "seconds": round(time.time() - t, 1)})
                print(f"{method:16} {scheme}  {sha[:16]}  ppl {rows[-1]['ppl']:.6f}", flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "cpu_flags": cpu_flags(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Tiny-model hashes at {commit}", "", f"CPU flags: {' '.join(result['cpu_flags'])}", "",
          "| method | scheme | sha256 of the tensors of model.safetensors | perplexity (4 x 32 tokens) |", "|---|---|---|---|"]
    md += [f"| {r['method']} | {r['scheme']} | `{r['sha256']}` | {r['ppl']:.6f} |" for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
