"""One phase of a plan, run on a model in place: the glue between the pipeline (eqat.pipeline),
a method (eqat.methods) and its engine (eqat.engine). Progress bars and report sections live here,
so the engines stay free of both."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eqat.core.layer_schemes import SchemeLike
from eqat.core.scheme import QuantScheme
from eqat.io.checkpoint import quantized_modules
from eqat.io.report import plot_block_losses, plot_e2e_losses, plot_layer_errors, plot_sensitivity
from eqat.methods.base import BLOCKWISE, END_TO_END, Method, report_key
from eqat.models.arch import quantizable_linears


def run_data_free(model: nn.Module, method: Method, cfg: Any, scheme: SchemeLike, storage: torch.dtype,
                  progress: bool) -> dict[str, float]:
    """A data-free method over every block Linear; relative weight error per layer."""
    n = len(quantizable_linears(model))
    bar = tqdm(total=n, desc=f"{method.label} {scheme.name}", unit="layer", disable=not progress)
    errors = method.quantize(model, scheme, cfg, storage, on_layer=lambda name, err: bar.update())
    bar.close()
    return errors


def run_blockwise(model: nn.Module, method: Method, cfg: Any, scheme: SchemeLike, state_dir: Path, device: str,
                  fingerprint: dict[str, Any], calib: torch.Tensor, report: dict[str, Any],
                  progress: bool) -> dict[str, float]:
    """A block-wise method through the block-wise engine; fills report["blocks"] and the method's section."""
    from eqat.engine.blockwise import BlockwiseEngine, peak_memory_bytes
    from eqat.methods.rtn import relative_error

    fp_weights = {name: lin.weight.detach().clone() for name, lin in quantizable_linears(model).items()}
    outer = tqdm(total=model.config.get_text_config().num_hidden_layers, desc=f"{method.label} {scheme.name}", unit="block",
                 disable=not progress)

    def on_block(rec) -> None:
        outer.n = rec.block + 1
        outer.set_postfix(loss=f"{rec.init_loss:.3g}->{rec.final_loss:.3g}")
        outer.refresh()

    engine = BlockwiseEngine(model, method, cfg, scheme, state_dir, device=device, fingerprint=fingerprint,
                             progress=progress, on_block=on_block)
    records = engine.run(calib)
    outer.close()
    report["blocks"] = [asdict(r) for r in records]
    report[report_key(method.name)] = {
        **method.describe(cfg, scheme),
        "peak_memory_bytes": peak_memory_bytes(torch.device(device)),
        "seconds_per_block": sum(r.seconds for r in records) / max(len(records), 1),
    }
    q = quantized_modules(model)
    return {name: relative_error(fp_weights[name], q[name]) for name in fp_weights}


def run_end_to_end(model: nn.Module, method: Method, cfg: Any, data: tuple[Any, Any], state_dir: Path, device: str,
                   fingerprint: dict[str, Any], progress: bool) -> dict[str, Any]:
    """An end-to-end method through the end-to-end engine, in place; returns its report section."""
    from eqat.engine.end2end import EndToEndEngine

    train, val = data
    engine = EndToEndEngine(model, method, cfg, state_dir, device=device, fingerprint=fingerprint, progress=progress)
    result = engine.run(train, val)
    return {**result.to_dict(), "config": asdict(cfg), "train_sequences": len(train), "heldout_sequences": len(val)}


def plot_outputs(report: dict[str, Any], plan: list[Method], folder: Path, title: str) -> None:
    """The plots a person looks at: weight error per layer, block losses, each end-to-end loss curve.
    `title` has one `{}` for what the plot shows."""
    if report.get("layer_relative_error"):
        plot_layer_errors(report["layer_relative_error"], folder / "layer_error.png",
                          title.format("+".join(m.name for m in plan) + ": weight error per layer"))
    mixed = report.get("mixed_precision") or {}
    if mixed.get("per_layer"):
        default = QuantScheme.from_dict(report["options"]["scheme"]).name
        plot_sensitivity(mixed, default, folder / "sensitivity.png", title.format(f"layer sensitivity, {mixed['avg_bits_target']:g} bits"))
    for m in plan:
        if m.phase == BLOCKWISE and report.get("blocks"):
            plot_block_losses(report["blocks"], folder / "block_loss.png", title.format(m.label))
    k = 0
    for m in plan:
        section = report.get(report_key(m.name))
        if m.phase == END_TO_END and section:
            name = "e2e_loss.png" if k == 0 else f"e2e-{k}_loss.png"
            plot_e2e_losses(section["log"], folder / name, title.format(m.label), section.get("val_loss_before"),
                            section.get("val_loss_after"))
            k += 1
