"""Numerical guard for training loops: a step whose loss or any gradient is NaN/Inf is skipped
(no optimizer update, so weights and optimizer state stay as they were), and recorded. After
`max_skips` bad steps in a row the loop asks for a restart (`NonFiniteRun`): Block-AP restores
the block's state from before training and retries with half the learning rates (or in float32
first, after a bfloat16 overflow); E2E-QP halves its learning rate and goes on from the current,
last good, scales. After `max_restarts` restarts the run stops with an EqatError naming where and
when; everything saved before (finished blocks, E2E-QP step checkpoints) stays resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch


class NonFiniteRun(Exception):
    """Too many non-finite steps in a row: restart with a safer setting."""


@dataclass
class NonFiniteGuard:
    where: str  # "Block-AP block 3", "E2E-QP"
    max_skips: int = 3
    skipped: int = 0  # steps skipped in all
    consecutive: int = 0
    events: list[dict] = field(default_factory=list)

    def loss_ok(self, step: int, loss: float) -> bool:
        return self._record(step, "loss", loss) if not math.isfinite(loss) else True

    def grads_ok(self, step: int, params: Iterable[torch.nn.Parameter]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return self._record(step, "gradient", float("nan"))
        return True

    def good_step(self) -> None:
        self.consecutive = 0

    def _record(self, step: int, what: str, value: float) -> bool:
        self.skipped += 1
        self.consecutive += 1
        self.events.append({"step": step, "what": what, "value": str(value)})
        if self.consecutive >= self.max_skips:
            raise NonFiniteRun(f"{self.where}: non-finite {what} in {self.consecutive} steps in a row (last at step {step})")
        return False
