"""The end-to-end engine: train a method's parameters on the language-model loss of the whole model.

The engine owns the data order (a function of seed and step, so a resumed run sees the same
batches), gradient accumulation, warm-up and schedule, clipping, the non-finite guard
(eqat.engine.guard: skip, then halve the learning rate) and the resume state: every `save_every`
optimizer steps the trained parameters (by name), the optimizer and scheduler state and the loss
log are written atomically to `state_dir/e2e_state.json` + its safetensors file (eqat.engine.state;
no pickle). A re-run with the same settings continues from there and ends with the same
parameters as an uninterrupted run. What trains, and how it is frozen afterwards, is the method's
(E2E-QP: the step sizes of the packed QuantLinears, eqat.methods.e2e_qp).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eqat.core.layer_schemes import dominant
from eqat.data.e2e_data import IGNORE, E2EData
from eqat.engine.config import EndToEndConfig
from eqat.engine.guard import NonFiniteGuard, NonFiniteRun
from eqat.engine.memory import PeakMemory
from eqat.engine.state import damaged, fingerprint_of, load_state, save_state
from eqat.errors import EqatError, EqatInputError
from eqat.io.checkpoint import quantized_modules

if TYPE_CHECKING:
    from eqat.methods.base import EndToEndMethod, ParamGroup

STATE = "e2e_state"  # e2e_state.json + e2e_state.<n>.safetensors (eqat/engine/state.py)
MAX_HALVINGS = 2  # learning-rate halvings after repeated non-finite steps before E2E-QP gives up


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
        if schedule == "linear":  # to zero at the last step (LR-QAT's paper)
            return max(0.0, (total - step) / max(total - warmup, 1))
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return f


def logits_of(model: nn.Module, batch: E2EData, device: torch.device, autocast: bool) -> torch.Tensor:
    """Next-token logits of the positions that predict a token: float32 [B, T-1, V]."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    return out.logits[:, :-1].float()


def nll_sum(logits: torch.Tensor, batch: E2EData) -> torch.Tensor:
    """Summed next-token NLL over the labelled tokens (float32 scalar); logits [B, T-1, V] from `logits_of`."""
    labels = batch.labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def lm_loss_sum(model: nn.Module, batch: E2EData, device: torch.device, autocast: bool) -> torch.Tensor:
    """Summed next-token NLL over the labelled tokens of `batch` (float32 scalar)."""
    return nll_sum(logits_of(model, batch, device, autocast), batch)


@torch.no_grad()
def mean_nll(model: nn.Module, data: E2EData, batch_size: int, device: torch.device, autocast: bool = False,
             loss_sum: Callable = lm_loss_sum) -> float | None:
    """Mean next-token NLL of `model` on `data` (None for no data)."""
    if len(data) == 0:
        return None
    total = sum(loss_sum(model, data.rows(slice(i, i + batch_size)), device, autocast).item()
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


class EndToEndEngine:
    """`method` over `model` (already quantized: its linears are QuantLinears), state in `state_dir`."""

    def __init__(self, model: nn.Module, method: "EndToEndMethod", config: EndToEndConfig, state_dir: str | Path,
                 device: str | torch.device = "cpu", fingerprint: dict[str, Any] | None = None,
                 progress: bool = True) -> None:
        config.check()
        qmods = quantized_modules(model).values()
        start = getattr(method, "schemes", None)  # LayerSchemes of a method that starts from full precision
        act = sorted({s.name for s in [m.scheme for m in qmods] + ([start.default, *start.layers.values()] if start else [])
                      if s.act is not None})
        if act and not method.quantizes_activations:  # the pipeline refuses this too, naming the methods that can
            raise EqatInputError(f"{method.name} trains weight-only quantization, and the scheme {act[0]} quantizes "
                                 "activations; train it with a method for weight-activation schemes (eqat info lists "
                                 "them), e.g. e2e-qp.")
        if not qmods and not method.from_full_precision:
            raise EqatInputError(f"the model has no quantized linears; {method.name} trains an eqat checkpoint "
                                 "(run `eqat quantize` first).")
        self.model, self.method, self.config, self.state_dir = model, method, config, Path(state_dir)
        self.scheme_name = (dominant([m.scheme for m in qmods], [m.in_features * m.out_features for m in qmods]).name
                            if qmods else method.schemes.name)
        self.device, self.progress = torch.device(device), progress
        self.fingerprint = fingerprint if fingerprint is not None else fingerprint_of(config)
        self.autocast = self.device.type == "cuda"
        self.params: dict[str, nn.Parameter] = {}

    # ---- resume state --------------------------------------------------------------------
    def _save(self, step: int, opt, sched, extra: dict[str, Any]) -> None:
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "params": dict(self.params), **extra}
        save_state(self.state_dir, STATE, self.fingerprint, state)

    def _load(self) -> dict[str, Any] | None:
        """The step checkpoint, or None. Plain JSON + safetensors (eqat.engine.state): the
        fingerprint is checked before any tensor is read, and nothing is unpickled."""
        state = load_state(self.state_dir, STATE, self.fingerprint, f"an unfinished {self.method.name} run")
        if state is None:
            return None
        try:
            saved = state["params"]
            if set(saved) != set(self.params):
                raise KeyError(f"{len(set(saved) ^ set(self.params))} parameter names differ")
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
        except (KeyError, TypeError, RuntimeError) as e:
            raise damaged(self.state_dir / f"{STATE}.json", f"its parameters do not fit the model: {str(e)[:120]}") from e
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

    def _prepare(self) -> list["ParamGroup"]:
        groups = self.method.prepare_model(self.model, self.config)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.params = {names[id(p)]: p for g in groups for p in g.params}
        return groups

    def _start(self, opt, sched, val: E2EData) -> tuple[int, list, float, int, float | None]:
        """(first step, log, seconds, tokens, held-out loss before): fresh, or from the step checkpoint."""
        state = self._load()
        if state is None:
            return 0, [], 0.0, 0, mean_nll(self.model, val, self.config.batch_size, self.device, self.autocast,
                                            self.method.heldout_loss_sum)
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            return int(state["step"]), state["log"], state["seconds"], state["tokens"], state["val_before"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise damaged(self.state_dir / f"{STATE}.json", f"{type(e).__name__}: {str(e)[:120]}") from e

    def _accumulate(self, step: int, train: E2EData) -> tuple[float, int]:
        """Forward and backward of optimizer step `step`'s micro-batches: (loss, tokens)."""
        batches = self._step_batches(step, len(train))
        n_pred = sum(train.rows(b).predicted_tokens() for b in batches)
        loss_sum, tokens = 0.0, 0
        for b in batches:
            batch = train.rows(b)
            loss = self.method.loss_sum(self.model, batch, self.device, self.autocast) / max(n_pred, 1)
            loss.backward()
            loss_sum += loss.item()
            tokens += int(batch.attention_mask.sum())
        return loss_sum, tokens

    def run(self, train: E2EData, val: E2EData) -> E2EResult:
        cfg = self.config
        model = self.model.to(self.device)
        train = self.method.prepare_data(model, train, cfg, self.state_dir, self.device)
        groups = self._prepare()
        params = list(self.params.values())
        total = cfg.total_steps(len(train))
        opt = torch.optim.AdamW([{"params": g.params, "lr": g.lr} for g in groups], weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, math.ceil(cfg.warmup_ratio * total), cfg.schedule))
        model.eval()
        start, log, seconds, tokens, val_before = self._start(opt, sched, val)
        if cfg.grad_checkpointing:
            _checkpointing(model, True)
            model.train()  # transformers checkpoints only in training mode; Llama-family has no dropout
        bar = tqdm(total=total, initial=start, desc=f"{self.method.label} {self.scheme_name}", unit="step",
                   disable=not self.progress)
        guard, halvings = NonFiniteGuard(self.method.label), 0
        with PeakMemory(self.device) as pm:
            for step in range(start, total):
                t = time.perf_counter()
                loss_sum, n_tokens = self._accumulate(step, train)
                tokens += n_tokens
                try:
                    ok = guard.loss_ok(step, loss_sum) and guard.grads_ok(step, params)
                except NonFiniteRun as e:  # the parameters are still the last good ones: go on at half the rate
                    halvings += 1
                    if halvings > MAX_HALVINGS:
                        bar.close()
                        raise EqatError(f"{e}, after {MAX_HALVINGS} learning-rate halvings; the step checkpoint in "
                                        f"{self.state_dir} is intact: re-run with a lower learning rate to resume.") from e
                    sched.base_lrs = [lr_ / 2 for lr_ in sched.base_lrs]
                    guard.consecutive, ok = 0, False
                norm = float("nan")
                if ok:
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
                    opt.step()
                    self.method.after_step(model)
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
        return self._finish(groups, val, total, start, log, seconds, tokens, val_before, halvings, pm)

    def _finish(self, groups, val: E2EData, total, start, log, seconds, tokens, val_before, halvings, pm) -> E2EResult:
        name, model = self.method.label, self.model
        if total > start and all(r.get("skipped") for r in log[start:]):
            raise EqatError(f"{name}: no step from {start} to {total - 1} had a finite loss and gradient; the parameters "
                            f"are unchanged and the step checkpoint in {self.state_dir} is intact: lower the learning rate.")
        if self.config.grad_checkpointing:
            _checkpointing(model, False)
        model.eval()
        self.method.finalize_model(model, self.config)
        val_after = mean_nll(model, val, self.config.batch_size, self.device, self.autocast, self.method.heldout_loss_sum)
        if val_after is not None and not math.isfinite(val_after):
            raise EqatError(f"{name}: the held-out loss after training is {val_after}: the trained parameters break the "
                            f"model; lower the learning rate (the step checkpoint in {self.state_dir} is kept; --force "
                            "starts over).")
        return E2EResult(
            steps=total, lr=groups[0].lr, trainable_params=sum(p.numel() for p in self.params.values()),
            val_loss_before=val_before, val_loss_after=val_after,
            train_seconds=seconds, tokens=tokens, tokens_per_second=tokens / seconds if seconds else 0.0,
            peak_memory=pm.to_dict(), resumed_at=start, log=log,
            skipped_steps=sum(1 for r in log if r.get("skipped")), lr_halvings=halvings,
        )
