"""What the validator measures for one backend against the reference, on the same windows.

`score(model_fn, windows, reference)`: perplexity over the windows, logit agreement with the
reference's logits (max / mean absolute difference, mean KL(reference || backend), top-1 token
agreement), and throughput. `greedy_agreement`: how many greedy tokens match the reference's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from eqat.data.evaluate import window_nll

Logits = Callable[[torch.Tensor], torch.Tensor]  # ids int64 [1, T] -> logits float [1, T, V]


@dataclass
class Thresholds:
    """A backend passes when all hold. The defaults suit float16 runtimes against eqat's forward;
    a bfloat16 runtime (vLLM on CPU) is held to the looser bf16 limits, since bfloat16 alone moves
    the top token at ~2% of positions (eqat's own bf16 forward against its fp32 one on SmolLM2
    w4g64: top-1 97.9%, mean KL 8.7e-4)."""

    max_ppl_delta_pct: float = 1.0  # |ppl / reference ppl - 1| in percent
    min_top1_agree: float = 0.98  # fraction of positions whose argmax matches the reference
    max_mean_kl: float = 1e-3  # mean KL(reference || backend) per position, nats
    min_top1_agree_bf16: float = 0.95
    max_mean_kl_bf16: float = 4e-3
    # a runtime in float16/bfloat16 need not agree with eqat's forward in that dtype better than that
    # forward agrees with eqat's float32 one (`reference_self_top1`) less this margin: per-token
    # activation quantization turns the dtype's rounding into other codes (SmolLM2 W8A8 in bf16: 89.5%).
    # For a weight-activation model the floor is measured for float32 runtimes too (eqat in float32
    # against float64: SmolLM2 QLLM W4A4 agrees at 44.5%, mean KL 0.94), and the KL and perplexity
    # limits become at least twice eqat's own difference (reference_self_kl, reference_self_ppl_delta_pct)
    self_top1_margin: float = 0.03

    def failures(self, row: dict) -> list[str]:
        bf16 = row.get("dtype") == "bfloat16"
        min_top1 = self.min_top1_agree_bf16 if bf16 else self.min_top1_agree
        if row.get("reference_self_top1") is not None:
            min_top1 = min(min_top1, row["reference_self_top1"] - self.self_top1_margin)
        max_kl = self.max_mean_kl_bf16 if bf16 else self.max_mean_kl
        max_ppl = self.max_ppl_delta_pct
        if row.get("reference_self_kl") is not None:  # weight-activation models: eqat's own noise floor, doubled
            max_kl = max(max_kl, 2 * row["reference_self_kl"])
            max_ppl = max(max_ppl, 2 * abs(row["reference_self_ppl_delta_pct"]))
        out = []
        bad = [k for k in ("ppl", "reference_ppl", "ppl_delta_pct", "mean_kl", "top1_agree")
               if isinstance(row.get(k), float) and not math.isfinite(row[k])]
        if bad:  # NaN compares false with every threshold: without this it would pass
            out.append(f"{', '.join(bad)} not finite in {row.get('dtype') or 'its dtype'} (the model overflows there, or "
                       "the runtime computed nothing; Gemma 2/3 overflow in float16: use a bfloat16 runtime)")
        if abs(row["ppl_delta_pct"]) > max_ppl:
            out.append(f"ppl delta {row['ppl_delta_pct']:+.2f}% beyond +-{max_ppl:.3g}%")
        if row.get("top1_agree") is not None and row["top1_agree"] < min_top1:
            out.append(f"top-1 agreement {100 * row['top1_agree']:.1f}% below {100 * min_top1:.1f}%")
        if row.get("mean_kl") is not None and row["mean_kl"] > max_kl:
            out.append(f"mean KL {row['mean_kl']:.2e} above {max_kl:.0e}")
        return out


def run_windows(logits_fn: Logits, windows: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Logits (float32, on the CPU) of each window, and the seconds the forwards took."""
    outs, seconds = [], 0.0
    for w in windows:
        t = time.perf_counter()
        with torch.no_grad():
            logits = logits_fn(w)
        seconds += time.perf_counter() - t
        outs.append(logits.float().cpu())
    return outs, seconds


def perplexity_of(logits: list[torch.Tensor], windows: list[torch.Tensor]) -> float:
    nll = count = 0
    for out, w in zip(logits, windows):
        n, c = window_nll(out, w)
        nll, count = nll + n, count + c
    return math.exp(nll / count)


def agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Logit agreement over every position of every window."""
    got, ref = torch.cat([x[0] for x in logits]), torch.cat([x[0] for x in reference])  # [P, V]
    diff = (got - ref).abs()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"max_abs_logit": diff.max().item(), "mean_abs_logit": diff.mean().item(), "mean_kl": kl.mean().item(),
            "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Per prompt, the share of generated tokens equal to the reference's up to the first
    difference (1.0 = identical continuations); averaged, with the count of identical ones."""
    shares, same = [], 0
    for got, ref in zip(tokens, reference):
        prefix = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        shares.append(prefix / max(len(ref), 1))
        same += got == ref
    return {"greedy_prefix_agree": sum(shares) / max(len(shares), 1), "greedy_identical": same}
