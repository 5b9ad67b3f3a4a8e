"""Is a quantized model sound? Checks that stop a run (exit 1) and warnings that the report records.

`check_finite(model)` raises EqatError when any tensor that would be stored is NaN or Inf: a
checkpoint like that would load and report perplexity `nan` (seen with `--lr-quant 1e9`).
`check_perplexity` does the same for a measured perplexity. `run_warnings(model, report)` lists what a person should look at although the run finished:
scales pinned at their clamp limits (the optimizer pushed them out of the valid range), and a
phase that raised the held-out loss it was meant to lower.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from eqat.errors import EqatError
from eqat.core.quantizer import SCALE_MAX, SCALE_MIN


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `model` holding NaN or Inf."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(model: nn.Module, what: str) -> None:
    """EqatError (exit 1) naming the tensors when `model` holds NaN or Inf; nothing is saved."""
    bad = nonfinite_tensors(model)
    if bad:
        raise EqatError(f"{what}: {len(bad)} tensors hold NaN or Inf ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); "
                        "the model is broken and was not saved. Lower the learning rates (--lr-weight, --lr-quant, "
                        "--e2e-lr) and re-run with --force.")


def scales_at_limits(model: nn.Module) -> tuple[int, int]:
    """(scales at SCALE_MIN or SCALE_MAX, all scales) over the model's QuantLinears."""
    from eqat.io.checkpoint import quantized_modules

    at, total = 0, 0
    for q in quantized_modules(model).values():
        s = q.scales.detach().float()
        at += int(((s <= SCALE_MIN) | (s >= SCALE_MAX)).sum())
        total += s.numel()
    return at, total


def run_warnings(model: nn.Module, report: dict[str, Any]) -> list[str]:
    """Warnings about a finished run, from the model and its report (`blocks`, `e2e_qp` sections)."""
    warnings = []
    at, total = scales_at_limits(model)
    if at:
        warnings.append(f"{at:,} of {total:,} stored scales ({100 * at / max(total, 1):.2f}%) sit at the clamp limits "
                        f"[{SCALE_MIN:g}, {SCALE_MAX:g}]: the optimizer pushed them out of range (learning rate too "
                        "high?) or their groups are constant (dead rows).")
    # a block selected by next-token loss may trade block loss for it (eqat.engine.selection)
    rose = [b for b in report.get("blocks", []) if b["final_loss"] > b["init_loss"] and b.get("selected_by") != "nll"]
    if rose:
        names = ", ".join(f"{b['block']} ({b['init_loss']:.3g} -> {b['final_loss']:.3g})" for b in rose[:6])
        warnings.append(f"Block-AP raised the held-out loss of {len(rose)} of {len(report['blocks'])} blocks against "
                        f"their round-to-nearest start: {names}{', ...' if len(rose) > 6 else ''}. Lower --lr-weight/--lr-quant.")
    never = [(f"block {b['block']} {name}", r["never_routed"]) for b in report.get("blocks", []) for name, r in (b.get("routing") or {}).items()
             if r["never_routed"]]
    if never:
        listed = "; ".join(f"{name} {ids}" for name, ids in never[:4]) + ("; ..." if len(never) > 4 else "")
        warnings.append(f"calibration routed no token to {sum(len(ids) for _, ids in never)} experts ({listed}): they "
                        "keep their round-to-nearest start. More calibration windows (--nsamples, --calib-seqlen) reach "
                        "more experts.")
    e2e = report.get("e2e_qp") or {}
    before, after = e2e.get("val_loss_before"), e2e.get("val_loss_after")
    if before is not None and after is not None and after > before:
        warnings.append(f"E2E-QP raised the held-out loss ({before:.4f} -> {after:.4f} nats): lower --e2e-lr.")
    return warnings


def check_perplexity(result: dict[str, Any] | None, what: str) -> None:
    """EqatError (exit 1) when a measured perplexity of the quantized model is NaN or Inf."""
    if result is not None and not math.isfinite(result["ppl"]):
        raise EqatError(f"{what}: perplexity is {result['ppl']} (mean NLL {result['nll']}): the quantized model's output "
                        "is not finite, so it was not saved. Lower the learning rates and re-run with --force.")
