"""Whole runs behind the CLI: `quantize_run`, `train_e2e_run` and `eval_run`. Options in, report out.

A quantize run follows a plan of methods (eqat.methods): one that makes the packed model (data-free
RTN, or block-wise Block-AP on calibration windows), then any end-to-end methods (E2E-QP) on it.
Every input is checked before any heavy work or write, progress goes to stderr, and the output
folder is written atomically with report.json and plots inside. A killed run resumes: each trained
phase keeps its state under `<out>/resume/`, keyed by a fingerprint of everything that shapes it.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from eqat.core.dtypes import parse_dtype
from eqat.data.evaluate import perplexity
from eqat.core.layer_schemes import LayerSchemes, bits_summary
from eqat.data.sources import calibration_windows, eval_token_ids
from eqat.engine.health import check_finite, check_perplexity, run_warnings
from eqat.engine.state import fingerprint_of
from eqat.errors import EqatInputError
from eqat.io.checkpoint import is_eqat_checkpoint, load_quantized, modules_of_model, quantized_modules, save_quantized
from eqat.io.lock import output_lock
from eqat.io.outdir import check_output, resolve_out
from eqat.io.report import environment, write_json
from eqat.methods.base import BLOCKWISE, DATA_FREE, END_TO_END, Method, check_activations, report_key
from eqat.models.loading import load_model, model_size_bytes
from eqat.options import RESUME, CalibOptions, EvalOptions, QuantizeOptions, TrainE2EOptions  # noqa: F401  (CalibOptions: re-exported)
from eqat.phases import plot_outputs, run_blockwise, run_data_free, run_end_to_end

def resolve_model(model: str | None) -> Path:
    """A model folder: `model` itself, the default packaged model (None), or a packaged model by
    name (`gemma3-270m`, eqat.models.default_model) where no folder of that name exists."""
    from eqat.models.default_model import PACKAGED, default_model_path, packaged_model_path

    if model is None:
        return default_model_path()
    if model in PACKAGED and not Path(model).exists():
        return packaged_model_path(model)
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

    A finished checkpoint is never replaced without --force; an unfinished resumable run (state in
    `out/resume/`) is resumed when `resumable`; any other existing folder is left alone unless --force.
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


def _set_teacher(cfg: Any, default: str | None) -> None:
    """A distilling end-to-end config's teacher: `default` (the quantized model) unless one was given;
    the folder is checked now, before any work."""
    from eqat.models.loading import check_model_dir

    if not (hasattr(cfg, "distills") and cfg.distills()):
        return
    if not cfg.teacher:
        if not default:
            raise EqatInputError("--e2e-loss kd/mix needs the full-precision teacher and the checkpoint does not name "
                                 "its base model: pass --e2e-teacher MODEL_FOLDER.")
        cfg.teacher = str(default)
    try:
        cfg.teacher = str(check_model_dir(Path(cfg.teacher).expanduser()))
    except EqatInputError as e:
        raise EqatInputError(f"the distillation teacher (--e2e-teacher): {e}") from e


def _check_quantize(opts: QuantizeOptions, model_path: Path) -> tuple[list[Method], torch.dtype]:
    """Every option checked before any work: the plan and each of its methods' configs."""
    plan = opts.plan()
    opts.eval.check()
    opts.check_mixed()
    storage = parse_dtype(opts.dtype)
    if storage == torch.float32:
        raise EqatInputError("scales are stored as float16 or bfloat16 (what runtimes read); use --dtype float16 or bfloat16.")
    for m in plan:
        cfg = opts.config_for(m)
        if hasattr(cfg, "storage_dtype"):
            cfg.storage_dtype = str(storage).removeprefix("torch.")
        if hasattr(cfg, "seed"):
            cfg.seed = opts.calib.seed
        if hasattr(cfg, "check"):
            cfg.check()
        _set_teacher(cfg, model_path)
    return plan, storage


def quantize_run(opts: QuantizeOptions) -> dict[str, Any]:
    """Load, (evaluate,) run the plan, (evaluate,) save. Returns the report that is also saved.
    One run per output folder: a second one refuses while this holds the folder's lock."""
    model_path = resolve_model(opts.model)
    plan, storage = _check_quantize(opts, model_path)
    name = "+".join(m.name for m in plan)
    tag = opts.scheme.name + ("-mixed" if opts.mixed else "")
    out = resolve_out(opts.out or Path("eqat-out") / f"{model_path.name}-{tag}-{name}")
    check_output(out, [model_path], opts.force, opts.replace_foreign)
    device = resolve_device(opts.device)
    with output_lock(out, "eqat quantize"):
        return _quantize(opts, plan, storage, model_path, out, device)


def _quantize(opts: QuantizeOptions, plan: list[Method], storage: torch.dtype, model_path: Path, out: Path,
              device: str) -> dict[str, Any]:
    from eqat.mixed import run_schemes, start_schemes
    from eqat.models.arch import quantizable_linears
    from eqat.models.coverage import check_coverage, coverage

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_path)
    linears = quantizable_linears(model)
    start = start_schemes(opts, linears)  # --scheme, --override, --avg-bits checked on the real layers
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    possible = sorted({start(n) for n in linears} | set(opts.promote_levels() if opts.avg_bits is not None else []),
                      key=lambda s: s.name)
    for m in plan:
        check_activations(m, possible)
        m.check_layers(shapes, possible, opts.config_for(m))
        m.check_model(model, opts.config_for(m))
    cov = coverage(model, linears)
    check_coverage(cov, opts.allow_unquantized)  # before any training or writing
    ids = eval_token_ids(tokenizer, opts.eval.data) if opts.evaluate else None
    first = plan[0]
    calib = None
    if first.phase == BLOCKWISE:
        c, val = opts.calib, opts.config_for(first).val_samples
        calib = calibration_windows(tokenizer, c.data, c.nsamples + val, c.seqlen, c.seed)
    data = [e2e_data_for(tokenizer, opts.config_for(m)) for m in plan if m.phase == END_TO_END]
    resuming = _prepare_output(out, any(m.phase != DATA_FREE for m in plan), opts.force)
    report: dict[str, Any] = {"command": "quantize", "options": opts.to_dict(), "model_path": str(model_path),
                              "output": str(out), "environment": environment(), "fp_size_bytes": model_size_bytes(model),
                              "coverage": cov}

    def ppl(tag: str) -> dict[str, Any]:
        model.to(device)
        r = perplexity(model, ids, opts.eval.seqlen, opts.eval.max_windows, progress=opts.progress, desc=f"ppl {tag}")
        model.to("cpu")
        return {**r.to_dict(), "data": opts.eval.data}

    if ids is not None:
        report["fp_perplexity"] = _cached_fp_ppl(out, opts.eval, resuming, len(plan) > 1 or first.phase != DATA_FREE,
                                                 lambda: ppl("fp"))
    if resuming:
        report["resumed"] = True
    c = opts.calib
    schemes, report["mixed_precision"] = run_schemes(
        opts, model, linears, start, lambda n: calib[:n] if calib is not None and len(calib) >= n else
        calibration_windows(tokenizer, c.data, n, c.seqlen, c.seed), out / RESUME, resuming)
    report["schemes"] = schemes.to_dict()
    errors = _run_plan(opts, plan, storage, model, model_path, out, device, calib, data, report, schemes)
    report["layer_relative_error"] = errors
    if not errors and first.phase == END_TO_END:
        report["layer_relative_error_note"] = (f"not measured: {first.name} drops each full-precision weight as it "
                                               "wraps the layer (keeping a copy would cost the memory it saves)")
    report["quantized_size_bytes"] = model_size_bytes(model)
    report["bits"] = bits_summary(modules_of_model(quantized_modules(model)))
    check_finite(model, "eqat quantize")
    if ids is not None:
        report["perplexity"] = ppl(schemes.name)
        check_perplexity(report["perplexity"], "eqat quantize")
    report["warnings"] = list(opts.ignored_flags) + run_warnings(model, report)
    report["total_seconds"] = time.perf_counter() - t0

    def extras(folder: Path) -> None:
        write_json(folder / "report.json", report)
        write_json(folder / "run_config.json", opts.to_dict())
        plot_outputs(report, plan, folder, f"{model_path.name} {{}} {schemes.name}")

    provenance = {"method": "+".join(m.name for m in plan), "base_model": str(model_path),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # `out` may hold this run's resume state: it is replaced only now, by the finished checkpoint
    save_quantized(model, tokenizer, out, provenance=provenance, force=True, extra=extras)
    return report


def _run_plan(opts: QuantizeOptions, plan: list[Method], storage: torch.dtype, model, model_path: Path, out: Path,
              device: str, calib: torch.Tensor | None, data: list, report: dict[str, Any],
              schemes: LayerSchemes) -> dict[str, float]:
    """Every phase of `plan` on `model`, in place; the report gets each phase's section and time.
    Returns the relative weight error per layer of the first phase (none when it is end to end:
    such a method drops the full-precision weights, and keeping a copy would cost what it saves)."""
    first = plan[0]
    t_q = time.perf_counter()
    cfg = opts.config_for(first)
    errors: dict[str, float] = {}
    if first.phase == DATA_FREE:
        errors = run_data_free(model, first, cfg, schemes, storage, opts.progress)
    elif first.phase == BLOCKWISE:
        fp = opts.fingerprint(model_path, [first])
        errors = run_blockwise(model, first, cfg, schemes, out / RESUME, device, fp, calib, report, opts.progress)
        report[report_key(first.name)]["calibration"] = {**asdict(opts.calib), "val_samples": cfg.val_samples,
                                                               "tokens": int(calib.numel())}
    else:  # an end-to-end method that quantizes the full-precision model itself (lr-qat)
        first.start_from_full_precision(schemes, storage)
    report["quantize_seconds"] = time.perf_counter() - t_q
    t_e = time.perf_counter()
    e2e = [m for m in plan if m.phase == END_TO_END]
    for k, (m, d) in enumerate(zip(e2e, data)):
        fp = opts.fingerprint(model_path, plan[: plan.index(m) + 1])
        report[report_key(m.name)] = run_end_to_end(model, m, opts.config_for(m), d, out / RESUME / _e2e_dir(k),
                                                          device, fp, opts.progress)
    if e2e:
        report["e2e_seconds"] = time.perf_counter() - t_e
    return errors


def _e2e_dir(k: int) -> str:
    """Resume folder of the k-th end-to-end phase of a plan (`e2e`, then `e2e-1`, ...)."""
    return "e2e" if k == 0 else f"e2e-{k}"


def _cached_fp_ppl(out: Path, ev: EvalOptions, resuming: bool, resumable: bool, compute) -> dict[str, Any]:
    """The unquantized perplexity; a resumed run reuses the one it measured first."""
    cache = out / RESUME / "fp_perplexity.json"
    if resuming and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("eval") == asdict(ev):
            return cached["result"]
    result = compute()
    if resumable:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"eval": asdict(ev), "result": result})
    return result


def e2e_data_for(tokenizer, cfg) -> tuple[Any, Any]:
    """(train, held-out) examples of an end-to-end config; EqatInputError for unusable data before any training."""
    from eqat.data.e2e_data import e2e_examples

    return e2e_examples(tokenizer, cfg.data, cfg.nsamples, cfg.val_samples, cfg.seqlen, cfg.seed, cfg.prompt_format)


def train_e2e_run(opts: TrainE2EOptions) -> dict[str, Any]:
    """End-to-end methods on an eqat checkpoint (`eqat train-e2e`): load, (evaluate,) train, (evaluate,) save."""
    from eqat.io.checkpoint import read_eqat_config
    from eqat.models.loading import check_model_dir

    src = check_model_dir(Path(opts.checkpoint).expanduser())
    if not is_eqat_checkpoint(src):
        raise EqatInputError(f"{src} is not an eqat checkpoint (no eqat_config.json); quantize it first with "
                             "`eqat quantize --skip-e2e`, then run train-e2e on the result.")
    meta = read_eqat_config(src)
    plan = opts.plan()
    for m in plan:
        opts.config_for(m).seed = opts.seed
        opts.config_for(m).check()
        _set_teacher(opts.config_for(m), meta.get("provenance", {}).get("base_model"))
    opts.eval.check()
    device = resolve_device(opts.device)
    out = resolve_out(opts.out or src.with_name(src.name + "-e2e"))
    check_output(out, [src], opts.force, opts.replace_foreign)
    with output_lock(out, "eqat train-e2e"):
        return _train_e2e(opts, plan, src, meta, out, device)


def _train_e2e(opts: TrainE2EOptions, plan: list[Method], src: Path, meta: dict, out: Path, device: str) -> dict[str, Any]:
    from eqat.models.coverage import coverage

    t0, ev = time.perf_counter(), opts.eval
    model, tokenizer, _ = load_quantized(src)
    qmods = quantized_modules(model)
    schemes = sorted({q.scheme for q in qmods.values()}, key=lambda s: s.name)
    for m in plan:
        check_activations(m, schemes)
        m.check_layers({n: (q.out_features, q.in_features) for n, q in qmods.items()}, schemes, opts.config_for(m))
    data = [e2e_data_for(tokenizer, opts.config_for(m)) for m in plan]
    ids = eval_token_ids(tokenizer, ev.data) if opts.evaluate else None
    resuming = _prepare_output(out, True, opts.force)
    options = {k: v for k, v in asdict(opts).items() if k != "configs"}
    options["methods"] = {m.name: asdict(opts.config_for(m)) for m in plan}
    report: dict[str, Any] = {"command": "train-e2e", "checkpoint": str(src), "output": str(out),
                              "scheme": meta["scheme"], "options": options, "environment": environment(),
                              "resumed": resuming, "coverage": coverage(model, quantized_modules(model))}

    def ppl(tag: str) -> dict[str, Any]:
        model.to(device)
        r = perplexity(model, ids, ev.seqlen, ev.max_windows, progress=opts.progress, desc=f"ppl {tag}")
        return {**r.to_dict(), "data": ev.data}

    if ids is not None:
        report["perplexity_before"] = ppl("before training")
    for k, (m, d) in enumerate(zip(plan, data)):
        fp = {"checkpoint": str(src.resolve()), "methods": {p.name: fingerprint_of(opts.config_for(p)) for p in plan[: k + 1]}}
        report[report_key(m.name)] = run_end_to_end(model, m, opts.config_for(m), d, out / RESUME / _e2e_dir(k),
                                                          device, fp, opts.progress)
    check_finite(model, "eqat train-e2e")
    if ids is not None:
        report["perplexity"] = ppl("after training")
        check_perplexity(report["perplexity"], "eqat train-e2e")
    report["warnings"] = run_warnings(model, report)
    report["total_seconds"] = time.perf_counter() - t0
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process, Linux KiB
    model.to("cpu")

    def extras(folder: Path) -> None:
        write_json(folder / "report.json", report)
        plot_outputs(report, plan, folder, f"{src.name}: {{}}")

    parent = meta.get("provenance", {})
    provenance = {**parent, "method": "+".join([parent.get("method", "unknown"), *(m.name for m in plan)]),
                  "parent_checkpoint": str(src), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_quantized(model, tokenizer, out, provenance=provenance, force=True, extra=extras)
    return report


def eval_run(model: str | None, opts: EvalOptions, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Perplexity of an eqat checkpoint or a Hugging Face folder."""
    opts.check()
    path = resolve_model(model)
    m, tok, meta = load_any(path, device=resolve_device(device))
    ids = eval_token_ids(tok, opts.data)
    r = perplexity(m, ids, opts.seqlen, opts.max_windows, progress=progress)
    return {"command": "eval", "model_path": str(path), "scheme": meta["scheme"] if meta else None, "data": opts.data,
            **r.to_dict(), "environment": environment()}
