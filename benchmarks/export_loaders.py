"""Exports of eqat checkpoints, loaded by the real runtimes: load time, logit and perplexity
agreement with eqat's own forward (all in float16; WikiText-2, first windows; perplexity by the
eqat.evaluate protocol: non-overlapping windows, mean next-token NLL).

    python benchmarks/export_loaders.py CKPT [CKPT ...] --windows 2 --seqlen 512

For each checkpoint and GPTQ checkpoint_format (auto, and gptq = v1 when auto picked v2), and
AWQ for 4-bit checkpoints with --awq, the export is loaded by GPTQModel (GPTQ through
BACKEND.GPTQ_TORCH, AWQ through its automatic CPU choice) and by transformers (optimum + gptqmodel);
a loader that refuses is recorded with its message. Writes results/export_loaders.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from eqat.checkpoint import load_quantized
from eqat.data import eval_token_ids
from eqat.evaluate import window_nll
from eqat.exporters import export_checkpoint
from eqat.report import environment, write_json


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def measure(model, ids, ref_logits, seqlen, windows) -> dict:
    """Perplexity over `windows` non-overlapping windows (the eqat.evaluate protocol), and the
    first window's logits against the reference: one forward per window."""
    nll, count, first = 0.0, 0, None
    for w in range(windows):
        chunk = ids[None, w * seqlen:(w + 1) * seqlen]
        out = logits(model, chunk)
        first = out if first is None else first
        window, tokens = window_nll(out, chunk)
        nll, count = nll + window, count + tokens
    if ref_logits is None:
        ref_logits = first
    d = (first - ref_logits).abs()
    kl = torch.nn.functional.kl_div(first.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    return {"ppl": math.exp(nll / count), "max_abs_logit": d.max().item(), "mean_abs_logit": d.mean().item(),
            "mean_kl": kl.item(), "top1_agree": (first.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "logits": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--awq", action="store_true", help="also export 4-bit checkpoints to AWQ")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    rows = []
    for ck in args.checkpoints:
        ref, tok, meta = load_quantized(ck)
        ref = ref.half()
        ids = eval_token_ids(tok, "wikitext2")
        base = {"checkpoint": ck.name, "scheme": meta["scheme"]}
        m = measure(ref, ids, None, args.seqlen, args.windows)
        ref_logits = m.pop("logits")
        rows.append({**base, "format": "eqat", "loader": "eqat (torch)", "status": "pass", **m})
        ppl_ref = rows[-1]["ppl"]
        sym = meta["scheme"]["symmetric"]
        exports = [("gptq", {"checkpoint_format": "auto"})] + ([] if sym else [("gptq", {"checkpoint_format": "gptq"})])
        exports += [("awq", {})] if meta["scheme"]["bits"] == 4 and args.awq else []
        for exporter, options in exports:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "export"
                report = export_checkpoint(ck, exporter, out, **options)
                qc = json.loads((out / "config.json").read_text())["quantization_config"]
                written = qc.get("checkpoint_format", qc.get("version"))
                backend = {"backend": BACKEND.GPTQ_TORCH} if exporter == "gptq" else {}
                loaders = {"gptqmodel": lambda: GPTQModel.load(str(out), device="cpu", dtype=torch.float16,
                                                               **backend).model,
                           "transformers": lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16,
                                                                                        device_map="cpu")}
                for name, load in loaders.items():
                    row = {**base, "format": f"{exporter} ({written})", "loader": name, "export_s": report["seconds"],
                           "flipped_groups": report["notes"].get("flipped_groups", 0)}
                    t = time.perf_counter()
                    try:
                        model = load()
                    except Exception as exc:
                        rows.append({**row, "status": "refused", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    row["load_s"] = round(time.perf_counter() - t, 2)
                    m = measure(model, ids, ref_logits, args.seqlen, args.windows)
                    m.pop("logits")
                    row.update(m, status="pass", ppl_delta_pct=100 * (m["ppl"] / ppl_ref - 1))
                    rows.append(row)
                    del model
                    print(json.dumps(rows[-1]))
    head = "| checkpoint | format | loader | status | ppl | ppl delta | top-1 agree | mean KL | max abs logit diff | load s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "pass":
            lines.append(f"| {r['checkpoint']} | {r['format']} | {r['loader']} | {r['status']}: {r['error'][:90]} | | | | | | |")
            continue
        delta = f"{r['ppl_delta_pct']:+.2f}%" if "ppl_delta_pct" in r else "(reference)"
        lines.append(f"| {r['checkpoint']} | {r['format']} | {r['loader']} | pass | {r['ppl']:.3f} | {delta} | "
                     f"{100 * r['top1_agree']:.1f}% | {r['mean_kl']:.2e} | {r['max_abs_logit']:.3f} | {r.get('load_s', '')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_loaders.md").write_text(
        f"float16 everywhere; WikiText-2 test, first {args.windows} windows of {args.seqlen} tokens; logits on the first window.\n\n" + table)
    write_json(args.out / "export_loaders.json", {"windows": args.windows, "seqlen": args.seqlen, "rows": rows,
                                                  "environment": environment()})


if __name__ == "__main__":
    main()
