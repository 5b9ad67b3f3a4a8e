"""Whole runs behind the CLI: `quantize_run` and `eval_run`. Options in, report out.

They validate every input before any heavy work or any write, show progress on stderr,
and write the output folder atomically with its report (JSON) and plot inside.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eqat.io.checkpoint import is_eqat_checkpoint, load_quantized, quantized_modules, save_quantized
from eqat.data.sources import eval_token_ids
from eqat.errors import EqatInputError
from eqat.data.evaluate import perplexity
from eqat.engine.health import check_finite, check_perplexity, run_warnings
from eqat.io.lock import output_lock
from eqat.io.outdir import check_output, resolve_out
from eqat.models.loading import load_model, model_size_bytes, parse_dtype
from eqat.io.report import environment, plot_block_losses, plot_layer_errors, write_json
from eqat.core.scheme import QuantScheme
from eqat.engine.blockwise import BlockAPConfig
from eqat.pipeline_e2e import e2e_data_for, e2e_fingerprint, plot_e2e, run_e2e
from eqat.engine.end2end import E2EQPConfig

METHODS = ("block-ap", "rtn")
REPORT = "report.json"
PLOT = "layer_error.png"
BLOCK_PLOT = "block_loss.png"
E2E_PLOT = "e2e_loss.png"
RESUME = "resume"


@dataclass
class EvalOptions:
    data: str = "wikitext2"
    seqlen: int = 2048
    max_windows: int | None = None

    def check(self) -> None:
        """Refuse --seqlen < 2 and --max-windows < 1 before any work (EqatInputError)."""
        from eqat.data.evaluate import check_windows

        check_windows(self.seqlen, self.max_windows)


@dataclass
class CalibOptions:
    data: str = "c4"
    nsamples: int = 64  # training windows; Block-AP holds out `val_samples` more
    seqlen: int = 256
    seed: int = 0


@dataclass
class QuantizeOptions:
    model: str | None = None  # None: the embedded default model
    method: str = "block-ap"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    out: str | None = None
    dtype: str = "float16"  # storage dtype of scales and zero-points
    device: str = "cpu"
    force: bool = False
    replace_foreign: bool = False  # with force: also replace a non-empty folder eqat did not write
    evaluate: bool = True
    eval: EvalOptions = field(default_factory=EvalOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    block_ap: BlockAPConfig = field(default_factory=BlockAPConfig)
    skip_e2e: bool = False
    e2e: E2EQPConfig = field(default_factory=E2EQPConfig)
    progress: bool = True
    allow_unquantized: bool = False  # go on when > 10% of the block matrices stay in full precision (eqat.models.coverage)

    @property
    def runs_e2e(self) -> bool:
        return self.method == "block-ap" and not self.skip_e2e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheme"] = self.scheme.to_dict()
        if self.method != "block-ap":
            d.pop("calib"), d.pop("block_ap")
        if not self.runs_e2e:
            d.pop("e2e")
        return d

    def fingerprint(self, model_path: Path) -> dict[str, Any]:
        """What determines the Block-AP model: a resumed run must match it (E2E-QP options
        may change between a killed run and its resume; they have their own fingerprint)."""
        d = self.to_dict()
        for k in ("out", "force", "replace_foreign", "evaluate", "eval", "progress", "model", "e2e", "skip_e2e",
                  "allow_unquantized"):
            d.pop(k, None)
        d["model_path"] = str(model_path)
        d["block_ap"].pop("offload", None)  # where activations live does not change the result
        return d


def resolve_model(model: str | None) -> Path:
    if model is None:
        from eqat.models.default_model import default_model_path

        return default_model_path()
    return Path(model).expanduser()


def resolve_device(device: str) -> str:
    """`cpu`, `cuda`, `cuda:N` (a device torch sees) or `auto`; anything else is bad input."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise EqatInputError(f"--device must be cpu, cuda, cuda:N or auto, not '{device}'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EqatInputError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu.")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise EqatInputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    return device


def load_any(path: Path, device: str = "cpu"):
    """(model, tokenizer, eqat_config or None) from an eqat checkpoint or a plain HF folder."""
    if is_eqat_checkpoint(path):
        return load_quantized(path, device=device)
    model, tok = load_model(path, device=device)
    return model, tok, None


def _prepare_output(out: Path, resumable: bool, force: bool) -> bool:
    """Apply the output-folder rules before any work. Returns True when resuming.

    A finished checkpoint is never replaced without --force; an unfinished resumable run
    (Block-AP and/or E2E-QP state in `out/resume/`) is resumed when `resumable`; any other
    existing folder is left alone unless --force.
    """
    unfinished = (out / RESUME).is_dir() and any((out / RESUME).iterdir()) and not is_eqat_checkpoint(out)
    if out.exists() and force:
        shutil.rmtree(out)
        return False
    if unfinished and resumable:
        return True
    if out.exists() and (is_eqat_checkpoint(out) or any(out.iterdir())):
        what = "a finished eqat checkpoint" if is_eqat_checkpoint(out) else "a non-empty folder"
        raise EqatInputError(f"output folder {out} already exists ({what}); pass --force to replace it or choose another --out.")
    return False


def quantize_run(opts: QuantizeOptions) -> dict[str, Any]:
    """Load, (evaluate,) quantize, (evaluate,) save. Returns the report that is also saved.
    One run per output folder: a second one refuses while this holds the folder's lock."""
    model_path = resolve_model(opts.model)
    out = resolve_out(opts.out or Path("eqat-out") / f"{model_path.name}-{opts.scheme.name}-{opts.method}")
    check_output(out, [model_path], opts.force, opts.replace_foreign)
    with output_lock(out, "eqat quantize"):
        return _quantize_run(opts, model_path, out)


def _quantize_run(opts: QuantizeOptions, model_path: Path, out: Path) -> dict[str, Any]:
    if opts.method not in METHODS:
        raise EqatInputError(f"unknown method '{opts.method}'; available: {', '.join(METHODS)}.")
    opts.eval.check()
    storage = parse_dtype(opts.dtype)
    if storage == torch.float32:
        raise EqatInputError("scales are stored as float16 or bfloat16 (what runtimes read); use --dtype float16 or bfloat16.")
    if opts.method == "block-ap":
        opts.block_ap.storage_dtype = str(storage).removeprefix("torch.")
        opts.block_ap.seed = opts.calib.seed
        opts.block_ap.check()
        opts.e2e.seed = opts.calib.seed
        opts.e2e.check()
    device = resolve_device(opts.device)

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_path)
    from eqat.models.coverage import check_coverage, coverage
    from eqat.methods.rtn import check_scheme

    linears = check_scheme(model, opts.scheme)
    cov = coverage(model, linears)
    check_coverage(cov, opts.allow_unquantized)  # before any training or writing
    ids = eval_token_ids(tokenizer, opts.eval.data) if opts.evaluate else None
    calib = None
    if opts.method == "block-ap":
        from eqat.data.sources import calibration_windows

        c = opts.calib
        calib = calibration_windows(tokenizer, c.data, c.nsamples + opts.block_ap.val_samples, c.seqlen, c.seed)
    e2e_data = e2e_data_for(tokenizer, opts.e2e) if opts.runs_e2e else None
    resuming = _prepare_output(out, opts.method == "block-ap", opts.force)
    report: dict[str, Any] = {
        "command": "quantize",
        "options": opts.to_dict(),
        "model_path": str(model_path),
        "output": str(out),
        "environment": environment(),
        "fp_size_bytes": model_size_bytes(model),
        "coverage": cov,
    }

    def ppl(tag: str) -> dict[str, Any]:
        model.to(device)
        r = perplexity(model, ids, opts.eval.seqlen, opts.eval.max_windows, progress=opts.progress, desc=f"ppl {tag}")
        model.to("cpu")
        return {**r.to_dict(), "data": opts.eval.data}

    if ids is not None:
        report["fp_perplexity"] = _cached_fp_ppl(out, opts, resuming, lambda: ppl("fp"))
    t_q = time.perf_counter()
    if opts.method == "rtn":
        errors = _run_rtn(model, opts, storage, len(linears))
    else:
        errors = _run_block_ap(model, opts, out, model_path, device, calib, report, resuming)
    report["quantize_seconds"] = time.perf_counter() - t_q
    if opts.runs_e2e:
        t_e = time.perf_counter()
        fingerprint = {**opts.fingerprint(model_path), "e2e": e2e_fingerprint(opts.e2e)}
        report["e2e_qp"] = run_e2e(model, opts.e2e, e2e_data, out / RESUME / "e2e", device, fingerprint, opts.progress)
        report["e2e_seconds"] = time.perf_counter() - t_e
    report["layer_relative_error"] = errors
    report["quantized_size_bytes"] = model_size_bytes(model)
    check_finite(model, "eqat quantize")
    if ids is not None:
        report["perplexity"] = ppl(opts.scheme.name)
        check_perplexity(report["perplexity"], "eqat quantize")
    report["warnings"] = run_warnings(model, report)
    report["total_seconds"] = time.perf_counter() - t0

    def extras(folder: Path) -> None:
        write_json(folder / REPORT, report)
        write_json(folder / "run_config.json", opts.to_dict())
        plot_layer_errors(errors, folder / PLOT, f"{model_path.name} {opts.method} {opts.scheme.name}: weight error per layer")
        if report.get("blocks"):
            plot_block_losses(report["blocks"], folder / BLOCK_PLOT, f"{model_path.name} Block-AP {opts.scheme.name}")
        if report.get("e2e_qp"):
            plot_e2e(report["e2e_qp"], folder / E2E_PLOT, f"{model_path.name} E2E-QP {opts.scheme.name}")

    method = "block-ap+e2e-qp" if opts.runs_e2e else opts.method
    provenance = {"method": method, "base_model": str(model_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # `out` may hold this run's resume state: it is replaced only now, by the finished checkpoint
    save_quantized(model, tokenizer, out, provenance=provenance, force=True, extra=extras)
    return report


def _cached_fp_ppl(out: Path, opts: QuantizeOptions, resuming: bool, compute) -> dict[str, Any]:
    """The unquantized perplexity; a resumed Block-AP run reuses the one it measured first."""
    cache = out / RESUME / "fp_perplexity.json"
    if resuming and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("eval") == asdict(opts.eval):
            return cached["result"]
    result = compute()
    if opts.method == "block-ap":
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"eval": asdict(opts.eval), "result": result})
    return result


def _run_rtn(model, opts: QuantizeOptions, storage: torch.dtype, n_layers: int) -> dict[str, float]:
    from eqat.methods.rtn import quantize_rtn

    bar = tqdm(total=n_layers, desc=f"rtn {opts.scheme.name}", unit="layer", disable=not opts.progress)
    errors = quantize_rtn(model, opts.scheme, dtype=storage, on_layer=lambda name, err: bar.update())
    bar.close()
    return errors


def _run_block_ap(model, opts, out: Path, model_path: Path, device: str, calib, report, resuming: bool) -> dict[str, float]:
    from eqat.models.arch import quantizable_linears
    from eqat.engine.blockwise import BlockAPTrainer, peak_memory_bytes
    from eqat.methods.rtn import relative_error

    fp_weights = {name: lin.weight.detach().clone() for name, lin in quantizable_linears(model).items()}
    n_blocks = model.config.num_hidden_layers
    outer = tqdm(total=n_blocks, desc=f"Block-AP {opts.scheme.name}", unit="block", disable=not opts.progress)

    def on_block(rec) -> None:
        outer.n = rec.block + 1
        outer.set_postfix(loss=f"{rec.init_loss:.3g}->{rec.final_loss:.3g}")
        outer.refresh()

    trainer = BlockAPTrainer(model, opts.scheme, opts.block_ap, out / RESUME, device=device,
                             fingerprint=opts.fingerprint(model_path), progress=opts.progress, on_block=on_block)
    if resuming:
        report["resumed"] = True
    records = trainer.run(calib)
    outer.close()
    report["blocks"] = [{k: v for k, v in asdict(r).items()} for r in records]
    report["block_ap"] = {
        "calibration": {**asdict(opts.calib), "val_samples": opts.block_ap.val_samples,
                        "tokens": int(calib.numel())},
        "weight_lr": opts.block_ap.weight_lr(opts.scheme.bits),
        "peak_memory_bytes": peak_memory_bytes(torch.device(device)),
        "seconds_per_block": sum(r.seconds for r in records) / max(len(records), 1),
    }
    q = quantized_modules(model)
    return {name: relative_error(fp_weights[name], q[name]) for name in fp_weights}


def eval_run(model: str | None, opts: EvalOptions, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Perplexity of an eqat checkpoint or a Hugging Face folder."""
    opts.check()
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
