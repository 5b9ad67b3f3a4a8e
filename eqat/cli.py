"""The `eqat` command line: argument handling only; the work lives in eqat.pipeline.

Exit codes: 0 ok, 1 a run failed or a check failed, 2 bad input (the message says the fix).
"""

from __future__ import annotations

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
from eqat.errors import EqatError, EqatInputError
from eqat.pipeline import CalibOptions
from eqat.engine.blockwise import BlockAPConfig
from eqat.engine.end2end import E2EQPConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="eqat: low-bit weight-only LLM quantization (EfficientQAT) and export to real runtimes.",
)
err = Console(stderr=True)
_CALIB, _BAP, _E2E = CalibOptions(), BlockAPConfig(), E2EQPConfig()  # defaults come from the option dataclasses
out = Console()
_json_stdout: list = []  # the real stdout while a --json run sends everything else to stderr


def emit_json(obj: object) -> None:
    """Print `obj` as JSON on the real stdout (in --json mode, the only thing written there)."""
    Console(file=_json_stdout[-1] if _json_stdout else sys.stdout).print_json(json.dumps(obj, default=str))

FORCE = typer.Option(False, help="Discard an existing output folder that eqat wrote (finished or not) and start over.")
REPLACE_FOREIGN = typer.Option(False, "--replace-foreign",
                               help="With --force: also replace a non-empty folder eqat did not write. The current folder, "
                                    "the home folder and the run's inputs are never replaced.")
CONFIG = typer.Option(None, "--config", "-c", callback=apply_config, is_eager=True, expose_value=True,
                      help="YAML file of this command's options, keyed by parameter name (e.g. `max_windows: 8`, "
                           "`evaluate: false`; docs/cli.md lists the keys); flags given here win. Every run writes the options it used to <output>/eqat_<command>.yaml.")

# E2E-QP options, shared by `quantize` and `train-e2e`
E2E_DATA = typer.Option(_E2E.data, "--e2e-data", help="E2E-QP training text: c4, a .txt/.jsonl path; a .jsonl with prompt/response fields trains on the responses only.")
E2E_NSAMPLES = typer.Option(_E2E.nsamples, "--e2e-nsamples", help="E2E-QP training sequences.")
E2E_VAL = typer.Option(_E2E.val_samples, "--e2e-val-samples", help="Held-out sequences of the same text, scored before and after E2E-QP.")
E2E_SEQLEN = typer.Option(_E2E.seqlen, "--e2e-seqlen", help="E2E-QP sequence length in tokens.")
E2E_EPOCHS = typer.Option(_E2E.epochs, "--e2e-epochs", help="Epochs over the E2E-QP sequences.")
E2E_STEPS = typer.Option(None, "--e2e-steps", help="Optimizer steps (overrides --e2e-epochs).")
E2E_LR = typer.Option(None, "--e2e-lr", help="Learning rate of the scales; default 1e-3 at 2 bits, 5e-4 at 3/4/8 (docs/e2e-qp.md).")
E2E_BATCH = typer.Option(_E2E.batch_size, "--e2e-batch-size", help="Sequences per forward pass.")
E2E_ACCUM = typer.Option(_E2E.grad_accum, "--e2e-grad-accum", help="Forward passes per optimizer step.")
E2E_SCHED = typer.Option(_E2E.schedule, "--e2e-schedule", help="Learning-rate schedule after warm-up: cosine or constant.")
E2E_WARMUP = typer.Option(_E2E.warmup_ratio, "--e2e-warmup", help="Warm-up as a fraction of the steps.")
E2E_CLIP = typer.Option(_E2E.max_grad_norm, "--e2e-max-grad-norm", help="Gradient-norm clip (0 = none).")
E2E_ZEROS = typer.Option(False, "--e2e-train-zeros", help="Also train the zero-points (kept on the integer grid).")
E2E_CKPT = typer.Option(False, "--grad-checkpointing", help="Recompute each block in the backward (less memory, ~1.3x time).")
E2E_SAVE = typer.Option(_E2E.save_every, "--e2e-save-every", help="Write the resumable E2E-QP state every this many steps.")
E2E_PROMPT = typer.Option(_E2E.prompt_format, "--prompt-format", help="Instruction data: plain (prompt + response) or chat (the tokenizer's chat template).")


def _e2e_config(data, nsamples, val, seqlen, epochs, steps, lr, batch, accum, sched, warmup, clip, zeros, ckpt, prompt,
                save) -> E2EQPConfig:
    return E2EQPConfig(data=data, nsamples=nsamples, val_samples=val, seqlen=seqlen, epochs=epochs, max_steps=steps, lr=lr,
                       batch_size=batch, grad_accum=accum, schedule=sched, warmup_ratio=warmup, max_grad_norm=clip,
                       train_zeros=zeros, grad_checkpointing=ckpt, prompt_format=prompt, save_every=save)


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


@app.command(epilog="Examples:\n\n  eqat quantize                       # SmolLM2 (embedded), Block-AP w4g64, perplexity\n\n"
             "  eqat quantize --scheme w2g64 --max-windows 8 --out out/w2\n\n"
             "  eqat quantize --method rtn --model ./Llama-3.2-1B --bits 3 --group-size 128 --no-eval\n\n"
             "  eqat quantize --model ./Qwen2.5-7B --device cuda --nsamples 4096 --calib-seqlen 2048 --offload disk\n\n"
             "Re-running a killed Block-AP command resumes at the first unfinished block.")
def quantize(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
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
    skip_e2e: bool = typer.Option(False, "--skip-e2e", help="Stop after Block-AP (no E2E-QP phase)."),
    e2e_data: str = E2E_DATA, e2e_nsamples: int = E2E_NSAMPLES, e2e_val_samples: int = E2E_VAL,
    e2e_seqlen: int = E2E_SEQLEN, e2e_epochs: int = E2E_EPOCHS, e2e_steps: Optional[int] = E2E_STEPS,
    e2e_lr: Optional[float] = E2E_LR, e2e_batch_size: int = E2E_BATCH, e2e_grad_accum: int = E2E_ACCUM,
    e2e_schedule: str = E2E_SCHED, e2e_warmup: float = E2E_WARMUP, e2e_max_grad_norm: float = E2E_CLIP,
    e2e_train_zeros: bool = E2E_ZEROS, grad_checkpointing: bool = E2E_CKPT, prompt_format: str = E2E_PROMPT,
    e2e_save_every: int = E2E_SAVE,
    force: bool = FORCE, replace_foreign: bool = REPLACE_FOREIGN,
    allow_unquantized: bool = typer.Option(False, "--allow-unquantized", help="Go on when more than 10% of the decoder "
                                           "blocks' weight matrices would stay in full precision (e.g. fused MoE experts, "
                                           "which are not nn.Linear); report.json records the share."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize a model (Block-AP then E2E-QP by default) and save an eqat checkpoint (with report.json and plots)."""
    from eqat.pipeline import CalibOptions, EvalOptions, QuantizeOptions, quantize_run
    from eqat.engine.blockwise import BlockAPConfig

    opts = QuantizeOptions(
        model=model, method=method, scheme=_scheme(scheme, bits, group_size, symmetric),
        out=str(out_dir) if out_dir else None, dtype=dtype, device=device, force=force,
        replace_foreign=replace_foreign, evaluate=evaluate,
        eval=EvalOptions(eval_data, seqlen, max_windows), calib=CalibOptions(calib_data, nsamples, calib_seqlen, seed),
        block_ap=BlockAPConfig(epochs=epochs, batch_size=batch_size, lr_weight=lr_weight, lr_quant=lr_quant,
                               val_samples=val_samples, loss=loss, act_dtype=act_dtype, offload=offload),
        skip_e2e=skip_e2e,
        e2e=_e2e_config(e2e_data, e2e_nsamples, e2e_val_samples, e2e_seqlen, e2e_epochs, e2e_steps, e2e_lr, e2e_batch_size,
                        e2e_grad_accum, e2e_schedule, e2e_warmup, e2e_max_grad_norm, e2e_train_zeros, grad_checkpointing,
                        prompt_format, e2e_save_every),
        progress=not quiet, allow_unquantized=allow_unquantized,
    )
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
    t.add_row(f"{opts.method}{'+e2e-qp' if opts.runs_e2e else ''} {opts.scheme.name}", f"{report['quantized_size_bytes'] / 1e6:.1f}", _fmt_ppl(ev or None), win)
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


@app.command("eval", epilog="Examples:\n\n  eqat eval                              # the embedded SmolLM2, unquantized\n\n"
             "  eqat eval eqat-out/SmolLM2-135M-Instruct-w4g64-rtn --max-windows 8")
def eval_cmd(
    config: Optional[str] = CONFIG,
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
    from eqat.io.report import write_json
    from eqat.pipeline import EvalOptions, eval_run

    result = eval_run(model, EvalOptions(data, seqlen, max_windows), device=device, progress=not quiet)
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


@app.command("train-e2e", epilog="Examples:\n\n  eqat train-e2e eqat-out/SmolLM2-135M-Instruct-w2g64-block-ap --max-windows 8\n\n"
             "  eqat train-e2e ckpt --e2e-data sft.jsonl --prompt-format chat --e2e-steps 200 --out ckpt-sft\n\n"
             "Re-running a killed command resumes from the last saved step.")
def train_e2e(
    ctx: typer.Context,
    config: Optional[str] = CONFIG,
    checkpoint: Path = typer.Argument(..., help="eqat checkpoint folder (from `eqat quantize`)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default <checkpoint>-e2e."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure perplexity before and after."),
    eval_data: str = typer.Option("wikitext2", help="Evaluation text: wikitext2, c4, a .txt/.jsonl path, ..."),
    seqlen: int = typer.Option(2048, help="Evaluation window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows (bounds CPU time)."),
    e2e_data: str = E2E_DATA, e2e_nsamples: int = E2E_NSAMPLES, e2e_val_samples: int = E2E_VAL,
    e2e_seqlen: int = E2E_SEQLEN, e2e_epochs: int = E2E_EPOCHS, e2e_steps: Optional[int] = E2E_STEPS,
    e2e_lr: Optional[float] = E2E_LR, e2e_batch_size: int = E2E_BATCH, e2e_grad_accum: int = E2E_ACCUM,
    e2e_schedule: str = E2E_SCHED, e2e_warmup: float = E2E_WARMUP, e2e_max_grad_norm: float = E2E_CLIP,
    e2e_train_zeros: bool = E2E_ZEROS, grad_checkpointing: bool = E2E_CKPT, prompt_format: str = E2E_PROMPT,
    e2e_save_every: int = E2E_SAVE,
    seed: int = typer.Option(_E2E.seed, help="Seed for sampling and shuffling the training sequences."),
    force: bool = FORCE, replace_foreign: bool = REPLACE_FOREIGN,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """E2E-QP on an existing eqat checkpoint: train the scales end to end, codes unchanged."""
    from eqat.pipeline import EvalOptions
    from eqat.pipeline_e2e import TrainE2EOptions, train_e2e_run

    cfg = _e2e_config(e2e_data, e2e_nsamples, e2e_val_samples, e2e_seqlen, e2e_epochs, e2e_steps, e2e_lr, e2e_batch_size,
                      e2e_grad_accum, e2e_schedule, e2e_warmup, e2e_max_grad_norm, e2e_train_zeros, grad_checkpointing,
                      prompt_format, e2e_save_every)
    cfg.seed = seed
    report = train_e2e_run(TrainE2EOptions(str(checkpoint), str(out_dir) if out_dir else None, device, force,
                                           replace_foreign, evaluate, EvalOptions(eval_data, seqlen, max_windows), cfg,
                                           progress=not quiet))
    save_config(ctx, report["output"])
    _print_warnings(report)
    if json_out:
        emit_json(report)
    elif not quiet:
        if report.get("perplexity"):
            out.print(f"perplexity {_fmt_ppl(report['perplexity_before'])} -> {_fmt_ppl(report['perplexity'])} "
                      f"({report['perplexity']['windows']} windows x {report['perplexity']['seqlen']})")
        _print_e2e(report["e2e_qp"])
        out.print(f"saved {report['output']} in {report['total_seconds']:.1f} s; report: {report['output']}/report.json")


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
