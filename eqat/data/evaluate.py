"""Perplexity: the one function behind `eqat eval`, the benchmarks and the validator.

Protocol (GPTQ-style): the token stream is cut into non-overlapping windows of `seqlen`;
each window is scored on its own (no context carried over); perplexity is
exp(total NLL / total predicted tokens), with seqlen - 1 predicted tokens per window.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eqat.errors import EqatInputError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token
    windows: int
    seqlen: int
    tokens: int  # predicted tokens
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: torch.Tensor, x: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) of windows x [B, T] given their logits [B, T, V]."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
    return nll.item(), x[:, 1:].numel()


def check_windows(seqlen: int, windows: int | None, flag: str = "--max-windows") -> None:
    """Refuse a window length or count that cannot measure anything, before any work: a window of
    `seqlen` tokens predicts `seqlen - 1` of them, and at least one window is needed."""
    if seqlen < 2:
        raise EqatInputError(f"--seqlen {seqlen}: a window of N tokens predicts N - 1 of them, so it needs at least "
                             "2 tokens; pass a larger --seqlen, e.g. --seqlen 512.")
    if windows is not None and windows < 1:
        raise EqatInputError(f"{flag} {windows}: at least one window is needed to measure anything; pass {flag} 1 "
                             "or more" + (" (or leave it out for every window)." if flag == "--max-windows" else "."))


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of `model` on the 1-D LongTensor `ids`."""
    check_windows(seqlen, max_windows)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise EqatInputError(f"the evaluation text has {ids.numel()} tokens, less than one window of {seqlen}; "
                             "lower --seqlen or use a longer text.")
    device = next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    total_nll, total_tokens, start = 0.0, 0, time.perf_counter()
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="win"):
        x = windows[i : i + batch_size].to(device)
        nll, tokens = window_nll(model(x, use_cache=False).logits, x)
        total_nll += nll
        total_tokens += tokens
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, n, seqlen, total_tokens, time.perf_counter() - start)
