"""Distillation in E2E-QP (eqat.methods.distill): the KL maths, the top-k cache, training, bad input."""

import pytest
import torch
import torch.nn.functional as F

from eqat.data.e2e_data import IGNORE, E2EData
from eqat.errors import EqatInputError
from eqat.methods import distill
from eqat.methods.distill import CACHE, cached_teacher_topk, kd_sum, nll_sum
from eqat.methods.e2e_qp import E2EQPTrainer
from tests.methods.test_e2e_qp import SCHEME, cfg, data, qmodel


def batch(b=2, t=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt: its next-token positions carry no loss
    return E2EData(ids, labels, torch.ones_like(ids)), torch.randn(b, t - 1, v, generator=g), torch.randn(b, t - 1, v, generator=g)


def manual_kl(student, teacher, mask, temp=1.0):
    p = F.softmax(teacher / temp, -1)
    return float((p * (p.log() - F.log_softmax(student / temp, -1))).sum(-1)[mask].sum()) * temp**2


def test_live_kl_is_the_kl_over_predicted_positions():
    b, s, t = batch()
    mask = b.labels[:, 1:] != IGNORE
    assert mask.sum() == 2 * 5 - 2  # labels[0, 1:3] are IGNORE
    assert kd_sum(s, b, 1.0, t).item() == pytest.approx(manual_kl(s, t, mask), rel=1e-5)
    assert kd_sum(s, b, 2.0, t).item() == pytest.approx(manual_kl(s, t, mask, 2.0), rel=1e-5)
    assert kd_sum(t, b, 1.0, t).item() == pytest.approx(0.0, abs=1e-5)  # student = teacher


def test_topk_kl_equals_live_at_full_vocabulary_and_is_sparse_below():
    b, s, t = batch()
    full = t.topk(t.shape[-1], -1)
    with_all = E2EData(b.input_ids, b.labels, b.attention_mask, full.values, full.indices.int())
    assert kd_sum(s, with_all, 1.0).item() == pytest.approx(kd_sum(s, b, 1.0, t).item(), rel=1e-5)
    top3 = t.topk(3, -1)
    sparse = E2EData(b.input_ids, b.labels, b.attention_mask, top3.values, top3.indices.int())
    # rows() carries the teacher targets with the rows
    assert torch.equal(sparse.rows(slice(1, 2)).teacher_ids, top3.indices.int()[1:2])
    # a student that puts its mass on the teacher's top 3 in the teacher's proportions scores ~0
    tuned = torch.full_like(s, -30.0).scatter(-1, top3.indices, top3.values)
    assert kd_sum(tuned, sparse, 1.0).item() == pytest.approx(0.0, abs=1e-4)
    assert kd_sum(s, sparse, 1.0).item() > 0.1


def test_nll_sum_matches_cross_entropy():
    b, s, _ = batch()
    ref = F.cross_entropy(s.reshape(-1, s.shape[-1]), b.labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert nll_sum(s, b).item() == pytest.approx(ref.item())


def test_topk_cache_is_reused_only_for_the_same_teacher_data_and_k(tmp_path, tiny_model_dir, monkeypatch):
    teacher_dir = tiny_model_dir()
    from eqat.models.loading import load_model

    student, _ = load_model(teacher_dir)
    d = data(n=4, t=10, vocab=student.config.vocab_size)
    first = cached_teacher_topk(tmp_path, str(teacher_dir), student, d, 5, 2, torch.device("cpu"), progress=False)
    assert first.teacher_logits.shape == (4, 9, 5) and first.teacher_ids.dtype == torch.int32
    ref = student(d.input_ids).logits[:, :-1].topk(5, -1)
    torch.testing.assert_close(first.teacher_logits, ref.values)
    assert (tmp_path / CACHE).is_file()

    def no_teacher(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    again = cached_teacher_topk(tmp_path, str(teacher_dir), student, d, 5, 2, torch.device("cpu"), progress=False)
    assert torch.equal(again.teacher_ids, first.teacher_ids)
    with pytest.raises(AssertionError, match="cache"):  # other k: recomputed
        cached_teacher_topk(tmp_path, str(teacher_dir), student, d, 4, 2, torch.device("cpu"), progress=False)
    with pytest.raises(AssertionError, match="cache"):  # other sequences: recomputed
        cached_teacher_topk(tmp_path, str(teacher_dir), student, data(n=4, t=10, seed=7, vocab=student.config.vocab_size),
                            5, 2, torch.device("cpu"), progress=False)
    (tmp_path / CACHE).write_bytes(b"damaged")
    with pytest.raises(AssertionError, match="cache"):  # a damaged cache is recomputed, not trusted
        cached_teacher_topk(tmp_path, str(teacher_dir), student, d, 5, 2, torch.device("cpu"), progress=False)


@pytest.mark.parametrize("loss,logits", [("kd", "live"), ("kd", "topk"), ("mix", "topk")])
def test_distillation_trains_scales_towards_the_teacher(tmp_path, tiny_model_dir, loss, logits):
    from eqat.methods.rtn import quantize_rtn
    from eqat.models.loading import load_model

    teacher_dir = tiny_model_dir()
    model, _ = load_model(teacher_dir)
    quantize_rtn(model, SCHEME)
    d = data(vocab=model.config.vocab_size)
    c = cfg(loss=loss, teacher_logits=logits, teacher=str(teacher_dir), kd_topk=16)
    res = E2EQPTrainer(model, c, tmp_path / "s", progress=False).run(d.rows(slice(0, 8)), d.rows(slice(8, 12)))
    assert res.log[-1]["loss"] < res.log[0]["loss"]  # the distillation loss falls
    assert res.val_loss_before > 0 and res.val_loss_after > 0  # held out: next-token NLL, whatever the training loss
    if logits == "topk":
        assert (tmp_path / "s" / CACHE).is_file()


def test_topk_distillation_resumes_to_the_same_model(tmp_path, tiny_model_dir, monkeypatch):
    from eqat.methods.rtn import quantize_rtn
    from eqat.models.loading import load_model
    from tests.conftest import e2e_killed_at

    teacher_dir = tiny_model_dir()

    def student():
        m, _ = load_model(teacher_dir)
        quantize_rtn(m, SCHEME)
        return m

    d = data(vocab=student().config.vocab_size)
    train, val = d.rows(slice(0, 8)), d.rows(slice(8, 12))
    c = dict(loss="kd", teacher=str(teacher_dir), kd_topk=8)
    ref = student()
    E2EQPTrainer(ref, cfg(**c), tmp_path / "ref", progress=False).run(train, val)
    original = E2EQPTrainer._step_batches
    monkeypatch.setattr(E2EQPTrainer, "_step_batches", e2e_killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        E2EQPTrainer(student(), cfg(**c), tmp_path / "run", progress=False).run(train, val)
    monkeypatch.setattr(E2EQPTrainer, "_step_batches", original)
    model = student()
    res = E2EQPTrainer(model, cfg(**c), tmp_path / "run", progress=False).run(train, val)
    assert res.resumed_at == 2
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir):
    from eqat.methods.rtn import quantize_rtn
    from tests.conftest import tiny_model

    teacher_dir = tiny_model_dir()
    model = tiny_model(vocab=400)  # the teacher has the tiny tokenizer's vocabulary (320)
    quantize_rtn(model, SCHEME)
    d = data()
    with pytest.raises(EqatInputError, match="same tokenizer"):
        E2EQPTrainer(model, cfg(loss="kd", teacher=str(teacher_dir)), tmp_path / "s", progress=False).run(
            d.rows(slice(0, 8)), d.rows(slice(8, 12)))


@pytest.mark.parametrize("bad", [dict(loss="kl"), dict(teacher_logits="all"), dict(kd_weight=1.5),
                                 dict(kd_temperature=0.0), dict(kd_topk=0)])
def test_bad_distillation_options(tmp_path, bad):
    with pytest.raises(EqatInputError):
        E2EQPTrainer(qmodel(), cfg(**bad), tmp_path / "s")


def test_cli_refuses_a_missing_teacher_before_any_work(tmp_path, tiny_model_dir, cli):
    model_dir = tiny_model_dir()
    out = tmp_path / "out"
    code, _, err = cli("quantize", "--model", str(model_dir), "--scheme", "w4g32", "--out", str(out), "--method",
                       "rtn+e2e-qp", "--e2e-loss", "kd", "--e2e-teacher", str(tmp_path / "nowhere"), "--no-eval")
    assert code == 2 and "--e2e-teacher" in err and "not found" in err
    assert not out.exists()


def test_train_e2e_without_a_base_model_asks_for_a_teacher(tmp_path, tiny_model_dir, cli):
    from eqat.io.checkpoint import save_quantized
    from eqat.methods.rtn import quantize_rtn
    from eqat.models.loading import load_model

    model, tok = load_model(tiny_model_dir())
    quantize_rtn(model, SCHEME)
    ckpt = save_quantized(model, tok, tmp_path / "ckpt", provenance={"method": "rtn"})  # no base_model
    out = tmp_path / "out"
    code, _, err = cli("train-e2e", str(ckpt), "--out", str(out), "--e2e-loss", "kd", "--no-eval")
    assert code == 2 and "--e2e-teacher" in err and "base model" in err
    assert not out.exists()
