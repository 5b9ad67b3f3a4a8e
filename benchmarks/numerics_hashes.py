"""SHA-256 of the tensors of `model.safetensors` (and the report's perplexities) for fixed-seed runs
on a tiny model: the record a refactor that must not change numerics is compared against (issue 18).

The hash is over the tensors (sorted names, dtype, shape, bytes), not the file: safetensors writes
its `__metadata__` map in an order that varies from process to process (seen: the same tensors
gave 2 different file hashes in 3 runs), so a file hash is not reproducible.

    python benchmarks/numerics_hashes.py [--name numerics_hashes]

`--pinned` pins the floating-point path as tests/test_numerics.py does (the test's EXPECTED comes
from `--pinned`); `--tree A --tree B` runs two checkouts on the same inputs (before/after a change).

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
sys.path.insert(0, str(ROOT))
from tests.test_numerics import PINNED_ENV, PLANS, run_case  # noqa: E402  (one definition of the cases)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))


def make_inputs(folder: Path) -> tuple[Path, Path]:
    from tests.conftest import save_tiny_inputs

    model, calib, _ = save_tiny_inputs(folder)
    return model, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="numerics_hashes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pinned", action="store_true", help=f"pin the floating-point path as tests/test_numerics.py does "
                    f"({' '.join(f'{k}={v}' for k, v in PINNED_ENV.items())})")
    ap.add_argument("--tree", type=Path, action="append", default=[],
                    help="run these checkouts (repeatable) on the same inputs; default: this one")
    args = ap.parse_args()
    trees = args.tree or [ROOT]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqat-hashes-") as tmp:
        model, calib = make_inputs(Path(tmp))
        for tree in trees:
            commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            for scheme in ("w2g32", "w4g32"):
                for plan in PLANS:
                    t = time.time()
                    got = run_case(model, calib, Path(tmp) / f"{commit}-{plan}-{scheme}", plan, scheme, args.pinned,
                                   tree.resolve())
                    rows.append({"commit": commit, "method": plan, "scheme": scheme, **got,
                                 "seconds": round(time.time() - t, 1)})
                    print(f"{commit} {plan:16} {scheme}  {got['sha256'][:16]}  ppl {got['ppl']:.6f}", flush=True)
    result = {"pinned": PINNED_ENV if args.pinned else None, "cpu_flags": cpu_flags(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Tiny-model hashes{' (pinned: ' + ' '.join(f'{k}={v}' for k, v in PINNED_ENV.items()) + ')' if args.pinned else ''}",
          "", f"CPU flags: {' '.join(result['cpu_flags'])}", "",
          "| commit | method | scheme | sha256 of the tensors of model.safetensors | perplexity (4 x 32 tokens) |",
          "|---|---|---|---|---|"]
    md += [f"| {r['commit']} | {r['method']} | {r['scheme']} | `{r['sha256']}` | {r['ppl']:.6f} |" for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    last = [r for r in rows if r["commit"] == rows[-1]["commit"]]
    print("expected = " + json.dumps({f"{r['method']} {r['scheme']}": {"sha256": r["sha256"], "ppl": r["ppl"]}
                                      for r in last}, indent=4))


if __name__ == "__main__":
    main()
