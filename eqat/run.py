"""Whole runs behind the CLI: `quantize_run` and `eval_run`. Options in, report out.

They validate every input before any heavy work or any write, show progress on stderr,
and write the output folder atomically with its report (JSON) and plot inside.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eqat.checkpoint import is_eqat_checkpoint, load_quantized, save_quantized
from eqat.data import eval_token_ids
from eqat.errors import EqatInputError
from eqat.evaluate import perplexity
from eqat.model import load_model, model_size_bytes, parse_dtype
from eqat.report import environment, plot_layer_errors, write_json
from eqat.scheme import QuantScheme

METHODS = ("rtn",)
REPORT = "report.json"
PLOT = "layer_error.png"


@dataclass
class EvalOptions:
    data: str = "wikitext2"
    seqlen: int = 2048
    max_windows: int | None = None


@dataclass
class QuantizeOptions:
    model: str | None = None  # None: the embedded default model
    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    out: str | None = None
    dtype: str = "float16"  # storage dtype of scales and zero-points
    device: str = "cpu"
    force: bool = False
    evaluate: bool = True
    eval: EvalOptions = field(default_factory=EvalOptions)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheme"] = self.scheme.to_dict()
        return d


def resolve_model(model: str | None) -> Path:
    if model is None:
        from eqat.default_model import default_model_path

        return default_model_path()
    return Path(model).expanduser()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EqatInputError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu.")
    return device


def load_any(path: Path, device: str = "cpu"):
    """(model, tokenizer, eqat_config or None) from an eqat checkpoint or a plain HF folder."""
    if is_eqat_checkpoint(path):
        return load_quantized(path, device=device)
    model, tok = load_model(path, device=device)
    return model, tok, None


def quantize_run(opts: QuantizeOptions) -> dict[str, Any]:
    """Load, (evaluate,) quantize, (evaluate,) save. Returns the report that is also saved."""
    if opts.method not in METHODS:
        raise EqatInputError(f"unknown method '{opts.method}'; available: {', '.join(METHODS)}.")
    storage = parse_dtype(opts.dtype)
    if storage == torch.float32:
        raise EqatInputError("scales are stored as float16 or bfloat16 (what runtimes read); use --dtype float16 or bfloat16.")
    device = resolve_device(opts.device)
    model_path = resolve_model(opts.model)
    out = Path(opts.out) if opts.out else Path("eqat-out") / f"{model_path.name}-{opts.scheme.name}-{opts.method}"
    if out.exists() and not opts.force:
        raise EqatInputError(f"output folder {out} already exists; pass --force to replace it or choose another --out.")

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_path, device=device)
    from eqat.train.rtn import check_scheme, quantize_rtn

    linears = check_scheme(model, opts.scheme)
    ids = eval_token_ids(tokenizer, opts.eval.data) if opts.evaluate else None
    report: dict[str, Any] = {
        "command": "quantize",
        "options": opts.to_dict(),
        "model_path": str(model_path),
        "output": str(out),
        "environment": environment(),
        "fp_size_bytes": model_size_bytes(model),
    }

    def ppl(tag: str) -> dict[str, Any]:
        r = perplexity(model, ids, opts.eval.seqlen, opts.eval.max_windows, progress=opts.progress, desc=f"ppl {tag}")
        return {**r.to_dict(), "data": opts.eval.data}

    if ids is not None:
        report["fp_perplexity"] = ppl("fp")
    t_q = time.perf_counter()
    bar = tqdm(total=len(linears), desc=f"{opts.method} {opts.scheme.name}", unit="layer", disable=not opts.progress)
    errors = quantize_rtn(model, opts.scheme, dtype=storage, on_layer=lambda name, err: bar.update())
    bar.close()
    report["quantize_seconds"] = time.perf_counter() - t_q
    report["layer_relative_error"] = errors
    report["quantized_size_bytes"] = model_size_bytes(model)
    if ids is not None:
        report["perplexity"] = ppl(opts.scheme.name)
    report["total_seconds"] = time.perf_counter() - t0

    def extras(folder: Path) -> None:
        write_json(folder / REPORT, report)
        write_json(folder / "run_config.json", opts.to_dict())
        plot_layer_errors(errors, folder / PLOT, f"{model_path.name} {opts.method} {opts.scheme.name}: weight error per layer")

    provenance = {"method": opts.method, "base_model": str(model_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_quantized(model, tokenizer, out, provenance=provenance, force=opts.force, extra=extras)
    return report


def eval_run(model: str | None, opts: EvalOptions, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Perplexity of an eqat checkpoint or a Hugging Face folder."""
    path = resolve_model(model)
    m, tok, meta = load_any(path, device=resolve_device(device))
    ids = eval_token_ids(tok, opts.data)
    r = perplexity(m, ids, opts.seqlen, opts.max_windows, progress=progress)
    return {
        "command": "eval",
        "model_path": str(path),
        "scheme": meta["scheme"] if meta else None,
        "data": opts.data,
        **r.to_dict(),
        "environment": environment(),
    }
