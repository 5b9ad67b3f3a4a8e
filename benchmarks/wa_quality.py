"""Weight-activation quantization on SmolLM2 (or --model): perplexity and wall time per method and
scheme, WikiText-2 test, the windows of benchmarks/quality.py (first --max-windows x --seqlen).

Rows (each quantized by the command a user runs, `eqat quantize --method M --scheme S --no-eval`, in
its own process, its wall clock the row's time; evaluated here by eqat.data.evaluate.perplexity,
which runs eqat's own forward with the activations fake-quantized per token):

    fp                 the unquantized model
    rtn                round to nearest, weights and activations
    smoothquant        SmoothQuant (alpha --sq-alpha), then RTN
    qllm[reassembly]   QLLM's adaptive channel reassembly only (--qllm-rank 0)
    qllm[lora]         QLLM's low-rank tuning only (--no-qllm-reassembly)
    qllm               both
    qllm[smooth]       SmoothQuant's migration (alpha 0.5) first, then both (--qllm-smooth-alpha 0.5)
    llmcompressor      the peer: llm-compressor's SmoothQuant + GPTQ W8A8 (int8 weights per channel,
                       int8 activations per token, symmetric), run by benchmarks/llmcompressor_run.py in its
                       own virtualenv (--llmcompressor-python), loaded back through compressed-tensors and
                       evaluated with eqat's fake quantization of the same scheme (w8g-1syma8sym)

Schemes: W8A8, W6A6, W4A8, W4A4 with weights per channel (g-1) and per group of 64. Rows are merged
into benchmarks/results/wa_quality.{json,md}. Run:

    python benchmarks/wa_quality.py --schemes w8g-1a8,w6g-1a6,w4g-1a8,w4g-1a4 --methods fp,rtn,smoothquant,qllm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from eqat.core.scheme import QuantScheme
from eqat.data.evaluate import perplexity
from eqat.data.sources import calibration_windows, eval_token_ids
from eqat.io.checkpoint import is_eqat_checkpoint, load_quantized
from eqat.io.report import cpu_description, environment, write_json
from eqat.models.loading import load_model
from eqat.pipeline import CalibOptions, resolve_model

RESULTS = Path(__file__).parent / "results"
METHOD_FLAGS = {
    "rtn": ["--method", "rtn"],
    "smoothquant": ["--method", "smoothquant"],
    "qllm[reassembly]": ["--method", "qllm", "--qllm-rank", "0"],
    "qllm[lora]": ["--method", "qllm", "--no-qllm-reassembly"],
    "qllm": ["--method", "qllm"],
    "qllm[smooth]": ["--method", "qllm", "--qllm-smooth-alpha", "0.5"],
}
ORDER = ["fp", "rtn", "smoothquant", "llmcompressor", "qllm[reassembly]", "qllm[lora]", "qllm", "qllm[smooth]"]


def run_eqat(model_path: Path, method: str, scheme: str, workdir: Path, extra: list[str]) -> tuple[torch.nn.Module, dict]:
    """`eqat quantize` in its own process (a finished run in `workdir` is reused with its time)."""
    tag = "".join(c if c.isalnum() else "-" for c in method)
    out = workdir / f"wa-{tag}-{scheme}-{model_path.name}"
    timing = out / "bench_seconds.json"
    if not (is_eqat_checkpoint(out) and timing.is_file()):
        cmd = [sys.executable, "-m", "eqat", "quantize", "--model", str(model_path), *METHOD_FLAGS[method], *extra,
               "--scheme", scheme, "--out", str(out), "--no-eval", "--force", "-q"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        write_json(timing, {"process_seconds": time.perf_counter() - t, "command": cmd})
    model, _, _ = load_quantized(out)
    seconds = json.loads(timing.read_text())
    return model, {"method_seconds": seconds["process_seconds"], "checkpoint": str(out),
                   "command": " ".join(seconds["command"][1:])}


def run_llmcompressor(model_path: Path, scheme: str, workdir: Path, python: str) -> tuple[torch.nn.Module, dict]:
    """llm-compressor's SmoothQuant + GPTQ W8A8 in its own virtualenv; loaded back as an eqat model."""
    if scheme != "w8g-1syma8sym":
        raise SystemExit(f"llmcompressor rows are W8A8 (w8g-1syma8sym), not {scheme}")
    out = workdir / f"wa-llmcompressor-{model_path.name}"
    if not (out / "llmcompressor_report.json").is_file():
        opts = CalibOptions()  # the windows eqat's block-wise methods train on (c4, 64 x 256, seed 0)
        tok = load_model(model_path)[1]
        calib = calibration_windows(tok, opts.data, opts.nsamples, opts.seqlen, opts.seed)
        calib_file = workdir / "wa-llmcompressor-calib.json"
        write_json(calib_file, {"input_ids": calib.tolist()})
        script = Path(__file__).with_name("llmcompressor_run.py")
        proc = subprocess.run([python, str(script), "--model", str(model_path), "--calib", str(calib_file),
                               "--out", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llmcompressor_run.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.llmcompressor_load import load_int8_w8a8

    report = json.loads((out / "llmcompressor_report.json").read_text())
    return load_int8_w8a8(model_path, out), {"method_seconds": report["seconds"], "checkpoint": str(out),
                                             "recipe": report["recipe"], "llmcompressor": report["version"]}


def markdown(results: dict) -> str:
    s = results["settings"]
    rank = {m: i for i, m in enumerate(ORDER)}
    rows = sorted(results["rows"], key=lambda r: (r["scheme"], rank.get(r["method"], 99)))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    md = [f"# Weight-activation quantization: {Path(s['model']).name}, WikiText-2 test, first {s['max_windows']} "
          f"windows x {s['seqlen']} tokens", "",
          "Each row: `eqat quantize --method M --scheme S --no-eval` in its own process (its wall time), evaluated "
          "by eqat's forward with per-token dynamic activation quantization (benchmarks/wa_quality.py).", "",
          "Times compare only within one CPU (the `cpu` column; AVX2-only machines run 2-3x slower).", "",
          "| scheme | method | perplexity | gap to FP | time (s) | cpu |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        gap = f"{r['ppl'] - fp:+.2f}" if fp is not None and r["method"] != "fp" else ""
        md.append(f"| {r['scheme']} | {r['method']} | {r['ppl']:.2f} | {gap} | {r['method_seconds']:.0f} "
                  f"| {r.get('cpu', '?')} |")
    return "\n".join(md) + "\n"


def merge_row(path: Path, settings: dict, row: dict) -> dict:
    results = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "rows": []}
    if any(results["settings"].get(k) != settings[k] for k in ("model", "seqlen", "max_windows", "extra")):
        results = {"settings": settings, "rows": []}  # another protocol: start over
    results["rows"] = [r for r in results["rows"] if (r["method"], r["scheme"]) != (row["method"], row["scheme"])]
    results["rows"].append(row)
    results["environment"] = environment()
    write_json(path, results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: embedded SmolLM2-135M-Instruct")
    ap.add_argument("--schemes", default="w8g-1a8,w6g-1a6,w4g-1a8,w4g-1a4,w8g64a8,w6g64a6,w4g64a8,w4g64a4")
    ap.add_argument("--methods", default="fp,rtn,smoothquant,qllm[reassembly],qllm[lora],qllm")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--extra", default="", help="more `eqat quantize` flags for every eqat row (e.g. '--nsamples 32')")
    ap.add_argument("--name", default="wa_quality")
    ap.add_argument("--redo", action="store_true", help="re-evaluate rows the results file already has (same settings)")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "eqat" / "bench")
    ap.add_argument("--llmcompressor-python", default=str(Path.home() / ".cache/eqat/venvs/llmcompressor/bin/python"))
    args = ap.parse_args()

    model_path = resolve_model(args.model)
    _, tok = load_model(model_path)
    ids = eval_token_ids(tok, "wikitext2")
    settings = {"model": str(model_path), "eval_data": "wikitext2 test (carried copy)", "seqlen": args.seqlen,
                "max_windows": args.max_windows, "extra": args.extra}
    path = RESULTS / f"{args.name}.json"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "rows": []}
    same = all(results["settings"].get(k) == settings[k] for k in ("model", "seqlen", "max_windows", "extra"))
    done = {(r["method"], r["scheme"]) for r in results["rows"]} if same and not args.redo else set()
    for method in args.methods.split(","):
        for scheme in (["-"] if method == "fp" else args.schemes.split(",")):
            if (method, scheme) in done:
                print(f"{method:18s} {scheme:12s} in {path.name} already (--redo to evaluate again)", flush=True)
                continue
            if method == "fp":
                t = time.perf_counter()
                model, info = load_model(model_path)[0], {"method_seconds": 0.0}
                info["load_seconds"] = time.perf_counter() - t
            elif method == "llmcompressor":
                model, info = run_llmcompressor(model_path, scheme, args.work_dir, args.llmcompressor_python)
            else:
                QuantScheme.parse(scheme)  # a bad scheme stops here, before a process is started
                model, info = run_eqat(model_path, method, scheme, args.work_dir, args.extra.split())
            r = perplexity(model, ids, args.seqlen, args.max_windows, desc=f"{method} {scheme}")
            row = {"method": method, "scheme": scheme, "ppl": r.ppl, **info, "eval": r.to_dict(),
                   "cpu": cpu_description()}
            results = merge_row(path, settings, row)
            (RESULTS / f"{args.name}.md").write_text(markdown(results))
            print(f"{method:18s} {scheme:12s} ppl {r.ppl:10.3f}  method {info['method_seconds']:7.1f} s", flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
