"""Perplexity of each quantization method on SmolLM2 (or --model), WikiText-2 test.

Prints a markdown table and writes benchmarks/results/quality.{json,md} with the machine,
versions and settings. Methods so far: fp (unquantized), rtn. Run:

    python benchmarks/quality.py --schemes w2g64,w3g64,w4g64 --max-windows 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eqat.data import eval_token_ids
from eqat.evaluate import perplexity
from eqat.model import load_model
from eqat.report import environment, write_json
from eqat.run import resolve_model
from eqat.scheme import QuantScheme
from eqat.train.rtn import quantize_rtn

RESULTS = Path(__file__).parent / "results"


def run_method(method: str, model_path: Path, scheme: QuantScheme | None) -> tuple[torch.nn.Module, float]:
    model, _ = load_model(model_path)
    t = time.perf_counter()
    if method == "rtn":
        quantize_rtn(model, scheme)
    elif method != "fp":
        raise SystemExit(f"unknown method {method}")
    return model, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: embedded SmolLM2-135M-Instruct")
    ap.add_argument("--schemes", default="w2g64,w3g64,w4g64")
    ap.add_argument("--methods", default="fp,rtn")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--name", default="quality", help="results file stem")
    args = ap.parse_args()

    model_path = resolve_model(args.model)
    _, tok = load_model(model_path)
    ids = eval_token_ids(tok, "wikitext2")
    rows = []
    for method in args.methods.split(","):
        for scheme_name in ([None] if method == "fp" else args.schemes.split(",")):
            scheme = QuantScheme.parse(scheme_name) if scheme_name else None
            model, seconds = run_method(method, model_path, scheme)
            r = perplexity(model, ids, args.seqlen, args.max_windows, desc=f"{method} {scheme_name or ''}")
            rows.append({"method": method, "scheme": scheme_name or "-", "ppl": r.ppl, "method_seconds": seconds,
                         "eval": r.to_dict()})
            print(f"{method:8s} {scheme_name or '-':8s} ppl {r.ppl:10.3f}  method {seconds:7.1f} s", flush=True)
    settings = {"model": str(model_path), "eval_data": "wikitext2 test (carried copy)", "seqlen": args.seqlen,
                "max_windows": args.max_windows, "eval_tokens_total": int(ids.numel())}
    md = [f"# Quality: {model_path.name}, WikiText-2 test, {rows[0]['eval']['windows']} windows x {args.seqlen} tokens", "",
          "| method | scheme | perplexity | method time (s) |", "|---|---|---|---|"]
    md += [f"| {r['method']} | {r['scheme']} | {r['ppl']:.2f} | {r['method_seconds']:.1f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"settings": settings, "environment": environment(), "rows": rows})
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
