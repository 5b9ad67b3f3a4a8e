"""Numerical guards: a non-finite loss or gradient skips the step (weights and optimizer state
untouched); repeated ones restart (Block-AP: the block from its state before training, at half the
learning rates) or halve the rate (E2E-QP); persistent ones stop with an error naming where,
leaving what was saved resumable."""

import math

import pytest
import torch

import eqat.engine.blockwise as blockap
import eqat.methods.block_ap as block_ap
import eqat.engine.end2end as e2e
from eqat.methods.e2e_qp import E2EQPTrainer
from eqat.errors import EqatError
from eqat.engine.guard import NonFiniteGuard, NonFiniteRun
from tests.methods.test_block_ap import train
from tests.methods.test_e2e_qp import cfg as e2e_cfg
from tests.methods.test_e2e_qp import data, qmodel


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward poisons every gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poisoned(original, bad_calls: set[int], kind: str):
    """Wrap a loss function so its training calls number `bad_calls` return NaN (or NaN gradients)."""
    calls = {"n": 0}

    def loss(*args, **kw):
        out = original(*args, **kw)
        if not torch.is_grad_enabled():  # held-out evaluation: leave alone
            return out
        calls["n"] += 1
        if calls["n"] in bad_calls:
            return out * float("nan") if kind == "loss" else NanGrad.apply(out)
        return out
    return loss


def test_guard_counts_and_asks_for_a_restart():
    g = NonFiniteGuard("here", max_skips=2)
    assert g.loss_ok(0, 1.0) and not g.loss_ok(1, math.inf)
    g.good_step()
    assert not g.loss_ok(2, math.nan)
    with pytest.raises(NonFiniteRun, match="here: non-finite loss in 2 steps in a row \\(last at step 3\\)"):
        g.loss_ok(3, math.nan)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, math.inf])
    assert not NonFiniteGuard("x").grads_ok(0, [p]) and g.skipped == 3


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_block_ap_skips_bad_steps_and_finishes(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(block_ap, "recon_loss", poisoned(block_ap.recon_loss, {2, 3}, kind))
    model, records = train(tmp_path)
    assert records[0].skipped_steps == 2 and records[0].restarts == 0 and records[1].skipped_steps == 0
    assert len(records[0].train_losses) == records[0].steps - 2
    assert all(math.isfinite(r.final_loss) and r.final_loss < r.init_loss for r in records)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def test_block_ap_restarts_at_half_the_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(block_ap, "recon_loss", poisoned(block_ap.recon_loss, {2, 3, 4}, "loss"))
    _, records = train(tmp_path)
    assert records[0].restarts == 1 and records[0].lr_scale == 0.5 and records[0].skipped_steps == 3
    assert math.isfinite(records[0].final_loss)


def test_block_ap_gives_up_naming_the_block_and_keeps_earlier_blocks(tmp_path, monkeypatch):
    """Block 1 never gets a finite loss: the error names it; block 0 is saved and the run resumes there."""
    original = block_ap.recon_loss
    state = {"block": 0}
    real_block = blockap.BlockwiseEngine._block

    def track(self, i, *a, **kw):
        state["block"] = i
        return real_block(self, i, *a, **kw)

    def loss(out, y, *args):
        value = original(out, y, *args)
        return value * float("nan") if torch.is_grad_enabled() and state["block"] == 1 else value
    monkeypatch.setattr(blockap.BlockwiseEngine, "_block", track)
    monkeypatch.setattr(block_ap, "recon_loss", loss)
    with pytest.raises(EqatError, match="Block-AP block 1: non-finite loss in 3 steps in a row .* blocks 0-0 are saved"):
        train(tmp_path, name="s")
    monkeypatch.setattr(block_ap, "recon_loss", original)
    model, records = train(tmp_path, name="s")  # resumes at block 1 and finishes
    assert [r.block for r in records] == [0, 1] and all(math.isfinite(r.final_loss) for r in records)


def test_e2e_skips_bad_steps_halves_the_rate_then_gives_up(tmp_path, monkeypatch):
    d = data()
    train_rows, val_rows = d.rows(slice(0, 8)), d.rows(slice(8, 12))
    original = e2e.lm_loss_sum
    monkeypatch.setattr(e2e, "lm_loss_sum", poisoned(original, {3, 4}, "gradient"))  # step 1 (2 batches a step)
    res = E2EQPTrainer(qmodel(), e2e_cfg(), tmp_path / "a", progress=False).run(train_rows, val_rows)
    assert res.skipped_steps == 1 and res.lr_halvings == 0 and [r["skipped"] for r in res.log][:3] == [False, True, False]

    monkeypatch.setattr(e2e, "lm_loss_sum", poisoned(original, set(range(3, 9)), "loss"))  # steps 1-3
    res = E2EQPTrainer(qmodel(), e2e_cfg(), tmp_path / "b", progress=False).run(train_rows, val_rows)
    assert res.lr_halvings == 1 and res.skipped_steps == 3 and math.isfinite(res.val_loss_after)
    assert res.log[-1]["lr"] < res.log[0]["lr"] and not res.log[-1]["skipped"]

    monkeypatch.setattr(e2e, "lm_loss_sum", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(EqatError, match="E2E-QP: non-finite loss .* after 2 learning-rate halvings; the step checkpoint"):
        E2EQPTrainer(qmodel(), e2e_cfg(epochs=5), tmp_path / "c", progress=False).run(train_rows, val_rows)
    with pytest.raises(EqatError, match="E2E-QP: no step from 0 to 5 had a finite loss"):
        E2EQPTrainer(qmodel(), e2e_cfg(), tmp_path / "d", progress=False).run(train_rows, val_rows)
