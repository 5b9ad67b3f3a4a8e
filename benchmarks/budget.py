"""What a bigger training budget buys at low bits: WikiText-2 perplexity and wall time over
calibration tokens x (Block-AP, + E2E-QP next-token, + E2E-QP distilled), through the CLI a
user runs (issue 19, item 5).

For each --nsamples N (windows of --calib-seqlen tokens; 64, 256, 1024 x 256 = 16k, 64k, 256k):

    eqat quantize --scheme S --method block-ap --nsamples N --no-eval          (Block-AP)
    eqat train-e2e <that> --e2e-nsamples N --e2e-loss L --no-eval              (each --e2e-losses L)
    eqat eval <each> --max-windows W

E2E-QP gets as many tokens as Block-AP (N windows of --calib-seqlen), or --e2e-scale times as
many. Every run lives in --work-dir and a finished one is reused, so the table fills in over
several calls (a killed run resumes where eqat's own resume leaves it). `--selections` adds Block-AP
runs that keep each block's state by next-token loss (`nll`: `--keep-best-by nll`) or keep the last
one (`last`: `--keep-last`) beside the default (`loss`: the held-out block loss); their rows are
labelled e.g. 'block-ap [nll]'. Rows are merged into
benchmarks/results/<name>.json by (tokens, variant); <name>.md and <name>.png (perplexity
against wall time) are rewritten. Times are process wall clock on this machine: compare them
only within one machine, and run with the machine to yourself. Run:

    python benchmarks/budget.py --scheme w2g64 --nsamples 64,256,1024 --max-windows 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from eqat.io.report import save_figure, environment, write_json

RESULTS = Path(__file__).parent / "results"
VARIANT_ORDER = {"block-ap": 0, "+e2e-nll": 1, "+e2e-kd": 2, "+e2e-mix": 3}


def eqat_json(args: list[str]) -> tuple[dict, float]:
    """Run `python -m eqat ARGS --json -q`; its JSON report and the process wall seconds."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eqat", *args, "--json", "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eqat {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), time.perf_counter() - t


def finished_report(folder: Path) -> dict | None:
    """The report of a finished eqat run in `folder` (eqat writes report.json last), else None."""
    path = folder / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cached(folder: Path, key: str, compute) -> dict:
    """`compute()` once per folder and key, kept in <folder>/budget_cache.json."""
    path = folder / "budget_cache.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache[key] = compute()
        write_json(path, cache)
    return cache[key]


def process_seconds(folder: Path, phase_seconds: float) -> float:
    """The wall seconds of the process that wrote `folder`, or its phase time when another
    process (not this script) ran it."""
    return cached(folder, "process_seconds", lambda: phase_seconds)


def evaluate(folder: Path, windows: int, seqlen: int) -> dict:
    """WikiText-2 perplexity of a checkpoint or model folder (cached beside it)."""
    def run() -> dict:
        result, seconds = eqat_json(["eval", str(folder), "--max-windows", str(windows), "--seqlen", str(seqlen)])
        return {"ppl": result["ppl"], "eval_seconds": seconds}
    return cached(folder, f"eval-{windows}x{seqlen}", run)


SELECTION_FLAGS = {"loss": [], "nll": ["--keep-best-by", "nll"], "last": ["--keep-last"]}


def run_block_ap(args: argparse.Namespace, n: int, selection: str = "loss") -> tuple[Path, dict]:
    """Block-AP on n windows keeping each block's state by `selection` (reused when finished); its
    folder and timing."""
    out = args.work_dir / (f"bap-{args.scheme}-{n}x{args.calib_seqlen}-e{args.epochs}-seed{args.seed}"
                           + ("" if selection == "loss" else f"-keep-{selection}"))
    report = finished_report(out)
    if report is None:
        cmd = ["quantize", "--scheme", args.scheme, "--method", "block-ap", "--nsamples", str(n),
               "--calib-seqlen", str(args.calib_seqlen), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--out", str(out), "--no-eval", *SELECTION_FLAGS[selection],
               *(["--model", args.model] if args.model else [])]
        _, seconds = eqat_json(cmd)
        report = finished_report(out)
        cached(out, "process_seconds", lambda: seconds)
    return out, {"phase_seconds": report["quantize_seconds"],
                 "process_seconds": process_seconds(out, report["quantize_seconds"]),
                 "peak_memory_bytes": report["block_ap"]["peak_memory_bytes"], "blocks": len(report["blocks"])}


def run_e2e(args: argparse.Namespace, ckpt: Path, n: int, loss: str, scale: int) -> tuple[Path, dict]:
    """E2E-QP with `loss` on scale x n sequences from the Block-AP checkpoint of n windows
    (reused when finished)."""
    out = ckpt.with_name(f"{ckpt.name}-e2e-{loss}" + (f"{scale * n}" if scale != 1 else ""))
    n = scale * n
    report = finished_report(out)
    if report is None:
        cmd = ["train-e2e", str(ckpt), "--out", str(out), "--e2e-nsamples", str(n),
               "--e2e-seqlen", str(args.calib_seqlen), "--e2e-loss", loss, "--seed", str(args.seed), "--no-eval"]
        _, seconds = eqat_json(cmd)
        report = finished_report(out)
        cached(out, "process_seconds", lambda: seconds)
    e = report["e2e_qp"]
    return out, {"phase_seconds": e["train_seconds"], "process_seconds": process_seconds(out, e["train_seconds"]),
                 "steps": e["steps"], "val_loss_before": e["val_loss_before"], "val_loss_after": e["val_loss_after"],
                 "peak_memory_bytes": e["peak_memory"]["peak_bytes"]}


def merge_row(path: Path, settings: dict, row: dict) -> dict:
    """Add `row` to the results file, replacing one of the same tokens and variant; rows under
    other settings are dropped."""
    results = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if results.get("settings") != settings:
        results["rows"] = []
    results["rows"] = [r for r in results["rows"] if (r["tokens"], r["variant"]) != (row["tokens"], row["variant"])]
    results["rows"].append(row)
    results.update(settings=settings, environment=environment())
    write_json(path, results)
    return results


def markdown(results: dict, fp_ppl: float) -> str:
    s = results["settings"]
    md = [f"# {s['scheme']} on {Path(s['model']).name}: what training budget buys", "",
          f"WikiText-2 test, first {s['max_windows']} windows x {s['seqlen']} tokens; FP perplexity {fp_ppl:.2f}. "
          f"Calibration: C4 windows of {s['calib_seqlen']} tokens, seed {s['seed']}; Block-AP {s['epochs']} epoch(s); "
          "E2E-QP one epoch on as many tokens as Block-AP (x k: k times as many); its held-out NLL is on sequences "
          "that depend on the number drawn, so compare it within rows of one E2E size. "
          "Seconds are process wall clock (load, train, save) "
          f"on this machine ({results['environment']['cpu_count']} CPUs, {results['environment']['torch_threads']} "
          "torch threads); the pipeline column is Block-AP plus that row's E2E-QP.", "",
          "| calib tokens | variant | perplexity | x FP | Block-AP s | E2E-QP s | pipeline s | pipeline min "
          "| E2E held-out NLL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["tokens"], VARIANT_ORDER.get(r["variant"], 9), r["variant"])):
        e2e = r["e2e"]
        e2e_seconds = f"{e2e['process_seconds']:.0f}" if e2e else "-"
        nll = f"{e2e['val_loss_before']:.3f} -> {e2e['val_loss_after']:.3f}" if e2e else "-"
        md.append(f"| {r['tokens']:,} | {r['variant']} | {r['ppl']:.2f} | {r['ppl'] / fp_ppl:.1f} "
                  f"| {r['block_ap']['process_seconds']:.0f} | {e2e_seconds} | {r['pipeline_seconds']:.0f} "
                  f"| {r['pipeline_seconds'] / 60:.1f} | {nll} |")
    notes: dict[str, list[str]] = {}
    for r in results["rows"]:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(r["variant"])
    md += [""] + [f"- {', '.join(sorted(v))}: {note}" for note, v in notes.items()] if notes else []
    return "\n".join(md) + "\n"


def plot(results: dict, fp_ppl: float, path: Path) -> None:
    """Perplexity (log) against pipeline minutes, one line per variant, points labelled by tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in sorted({r["variant"] for r in results["rows"]}, key=lambda v: (VARIANT_ORDER.get(v, 9), v)):
        rows = sorted((r for r in results["rows"] if r["variant"] == variant), key=lambda r: r["tokens"])
        ax.plot([r["pipeline_seconds"] / 60 for r in rows], [r["ppl"] for r in rows], marker="o", label=variant)
        for r in rows:
            label = f"{r['tokens'] // 1024}k" if r["tokens"] >= 1024 else str(r["tokens"])
            ax.annotate(label, (r["pipeline_seconds"] / 60, r["ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for mult, style in ((1, "-"), (2, "--"), (3, ":")):
        ax.axhline(fp_ppl * mult, color="grey", linestyle=style, linewidth=0.8,
                   label=f"{mult}x FP" if mult > 1 else "FP")
    ax.set_yscale("log")
    ax.set_xlabel("pipeline wall time (min)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{results['settings']['scheme']}: perplexity against training budget")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: embedded SmolLM2-135M-Instruct")
    ap.add_argument("--scheme", default="w2g64")
    ap.add_argument("--nsamples", default="64,256,1024", help="calibration windows per row, comma-separated")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="Block-AP epochs (eqat's default 2)")
    ap.add_argument("--e2e-losses", default="nll,kd", help="E2E-QP losses, one row each (nll, kd, mix)")
    ap.add_argument("--e2e-scale", type=int, default=1,
                    help="E2E-QP trains on this many times Block-AP's tokens (rows labelled e.g. '+e2e-mix x2')")
    ap.add_argument("--selections", default="loss",
                    help="how Block-AP keeps each block's state, one set of rows each: loss (default), nll, last")
    ap.add_argument("--note", default=None,
                    help="how this call's runs shared the machine, kept with its rows and printed under the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--name", default=None, help="results file stem; default budget_<scheme>")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "eqat" / "bench" / "budget")
    args = ap.parse_args()

    from eqat.pipeline import resolve_model

    bad = set(args.selections.split(",")) - set(SELECTION_FLAGS)
    if bad:
        ap.error(f"--selections: unknown {', '.join(sorted(bad))}; choose from {', '.join(SELECTION_FLAGS)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model)
    path = RESULTS / f"{args.name or 'budget_' + args.scheme}.json"
    settings = {"model": str(model_path), "scheme": args.scheme, "calib_seqlen": args.calib_seqlen,
                "epochs": args.epochs, "seed": args.seed, "seqlen": args.seqlen, "max_windows": args.max_windows}
    fp_ppl = cached(args.work_dir, f"fp-{model_path.name}-{args.max_windows}x{args.seqlen}",
                    lambda: eqat_json(["eval", str(model_path), "--max-windows", str(args.max_windows),
                                       "--seqlen", str(args.seqlen)])[0]["ppl"])
    for n in (int(x) for x in args.nsamples.split(",")):
        tokens = n * args.calib_seqlen
        print(f"{args.scheme}: {tokens:,} calibration tokens ({n} x {args.calib_seqlen})", flush=True)
        variants = []
        for selection in args.selections.split(","):
            tag = "" if selection == "loss" else f" [{selection}]"
            ckpt, bap = run_block_ap(args, n, selection)
            variants.append(("block-ap" + tag, ckpt, None, bap))
            for loss in args.e2e_losses.split(","):
                out, e2e = run_e2e(args, ckpt, n, loss, args.e2e_scale)
                variants.append((f"+e2e-{loss}" + (f" x{args.e2e_scale}" if args.e2e_scale != 1 else "") + tag,
                                 out, e2e, bap))
        for variant, folder, e2e, bap in variants:
            ev = evaluate(folder, args.max_windows, args.seqlen)
            row = {"tokens": tokens, "nsamples": n, "variant": variant, "ppl": ev["ppl"],
                   "eval_seconds": ev["eval_seconds"], "block_ap": bap, "e2e": e2e,
                   "pipeline_seconds": bap["process_seconds"] + (e2e["process_seconds"] if e2e else 0.0),
                   **({"note": args.note} if args.note else {})}
            results = merge_row(path, settings, row)
            print(f"  {variant:12s} ppl {ev['ppl']:9.2f}  pipeline {row['pipeline_seconds'] / 60:6.1f} min", flush=True)
            path.with_suffix(".md").write_text(markdown(results, fp_ppl))
            plot(results, fp_ppl, path.with_suffix(".png"))
    print(markdown(results, fp_ppl))


if __name__ == "__main__":
    main()
