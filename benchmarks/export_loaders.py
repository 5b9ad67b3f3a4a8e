"""Exports of eqat checkpoints, loaded by the real runtimes: load time, logit and perplexity
agreement with eqat's own forward in the loader's dtype (WikiText-2, first windows; perplexity by
the eqat.evaluate protocol: non-overlapping windows, mean next-token NLL).

    python benchmarks/export_loaders.py CKPT [CKPT ...] --windows 1 --seqlen 512

Per checkpoint: GPTQ (checkpoint_format auto, and gptq = v1 when auto picked v2) and AWQ (4-bit)
loaded by GPTQModel (GPTQ through BACKEND.GPTQ_TORCH) and by transformers (optimum + gptqmodel),
in float16; compressed-tensors loaded by transformers through the compressed-tensors package
(dequantize=True), in float32; ONNX run by onnxruntime's CPU MatMulNBits, in float32. A loader
that refuses is recorded with its message. Writes results/<name>.{json,md}.
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


def loaders(exporter: str, out: Path, meta: dict) -> dict:
    """{loader name: (dtype it runs in, load function)} for one export folder."""
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    f16 = torch.float16
    if exporter in ("gptq", "awq"):
        backend = {"backend": BACKEND.GPTQ_TORCH} if exporter == "gptq" else {}
        return {"gptqmodel": (f16, lambda: GPTQModel.load(str(out), device="cpu", dtype=f16, **backend).model),
                "transformers": (f16, lambda: AutoModelForCausalLM.from_pretrained(out, dtype=f16, device_map="cpu"))}
    if exporter == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        return {"transformers (compressed-tensors, dequantize)": (torch.float32, lambda: AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)))}
    if exporter == "onnx":
        return {"onnxruntime (CPU)": (torch.float32, lambda: OrtModel(out))}
    raise ValueError(exporter)


class OrtModel:
    """An onnxruntime session with the call shape of a causal LM (`model(ids).logits`)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def __call__(self, ids: torch.Tensor):
        feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
        return type("Out", (), {"logits": torch.from_numpy(self.session.run(None, feed)[0])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--formats", default="gptq,awq,compressed-tensors,onnx",
                    help="comma-separated; awq only for 4-bit checkpoints")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="export_loaders", help="results file stem")
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    formats = args.formats.split(",")

    rows = []
    for ck in args.checkpoints:
        _, tok, meta = load_quantized(ck)
        ids = eval_token_ids(tok, "wikitext2")
        base = {"checkpoint": ck.name, "scheme": meta["scheme"]}
        refs = {}  # eqat's own forward in each dtype a loader runs in
        for dtype in (torch.float16, torch.float32):
            model = load_quantized(ck)[0].to(dtype)
            m = measure(model, ids, None, args.seqlen, args.windows)
            refs[dtype] = (m.pop("logits"), m["ppl"])
            rows.append({**base, "format": "eqat", "loader": f"eqat (torch, {str(dtype)[6:]})", "dtype": str(dtype)[6:],
                         "status": "pass", **m})
        del model
        exports = []
        if "gptq" in formats:
            exports += [("gptq", {"checkpoint_format": "auto"})]
            exports += [] if meta["scheme"]["symmetric"] else [("gptq", {"checkpoint_format": "gptq"})]
        exports += [("awq", {})] if "awq" in formats and meta["scheme"]["bits"] == 4 else []
        exports += [(f, {}) for f in ("compressed-tensors", "onnx") if f in formats]
        for exporter, options in exports:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "export"
                report = export_checkpoint(ck, exporter, out, **options)
                qc = json.loads((out / "config.json").read_text())["quantization_config"]
                written = qc.get("checkpoint_format", qc.get("version", qc.get("format")))
                if exporter == "onnx":
                    written = f"MatMulNBits {qc['bits']}-bit"
                for name, (dtype, load) in loaders(exporter, out, meta).items():
                    row = {**base, "format": f"{exporter} ({written})", "loader": name, "dtype": str(dtype)[6:],
                           "export_s": report["seconds"], "notes": report["notes"]}
                    t = time.perf_counter()
                    try:
                        loaded = load()
                    except Exception as exc:
                        rows.append({**row, "status": "refused", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        continue
                    row["load_s"] = round(time.perf_counter() - t, 2)
                    ref_logits, ref_ppl = refs[dtype]
                    m = measure(loaded, ids, ref_logits, args.seqlen, args.windows)
                    m.pop("logits")
                    row.update(m, status="pass", ppl_delta_pct=100 * (m["ppl"] / ref_ppl - 1))
                    rows.append(row)
                    del loaded
                    print(json.dumps(rows[-1]))
    head = "| checkpoint | format | loader | dtype | status | ppl | ppl delta | top-1 agree | mean KL | max abs logit diff | load s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "pass":
            lines.append(f"| {r['checkpoint']} | {r['format']} | {r['loader']} | {r['dtype']} | {r['status']}: {r['error'][:90]} | | | | | | |")
            continue
        delta = f"{r['ppl_delta_pct']:+.3f}%" if "ppl_delta_pct" in r else "(reference)"
        lines.append(f"| {r['checkpoint']} | {r['format']} | {r['loader']} | {r['dtype']} | pass | {r['ppl']:.3f} | {delta} | "
                     f"{100 * r['top1_agree']:.1f}% | {r['mean_kl']:.2e} | {r['max_abs_logit']:.4f} | {r.get('load_s', '')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(
        f"WikiText-2 test, first {args.windows} windows of {args.seqlen} tokens; logits on the first window; each "
        "loader compared with eqat's own forward in the loader's dtype.\n\n" + table)
    write_json(args.out / f"{args.name}.json", {"windows": args.windows, "seqlen": args.seqlen, "rows": rows,
                                                "environment": environment()})


if __name__ == "__main__":
    main()
