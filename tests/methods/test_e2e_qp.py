import json

import pytest
import torch

from eqat.errors import EqatInputError
from eqat.core.scheme import QuantScheme
from eqat.engine.end2end import lr_lambda
from eqat.methods.e2e_qp import E2EQPConfig, E2EQPTrainer
from eqat.data.e2e_data import E2EData
from eqat.methods.rtn import quantize_rtn
from tests.conftest import e2e_killed_at, tiny_model

SCHEME = QuantScheme(2, 32)


def data(n=12, t=24, vocab=320, seed=1):
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return E2EData(ids, ids.clone(), torch.ones_like(ids))


def qmodel(scheme=SCHEME, family="llama"):
    model = tiny_model(family)
    quantize_rtn(model, scheme)
    return model


def cfg(**kw):
    base = dict(nsamples=8, val_samples=4, seqlen=24, epochs=3, batch_size=2, grad_accum=2, lr=1e-2, save_every=2)
    return E2EQPConfig(**{**base, **kw})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trains_scales_only_and_keeps_codes(tmp_path, family):
    model = qmodel(family=family)
    before = snapshot(model)
    d = data()
    res = E2EQPTrainer(model, cfg(), tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    after = model.state_dict()
    assert res.steps == 3 * 2 and len(res.log) == 6
    assert res.log[-1]["loss"] < res.log[0]["loss"]
    # random tokens: nothing generalizes, so only check that held-out loss was measured before and after
    assert res.val_loss_before > 0 and res.val_loss_after > 0 and res.val_loss_after != res.val_loss_before
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed), changed
    assert all(after[k].dtype == before[k].dtype for k in before)  # scales back in fp16
    n_scales = sum(v.numel() for k, v in before.items() if k.endswith(".scales"))
    assert res.trainable_params == n_scales
    assert res.tokens == 6 * 4 * 24 and res.tokens_per_second > 0
    assert res.peak_memory["peak_bytes"] > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_train_zeros_keeps_them_on_the_grid(tmp_path):
    model = qmodel()
    before = snapshot(model)
    d = data()
    E2EQPTrainer(model, cfg(train_zeros=True, lr=0.5), tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    after = model.state_dict()
    zeros = [k for k in after if k.endswith(".zeros")]
    assert any(not torch.equal(before[k], after[k]) for k in zeros)
    for k in zeros:
        z = after[k].float()
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= SCHEME.qmax
    assert all(torch.equal(before[k], after[k]) for k in after if k.endswith(".qweight"))


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    d = data()
    train, val = d.rows(slice(0, 8)), d.rows(slice(8, 12))
    ref = qmodel()
    E2EQPTrainer(ref, cfg(), tmp_path / "ref", progress=False).run(train, val)

    original = E2EQPTrainer._step_batches
    monkeypatch.setattr(E2EQPTrainer, "_step_batches", e2e_killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        E2EQPTrainer(qmodel(), cfg(), tmp_path / "run", progress=False).run(train, val)
    monkeypatch.setattr(E2EQPTrainer, "_step_batches", original)
    model = qmodel()
    res = E2EQPTrainer(model, cfg(), tmp_path / "run", progress=False).run(train, val)
    assert res.resumed_at == 2 and len(res.log) == 6
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_resume_with_other_settings_is_refused(tmp_path):
    d = data()
    E2EQPTrainer(qmodel(), cfg(max_steps=2), tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    with pytest.raises(EqatInputError, match="other settings"):
        E2EQPTrainer(qmodel(), cfg(max_steps=2, lr=1e-3), tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))


def test_gradient_checkpointing_gives_the_same_model(tmp_path):
    d = data()
    a, b = qmodel(), qmodel()
    E2EQPTrainer(a, cfg(max_steps=2), tmp_path / "a", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    E2EQPTrainer(b, cfg(max_steps=2, grad_checkpointing=True), tmp_path / "b", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-3)


def test_model_without_quantized_linears_is_refused(tmp_path):
    with pytest.raises(EqatInputError, match="no quantized linears"):
        E2EQPTrainer(tiny_model(), cfg(), tmp_path / "s")


@pytest.mark.parametrize("bad", [dict(nsamples=3), dict(schedule="step"), dict(grad_accum=0), dict(warmup_ratio=1.5)])
def test_bad_options(tmp_path, bad):
    with pytest.raises(EqatInputError):
        E2EQPTrainer(qmodel(), cfg(**bad), tmp_path / "s")


def test_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(100, 3, "cosine")
    assert [round(f(i), 3) for i in range(3)] == [0.333, 0.667, 1.0]
    assert f(3) == 1.0 and f(50) < 0.6 and f(99) < 0.01
    lin = lr_lambda(10, 2, "linear")  # LR-QAT's: warm-up, then straight down to zero
    assert [lin(i) for i in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_scales_stay_positive_under_a_huge_learning_rate(tmp_path):
    from eqat.core.quantizer import SCALE_MIN

    model = qmodel()
    d = data()
    E2EQPTrainer(model, cfg(lr=10.0, max_grad_norm=0), tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    scales = [v for k, v in model.state_dict().items() if k.endswith(".scales")]
    assert all(float(s.float().min()) >= SCALE_MIN * 0.99 for s in scales)
    assert any(float(s.float().min()) < 2 * SCALE_MIN for s in scales)  # the floor was reached and held


def test_mixed_precision_scales_train_at_rates_scaled_to_their_step_size():
    from eqat.core.layer_schemes import LayerSchemes
    from eqat.methods import get_method

    model = tiny_model()
    quantize_rtn(model, LayerSchemes(SCHEME, {"model.layers.1.mlp.down_proj": QuantScheme(8, 32)}))
    c = E2EQPConfig()
    groups = {g.name: g for g in get_method("e2e-qp").prepare_model(model, c)}
    assert list(groups) == ["quant_w2", "quant_w8"]  # the dominant width first
    assert groups["quant_w2"].lr == c.lr_for(2) and groups["quant_w8"].lr == pytest.approx(c.lr_for(2) * 3 / 255)
    assert groups["quant_w8"].params == [model.model.layers[1].mlp.down_proj.scales] and len(groups["quant_w2"].params) == 13
