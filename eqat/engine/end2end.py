"""E2E-QP (EfficientQAT phase 2): train the step sizes end to end on a frozen, packed backbone.

The model's `QuantLinear`s keep their packed integer codes; only their `scales` train
(optionally the zero-points too, `train_zeros`), with the ordinary causal-LM loss. Each
QuantLinear dequantizes inside its forward and its backward (`PackedLinearFunction`), so no
full-precision copy of the backbone exists at any time: memory is the packed weights, the
activations, and AdamW state for ~1/g of the weights.

Trainable scales live in float32 during training (fp16 cannot hold updates of ~lr * 1e-2) and
are cast back to the checkpoint's storage dtype at the end; zero-points are rounded to the
grid. The integer codes are never touched.

Resume: every `save_every` optimizer steps the scales, the optimizer and scheduler state and
the loss log are written atomically to `state_dir/e2e_state.json` (+ its safetensors file; no
pickle, eqat/engine/state.py); a re-run with the same
settings continues from there and, since the batch order is a function of (seed, step), ends
with the same scales as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eqat.io.checkpoint import quantized_modules
from eqat.errors import EqatError, EqatInputError
from eqat.engine.memory import PeakMemory
from eqat.core.quantizer import SCALE_MAX, SCALE_MIN, valid_zero
from eqat.data.e2e_data import IGNORE, E2EData
from eqat.engine.guard import NonFiniteGuard, NonFiniteRun
from eqat.engine.state import damaged, load_state, save_state

STATE = "e2e_state"  # e2e_state.json + e2e_state.<n>.safetensors (eqat/engine/state.py)
MAX_HALVINGS = 2  # learning-rate halvings after repeated non-finite steps before E2E-QP gives up
SCHEDULES = ("cosine", "constant")


@dataclass
class E2EQPConfig:
    """What E2E-QP does. Paper defaults: AdamW without weight decay, cosine schedule with 3%
    warm-up, max grad norm 0.3, 1 epoch, lr 2e-5 at 2 bits / 1e-5 at 3-4 bits for 128 steps
    of 32 x 4096 tokens. eqat's defaults are sized for a CPU run on a small model (docs/e2e-qp.md)."""

    data: str = "c4"
    nsamples: int = 64  # training sequences
    val_samples: int = 8  # held-out sequences of the same source
    seqlen: int = 256
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 2
    grad_accum: int = 2
    lr: float | None = None  # None: by bits, see lr_for
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    train_zeros: bool = False
    grad_checkpointing: bool = False
    prompt_format: str = "plain"  # for prompt/response .jsonl: plain or chat (the tokenizer's template)
    save_every: int = 10
    seed: int = 0

    def lr_for(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if bits <= 2 else 5e-4

    def check(self) -> None:
        if self.nsamples < 1 or self.val_samples < 0 or self.seqlen < 2:
            raise EqatInputError("E2E-QP needs --e2e-nsamples >= 1, --e2e-val-samples >= 0 and --e2e-seqlen >= 2.")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise EqatInputError("E2E-QP needs --e2e-batch-size >= 1, --e2e-grad-accum >= 1, --e2e-epochs >= 0, --e2e-steps >= 0.")
        if self.nsamples < self.batch_size * self.grad_accum:
            raise EqatInputError(
                f"one E2E-QP step takes --e2e-batch-size x --e2e-grad-accum = {self.batch_size * self.grad_accum} "
                f"sequences but --e2e-nsamples is {self.nsamples}; raise --e2e-nsamples or lower those."
            )
        if self.schedule not in SCHEDULES:
            raise EqatInputError(f"--e2e-schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise EqatInputError(f"--e2e-lr must be a positive learning rate, got {self.lr}; the defaults are in docs/e2e-qp.md.")
        if not self.weight_decay >= 0:
            raise EqatInputError(f"E2E-QP weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.warmup_ratio < 1 or not self.max_grad_norm >= 0 or self.save_every < 1:
            raise EqatInputError("need 0 <= --e2e-warmup < 1, --e2e-max-grad-norm >= 0 and save_every >= 1.")

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps over `n_train` sequences (an incomplete last step of an epoch is dropped)."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * max(n_train // (self.batch_size * self.grad_accum), 1)


@dataclass
class E2EResult:
    steps: int
    lr: float
    trainable_params: int
    val_loss_before: float | None
    val_loss_after: float | None
    train_seconds: float
    tokens: int  # input tokens processed in training (padding excluded)
    tokens_per_second: float
    peak_memory: dict[str, Any]
    resumed_at: int = 0
    log: list[dict[str, float]] = field(default_factory=list)  # per step: loss, lr, grad_norm, skipped
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (eqat/engine/guard.py)
    lr_halvings: int = 0  # after max_skips bad steps in a row

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_lambda(total: int, warmup: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return f


def lm_loss_sum(model: nn.Module, batch: E2EData, device: torch.device, autocast: bool) -> torch.Tensor:
    """Summed next-token NLL over the labelled tokens of `batch` (float32 scalar)."""
    ids = batch.input_ids.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(device), use_cache=False).logits
    labels = batch.labels[:, 1:].to(device)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def mean_nll(model: nn.Module, data: E2EData, batch_size: int, device: torch.device, autocast: bool = False) -> float | None:
    """Mean next-token NLL of `model` on `data` (None for no data)."""
    if len(data) == 0:
        return None
    total = sum(lm_loss_sum(model, data.rows(slice(i, i + batch_size)), device, autocast).item()
                for i in range(0, len(data), batch_size))
    return total / max(data.predicted_tokens(), 1)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder block in the backward (transformers >= 5.2 calls it activation
    checkpointing; older releases gradient checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


class E2EQPTrainer:
    """E2E-QP over a model whose linears are `QuantLinear` (the output of Block-AP or RTN)."""

    def __init__(self, model: nn.Module, config: E2EQPConfig, state_dir: str | Path, device: str | torch.device = "cpu",
                 fingerprint: dict[str, Any] | None = None, progress: bool = True) -> None:
        config.check()
        self.qmods = quantized_modules(model)
        if not self.qmods:
            raise EqatInputError("the model has no quantized linears; E2E-QP trains an eqat checkpoint "
                                 "(run `eqat quantize` first).")
        self.model, self.config, self.state_dir = model, config, Path(state_dir)
        self.device, self.progress = torch.device(device), progress
        self.bits = next(iter(self.qmods.values())).scheme.bits
        self.storage = next(iter(self.qmods.values())).scales.dtype
        self.fingerprint = fingerprint if fingerprint is not None else {
            k: v for k, v in asdict(config).items() if k not in ("save_every",)}
        self.autocast = self.device.type == "cuda"

    # ---- trainable parameters ------------------------------------------------------------
    def _make_trainable(self) -> list[nn.Parameter]:
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = []
        for m in self.qmods.values():
            m.scales = nn.Parameter(m.scales.detach().float(), requires_grad=True)
            params.append(m.scales)
            if self.config.train_zeros and not m.scheme.symmetric:
                m.zeros = nn.Parameter(m.zeros.detach().float(), requires_grad=True)
                params.append(m.zeros)
        return params

    @torch.no_grad()
    def _clamp_scales(self) -> None:
        """Adam moves every scale by up to ~lr per step whatever its size, so a small one could
        cross zero and flip its group's sign: keep scales in [SCALE_MIN, SCALE_MAX]."""
        for m in self.qmods.values():
            m.scales.clamp_(SCALE_MIN, SCALE_MAX)

    def _finalize(self) -> None:
        for m in self.qmods.values():
            m.scales = nn.Parameter(m.scales.detach().to(self.storage), requires_grad=False)
            zeros = valid_zero(m.zeros.detach(), m.scheme)
            m.zeros = nn.Parameter(zeros.to(self.storage), requires_grad=False)

    # ---- resume state --------------------------------------------------------------------
    def _save(self, step: int, opt, sched, extra: dict[str, Any]) -> None:
        state = {
            "step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scales": {n: m.scales for n, m in self.qmods.items()},
            "zeros": {n: m.zeros for n, m in self.qmods.items()} if self.config.train_zeros else None,
            **extra,
        }
        save_state(self.state_dir, STATE, self.fingerprint, state)

    def _load(self) -> dict[str, Any] | None:
        """The step checkpoint, or None. Plain JSON + safetensors (eqat/engine/state.py): the
        fingerprint is checked before any tensor is read, and nothing is unpickled."""
        state = load_state(self.state_dir, STATE, self.fingerprint, "an E2E-QP run")
        if state is None:
            return None
        try:
            with torch.no_grad():
                for n, m in self.qmods.items():
                    m.scales.copy_(state["scales"][n])
                    if state["zeros"] is not None:
                        m.zeros.copy_(state["zeros"][n])
        except (KeyError, TypeError, RuntimeError) as e:
            raise damaged(self.state_dir / f"{STATE}.json", f"its scales do not fit the model: {str(e)[:120]}") from e
        return state

    # ---- training ------------------------------------------------------------------------
    def _step_batches(self, step: int, n_train: int) -> list[torch.Tensor]:
        """Row indices of the micro-batches of optimizer step `step` (a function of seed and step)."""
        cfg = self.config
        per_step = cfg.batch_size * cfg.grad_accum
        per_epoch = max(n_train // per_step, 1)
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        rows = perm[pos * per_step : (pos + 1) * per_step]
        return list(rows.split(cfg.batch_size))

    def run(self, train: E2EData, val: E2EData) -> E2EResult:
        cfg = self.config
        model = self.model.to(self.device)
        params = self._make_trainable()
        lr = cfg.lr_for(self.bits)
        total = cfg.total_steps(len(train))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, math.ceil(cfg.warmup_ratio * total), cfg.schedule))
        model.eval()
        state = self._load()
        if state is None:
            start, log, seconds, tokens = 0, [], 0.0, 0
            val_before = mean_nll(model, val, cfg.batch_size, self.device, self.autocast)
        else:
            try:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                start, log, seconds, tokens = int(state["step"]), state["log"], state["seconds"], state["tokens"]
                val_before = state["val_before"]
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise damaged(self.state_dir / f"{STATE}.json", f"{type(e).__name__}: {str(e)[:120]}") from e
        if cfg.grad_checkpointing:
            _checkpointing(model, True)
            model.train()  # transformers checkpoints only in training mode; Llama-family has no dropout
        bar = tqdm(total=total, initial=start, desc=f"E2E-QP w{self.bits}", unit="step", disable=not self.progress)
        guard, halvings = NonFiniteGuard("E2E-QP"), 0
        with PeakMemory(self.device) as pm:
            for step in range(start, total):
                t = time.perf_counter()
                batches = self._step_batches(step, len(train))
                n_pred = sum(train.rows(b).predicted_tokens() for b in batches)
                loss_sum = 0.0
                for b in batches:
                    batch = train.rows(b)
                    loss = lm_loss_sum(model, batch, self.device, self.autocast) / max(n_pred, 1)
                    loss.backward()
                    loss_sum += loss.item()
                    tokens += int(batch.attention_mask.sum())
                try:
                    ok = guard.loss_ok(step, loss_sum) and guard.grads_ok(step, params)
                except NonFiniteRun as e:  # the scales are still the last good ones: go on at half the rate
                    halvings += 1
                    if halvings > MAX_HALVINGS:
                        bar.close()
                        raise EqatError(f"{e}, after {MAX_HALVINGS} learning-rate halvings; the step checkpoint in "
                                        f"{self.state_dir} is intact: re-run with a lower --e2e-lr to resume.") from e
                    sched.base_lrs = [lr_ / 2 for lr_ in sched.base_lrs]
                    guard.consecutive, ok = 0, False
                norm = float("nan")
                if ok:
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
                    opt.step()
                    self._clamp_scales()
                    guard.good_step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                seconds += time.perf_counter() - t
                log.append({"step": step, "loss": loss_sum, "lr": opt.param_groups[0]["lr"], "grad_norm": norm,
                            "skipped": not ok})
                bar.update()
                bar.set_postfix(loss=f"{loss_sum:.3f}")
                if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                    self._save(step + 1, opt, sched, {"log": log, "seconds": seconds, "tokens": tokens,
                                                      "val_before": val_before})
        bar.close()
        if total > start and all(r.get("skipped") for r in log[start:]):
            raise EqatError(f"E2E-QP: no step from {start} to {total - 1} had a finite loss and gradient; the scales are "
                            f"unchanged and the step checkpoint in {self.state_dir} is intact: lower --e2e-lr.")
        if cfg.grad_checkpointing:
            _checkpointing(model, False)
        model.eval()
        self._finalize()
        val_after = mean_nll(model, val, cfg.batch_size, self.device, self.autocast)
        if val_after is not None and not math.isfinite(val_after):
            raise EqatError(f"E2E-QP: the held-out loss after training is {val_after}: the trained scales break the model; "
                            f"lower --e2e-lr (the step checkpoint in {self.state_dir} is kept; --force starts over).")
        return E2EResult(
            steps=total, lr=lr, trainable_params=sum(p.numel() for p in params),
            val_loss_before=val_before, val_loss_after=val_after,
            train_seconds=seconds, tokens=tokens, tokens_per_second=tokens / seconds if seconds else 0.0,
            peak_memory=pm.to_dict(), resumed_at=start, log=log,
            skipped_steps=sum(1 for r in log if r.get("skipped")), lr_halvings=halvings,
        )
