"""E2E-QP runs behind the CLI: after Block-AP inside `eqat quantize`, or on an existing eqat
checkpoint with `eqat train-e2e`. Same rules as eqat.pipeline: inputs checked before any work,
progress on stderr, the output folder written atomically with report.json and a plot."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from eqat.errors import EqatInputError
from eqat.engine.health import check_finite, check_perplexity, run_warnings
from eqat.io.lock import output_lock
from eqat.io.outdir import check_output, resolve_out
from eqat.io.report import environment, plot_e2e_losses, write_json
from eqat.engine.end2end import E2EQPConfig, E2EQPTrainer
from eqat.data.e2e_data import E2EData, e2e_examples

RESUME_E2E = "e2e"


def e2e_data_for(tokenizer, cfg: E2EQPConfig) -> tuple[E2EData, E2EData]:
    """(train, held-out) examples; raises EqatInputError for unusable data before any training."""
    return e2e_examples(tokenizer, cfg.data, cfg.nsamples, cfg.val_samples, cfg.seqlen, cfg.seed, cfg.prompt_format)


def e2e_fingerprint(cfg: E2EQPConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k != "save_every"}


def run_e2e(model: nn.Module, cfg: E2EQPConfig, data: tuple[E2EData, E2EData], state_dir: Path, device: str,
            fingerprint: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Train the scales of `model` in place; returns the report section `e2e_qp`."""
    train, val = data
    trainer = E2EQPTrainer(model, cfg, state_dir, device=device, fingerprint=fingerprint, progress=progress)
    result = trainer.run(train, val)
    return {**result.to_dict(), "config": asdict(cfg), "train_sequences": len(train), "heldout_sequences": len(val)}


def plot_e2e(section: dict[str, Any], path: Path, title: str) -> None:
    plot_e2e_losses(section["log"], path, title, section.get("val_loss_before"), section.get("val_loss_after"))


@dataclass
class TrainE2EOptions:
    checkpoint: str
    out: str | None = None
    device: str = "cpu"
    force: bool = False
    replace_foreign: bool = False  # with force: also replace a non-empty folder eqat did not write
    evaluate: bool = True
    eval: Any = None  # eqat.pipeline.EvalOptions
    e2e: E2EQPConfig = field(default_factory=E2EQPConfig)
    progress: bool = True


def train_e2e_run(opts: TrainE2EOptions) -> dict[str, Any]:
    """E2E-QP on an eqat checkpoint (`eqat train-e2e`): load, (evaluate,) train, (evaluate,) save."""
    from eqat.io.checkpoint import is_eqat_checkpoint, load_quantized, read_eqat_config, save_quantized
    from eqat.data.sources import eval_token_ids
    from eqat.data.evaluate import perplexity
    from eqat.models.loading import check_model_dir
    from eqat.pipeline import RESUME, EvalOptions, _prepare_output, resolve_device

    src = check_model_dir(Path(opts.checkpoint).expanduser())
    if not is_eqat_checkpoint(src):
        raise EqatInputError(f"{src} is not an eqat checkpoint (no eqat_config.json); quantize it first with "
                             "`eqat quantize --skip-e2e`, then run train-e2e on the result.")
    meta = read_eqat_config(src)
    opts.e2e.check()
    ev = opts.eval or EvalOptions()
    ev.check()
    device = resolve_device(opts.device)
    out = resolve_out(opts.out or src.with_name(src.name + "-e2e"))
    check_output(out, [src], opts.force, opts.replace_foreign)
    with output_lock(out, "eqat train-e2e"):
        return _train_e2e(opts, src, meta, out, ev, device)


def _train_e2e(opts: TrainE2EOptions, src: Path, meta: dict, out: Path, ev: Any, device: Any) -> dict[str, Any]:
    from eqat.io.checkpoint import load_quantized, quantized_modules, save_quantized
    from eqat.models.coverage import coverage
    from eqat.data.sources import eval_token_ids
    from eqat.data.evaluate import perplexity
    from eqat.pipeline import RESUME, _prepare_output

    t0 = time.perf_counter()
    model, tokenizer, _ = load_quantized(src)
    data = e2e_data_for(tokenizer, opts.e2e)
    ids = eval_token_ids(tokenizer, ev.data) if opts.evaluate else None
    resuming = _prepare_output(out, True, opts.force)
    report: dict[str, Any] = {"command": "train-e2e", "checkpoint": str(src), "output": str(out),
                              "scheme": meta["scheme"], "options": {**asdict(opts), "eval": asdict(ev)},
                              "environment": environment(), "resumed": resuming,
                              "coverage": coverage(model, quantized_modules(model))}

    def ppl(tag: str) -> dict[str, Any]:
        model.to(device)
        r = perplexity(model, ids, ev.seqlen, ev.max_windows, progress=opts.progress, desc=f"ppl {tag}")
        return {**r.to_dict(), "data": ev.data}

    if ids is not None:
        report["perplexity_before"] = ppl("before E2E-QP")
    fingerprint = {"checkpoint": str(src.resolve()), "e2e": e2e_fingerprint(opts.e2e)}
    report["e2e_qp"] = run_e2e(model, opts.e2e, data, out / RESUME / RESUME_E2E, device, fingerprint, opts.progress)
    check_finite(model, "eqat train-e2e")
    if ids is not None:
        report["perplexity"] = ppl("after E2E-QP")
        check_perplexity(report["perplexity"], "eqat train-e2e")
    report["warnings"] = run_warnings(model, report)
    report["total_seconds"] = time.perf_counter() - t0
    report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process, Linux KiB
    model.to("cpu")

    def extras(folder: Path) -> None:
        write_json(folder / "report.json", report)
        plot_e2e(report["e2e_qp"], folder / "e2e_loss.png", f"{src.name}: E2E-QP")

    parent = meta.get("provenance", {})
    provenance = {**parent, "method": f"{parent.get('method', 'unknown')}+e2e-qp", "parent_checkpoint": str(src),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_quantized(model, tokenizer, out, provenance=provenance, force=True, extra=extras)
    return report
