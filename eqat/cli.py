"""The `eqat` command line: argument handling only; the work lives in eqat.pipeline.

Exit codes: 0 ok, 1 a run failed or a check failed, 2 bad input (the message says the fix).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eqat.cliconfig import apply_config, save_config
from eqat.cliflags import Flag, apply, command_with, flags_of, merge
from eqat.errors import EqatError, EqatInputError
from eqat.pipeline import FOREIGN_HELP, CalibOptions, EvalOptions, QuantizeOptions, TrainE2EOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="eqat: low-bit weight-only LLM quantization (EfficientQAT) and export to real runtimes.",
)
err = Console(stderr=True)
out = Console()
_json_stdout: list = []  # the real stdout while a --json run sends everything else to stderr


def emit_json(obj: object) -> None:
    """Print `obj` as JSON on the real stdout (in --json mode, the only thing written there)."""
    Console(file=_json_stdout[-1] if _json_stdout else sys.stdout).print_json(json.dumps(obj, default=str))

REPLACE_FOREIGN = typer.Option(False, "--replace-foreign", help=FOREIGN_HELP)
CONFIG = typer.Option(None, "--config", "-c", callback=apply_config, is_eager=True, expose_value=True,
                      help="YAML file of this command's options, keyed by parameter name (e.g. `max_windows: 8`, "
                           "`evaluate: false`; docs/cli.md lists the keys); flags given here win. Every run writes the options it used to <output>/eqat_<command>.yaml.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")
JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout.")


def method_flags(phases: tuple[str, ...]) -> list[Flag]:
    """Flags of the registered methods of `phases`: each engine's own fields once (they set that field
    in every method of the phase; `--e2e-` for the end-to-end engine), then each method's own fields
    (`--<cli_prefix><field>`)."""
    from eqat.methods.base import ENGINE_CONFIG, ENGINE_PREFIX, registered_methods

    flags: list[Flag] = []
    for phase in phases:
        methods = {n: m for n, m in registered_methods().items() if m.phase == phase}
        engine = ENGINE_CONFIG.get(phase)
        engine_fields = {f.name for f in dataclasses.fields(engine)} if engine else set()
        if engine and methods:
            for f in flags_of(engine, "", ENGINE_PREFIX[phase], note=f"{phase} methods"):
                f.targets = [(n, f.targets[0][1]) for n in methods]
                flags.append(f)
        for n, m in methods.items():
            flags += flags_of(m.config, n, m.cli_prefix, note=n, only=lambda f: f.name not in engine_fields)
    return merge(flags)


def method_configs() -> dict:
    """A default config for every registered method, by name (the flags write into them)."""
    from eqat.methods.base import registered_methods

    return {n: m.config() for n, m in registered_methods().items()}


def _print_e2e(section: dict) -> None:
    pm = section["peak_memory"]
    vb, va = section.get("val_loss_before"), section.get("val_loss_after")
    held = f"held-out NLL {vb:.4f} -> {va:.4f}, " if vb is not None and va is not None else ""
    out.print(f"E2E-QP: {section['steps']} steps, lr {section['lr']:.2g}, {section['trainable_params']:,} trainable scales, "
              f"{held}{section['tokens_per_second']:.0f} tokens/s, peak memory {pm['peak_bytes'] / 2**30:.2f} GiB")


def _scheme(scheme: Optional[str], bits: int, group_size: int, symmetric: bool):
    from eqat.core.scheme import QuantScheme

    return QuantScheme.parse(scheme) if scheme else QuantScheme(bits, group_size, symmetric)


def _print_warnings(report: dict) -> None:
    """A run's warnings on stderr, also with --quiet and --json (they are in report.json too)."""
    for w in report.get("warnings", []):
        err.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}", highlight=False)


def _fmt_ppl(r: Optional[dict]) -> str:
    return "-" if not r else f"{r['ppl']:.2f}"


def _quantize_flags() -> list[Flag]:
    from eqat.methods.base import BLOCKWISE, DATA_FREE, END_TO_END, plan_help

    top = flags_of(QuantizeOptions, "top")
    top[[f.param for f in top].index("method")].help += f" Registered: {plan_help()}."
    return merge(top + flags_of(EvalOptions, "eval", rename={"data": "eval_data"})
                 + flags_of(CalibOptions, "calib", rename={"data": "calib_data", "seqlen": "calib_seqlen"})
                 + method_flags((DATA_FREE, BLOCKWISE, END_TO_END)))


QUANTIZE_FLAGS = _quantize_flags()


def quantize(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    scheme: Optional[str] = typer.Option(None, help="Short scheme name, e.g. w4g64, w2g-1, w4g128sym (overrides --bits/--group-size/--symmetric)."),
    bits: int = typer.Option(4, help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(64, help="Input channels per scale/zero-point group; -1 = per output channel."),
    symmetric: bool = typer.Option(False, help="Fix the zero-point at 2^(bits-1) (GPTQ sym=True)."),
    quiet: bool = QUIET,
    json_out: bool = JSON,
    **flags,
) -> None:
    """Quantize a model (Block-AP then E2E-QP by default) and save an eqat checkpoint (with report.json and plots)."""
    from eqat.pipeline import quantize_run

    opts = QuantizeOptions(scheme=_scheme(scheme, bits, group_size, symmetric), progress=not quiet,
                           configs=method_configs())
    apply(QUANTIZE_FLAGS, flags, {"top": opts, "eval": opts.eval, "calib": opts.calib, **opts.configs})
    report = quantize_run(opts)
    save_config(ctx, report["output"])
    _print_warnings(report)
    if json_out:
        emit_json(report)
        return
    if quiet:
        return
    t = Table(title=f"eqat quantize: {Path(report['model_path']).name} -> {report['output']}")
    for col in ("model", "size MB", "perplexity", "windows x seqlen"):
        t.add_column(col)
    ev = report.get("perplexity") or {}
    win = f"{ev.get('windows', '-')} x {ev.get('seqlen', '-')}" if ev else "-"
    t.add_row("unquantized", f"{report['fp_size_bytes'] / 1e6:.1f}", _fmt_ppl(report.get("fp_perplexity")), win)
    t.add_row(f"{'+'.join(report['options']['plan'])} {opts.scheme.name}", f"{report['quantized_size_bytes'] / 1e6:.1f}",
              _fmt_ppl(ev or None), win)
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
    if report.get("e2e_qp"):
        _print_e2e(report["e2e_qp"])
    if report["coverage"]["unquantized"]:
        from eqat.models.coverage import summary

        out.print(summary(report["coverage"]), highlight=False)
    out.print(f"quantized in {report['quantize_seconds']:.1f} s, total {report['total_seconds']:.1f} s; "
              f"report: {report['output']}/report.json")


app.command(epilog="Examples:\n\n  eqat quantize                       # SmolLM2 (embedded), Block-AP + E2E-QP w4g64, perplexity\n\n"
            "  eqat quantize --scheme w2g64 --max-windows 8 --out out/w2\n\n"
            "  eqat quantize --method block-ap --scheme w3g64   # Block-AP only (same as --skip-e2e)\n\n"
            "  eqat quantize --method rtn --model ./Llama-3.2-1B --bits 3 --group-size 128 --no-eval\n\n"
            "  eqat quantize --model ./Qwen2.5-7B --device cuda --nsamples 4096 --calib-seqlen 2048 --offload disk\n\n"
            "Re-running a killed command resumes: Block-AP at the first unfinished block, E2E-QP at its last saved step.")(
    command_with(quantize, QUANTIZE_FLAGS))


EVAL_FLAGS = flags_of(EvalOptions, "eval")


def eval_cmd(
    config: Optional[str] = CONFIG,
    model: Optional[str] = typer.Argument(None, help="eqat checkpoint or Hugging Face folder; default: the embedded SmolLM2."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    report: Optional[Path] = typer.Option(None, help="Also write the result as JSON to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    **flags,
) -> None:
    """Perplexity with the standard protocol (non-overlapping windows, mean token NLL)."""
    from eqat.io.report import write_json
    from eqat.pipeline import eval_run

    ev = EvalOptions()
    apply(EVAL_FLAGS, flags, {"eval": ev})
    result = eval_run(model, ev, device=device, progress=not quiet)
    if report:
        write_json(report, result)
    if json_out:
        emit_json(result)
    elif not quiet:
        out.print(f"perplexity {result['ppl']:.3f} on {result['data']} ({result['windows']} windows x {result['seqlen']} "
                  f"tokens, {result['seconds']:.1f} s)")
    if not math.isfinite(result["ppl"]):
        raise EqatError(f"perplexity is {result['ppl']}: the model's output is not finite on {result['data']}; the "
                        "model is broken (a checkpoint from a diverged run?).")


app.command("eval", epilog="Examples:\n\n  eqat eval                              # the embedded SmolLM2, unquantized\n\n"
            "  eqat eval eqat-out/SmolLM2-135M-Instruct-w4g64-rtn --max-windows 8")(command_with(eval_cmd, EVAL_FLAGS))


TRAIN_E2E_FLAGS = merge(flags_of(TrainE2EOptions, "top") + flags_of(EvalOptions, "eval", rename={"data": "eval_data"})
                        + method_flags(("end-to-end",)))


def train_e2e(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    checkpoint: Path = typer.Argument(..., help="eqat checkpoint folder (from `eqat quantize`)."),
    quiet: bool = QUIET,
    json_out: bool = JSON,
    **flags,
) -> None:
    """E2E-QP (or another end-to-end method) on an existing eqat checkpoint: codes unchanged."""
    from eqat.pipeline import train_e2e_run

    opts = TrainE2EOptions(checkpoint=str(checkpoint), progress=not quiet, configs=method_configs())
    apply(TRAIN_E2E_FLAGS, flags, {"top": opts, "eval": opts.eval, **opts.configs})
    report = train_e2e_run(opts)
    save_config(ctx, report["output"])
    _print_warnings(report)
    if json_out:
        emit_json(report)
    elif not quiet:
        if report.get("perplexity"):
            out.print(f"perplexity {_fmt_ppl(report['perplexity_before'])} -> {_fmt_ppl(report['perplexity'])} "
                      f"({report['perplexity']['windows']} windows x {report['perplexity']['seqlen']})")
        for m in report["options"]["methods"]:
            _print_e2e(report[m.replace("-", "_")])
        out.print(f"saved {report['output']} in {report['total_seconds']:.1f} s; report: {report['output']}/report.json")


app.command("train-e2e", epilog="Examples:\n\n  eqat train-e2e eqat-out/SmolLM2-135M-Instruct-w2g64-block-ap --max-windows 8\n\n"
            "  eqat train-e2e ckpt --e2e-data sft.jsonl --prompt-format chat --e2e-steps 200 --out ckpt-sft\n\n"
            "Re-running a killed command resumes from the last saved step.")(command_with(train_e2e, TRAIN_E2E_FLAGS))


@app.command("export", epilog="Examples:\n\n  eqat export eqat-out/SmolLM2-135M-Instruct-w4g64-block-ap --format gptq --out smol-gptq\n\n"
             "  eqat export ckpt --format gptq --checkpoint-format gptq --out ckpt-gptq-v1   # force v1")
def export_cmd(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    model: str = typer.Argument(..., help="eqat checkpoint folder (written by eqat quantize)."),
    format: str = typer.Option(..., "--format", "-f",
                               help="Target format: gptq, awq, compressed-tensors or onnx (docs/formats.md)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    checkpoint_format: Optional[str] = typer.Option(
        None, help="gptq only: auto (v1 if symmetric, else v2), gptq (v1) or gptq_v2."),
    option: list[str] = typer.Option([], "--option", "-O", help="A format option KEY=VALUE, e.g. -O widen_3bit=false (onnx); repeatable."),
    force: bool = typer.Option(False, help="Replace --out if it exists (an earlier eqat output)."),
    replace_foreign: bool = REPLACE_FOREIGN,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON on stdout."),
) -> None:
    """Repack an eqat checkpoint, losslessly, into a format a runtime loads (docs/formats.md)."""
    from eqat.exporters import export_checkpoint

    options = {"checkpoint_format": checkpoint_format} if checkpoint_format is not None else {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EqatInputError(f"--option takes KEY=VALUE, got {item!r}; e.g. -O widen_3bit=false.")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    report = export_checkpoint(model, format, out_dir, force=force, progress=not quiet, replace_foreign=replace_foreign,
                               **options)
    save_config(ctx, out_dir)
    if json_out:
        emit_json(report)
    elif not quiet:
        out.print(f"wrote {out_dir} ({report['format']}, {report['quantized_layers']} layers, "
                  f"{report['seconds']:.1f} s; notes {report['notes']})")


@app.command(epilog="Examples:\n\n  eqat validate out/w4 --export out/w4-gptq --export out/w4-onnx\n\n"
             "  eqat validate out/w4 --export out/w4-ct --backends transformers,vllm --vllm-python /opt/vllm/bin/python\n\n"
             "  eqat validate out/w2 --export out/w2-gptq --windows 4 --max-ppl-delta 0.5 --json\n\n"
             "Exit codes: 0 every backend that ran is within the thresholds, 1 one is not (or failed) or no export "
             "was compared by any runtime, 2 bad input.")
def validate(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    model: str = typer.Argument(..., help="eqat checkpoint (the reference)."),
    export: list[Path] = typer.Option([], "--export", "-e", help="An `eqat export` folder to check; repeatable."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated subset of: eqat-torch, eqat-triton, gptqmodel, "
                                           "transformers, onnxruntime, vllm, bitblas; default: every one that reads the folders."),
    windows: int = typer.Option(2, help="WikiText-2 test windows to score."),
    seqlen: int = typer.Option(512, help="Window length in tokens."),
    new_tokens: int = typer.Option(16, help="Greedy tokens generated per prompt."),
    max_ppl_delta: float = typer.Option(1.0, help="Fail beyond this |perplexity delta| in percent."),
    min_top1: float = typer.Option(0.98, help="Fail below this top-1 agreement (fraction)."),
    max_kl: float = typer.Option(1e-3, help="Fail above this mean KL divergence (nats)."),
    min_top1_bf16: float = typer.Option(0.95, help="--min-top1 for bfloat16 runtimes (vLLM on CPU)."),
    max_kl_bf16: float = typer.Option(4e-3, help="--max-kl for bfloat16 runtimes."),
    vllm_python: Optional[str] = typer.Option(None, envvar="EQAT_VLLM_PYTHON",
                                              help="Python of a virtualenv with vLLM (it runs in a subprocess); "
                                              "command line or environment only, never from or into a --config file."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder; default <MODEL>/validate (replaced)."),
    replace_foreign: bool = REPLACE_FOREIGN,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Load the checkpoint and its exports through the real runtimes and compare them (validate.json/.md/.html)."""
    from eqat.validate import Thresholds, validate as run_validate, write_report
    from eqat.validate.report import COLUMNS, CONSOLE, check_report_folder, table_rows

    from eqat.io.outdir import check_output, resolve_out

    folder = resolve_out(out_dir or Path(model) / "validate")
    check_output(folder, [model, *export], force=True, replace_foreign=replace_foreign)
    check_report_folder(folder)  # before the backends, which can take minutes
    report = run_validate(model, export, [b.strip() for b in backends.split(",")] if backends else None, windows=windows,
                          seqlen=seqlen, new_tokens=new_tokens, vllm_python=vllm_python, progress=not quiet,
                          thresholds=Thresholds(max_ppl_delta, min_top1, max_kl, min_top1_bf16, max_kl_bf16))
    write_report(report, folder)
    save_config(ctx, folder)
    if json_out:
        emit_json(report)
    elif not quiet:
        t = Table(title=f"eqat validate: {Path(model).name} ({report['windows']} x {report['seqlen']} tokens)")
        keep = [COLUMNS.index(c) for c in CONSOLE]
        for col in CONSOLE:
            t.add_column(col, overflow="fold")
        style = {"pass": "green", "fail": "bold red", "error": "bold red", "skipped": "dim", "reference": "cyan"}
        for row in table_rows(report):
            t.add_row(*(row[i] for i in keep), style=style.get(row[3]))
        console = out if out.is_terminal else Console(width=140)  # logs: wide enough to read
        console.print(t)
        out.print(f"{'PASS' if report['passed'] else 'FAIL'}; report: {folder}/validate.html, validate.json, validate.md")
    if not report["passed"]:
        err.print(f"[bold red]failed:[/bold red] {escape(report['reason'])}", highlight=False)
        raise typer.Exit(1)


@app.command(epilog="Examples:\n\n  eqat info\n\n  eqat info eqat-out/SmolLM2-135M-Instruct-w4g64-rtn")
def info(model: Optional[str] = typer.Argument(None, help="eqat checkpoint or Hugging Face folder; default: the embedded SmolLM2."),
         json_out: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout.")) -> None:
    """Describe a model folder or eqat checkpoint: architecture, valid group sizes, scheme, and which
    export formats can hold it."""
    from eqat.io.checkpoint import is_eqat_checkpoint, read_eqat_config
    from eqat.models.coverage import folder_coverage, summary
    from eqat.models.loading import check_model_dir
    from eqat.pipeline import resolve_model

    path = check_model_dir(resolve_model(model))
    cfg = json.loads((path / "config.json").read_text())
    sizes = sorted({cfg.get("hidden_size"), cfg.get("intermediate_size")} - {None})
    desc: dict = {"path": str(path), "model_type": cfg.get("model_type"), "blocks": cfg.get("num_hidden_layers"),
                  "hidden_size": cfg.get("hidden_size"), "intermediate_size": cfg.get("intermediate_size"),
                  "heads": cfg.get("num_attention_heads"), "kv_heads": cfg.get("num_key_value_heads"),
                  "valid_group_sizes": {k: [g for g in (16, 32, 64, 128, 256) if k % g == 0] + [-1] for k in sizes},
                  "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
    try:
        desc["coverage"] = folder_coverage(path)
    except (EqatInputError, ValueError, KeyError) as e:  # a config transformers cannot build: describe the rest
        desc["coverage"] = {"error": str(e)}
    if is_eqat_checkpoint(path):
        from eqat.exporters.base import checkpoint_formats

        meta = read_eqat_config(path)
        desc["eqat"] = {"format_version": meta["format_version"], "scheme": meta["scheme"], "storage_dtype": meta["storage_dtype"],
                        "quantized_modules": len(meta["quantized_modules"]), "method": meta["provenance"].get("method")}
        desc["export_formats"] = checkpoint_formats(path)
    if json_out:
        emit_json(desc)
        return
    out.print(f"[bold]{path}[/bold]")
    out.print(f"  model_type {desc['model_type']}, {desc['blocks']} blocks, hidden {desc['hidden_size']}, "
              f"intermediate {desc['intermediate_size']}, heads {desc['heads']}/{desc['kv_heads']}")
    for k, valid in desc["valid_group_sizes"].items():
        out.print(f"  in_features {k}: valid group sizes {valid}")
    if "eqat" in desc:
        e = desc["eqat"]
        out.print(f"  eqat checkpoint v{e['format_version']}: scheme {e['scheme']}, storage {e['storage_dtype']}, "
                  f"{e['quantized_modules']} quantized modules, method {e['method']}")
        for fmt, why in desc["export_formats"].items():
            out.print(f"  export {fmt}: {'yes' if why is None else 'no, ' + why}", highlight=False)
    out.print(f"  {summary(desc['coverage'], would='eqat' not in desc)}", highlight=False)
    out.print(f"  on disk {desc['bytes_on_disk'] / 1e6:.1f} MB")


def main() -> None:
    """Entry point: maps eqat's errors to exit codes (2 bad input, 1 failure). With --json, whatever
    else would reach stdout (progress, libraries' banners and logs) goes to stderr, so stdout holds
    the JSON alone."""
    if "--json" in sys.argv[1:]:
        _json_stdout.append(sys.stdout)
        sys.stdout = sys.stderr
    try:
        _run()
    finally:
        if _json_stdout:
            sys.stdout = _json_stdout.pop()


def _disk_error(e: OSError) -> str | None:
    """The message for a write that the disk refused (full, read-only, no permission), else None.
    Every output is written to a temporary name first, so nothing half-written is left under a
    final name; resumable runs resume."""
    where = f" while writing {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full{where}. Nothing was left half-written; free some space (or choose another --out) "
                "and re-run the same command: an interrupted quantize or train-e2e resumes.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}. Choose a writable --out."
    return None


def _run() -> None:
    try:
        rc = app(standalone_mode=False)  # returns the exit code of typer.Exit, e.g. 130 for Ctrl-C
        if isinstance(rc, int) and rc:
            if rc == 130:
                err.print("interrupted; re-run the same command to resume")
            sys.exit(rc)
    except EqatInputError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        sys.exit(2)
    except EqatError as e:
        err.print(f"[bold red]failed:[/bold red] {escape(str(e))}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume")
        sys.exit(130)
    except OSError as e:
        why = _disk_error(e)
        if why is None:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(why)}")
        sys.exit(2)
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
