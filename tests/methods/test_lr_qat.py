"""LR-QAT: the layer against its formula and a dense autograd reference, the start against RTN,
the int8 fixed-point grid, the plans through the CLI, and bad input. (Export, validation and
resume after a kill: tests/methods/test_conformance.py runs both methods through its matrix.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import round_ste
from eqat.core.scheme import QuantScheme
from eqat.methods.lowrank import LowRankQuantLinear, init_lp, load_grid

SCHEMES = ["w2g32", "w3g32", "w4g32", "w8g32", "w4g-1", "w2g-1", "w4g32sym", "w3g-1sym"]
SMALL = ["--scheme", "w4g32", "--e2e-nsamples", "4", "--e2e-val-samples", "2", "--e2e-seqlen", "32",
         "--e2e-grad-accum", "1", "--nsamples", "4", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1",
         "--lr-qat-rank", "4", "--no-eval", "-q"]


def layer(scheme: str, phi0: str = "float32", train_zeros: bool = False, seed: int = 0, trained: bool = True,
          bias: bool = True) -> tuple[nn.Linear, LowRankQuantLinear]:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 48, bias=bias)
    m = LowRankQuantLinear.from_linear(lin, QuantScheme.parse(scheme), rank=4, alpha=2.0, phi0=phi0,
                                       storage=torch.float16, train_zeros=train_zeros,
                                       generator=torch.Generator().manual_seed(seed))
    if trained:  # an adapter large enough to move codes
        with torch.no_grad():
            m.lora_a.normal_(0, 3.0)
            m.scale.mul_(1 + 0.05 * torch.randn_like(m.scale))
            if train_zeros:
                m.zero.add_(torch.randn_like(m.zero))
    return lin, m


def dense(m: LowRankQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The formula with plain autograd: W_hat = s (clamp(round_ste(U + c A B) - z0 + z, 0, qmax) - z)."""
    sch, g = m.scheme, m.scheme.group_size_for(m.in_features)
    s = m.scale.clamp(2**-16, 2**14)
    s = (s + (s.to(torch.float16).float() - s).detach()).repeat_interleave(g, 1)
    z = m.zero + (torch.round(m.zero).clamp(0, sch.qmax) - m.zero).detach()
    zg, z0 = z.repeat_interleave(g, 1), m.zero0.repeat_interleave(g, 1)
    q = torch.clamp(round_ste(m.grid() + m.c * m.lora_a @ m.lora_b) - z0 + zg, 0, sch.qmax)
    return nn.functional.linear(x, s * (q - zg), m.bias)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_is_the_formula_and_packs_to_it(scheme):
    _, m = layer(scheme)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(y, dense(m, x), atol=1e-5, rtol=1e-5)
        packed = m.to_quant_linear(torch.float16)
        assert torch.allclose(packed(x), y, atol=1e-5, rtol=1e-5)  # the checkpoint computes what training saw
    assert (m.codes().int() != QuantLinear.from_linear(nn.Linear(64, 48), m.scheme).codes().int()).any()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("phi0", ["int8", "bfloat16", "float16", "float32"])
def test_zero_adapter_is_rtn_bit_for_bit(scheme, phi0):
    if phi0 == "int8" and QuantScheme.parse(scheme).bits == 8:
        pytest.skip("int8 fixed point is refused at 8 bits (test_bad_input)")
    lin, m = layer(scheme, phi0, trained=False)
    rtn = QuantLinear.from_linear(lin, m.scheme, torch.float16)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.equal(m(x), rtn(x))
        assert torch.equal(m.to_quant_linear(torch.float16).qweight, rtn.qweight)


@pytest.mark.parametrize("scheme", ["w2g32", "w3g-1", "w4g32sym", "w8g32"])
@pytest.mark.parametrize("train_zeros", [False, True])
def test_gradients_match_dense_autograd(scheme, train_zeros):
    _, m = layer(scheme, train_zeros=train_zeros)
    x = torch.randn(2, 5, 64, requires_grad=True)
    gy = torch.randn(2, 5, 48)
    params = [x, m.lora_a, m.lora_b, m.scale, m.bias] + ([m.zero] if isinstance(m.zero, nn.Parameter) else [])
    m.bias.requires_grad_(True)
    mine = torch.autograd.grad((m(x) * gy).sum(), params)
    ref = torch.autograd.grad((dense(m, x) * gy).sum(), params)
    for name, a, b in zip(["x", "A", "B", "scale", "bias", "zero"], mine, ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name
    assert mine[1].abs().sum() > 0 and mine[2].abs().sum() > 0


def test_backward_keeps_no_dense_weight():
    """What autograd keeps between forward and backward: x, the stored grid and the small tensors,
    not a float [N, K] weight."""
    _, m = layer("w4g32", "int8")
    x = torch.randn(4, 64, requires_grad=True)
    y = m(x)
    saved = y.grad_fn.saved_tensors
    assert not any(t.dtype.is_floating_point and t.shape == (48, 64) for t in saved)
    assert [t.dtype for t in saved if t.shape == (48, 64)] == [torch.uint8]  # the int8 fixed-point grid only


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_fixed_point_holds_what_the_formula_says(bits):
    """U = W0 / s0 + z0 on the grid of 2^-(8 - b), in [0, 255] as uint8; where that rounding would
    change round(U), the RTN code itself."""
    lin, m = layer(f"w{bits}g32", "int8", trained=False)
    _, m32 = layer(f"w{bits}g32", "float32", trained=False)
    f = 2.0 ** (8 - bits)
    u = m32.grid()  # W0 / s0 + z0 in float32
    codes = QuantLinear.from_linear(lin, m.scheme, torch.float16).codes().float()
    expected = torch.round(u * f).clamp(0, 255) / f
    moved = torch.round(expected).clamp(0, m.scheme.qmax) != codes
    expected = torch.where(moved, codes, expected)
    assert m.phi0.dtype == torch.uint8
    assert torch.equal(load_grid(m.phi0, bits), expected)
    assert moved.float().mean() < 0.05  # the guard is the exception
    inside = (u >= 0) & (u <= m.scheme.qmax) & ~moved
    assert ((load_grid(m.phi0, bits) - u).abs()[inside] <= 0.5 / f + 1e-6).all()  # round to nearest on that grid


def test_lp_init_is_no_worse_than_minmax_in_lp():
    from eqat.core.quantizer import fake_quantize, init_minmax

    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 1)
    sch = QuantScheme.parse("w3g64")
    errs = [(fake_quantize(w, *init(w, sch), sch) - w).abs().pow(4).sum() for init in (init_minmax, init_lp)]
    assert errs[1] < errs[0]


def test_quantize_lr_qat_from_full_precision(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(model), "--method", "lr-qat", *SMALL, "--e2e-epochs", "2",
                       "--lr-qat-lr", "1e-2", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    sec = report["lr_qat"]
    assert sec["steps"] == 4 and sec["trainable_params"] > 0
    # trainable: A, B (rank 4) and the scales of the 14 linears; nothing else
    assert report["options"]["methods"]["lr-qat"]["rank"] == 4
    # no weight error from the fp model (lr-qat drops it): said so rather than left blank
    assert report["layer_relative_error"] == {} and "lr-qat" in report["layer_relative_error_note"]
    from eqat.io.checkpoint import load_quantized, quantized_modules

    q, _, meta = load_quantized(out)
    assert len(quantized_modules(q)) == 14 and meta["provenance"]["method"] == "lr-qat"


def test_block_then_end_to_end_and_train_e2e(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    code, _, err = cli("quantize", "--model", str(model), "--method", "lr-qat-block+lr-qat", *SMALL,
                       "--out", str(tmp_path / "b"))
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert len(report["blocks"]) == 2 and "lr_qat" in report
    code, _, err = cli("train-e2e", str(tmp_path / "b"), "--method", "lr-qat", "--e2e-nsamples", "4",
                       "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-grad-accum", "1", "--lr-qat-rank", "2",
                       "--no-eval", "-q", "--out", str(tmp_path / "t"))
    assert code == 0, err


def test_python_api_from_full_precision_needs_the_pipeline(tmp_path):
    from tests.conftest import tiny_model
    from eqat.engine.end2end import EndToEndEngine
    from eqat.errors import EqatInputError
    from eqat.methods.base import get_method

    lrqat, e2e_qp = get_method("lr-qat"), get_method("e2e-qp")
    cfg = lrqat.config(nsamples=2, val_samples=0, seqlen=8, batch_size=1, grad_accum=1)
    with pytest.raises(EqatInputError, match="eqat quantize --method lr-qat"):
        lrqat.prepare_model(tiny_model(), cfg)  # no schemes given: refused, nothing wrapped
    with pytest.raises(NotImplementedError, match="e2e-qp"):
        e2e_qp.start_from_full_precision(None, torch.float16)
    with pytest.raises(EqatInputError, match="no quantized linears"):
        EndToEndEngine(tiny_model(), e2e_qp, e2e_qp.config(), tmp_path / "state", progress=False)


@pytest.mark.parametrize("flags, needle", [
    (["--lr-qat-rank", "0"], "--lr-qat-rank"),
    (["--lr-qat-rank", "500"], "--lr-qat-rank 500"),
    (["--scheme", "w8g32", "--lr-qat-phi0", "int8"], "int8"),
    (["--lr-qat-phi0", "int4"], "--lr-qat-phi0"),
    (["--lr-qat-init", "mse"], "--lr-qat-init"),
    (["--lr-qat-lr", "-1"], "--lr-qat-lr"),
])
def test_bad_input(cli, tiny_model_dir, tmp_path, flags, needle):
    out = tmp_path / "bad"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "lr-qat", *SMALL, *flags,
                       "--out", str(out))
    assert code == 2, err
    assert needle in err
    assert not out.exists() or not any(out.iterdir())


def test_python_api_refuses_weight_activation_models(tmp_path):
    """lr-qat's low-rank linears are weight-only: the engine refuses a W-A model, packed or not."""
    from tests.conftest import tiny_model
    from eqat.core.layer_schemes import as_layer_schemes
    from eqat.core.scheme import QuantScheme
    from eqat.engine.end2end import EndToEndEngine
    from eqat.errors import EqatInputError
    from eqat.methods.base import get_method
    from eqat.methods.rtn import quantize_rtn

    lrqat, wa = get_method("lr-qat"), QuantScheme.parse("w4g32a8")
    packed = tiny_model()
    quantize_rtn(packed, wa)
    with pytest.raises(EqatInputError, match="lr-qat trains weight-only.*w4g32a8.*e2e-qp"):
        EndToEndEngine(packed, lrqat, lrqat.config(), tmp_path / "a", progress=False)
    lrqat.start_from_full_precision(as_layer_schemes(wa), torch.float16)
    with pytest.raises(EqatInputError, match="lr-qat trains weight-only.*w4g32a8"):
        EndToEndEngine(tiny_model(), lrqat, lrqat.config(), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    e2e_qp = get_method("e2e-qp")  # E2E-QP trains the packed QuantLinears, whose forward quantizes activations
    EndToEndEngine(packed, e2e_qp, e2e_qp.config(), tmp_path / "c", progress=False)
