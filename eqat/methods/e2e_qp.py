"""E2E-QP (EfficientQAT phase 2): train the step sizes end to end on a frozen, packed backbone.

The model's `QuantLinear`s keep their packed integer codes; only their `scales` train (optionally
the zero-points too, `train_zeros`), on the causal-LM loss or distilled from the full-precision
model's logits (`loss` kd/mix, eqat.methods.distill). Each QuantLinear dequantizes inside its
forward and its backward (`PackedLinearFunction`), so no full-precision copy of the backbone exists:
memory is the packed weights, the activations and AdamW state for ~1/g of the weights.

Trainable scales live in float32 during training (fp16 cannot hold updates of ~lr * 1e-2) and are
cast back to the checkpoint's storage dtype at the end; zero-points are rounded to the grid. The
end-to-end engine (eqat.engine.end2end) does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqat.core.layer_schemes import dominant, step_ratio
from eqat.core.scheme import QuantScheme
from eqat.core.options import option
from eqat.core.quantizer import SCALE_MAX, SCALE_MIN, valid_zero
from eqat.engine.config import EndToEndConfig, check_lr
from eqat.engine.end2end import EndToEndEngine, lm_loss_sum, mean_nll  # noqa: F401  (re-exported)
from eqat.data.e2e_data import E2EData
from eqat.errors import EqatInputError
from eqat.io.checkpoint import quantized_modules
from eqat.methods.base import EndToEndMethod, ParamGroup, get_method, register_method
from eqat.methods.distill import LOSSES, TEACHER_LOGITS, cached_teacher_topk, kd_sum, load_teacher, logits_of, nll_sum


@dataclass
class DistillOptions:
    """What an end-to-end method trains on: next-token loss, or distilled from the full-precision
    model (E2E-QP and LR-QAT share these, and their `--e2e-*` flags)."""

    loss: str = option("nll", "Training loss: nll (next token, the paper), kd (KL from the full-precision teacher's "
                              "logits), mix (kd-weight x kd + the rest x nll); docs/e2e-qp.md.")
    kd_weight: float = option(0.5, "For --e2e-loss mix: the weight of the KL term (0-1).")
    kd_temperature: float = option(1.0, "Softmax temperature of teacher and student in the KL (scaled back by T^2).")
    teacher: str = option("", "Teacher model folder for kd/mix; default: the model that was quantized (train-e2e: "
                              "the checkpoint's base_model).")
    teacher_logits: str = option("topk", "live (the teacher runs every step: exact KL, its weights in memory) or topk "
                                         "(its top-k logits computed once and cached in the resume folder).")
    kd_topk: int = option(64, "Teacher logits kept per position with --e2e-teacher-logits topk.")

    def distills(self) -> bool:
        return self.loss != "nll"

    def check_distill(self) -> None:
        if self.loss not in LOSSES:
            raise EqatInputError(f"--e2e-loss must be one of {', '.join(LOSSES)}, got '{self.loss}'.")
        if self.teacher_logits not in TEACHER_LOGITS:
            raise EqatInputError(f"--e2e-teacher-logits must be live or topk, got '{self.teacher_logits}'.")
        if not 0 <= self.kd_weight <= 1:
            raise EqatInputError(f"--e2e-kd-weight must be between 0 and 1, got {self.kd_weight}.")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise EqatInputError(f"--e2e-kd-temperature must be a positive number, got {self.kd_temperature}.")
        if self.kd_topk < 1:
            raise EqatInputError(f"--e2e-kd-topk must be at least 1, got {self.kd_topk}.")


@dataclass
class E2EQPConfig(EndToEndConfig, DistillOptions):
    """Paper: lr 2e-5 at 2 bits / 1e-5 at 3-4 bits for 128 steps of 32 x 4096 tokens; eqat's
    defaults are sized for a CPU run on a small model (docs/e2e-qp.md)."""

    lr: float | None = option(None, "Learning rate of the scales; default 1e-3 at 2 bits, 5e-4 at 3/4/8 "
                                    "(docs/e2e-qp.md).")
    train_zeros: bool = option(False, "Also train the zero-points (kept on the integer grid).")

    def lr_for(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if bits <= 2 else 5e-4

    def check(self) -> None:
        super().check()
        check_lr("--e2e-lr", self.lr, "docs/e2e-qp.md")
        self.check_distill()


@register_method
class E2EQP(EndToEndMethod):
    name = "e2e-qp"
    label = "E2E-QP"
    config = E2EQPConfig
    quantizes_activations = True  # trains the packed QuantLinears, whose forward quantizes activations
    cli_prefix = "e2e_"
    summary = "EfficientQAT phase 2: the step sizes trained end to end on the frozen packed codes"

    def prepare_model(self, model: nn.Module, cfg: E2EQPConfig) -> list[ParamGroup]:
        qmods = quantized_modules(model)
        self.storage = next(iter(qmods.values())).scales.dtype
        for p in model.parameters():
            p.requires_grad_(False)
        by_bits: dict[int, list[nn.Parameter]] = {}  # mixed precision: each bit width at its own learning rate
        width: dict[int, QuantScheme] = {}
        for m in qmods.values():
            width.setdefault(m.scheme.bits, m.scheme)
            params = by_bits.setdefault(m.scheme.bits, [])
            m.scales = nn.Parameter(m.scales.detach().float(), requires_grad=True)
            params.append(m.scales)
            if cfg.train_zeros and not m.scheme.symmetric:
                m.zeros = nn.Parameter(m.zeros.detach().float(), requires_grad=True)
                params.append(m.zeros)
        main = dominant([m.scheme for m in qmods.values()], [m.in_features * m.out_features for m in qmods.values()])
        order = sorted(by_bits, key=lambda b: b != main.bits)  # the dominant width first: its lr is the one reported
        # other widths: the dominant one's rate scaled to their step size (eqat.core.layer_schemes.step_ratio)
        lr = {b: cfg.lr_for(b) if b == main.bits else cfg.lr_for(main.bits) * step_ratio(main, width[b]) for b in order}
        return [ParamGroup("quant" if len(by_bits) == 1 else f"quant_w{b}", by_bits[b], lr[b]) for b in order]

    def prepare_data(self, model: nn.Module, train: E2EData, cfg: E2EQPConfig, state_dir: Path,
                     device: torch.device) -> E2EData:
        """For kd/mix: the teacher beside the model (live), or its top-k logits attached to `train`."""
        self.cfg, self.teacher = cfg, None
        if not cfg.distills():
            return train
        if cfg.teacher_logits == "live":
            self.teacher = load_teacher(cfg.teacher, model).to(device)
            return train
        return cached_teacher_topk(state_dir, cfg.teacher, model, train, cfg.kd_topk, cfg.batch_size, device)

    def loss_sum(self, model: nn.Module, batch: E2EData, device: torch.device, autocast: bool) -> torch.Tensor:
        cfg = getattr(self, "cfg", None)
        if cfg is None or not cfg.distills():
            return super().loss_sum(model, batch, device, autocast)
        logits = logits_of(model, batch, device, autocast)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = logits_of(self.teacher, batch, device, autocast)
        kd = kd_sum(logits, batch, cfg.kd_temperature, teacher)
        if cfg.loss == "kd":
            return kd
        return cfg.kd_weight * kd + (1 - cfg.kd_weight) * nll_sum(logits, batch)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Adam moves every scale by up to ~lr per step whatever its size, so a small one could
        cross zero and flip its group's sign: keep scales in [SCALE_MIN, SCALE_MAX]."""
        for m in quantized_modules(model).values():
            m.scales.clamp_(SCALE_MIN, SCALE_MAX)

    def finalize_model(self, model: nn.Module, cfg: E2EQPConfig) -> None:
        self.teacher = None
        for m in quantized_modules(model).values():
            m.scales = nn.Parameter(m.scales.detach().to(self.storage), requires_grad=False)
            zeros = valid_zero(m.zeros.detach(), m.scheme)
            m.zeros = nn.Parameter(zeros.to(self.storage), requires_grad=False)


class E2EQPTrainer(EndToEndEngine):
    """E2E-QP through the end-to-end engine, with the argument order of eqat 0.1."""

    def __init__(self, model: nn.Module, config: E2EQPConfig, state_dir: str | Path, device: str | torch.device = "cpu",
                 fingerprint: dict[str, Any] | None = None, progress: bool = True) -> None:
        super().__init__(model, get_method("e2e-qp"), config, state_dir, device, fingerprint, progress)
