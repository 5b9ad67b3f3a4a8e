import pytest
import torch

from eqat.errors import EqatError, EqatInputError
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.methods.block_ap import BlockAPConfig, BlockAPTrainer
from eqat.methods.rtn import quantize_rtn
from tests.conftest import tiny_model

SCHEME = QuantScheme(2, 32)


def calib(n=12, t=32, vocab=320, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(epochs=3, batch_size=4, lr_weight=1e-3, lr_quant=1e-3, val_samples=4, act_dtype="float32")
    return BlockAPConfig(**{**base, **kw})


def train(tmp_path, family="llama", config=None, name="run", **kw):
    model = tiny_model(family)
    trainer = BlockAPTrainer(model, SCHEME, config or cfg(), tmp_path / name, progress=False, fingerprint={"t": 1}, **kw)
    return model, trainer.run(calib())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_training_lowers_every_blocks_loss_and_packs(tmp_path, family):
    model, records = train(tmp_path, family)
    assert [r.block for r in records] == [0, 1]
    for r in records:
        assert r.final_loss < r.init_loss, r
        assert r.steps == 3 * 2 and len(r.train_losses) == 6
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 2 * 7 and all(q.scheme == SCHEME for q in qlinears)
    assert all(q.scales.dtype == torch.float16 for q in qlinears)


def test_block_ap_beats_rtn_on_model_output(tmp_path):
    x = calib(4, 32, seed=7)
    fp = tiny_model()
    with torch.no_grad():
        ref = fp(x).logits
    rtn = tiny_model()
    quantize_rtn(rtn, SCHEME)
    trained, _ = train(tmp_path, config=cfg(epochs=10))
    with torch.no_grad():
        err_rtn = (rtn(x).logits - ref).pow(2).mean()
        err_bap = (trained(x).logits - ref).pow(2).mean()
    assert err_bap < 0.8 * err_rtn, (err_bap, err_rtn)


class Kill(Exception):
    pass


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_resume_after_kill_gives_the_same_model(tmp_path, offload):
    config = cfg(offload=offload, act_dtype="bfloat16")
    ref, ref_records = train(tmp_path, config=config, name="ref")

    def die(rec):
        raise Kill

    with pytest.raises(Kill):
        train(tmp_path, config=config, name="killed", on_block=die)
    state = (tmp_path / "killed" / "state.json").read_text()
    assert '"next_block": 1' in state
    resumed, records = train(tmp_path, config=config, name="killed")
    assert [r.block for r in records] == [0, 1]
    assert records[1].final_loss == ref_records[1].final_loss
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_disk_offload_matches_memory(tmp_path):
    m1, r1 = train(tmp_path, config=cfg(offload="cpu"), name="a")
    m2, r2 = train(tmp_path, config=cfg(offload="disk"), name="b")
    assert [r.final_loss for r in r1] == [r.final_loss for r in r2]
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_resume_with_other_settings_is_refused(tmp_path):
    def die(rec):
        raise Kill

    with pytest.raises(Kill):
        train(tmp_path, name="s", on_block=die)
    model = tiny_model()
    other = BlockAPTrainer(model, SCHEME, cfg(), tmp_path / "s", progress=False, fingerprint={"t": 2})
    with pytest.raises(EqatInputError, match="other settings"):
        other.run(calib())


def test_divergence_names_the_block(tmp_path):
    with pytest.raises(EqatError, match="Block-AP block 0: non-finite .* after 2 restarts"):
        train(tmp_path, config=cfg(lr_weight=1e30, lr_quant=1e30, epochs=4))


def test_bad_options_are_input_errors(tmp_path):
    for bad in (dict(offload="tape"), dict(act_dtype="int8"), dict(batch_size=0), dict(loss="l1")):
        with pytest.raises(EqatInputError):
            BlockAPTrainer(tiny_model(), SCHEME, cfg(**bad), tmp_path / "x")
    with pytest.raises(EqatInputError, match="in_features=64"):
        BlockAPTrainer(tiny_model(), QuantScheme(4, 48), cfg(), tmp_path / "y")


def test_relative_loss_weighs_tokens_equally():
    from eqat.methods.block_ap import recon_loss

    y = torch.ones(1, 3, 4)
    y[0, 0] *= 1000.0  # an "attention sink" token with a massive activation
    out = y * 1.1  # 10% error on every token
    mse, rel = recon_loss(out, y, "mse"), recon_loss(out, y, "relative")
    assert mse[0, 0] > 1e5 * mse[0, 1]
    assert torch.allclose(rel, torch.full((1, 3), 0.01))


def sink_window(t=40, h=8):
    """One window of ordinary tokens (RMS ~1) whose first token holds one massive entry."""
    y = torch.randn(1, t, h, generator=torch.Generator().manual_seed(0))
    y[0, 0, 3] = 1000.0
    return y


def test_sink_loss_is_mse_for_ordinary_tokens_and_relative_for_the_sink():
    from eqat.methods.block_ap import recon_loss

    y = sink_window()
    out = y * 1.1
    mse, sink = recon_loss(out, y, "mse"), recon_loss(out, y, "sink", outlier_ratio=20.0, sink_weight=1.0)
    torch.testing.assert_close(sink[0, 1:], mse[0, 1:])  # ordinary tokens: plain MSE
    m = y.pow(2).mean(-1).sqrt().median()
    rms0 = y[0, 0].pow(2).mean().sqrt()
    torch.testing.assert_close(sink[0, 0], mse[0, 0] * (m / rms0) ** 2)  # the sink: like a typical token, same rel. error
    heavy = recon_loss(out, y, "sink", sink_weight=100.0)
    torch.testing.assert_close(heavy[0, 0], 100 * sink[0, 0])
    torch.testing.assert_close(heavy[0, 1:], sink[0, 1:])


def test_clamp_loss_scales_only_the_massive_entries():
    from eqat.methods.block_ap import recon_loss

    y = sink_window()
    out = y.clone()
    out[0, 0, 3] += 10.0  # 1% error on the massive entry
    out[0, 0, 0] += 0.5  # and an ordinary error on another channel of the same token
    clamp, mse = recon_loss(out, y, "clamp"), recon_loss(out, y, "mse")
    limit = 20.0 * y.pow(2).mean(-1).sqrt().median()
    expected = (0.5**2 + 10.0**2 * (limit / 1000.0) ** 2) / y.shape[-1]
    torch.testing.assert_close(clamp[0, 0], expected.float())
    assert mse[0, 0] > 50 * clamp[0, 0]
    assert torch.all(clamp[0, 1:] == 0)


@pytest.mark.parametrize("bad", [dict(outlier_ratio=0.0), dict(sink_weight=-1.0), dict(sink_weight=float("nan"))])
def test_bad_outlier_options(tmp_path, bad):
    with pytest.raises(EqatInputError, match="positive"):
        BlockAPTrainer(tiny_model(), SCHEME, cfg(loss="sink", **bad), tmp_path / "x")


def test_the_packed_block_computes_what_training_saw(tmp_path):
    """Training fake-quantizes with the scales as they will be stored, so the trained block before
    packing and the packed block after the last epoch score the same on the held-out windows."""
    _, records = train(tmp_path, config=cfg(keep_best=True))
    for r in records:
        assert r.fake_quant_loss == pytest.approx(r.heldout_losses[-1], rel=1e-5)


def test_sink_loss_trains(tmp_path):
    _, records = train(tmp_path, config=cfg(loss="sink", sink_weight=10.0))
    assert all(r.final_loss <= r.init_loss for r in records)
    assert records[0].train_losses[-1] < records[0].train_losses[0]


def test_relative_loss_trains_and_is_recorded(tmp_path):
    _, records = train(tmp_path, config=cfg(loss="relative"))
    # relative per-token errors: well below 1; training lowers the training loss of every block
    assert all(0 < r.final_loss < 1 and 0 < r.init_loss < 1 for r in records)
    assert all(r.train_losses[-1] < 0.8 * r.train_losses[0] for r in records)
    assert records[0].final_loss < records[0].init_loss


def test_a_block_never_ends_worse_than_its_start(tmp_path):
    """Training that hurts (a learning rate 300x too high) keeps the packed RTN start; the record
    says which state was kept and what each candidate scored."""
    model, records = train(tmp_path, config=cfg(lr_weight=0.3, lr_quant=0.3, lr_backoff=False))
    assert all(r.backoffs == 0 and r.lr_scale == 1.0 for r in records)
    rtn = tiny_model()
    quantize_rtn(rtn, SCHEME)
    for r in records:
        assert len(r.heldout_losses) == 1 + 3  # the start, then each of the 3 epochs
        assert r.final_loss == min(r.heldout_losses) and r.heldout_losses[r.kept_epoch] == r.final_loss
        assert r.final_loss <= r.heldout_losses[0] and r.fake_quant_loss is not None
    assert any(r.kept_epoch == 0 for r in records), [r.heldout_losses for r in records]
    block0 = [r for r in records if r.kept_epoch == 0]
    if records[0].kept_epoch == 0:  # block 0 sees the same inputs as RTN's block 0: the same codes
        q, ref = model.model.layers[0].self_attn.q_proj, rtn.model.layers[0].self_attn.q_proj
        assert torch.equal(q.qweight, ref.qweight) and torch.equal(q.scales, ref.scales)
    assert block0


def test_a_block_that_training_hurts_is_trained_again_at_a_tenth_of_the_rates(tmp_path):
    """--lr-backoff (the default): a learning rate 300x too high makes block 0 end at its start, so it
    trains again from that start at 0.03, then 0.003, which helps; the next block starts at 0.003
    (the level is carried), and no block backs off more than twice in the run."""
    _, hurt = train(tmp_path, config=cfg(lr_weight=0.3, lr_quant=0.3, lr_backoff=False), name="off")
    assert hurt[0].kept_epoch == 0, hurt[0].heldout_losses  # the premise: at 0.3, block 0 keeps its start
    _, records = train(tmp_path, config=cfg(lr_weight=0.3, lr_quant=0.3), name="on")
    first, second = records
    assert first.backoffs >= 1 and first.backoff_level == first.backoffs
    assert first.lr_scale == pytest.approx(0.1 ** first.backoffs)
    assert first.kept_epoch > 0 and first.final_loss < first.init_loss < hurt[0].final_loss * 1.0001
    assert second.backoff_level >= first.backoff_level and second.backoff_level <= 2
    assert second.lr_scale == pytest.approx(0.1 ** second.backoff_level)
    assert second.backoffs == second.backoff_level - first.backoff_level


def test_resume_keeps_the_lowered_rates(tmp_path):
    """A run killed after block 0 backed off resumes block 1 at the lowered rates: the same records
    and model as the uninterrupted run."""
    config = cfg(lr_weight=0.3, lr_quant=0.3)
    ref, ref_records = train(tmp_path, config=config, name="ref")
    assert ref_records[0].backoff_level >= 1

    def die(rec):
        raise Kill

    with pytest.raises(Kill):
        train(tmp_path, config=config, name="killed", on_block=die)
    resumed, records = train(tmp_path, config=config, name="killed")
    assert [(r.backoffs, r.backoff_level, r.lr_scale) for r in records] == \
        [(r.backoffs, r.backoff_level, r.lr_scale) for r in ref_records]
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_by_nll_scores_each_candidate_through_the_rest_of_the_model(tmp_path):
    """--keep-best-by nll keeps the candidate with the lowest next-token loss of the held-out windows
    (the candidate block, then the later blocks in full precision and the head); block losses are
    still recorded for each candidate, and the last block's score is the quantized model's own NLL."""
    model, records = train(tmp_path, config=cfg(lr_weight=0.3, lr_quant=0.3, keep_best_by="nll"))
    for r in records:
        assert r.selected_by == "nll" and len(r.heldout_nll) == len(r.heldout_losses) == 1 + 3
        assert r.heldout_nll[r.kept_epoch] == min(r.heldout_nll)
        assert r.final_loss == r.heldout_losses[r.kept_epoch]
        assert all(0 < v < 10 for v in r.heldout_nll)  # nats over a 320-token vocabulary: ln 320 = 5.8
    ids = calib()[8:]  # the 4 held-out windows of 12
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert records[-1].heldout_nll[records[-1].kept_epoch] == pytest.approx(float(nll), rel=1e-4)


def test_keep_best_by_nll_without_a_head_is_refused_before_training(tmp_path):
    model = tiny_model()
    model.lm_head = None
    with pytest.raises(EqatInputError, match="--keep-best-by nll needs the final norm"):
        BlockAPTrainer(model, SCHEME, cfg(keep_best_by="nll"), tmp_path / "x")


def test_keep_best_by_must_be_known(tmp_path):
    with pytest.raises(EqatInputError, match="--keep-best-by"):
        BlockAPTrainer(tiny_model(), SCHEME, cfg(keep_best_by="ppl"), tmp_path / "x")


def test_keep_last_packs_the_last_state(tmp_path):
    _, records = train(tmp_path, config=cfg(lr_weight=0.3, lr_quant=0.3, keep_best=False))
    assert all(r.kept_epoch == 3 and r.heldout_losses == [] for r in records)
    assert any(r.final_loss > r.init_loss for r in records)  # what keep_best prevents


def test_mixed_precision_block_trains_each_width_at_its_own_rates():
    """8-bit scales are ~85x smaller than 2-bit ones: they get lr_quant scaled by the qmax ratio, so an
    Adam step moves both by the same fraction; zero-points keep lr_quant."""
    from eqat.core.layer_schemes import LayerSchemes
    from eqat.core.scheme import QuantScheme
    from eqat.methods import get_method
    from eqat.methods.block_ap import BlockAPConfig
    from tests.conftest import tiny_model

    block = tiny_model("llama").model.layers[0]
    cfg = BlockAPConfig()
    schemes = LayerSchemes(QuantScheme(2, 32), {"mlp.down_proj": QuantScheme(8, 32)})
    groups = {g.name: g for g in get_method("block-ap").prepare_block(block, schemes, cfg)}
    assert set(groups) == {"weights_w2g32", "scales_w2g32", "weights_w8g32", "scales_w8g32", "zeros"}
    assert groups["scales_w8g32"].lr == pytest.approx(cfg.lr_quant * 3 / 255) and groups["scales_w2g32"].lr == cfg.lr_quant
    assert groups["weights_w8g32"].params == [block.mlp.down_proj.weight] and len(groups["weights_w2g32"].params) == 6
    assert groups["weights_w2g32"].lr == cfg.weight_lr(2) and groups["weights_w8g32"].lr == cfg.weight_lr(8)
    assert len(groups["zeros"].params) == 7 and groups["zeros"].lr == cfg.lr_quant
