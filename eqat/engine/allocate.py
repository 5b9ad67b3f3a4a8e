"""Mixed precision by measurement: per-layer sensitivity, then the schemes that meet `--avg-bits`.

Sensitivity of layer L at scheme s is how much the model's next-token loss grows when only L is
round-to-nearest quantized to s, measured on calibration windows in one of two ways:
    fisher  0.5 * sum(F * (W - Q_s(W))^2), F the empirical Fisher diagonal (squared gradients of
            each window's mean NLL, summed over windows): one forward and backward per window for
            every layer and scheme at once (seconds on SmolLM2).
    kl      KL(FP || model with L quantized) per token on the logits, one forward per layer and
            scheme (minutes on SmolLM2): the direct measurement, to check the estimate.
The allocator starts every layer at its scheme (the default, or an explicit override, which it
never changes) and repeatedly makes the upgrade with the largest loss reduction per added code bit
until the next one would exceed the budget (average code bits over all quantized weights). Fused
runtime layers (q/k/v, gate/up) move together by default, so vLLM's fused linears get one scheme.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eqat.core.layer_schemes import LayerSchemes, fused_group
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError

SENSITIVITY = ("fisher", "kl")
MIN_BITS, MAX_BITS = 2.0, 8.0


def rtn_weight(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The round-to-nearest dequantized weight float32 [N, K] (fp16 scales, as stored)."""
    return QuantLinear.from_weight(weight.detach(), scheme, dtype=torch.float16).dequantize()


def _next_token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def fisher_sensitivity(model: nn.Module, linears: Mapping[str, nn.Linear], levels: Sequence[QuantScheme],
                       windows: torch.Tensor, progress: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {scheme name: 0.5 * sum(F * (W - Q(W))^2)}}. windows: int64 [n, T] token ids."""
    weights = {name: lin.weight for name, lin in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for row in tqdm(windows, desc="sensitivity (Fisher)", unit="window", disable=not progress):
            loss = _next_token_nll(model, row[None])
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, g in zip(weights, grads):
                fisher[name] += g.float() ** 2
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    with torch.no_grad():
        return {name: {s.name: float(0.5 * (fisher[name] * (w.float() - rtn_weight(w, s)) ** 2).sum()) for s in levels}
                for name, w in weights.items()}


@torch.no_grad()
def kl_sensitivity(model: nn.Module, linears: Mapping[str, nn.Linear], levels: Sequence[QuantScheme],
                   windows: torch.Tensor, progress: bool = True) -> dict[str, dict[str, float]]:
    """{layer: {scheme name: mean per-token KL(FP || L quantized) in nats}}. windows: int64 [n, T]."""
    ref = [model(input_ids=row[None]).logits.float() for row in windows]
    out: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(linears) * len(levels), desc="sensitivity (KL)", unit="layer", disable=not progress)
    for name, lin in linears.items():
        original = lin.weight.data
        out[name] = {}
        for s in levels:
            lin.weight.data = rtn_weight(original, s).to(original.dtype)
            try:
                kl = sum(_kl(r, model(input_ids=row[None]).logits) for r, row in zip(ref, windows))
            finally:
                lin.weight.data = original
            out[name][s.name] = float(kl) / windows.numel()
            bar.update()
    bar.close()
    return out


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(softmax(ref) || softmax(logits)) over the tokens, normalised in float64 (in float32
    the sum of a tiny KL goes negative)."""
    ref, logp = torch.log_softmax(ref_logits.double(), dim=-1), torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - logp)).sum()


def fused_units(names: Sequence[str], tie: bool = True) -> list[list[str]]:
    """Layers that must share a scheme: siblings a runtime fuses (q/k/v, gate/up), else one each."""
    units: dict[str, list[str]] = {}
    for n in names:
        group = fused_group(n) if tie else None
        units.setdefault(group[0] if group else n, []).append(n)
    return list(units.values())


def check_budget(avg_bits: float, start_bits: float, levels: Sequence[QuantScheme]) -> None:
    """EqatInputError for a budget outside [2, 8], below what the fixed schemes already use, or one
    no level can reach."""
    if not (MIN_BITS <= avg_bits <= MAX_BITS) or math.isnan(avg_bits):
        raise EqatInputError(f"--avg-bits {avg_bits} is outside [{MIN_BITS:g}, {MAX_BITS:g}]: it is the average code "
                             "width over all quantized weights, e.g. --avg-bits 2.25 with --scheme w2g64.")
    if avg_bits + 1e-9 < start_bits:
        raise EqatInputError(f"--avg-bits {avg_bits} is below the {start_bits:.3f} bits that --scheme and --override "
                             "already give; raise the budget, lower --scheme's bits or drop overrides.")
    if levels and avg_bits > max(s.bits for s in levels) + 1e-9:
        raise EqatInputError(f"--avg-bits {avg_bits} is above the widest --promote scheme "
                             f"({max(levels, key=lambda s: s.bits).name}); add a wider one or lower the budget.")


def allocate(shapes: Mapping[str, tuple[int, int]], start: LayerSchemes, fixed: set[str],
             sensitivity: Mapping[str, Mapping[str, float]], levels: Sequence[QuantScheme], avg_bits: float,
             tie: bool = True) -> LayerSchemes:
    """Greedy upgrades (largest loss reduction per added bit first) until the budget is met.

    shapes: name -> (N, K); start: the schemes before allocation; fixed: names never changed
    (explicit overrides); sensitivity: name -> {scheme name: loss increase}; levels: the schemes a
    layer may be promoted to (more bits than its start). Returns `start` with the upgrades.
    """
    total = sum(n * k for n, k in shapes.values())
    budget = avg_bits * total
    used = sum(n * k * start(name).bits for name, (n, k) in shapes.items())
    current = dict(start.layers)
    units = [u for u in fused_units(list(shapes), tie) if not set(u) & fixed]

    def cost(unit: list[str], s: QuantScheme) -> float:  # code bits added and loss removed by moving unit to s
        now = [current.get(n, start.default) for n in unit]
        bits = sum(shapes[n][0] * shapes[n][1] * (s.bits - c.bits) for n, c in zip(unit, now))
        gain = sum(sensitivity[n][c.name] - sensitivity[n][s.name] for n, c in zip(unit, now))
        return bits, gain

    while True:
        best = None
        for unit in units:
            lowest = min(current.get(n, start.default).bits for n in unit)
            for s in levels:
                if s.bits <= lowest:
                    continue
                bits, gain = cost(unit, s)
                if bits <= 0 or gain <= 0 or used + bits > budget + 1e-6:
                    continue
                if best is None or gain / bits > best[0]:
                    best = (gain / bits, unit, s, bits)
        if best is None:
            return LayerSchemes(start.default, current)
        _, unit, s, bits = best
        current.update({n: s for n in unit})
        used += bits


def measure_and_allocate(model: nn.Module, linears: Mapping[str, nn.Linear], start: LayerSchemes, fixed: set[str],
                         levels: Sequence[QuantScheme], avg_bits: float, windows: torch.Tensor, how: str = "fisher",
                         tie: bool = True, progress: bool = True) -> tuple[LayerSchemes, dict[str, Any]]:
    """Measure sensitivity on `windows` at the start scheme and every level, then allocate.
    Returns (schemes, the report's mixed_precision section)."""
    if how not in SENSITIVITY:
        raise EqatInputError(f"--sensitivity must be one of {', '.join(SENSITIVITY)}, got '{how}'.")
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
    t0 = time.perf_counter()
    measure: Callable = fisher_sensitivity if how == "fisher" else kl_sensitivity
    schemes_needed = list({start.default, *start.layers.values(), *levels})
    sens = measure(model, linears, schemes_needed, windows, progress)
    seconds = time.perf_counter() - t0
    chosen = allocate(shapes, start, fixed, sens, levels, avg_bits, tie)
    section = {"avg_bits_target": avg_bits, "sensitivity": how, "sensitivity_windows": int(windows.shape[0]),
               "sensitivity_tokens": int(windows.numel()), "sensitivity_seconds": seconds,
               "levels": [s.name for s in levels], "tie_fused": tie,
               "promoted": {n: s.name for n, s in chosen.layers.items() if n not in fixed},
               "per_layer": sens}
    return chosen, section
