"""Which packed state of a block the block-wise engine keeps (`--keep-best`).

Candidates are the packed block at the start (RTN) and after each epoch. `loss` compares them by
the method's reconstruction loss on the held-out windows; `nll` by the next-token loss of those
windows when the candidate runs after the already-quantized blocks and before the remaining blocks
in full precision, then the final norm and the LM head. `nll` exists because a reconstruction loss
can rank states against what the model needs: at w2g64 on SmolLM2 one massive-activation entry
owns the block MSE from block 11 on (docs/block-ap.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SELECT_BY = ("loss", "nll")


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Best:
    """The candidate with the lowest score among those offered (0: before training, k: after epoch
    k); a non-finite score is never kept over a finite one. `losses` and `scores` record every
    candidate's held-out block loss and its score (the same list when selecting by the loss)."""

    def __init__(self, loss_of: Callable[[nn.Module], float], score_of: Callable[[nn.Module], float] | None = None):
        self.loss_of, self.score_of = loss_of, score_of
        self.block: nn.Module | None = None
        self.score, self.loss, self.epoch = math.inf, math.inf, -1
        self.losses: list[float] = []
        self.scores: list[float] = []

    def offer(self, epoch: int, packed: nn.Module) -> None:
        loss = self.loss_of(packed)
        score = loss if self.score_of is None else self.score_of(packed)
        self.losses.append(loss)
        if self.score_of is not None:
            self.scores.append(score)
        if self.block is None or (math.isfinite(score) and not score >= self.score):
            self.block, self.score, self.loss, self.epoch = packed, score, loss, epoch


class HeldoutNLL:
    """Mean next-token NLL (nats) of the windows `ids[rows]` (`ids`: LongTensor [n, T], the whole
    calibration set) with a candidate for block `i` fed `xs[rows]` (its quantized-stream inputs,
    [n, T, hidden]) and followed by `rest[i+1:]`, `norm` and `head` in full precision. Blocks after
    `i` are moved to `device` one at a time and back, so only one extra block is on it at once.
    `kwargs[j]` are block j's keyword arguments (its attention type's mask and rotary); logits are
    soft-capped as the model does (Gemma 2: `softcap * tanh(logits / softcap)`) when `softcap` is set."""

    def __init__(self, rest: Sequence[nn.Module], norm: nn.Module, head: nn.Module, ids: torch.Tensor,
                 kwargs: Sequence[dict[str, Any]], device: torch.device, batch_size: int,
                 softcap: float | None = None) -> None:
        self.rest, self.norm, self.head, self.ids = rest, norm, head, ids
        self.kwargs, self.device, self.batch_size, self.softcap = kwargs, device, batch_size, softcap

    def _batched(self, j: int, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([run_block(block, h[s : s + self.batch_size], self.kwargs[j])
                          for s in range(0, h.shape[0], self.batch_size)])

    @torch.no_grad()
    def __call__(self, i: int, block: nn.Module, xs, rows: range) -> float:
        h = self._batched(i, block, xs[rows.start : rows.stop].to(self.device, torch.float32))
        for j in range(i + 1, len(self.rest)):
            later = self.rest[j]
            later.to(self.device)
            h = self._batched(j, later, h)
            if self.device.type != "cpu":
                later.to("cpu")
        self.norm.to(self.device), self.head.to(self.device)
        ids = self.ids[rows.start : rows.stop].to(self.device)
        total = 0.0
        for s in range(0, h.shape[0], self.batch_size):
            logits = self.head(self.norm(h[s : s + self.batch_size])).float()
            if self.softcap:
                logits = self.softcap * torch.tanh(logits / self.softcap)
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[s : s + self.batch_size, 1:].flatten(),
                                           reduction="sum"))
        if self.device.type != "cpu":
            self.norm.to("cpu"), self.head.to("cpu")
        return total / max(h.shape[0] * (h.shape[1] - 1), 1)
