"""Per-block held-out losses of Block-AP runs, side by side: the RTN start, what training left
(packed), what was kept, and the trained block before packing (fake-quant), from report.json.

    python benchmarks/block_losses.py RUN_A [RUN_B ...] [--name block_losses]

Each RUN is an `eqat quantize` output folder (or its report.json). Writes results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> dict:
    path = run / "report.json" if run.is_dir() else run
    return json.loads(path.read_text())


def rows(report: dict) -> list[dict]:
    out = []
    for b in report["blocks"]:
        held = b.get("heldout_losses") or []
        out.append({"block": b["block"], "start": b["init_loss"], "last_packed": held[-1] if held else b["final_loss"],
                    "fake_quant": b.get("fake_quant_loss"), "kept": b["final_loss"], "kept_epoch": b.get("kept_epoch", -1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--name", default="block_losses")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    reports = {str(r): load(r) for r in args.runs}
    md = [f"# Block-AP per-block held-out losses ({', '.join(reports)})", ""]
    for name, rep in reports.items():
        ppl = rep.get("perplexity", {}).get("ppl")
        md += [f"## {name}: plan {'+'.join(rep['options'].get('plan', [rep['options'].get('method', '?')]))}, "
               f"perplexity {ppl if ppl is None else round(ppl, 4)}", "",
               "| block | start (RTN) | trained, packed | trained, fake-quant | kept | kept state |", "|---|---|---|---|---|---|"]
        for r in rows(rep):
            kept = {0: "start", -1: "last (no choice)"}.get(r["kept_epoch"], f"epoch {r['kept_epoch']}")
            fq = "-" if r["fake_quant"] is None else f"{r['fake_quant']:.4g}"
            md.append(f"| {r['block']} | {r['start']:.4g} | {r['last_packed']:.4g} | {fq} | {r['kept']:.4g} | {kept} |")
        worse = sum(1 for r in rows(rep) if r["kept"] > r["start"])
        md += ["", f"blocks that end above their RTN start: {worse} of {len(rep['blocks'])}", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({k: rows(v) for k, v in reports.items()}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
