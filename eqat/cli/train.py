"""`eqat quantize`, `eqat train-e2e` and `eqat eval`: their flags are generated from the option
dataclasses of the pipeline and of every registered method (eqat.cli.flags)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from eqat.cli.common import (CONFIG, JSON, QUIET, _fmt_ppl, _print_e2e, _print_warnings, _scheme, app, emit_json,
                             out)
from eqat.cli.config import save_config
from eqat.cli.flags import Flag, apply, command_with, flags_of, merge
from eqat.core.layer_schemes import bits_text
from eqat.errors import EqatError
from eqat.methods.base import report_key
from eqat.options import CalibOptions, EvalOptions, QuantizeOptions, TrainE2EOptions


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
        if engine and methods:  # "@<phase>": every config of that phase, also of methods registered later
            for f in flags_of(engine, "", ENGINE_PREFIX[phase], note=f"{phase} methods"):
                f.targets = [(f"@{phase}", f.targets[0][1])]
                flags.append(f)
        for n, m in methods.items():
            flags += flags_of(m.config, n, m.cli_prefix, note=n, only=lambda f: f.name not in engine_fields)
    return merge(flags)


def method_configs() -> dict:
    """A default config for every registered method, by name (the flags write into them)."""
    from eqat.methods.base import registered_methods

    return {n: m.config() for n, m in registered_methods().items()}


def config_sections(configs: dict) -> dict:
    """Where flags write: each method's config by name, and "@<phase>" for all configs of a phase."""
    from eqat.methods.base import registered_methods

    methods = registered_methods()
    by_phase: dict = {}
    for n, cfg in configs.items():
        by_phase.setdefault(f"@{methods[n].phase}", []).append(cfg)
    return {**configs, **by_phase}


def _quantize_flags() -> list[Flag]:
    from eqat.methods.base import BLOCKWISE, DATA_FREE, END_TO_END, plan_help

    top = flags_of(QuantizeOptions, "top")
    top[[f.param for f in top].index("method")].help += f" Registered: {plan_help()}."
    return merge(top + flags_of(EvalOptions, "eval", rename={"data": "eval_data"})
                 + flags_of(CalibOptions, "calib", rename={"data": "calib_data", "seqlen": "calib_seqlen"})
                 + method_flags((DATA_FREE, BLOCKWISE, END_TO_END)))


QUANTIZE_FLAGS = _quantize_flags()


def ignored_method_flags(ctx: typer.Context, flags: list[Flag], plan: list) -> list[str]:
    """Warnings for the method flags the user set (on the command line, or to a non-default value in
    --config) that no method of `plan` reads: nothing a user asked for is dropped silently."""
    from eqat.methods.base import registered_methods

    methods, run = registered_methods(), {m.name for m in plan} | {f"@{m.phase}" for m in plan}
    ignored = []
    for f in flags:
        sections = {s for s, _ in f.targets}
        if not all(s.startswith("@") or s in methods for s in sections) or sections & run:
            continue  # a pipeline flag, or one that a method of the plan reads
        source = getattr(ctx.get_parameter_source(f.param), "name", None)  # typer may carry its own click
        if source == "COMMANDLINE" or (source == "DEFAULT_MAP" and ctx.params.get(f.param) != f.default):
            owners = ", ".join(sorted(s[1:] + " methods" if s.startswith("@") else s for s in sections))
            ignored.append(f"{f.decls[0].split('/')[0]} is an option of {owners}, which this plan "
                           f"({'+'.join(m.name for m in plan)}) does not run: it was ignored.")
    return ignored


def quantize(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    scheme: Optional[str] = typer.Option(None, help="Short scheme name, e.g. w4g64, w2g-1, w4g128sym; a<bits>[sym] after it quantizes the input activations too, per token (w8g-1a8, docs/checkpoint-format.md). Overrides --bits/--group-size/--symmetric."),
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
    apply(QUANTIZE_FLAGS, flags, {"top": opts, "eval": opts.eval, "calib": opts.calib, **config_sections(opts.configs)})
    opts.ignored_flags = ignored_method_flags(ctx, QUANTIZE_FLAGS, opts.plan())
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
    name = opts.scheme.name + ("-mixed" if report["schemes"]["layers"] else "")
    t.add_row(f"{'+'.join(report['options']['plan'])} {name}", f"{report['quantized_size_bytes'] / 1e6:.1f}",
              _fmt_ppl(ev or None), win)
    out.print(t)
    if report.get("blocks"):
        bt = Table(title="Block-AP: block output MSE on held-out windows")
        for col in ("block", "before (RTN)", "after", "kept", "time s"):
            bt.add_column(col, justify="right")
        for b in report["blocks"]:
            kept = {0: "start", -1: "last"}.get(b.get("kept_epoch", -1), f"epoch {b.get('kept_epoch')}")
            kept += " (nll)" if b.get("selected_by") == "nll" else ""
            bt.add_row(str(b["block"]), f"{b['init_loss']:.4g}", f"{b['final_loss']:.4g}", kept, f"{b['seconds']:.1f}")
        out.print(bt)
        ba = report["block_ap"]
        out.print(f"peak memory {ba['peak_memory_bytes'] / 2**30:.2f} GiB, {ba['seconds_per_block']:.1f} s per block")
    if report.get("e2e_qp"):
        _print_e2e(report["e2e_qp"])
    if report["coverage"]["unquantized"]:
        from eqat.models.coverage import summary

        out.print(summary(report["coverage"]), highlight=False)
    out.print(f"{name}: {bits_text(report['bits'])}", highlight=False)
    out.print(f"quantized in {report['quantize_seconds']:.1f} s, total {report['total_seconds']:.1f} s; "
              f"report: {report['output']}/report.json")


app.command(epilog="Examples:\n\n  eqat quantize                       # SmolLM2 (embedded), Block-AP + E2E-QP w4g64, perplexity\n\n"
            "  eqat quantize --scheme w2g64 --max-windows 8 --out out/w2\n\n"
            "  eqat quantize --method block-ap --scheme w3g64   # Block-AP only (same as --skip-e2e)\n\n"
            "  eqat quantize --scheme w2g64 --avg-bits 2.25      # mixed precision: sensitive layers at 8 bits\n\n"
            "  eqat quantize --scheme w2g64 --override 'layers.11.mlp.down_proj=w8g64'\n\n"
            "  eqat quantize --method rtn --model ./Llama-3.2-1B --bits 3 --group-size 128 --no-eval\n\n"
            "  eqat quantize --model ./Qwen2.5-7B --device cuda --nsamples 4096 --calib-seqlen 2048 --offload disk\n\n"
            "Re-running a killed command resumes: Block-AP at the first unfinished block, E2E-QP at its last saved step.")(
    command_with(quantize, QUANTIZE_FLAGS))


EVAL_FLAGS = flags_of(EvalOptions, "eval")


def eval_cmd(
    config: Optional[str] = CONFIG,
    model: Optional[str] = typer.Argument(None, help="eqat checkpoint, Hugging Face folder or packaged model (gemma3-270m); default: the embedded SmolLM2."),
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
    apply(TRAIN_E2E_FLAGS, flags, {"top": opts, "eval": opts.eval, **config_sections(opts.configs)})
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
            _print_e2e(report[report_key(m)])
        out.print(f"saved {report['output']} in {report['total_seconds']:.1f} s; report: {report['output']}/report.json")


app.command("train-e2e", epilog="Examples:\n\n  eqat train-e2e eqat-out/SmolLM2-135M-Instruct-w2g64-block-ap --max-windows 8\n\n"
            "  eqat train-e2e ckpt --e2e-data sft.jsonl --prompt-format chat --e2e-steps 200 --out ckpt-sft\n\n"
            "Re-running a killed command resumes from the last saved step.")(command_with(train_e2e, TRAIN_E2E_FLAGS))
