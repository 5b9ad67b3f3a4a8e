"""`eqat export`, `eqat validate` and `eqat info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eqat.cli.common import CONFIG, REPLACE_FOREIGN, app, emit_json, err, out
from eqat.cli.config import save_config
from eqat.errors import EqatInputError


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
def info(model: Optional[str] = typer.Argument(None, help="eqat checkpoint, Hugging Face folder or packaged model (gemma3-270m); default: the embedded SmolLM2."),
         json_out: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout.")) -> None:
    """Describe a model folder or eqat checkpoint: architecture, valid group sizes, scheme, which
    export formats can hold it, and the registered quantization methods."""
    from eqat.core.layer_schemes import bits_text
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
    from eqat.models.families import registered_families

    fam = registered_families().get(cfg.get("model_type") or "")
    desc["family"] = (None if fam is None else
                      {"name": fam.name, "sites": [s.name for s in fam.sites], "notes": fam.notes})
    try:
        desc["coverage"] = folder_coverage(path)
    except (EqatInputError, ValueError, KeyError) as e:  # a config transformers cannot build: describe the rest
        desc["coverage"] = {"error": str(e)}
    if is_eqat_checkpoint(path):
        from eqat.exporters.base import checkpoint_bits, checkpoint_formats, checkpoint_schemes

        meta = read_eqat_config(path)
        desc["eqat"] = {"format_version": meta["format_version"], "scheme": meta["scheme"], "storage_dtype": meta["storage_dtype"],
                        "quantized_modules": len(meta["quantized_modules"]), "method": meta["provenance"].get("method"),
                        "module_schemes": {n: s.name for n, s in checkpoint_schemes(meta).layers.items()},
                        "bits": checkpoint_bits(path)}
        desc["export_formats"] = checkpoint_formats(path)
    from eqat.methods.base import registered_methods

    desc["methods"] = {n: {"phase": m.phase, "summary": m.summary} for n, m in registered_methods().items()}
    if json_out:
        emit_json(desc)
        return
    out.print(f"[bold]{path}[/bold]")
    out.print(f"  model_type {desc['model_type']}, {desc['blocks']} blocks, hidden {desc['hidden_size']}, "
              f"intermediate {desc['intermediate_size']}, heads {desc['heads']}/{desc['kv_heads']}")
    fam = desc["family"]
    out.print(f"  family {fam['name']}: SmoothQuant/QLLM sites {', '.join(fam['sites']) or 'none'}"
              f"{'; ' + fam['notes'] if fam['notes'] else ''}" if fam else
              "  family: none for this model type (eqat refuses it; docs/extending.md)", highlight=False)
    for k, valid in desc["valid_group_sizes"].items():
        out.print(f"  in_features {k}: valid group sizes {valid}")
    if "eqat" in desc:
        e = desc["eqat"]
        out.print(f"  eqat checkpoint v{e['format_version']}: scheme {e['scheme']}, storage {e['storage_dtype']}, "
                  f"{e['quantized_modules']} quantized modules, method {e['method']}")
        by = ", ".join(f"{k} {v['layers']} layers" for k, v in e["bits"]["by_scheme"].items())
        out.print(f"  {bits_text(e['bits'])} ({by})", highlight=False)
        for fmt, why in desc["export_formats"].items():
            out.print(f"  export {fmt}: {'yes' if why is None else 'no, ' + why}", highlight=False)
    out.print(f"  {summary(desc['coverage'], would='eqat' not in desc)}", highlight=False)
    out.print(f"  on disk {desc['bytes_on_disk'] / 1e6:.1f} MB")
    out.print("  methods (eqat quantize --method A+B):", highlight=False)
    for n, m in desc["methods"].items():
        out.print(f"    {n} ({m['phase']}): {m['summary']}", highlight=False)
