"""The `eqat` command line: argument handling only; the work lives in eqat.run.

Exit codes: 0 ok, 1 a run failed or a check failed, 2 bad input (the message says the fix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from eqat.errors import EqatError, EqatInputError
from eqat.run import CalibOptions
from eqat.train.blockap import BlockAPConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="eqat: low-bit weight-only LLM quantization (EfficientQAT) and export to real runtimes.",
)
err = Console(stderr=True)
_CALIB, _BAP = CalibOptions(), BlockAPConfig()  # option defaults come from the option dataclasses
out = Console()


def _scheme(scheme: Optional[str], bits: int, group_size: int, symmetric: bool):
    from eqat.scheme import QuantScheme

    return QuantScheme.parse(scheme) if scheme else QuantScheme(bits, group_size, symmetric)


def _fmt_ppl(r: Optional[dict]) -> str:
    return "-" if not r else f"{r['ppl']:.2f}"


@app.command(epilog="Examples:\n\n  eqat quantize                       # SmolLM2 (embedded), Block-AP w4g64, perplexity\n\n"
             "  eqat quantize --scheme w2g64 --max-windows 8 --out out/w2\n\n"
             "  eqat quantize --method rtn --model ./Llama-3.2-1B --bits 3 --group-size 128 --no-eval\n\n"
             "  eqat quantize --model ./Qwen2.5-7B --device cuda --nsamples 4096 --calib-seqlen 2048 --offload disk\n\n"
             "Re-running a killed Block-AP command resumes at the first unfinished block.")
def quantize(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local Hugging Face causal-LM folder; default: the embedded SmolLM2-135M-Instruct."),
    method: str = typer.Option("block-ap", help="Quantization method: block-ap (EfficientQAT phase 1) or rtn."),
    scheme: Optional[str] = typer.Option(None, help="Short scheme name, e.g. w4g64, w2g-1, w4g128sym (overrides --bits/--group-size/--symmetric)."),
    bits: int = typer.Option(4, help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(64, help="Input channels per scale/zero-point group; -1 = per output channel."),
    symmetric: bool = typer.Option(False, help="Fix the zero-point at 2^(bits-1) (GPTQ sym=True)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default eqat-out/<model>-<scheme>-<method>."),
    dtype: str = typer.Option("float16", help="Storage dtype of scales and zero-points: float16 or bfloat16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure perplexity before and after quantizing."),
    eval_data: str = typer.Option("wikitext2", help="Evaluation text: wikitext2, c4, a .txt/.jsonl path, ..."),
    seqlen: int = typer.Option(2048, help="Evaluation window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows (bounds CPU time)."),
    calib_data: str = typer.Option(_CALIB.data, help="Calibration text (block-ap): c4, c4-hub, redpajama, wikitext2-hub, a .txt/.jsonl path."),
    nsamples: int = typer.Option(_CALIB.nsamples, help="Calibration windows to train on (block-ap)."),
    calib_seqlen: int = typer.Option(_CALIB.seqlen, help="Calibration window length in tokens (block-ap)."),
    val_samples: int = typer.Option(_BAP.val_samples, help="Further windows held out to measure each block's loss (block-ap)."),
    epochs: int = typer.Option(_BAP.epochs, help="Epochs over the calibration windows per block (block-ap)."),
    batch_size: int = typer.Option(_BAP.batch_size, help="Windows per step (block-ap)."),
    lr_weight: Optional[float] = typer.Option(None, help="Weight learning rate (block-ap); default depends on bits, see docs/block-ap.md."),
    lr_quant: float = typer.Option(_BAP.lr_quant, help="Learning rate of scales and zero-points (block-ap)."),
    loss: str = typer.Option(_BAP.loss, help="Block reconstruction loss (block-ap): mse (the paper) or relative (per-token, robust to massive activations)."),
    offload: str = typer.Option(_BAP.offload, help="Where block activations live (block-ap): cpu (memory) or disk (memory-mapped files)."),
    act_dtype: str = typer.Option(_BAP.act_dtype, help="dtype of stored activations (block-ap): bfloat16, float16, float32."),
    seed: int = typer.Option(_CALIB.seed, help="Seed for calibration sampling and shuffling."),
    force: bool = typer.Option(False, help="Discard an existing output folder (finished or not) and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize a model and save an eqat checkpoint (with report.json and plots)."""
    from eqat.run import CalibOptions, EvalOptions, QuantizeOptions, quantize_run
    from eqat.train.blockap import BlockAPConfig

    opts = QuantizeOptions(
        model=model, method=method, scheme=_scheme(scheme, bits, group_size, symmetric),
        out=str(out_dir) if out_dir else None, dtype=dtype, device=device, force=force, evaluate=evaluate,
        eval=EvalOptions(eval_data, seqlen, max_windows), calib=CalibOptions(calib_data, nsamples, calib_seqlen, seed),
        block_ap=BlockAPConfig(epochs=epochs, batch_size=batch_size, lr_weight=lr_weight, lr_quant=lr_quant,
                               val_samples=val_samples, loss=loss, act_dtype=act_dtype, offload=offload),
        progress=not quiet,
    )
    report = quantize_run(opts)
    if json_out:
        out.print_json(json.dumps(report, default=str))
        return
    if quiet:
        return
    t = Table(title=f"eqat quantize: {Path(report['model_path']).name} -> {report['output']}")
    for col in ("model", "size MB", "perplexity", "windows x seqlen"):
        t.add_column(col)
    ev = report.get("perplexity") or {}
    win = f"{ev.get('windows', '-')} x {ev.get('seqlen', '-')}" if ev else "-"
    t.add_row("unquantized", f"{report['fp_size_bytes'] / 1e6:.1f}", _fmt_ppl(report.get("fp_perplexity")), win)
    t.add_row(f"{opts.method} {opts.scheme.name}", f"{report['quantized_size_bytes'] / 1e6:.1f}", _fmt_ppl(ev or None), win)
    out.print(t)
    if report.get("blocks"):
        bt = Table(title="Block-AP: block output MSE on held-out windows")
        for col in ("block", "before (RTN)", "after", "time s"):
            bt.add_column(col, justify="right")
        for b in report["blocks"]:
            bt.add_row(str(b["block"]), f"{b['init_loss']:.4g}", f"{b['final_loss']:.4g}", f"{b['seconds']:.1f}")
        out.print(bt)
        ba = report["block_ap"]
        out.print(f"peak memory {ba['peak_memory_bytes'] / 2**30:.2f} GiB, {ba['seconds_per_block']:.1f} s per block")
    out.print(f"quantized in {report['quantize_seconds']:.1f} s, total {report['total_seconds']:.1f} s; "
              f"report: {report['output']}/report.json")


@app.command("eval", epilog="Examples:\n\n  eqat eval                              # the embedded SmolLM2, unquantized\n\n"
             "  eqat eval eqat-out/SmolLM2-135M-Instruct-w4g64-rtn --max-windows 8")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="eqat checkpoint or Hugging Face folder; default: the embedded SmolLM2."),
    data: str = typer.Option("wikitext2", help="Evaluation text: wikitext2, c4, a .txt/.jsonl path, ..."),
    seqlen: int = typer.Option(2048, help="Window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    report: Optional[Path] = typer.Option(None, help="Also write the result as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Perplexity with the standard protocol (non-overlapping windows, mean token NLL)."""
    from eqat.report import write_json
    from eqat.run import EvalOptions, eval_run

    result = eval_run(model, EvalOptions(data, seqlen, max_windows), device=device, progress=not quiet)
    if report:
        write_json(report, result)
    if json_out:
        out.print_json(json.dumps(result, default=str))
    elif not quiet:
        out.print(f"perplexity {result['ppl']:.3f} on {result['data']} ({result['windows']} windows x {result['seqlen']} "
                  f"tokens, {result['seconds']:.1f} s)")


@app.command(epilog="Examples:\n\n  eqat info\n\n  eqat info eqat-out/SmolLM2-135M-Instruct-w4g64-rtn")
def info(model: Optional[str] = typer.Argument(None, help="eqat checkpoint or Hugging Face folder; default: the embedded SmolLM2.")) -> None:
    """Describe a model folder or eqat checkpoint: architecture, quantizable layers, scheme."""
    from eqat.checkpoint import is_eqat_checkpoint, read_eqat_config
    from eqat.model import check_model_dir
    from eqat.run import resolve_model

    path = check_model_dir(resolve_model(model))
    cfg = json.loads((path / "config.json").read_text())
    out.print(f"[bold]{path}[/bold]")
    out.print(f"  model_type {cfg.get('model_type')}, {cfg.get('num_hidden_layers')} blocks, hidden {cfg.get('hidden_size')}, "
              f"intermediate {cfg.get('intermediate_size')}, heads {cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')}")
    sizes = sorted({cfg.get("hidden_size"), cfg.get("intermediate_size")} - {None})
    for k in sizes:
        valid = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
        out.print(f"  in_features {k}: valid group sizes {valid} and -1")
    if is_eqat_checkpoint(path):
        meta = read_eqat_config(path)
        out.print(f"  eqat checkpoint v{meta['format_version']}: scheme {meta['scheme']}, storage {meta['storage_dtype']}, "
                  f"{len(meta['quantized_modules'])} quantized modules, method {meta['provenance'].get('method')}")
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    out.print(f"  on disk {size / 1e6:.1f} MB")


def main() -> None:
    """Entry point: maps eqat's errors to exit codes (2 bad input, 1 failure)."""
    try:
        rc = app(standalone_mode=False)  # returns the exit code of typer.Exit, e.g. 130 for Ctrl-C
        if isinstance(rc, int) and rc:
            if rc == 130:
                err.print("interrupted; re-run the same command to resume a Block-AP run")
            sys.exit(rc)
    except EqatInputError as e:
        err.print(f"[bold red]error:[/bold red] {e}")
        sys.exit(2)
    except EqatError as e:
        err.print(f"[bold red]failed:[/bold red] {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume a Block-AP run")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as e:  # usage errors (bad option values) with standalone_mode=False
        if hasattr(e, "show"):
            e.show()
        sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    main()
