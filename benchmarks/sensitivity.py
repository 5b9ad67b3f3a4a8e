"""Does --avg-bits pick the right layers? Per-layer sensitivity of SmolLM2 (or --model) measured
both ways (fisher: the estimate eqat uses by default; kl: the direct measurement), their rank
agreement, and the RTN perplexity of the allocations each gives at --avg-bits, beside uniform
RTN and the same number of promoted weights chosen at random. Prints and saves
benchmarks/results/<name>.{md,json}. Run:

    python benchmarks/sensitivity.py --scheme w2g64 --avg-bits 2.25 --kl-windows 2 --max-windows 4
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch

from eqat.core.layer_schemes import LayerSchemes, bits_summary
from eqat.core.scheme import QuantScheme
from eqat.data.evaluate import perplexity
from eqat.data.sources import calibration_windows, eval_token_ids
from eqat.engine.allocate import allocate, fisher_sensitivity, fused_units, kl_sensitivity
from eqat.io.report import environment, write_json
from eqat.methods.rtn import quantize_rtn
from eqat.models.arch import quantizable_linears
from eqat.models.loading import load_model
from eqat.pipeline import resolve_model

RESULTS = Path(__file__).parent / "results"


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def random_allocation(shapes, base: QuantScheme, level: QuantScheme, avg_bits: float, seed: int) -> LayerSchemes:
    """Fused units promoted in a random order until the budget: the control for a measured allocation."""
    units = fused_units(list(shapes))
    random.Random(seed).shuffle(units)
    total = sum(n * k for n, k in shapes.values())
    used, layers = base.bits * total, {}
    for unit in units:
        extra = sum(shapes[n][0] * shapes[n][1] for n in unit) * (level.bits - base.bits)
        if used + extra <= avg_bits * total:
            layers.update({n: level for n in unit})
            used += extra
    return LayerSchemes(base, layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--scheme", default="w2g64")
    ap.add_argument("--promote", default="w8g64")
    ap.add_argument("--avg-bits", type=float, default=2.25)
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=2)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=4, help="WikiText-2 windows of 2048 for the RTN perplexities")
    ap.add_argument("--name", default="sensitivity_w2g64")
    args = ap.parse_args()
    base, level = QuantScheme.parse(args.scheme), QuantScheme.parse(args.promote)
    model, tok = load_model(resolve_model(args.model))
    linears = quantizable_linears(model)
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    calib = calibration_windows(tok, "c4", max(args.fisher_windows, args.kl_windows), args.calib_seqlen, 0)
    t0 = time.perf_counter()
    fisher = fisher_sensitivity(model, linears, [base, level], calib[: args.fisher_windows])
    t_fisher = time.perf_counter() - t0
    t0 = time.perf_counter()
    kl = kl_sensitivity(model, linears, [base, level], calib[: args.kl_windows])
    t_kl = time.perf_counter() - t0
    names = list(linears)
    rho = spearman([fisher[n][base.name] for n in names], [kl[n][base.name] for n in names])
    top = {k: sorted(names, key=lambda n: -s[n][base.name])[:20] for k, s in (("fisher", fisher), ("kl", kl))}
    overlap = len(set(top["fisher"]) & set(top["kl"]))
    allocations = {"uniform RTN": LayerSchemes(base),
                   "fisher": allocate(shapes, LayerSchemes(base), set(), fisher, [level], args.avg_bits),
                   "kl": allocate(shapes, LayerSchemes(base), set(), kl, [level], args.avg_bits),
                   **{f"random (seed {s})": random_allocation(shapes, base, level, args.avg_bits, s) for s in (0, 1)}}
    ids = eval_token_ids(tok, "wikitext2")
    rows = []
    for label, schemes in allocations.items():
        q = copy.deepcopy(model)
        quantize_rtn(q, schemes)
        r = perplexity(q, ids, 2048, args.max_windows, desc=f"ppl {label}")
        bits = bits_summary({n: (schemes(n), *shapes[n]) for n in shapes})
        rows.append({"allocation": label, "avg_code_bits": bits["avg_code_bits"], "bits_per_weight": bits["bits_per_weight"],
                     "promoted_layers": len(schemes.layers), "ppl": r.ppl, "promoted": sorted(schemes.layers)})
        del q
    header = (f"# Per-layer sensitivity and allocation, {args.scheme} -> {args.promote} at {args.avg_bits} code bits\n\n"
              f"fisher: {args.fisher_windows} C4 windows x {args.calib_seqlen} ({t_fisher:.0f} s); kl: "
              f"{args.kl_windows} windows ({t_kl:.0f} s); Spearman rank correlation over {len(names)} layers "
              f"{rho:.3f}; top-20 overlap {overlap}/20. RTN perplexity, WikiText-2 first {args.max_windows} windows "
              f"x 2048. Times on this machine ({environment()['processor']}).\n\n")
    table = "| allocation | code bits | bits/weight incl. scales | promoted layers | RTN ppl |\n|---|---|---|---|---|\n"
    table += "".join(f"| {r['allocation']} | {r['avg_code_bits']:.3f} | {r['bits_per_weight']:.3f} | "
                     f"{r['promoted_layers']} | {r['ppl']:.1f} |\n" for r in rows)
    text = header + table
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    write_json(RESULTS / f"{args.name}.json", {"args": vars(args), "environment": environment(), "spearman": rho,
                                               "top20_overlap": overlap, "fisher_seconds": t_fisher, "kl_seconds": t_kl,
                                               "rows": rows, "fisher": fisher, "kl": kl})


if __name__ == "__main__":
    main()
