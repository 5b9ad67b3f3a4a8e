import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqat.core.quantizer import (SCALE_MIN, FakeQuantizer, clamp_ste, dequantize_codes, fake_quantize, init_minmax,
                            quantize_codes, round_ste)
from eqat.core.scheme import QuantScheme


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 6, 8]), group=st.sampled_from([8, 16, 32, -1]), rows=st.integers(1, 6),
       groups=st.integers(1, 4), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_dequant_matches_formula_and_error_bound(bits, group, rows, groups, sym, seed):
    g = torch.Generator().manual_seed(seed)
    k = (group if group > 0 else 24) * groups
    w = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g)
    scheme = QuantScheme(bits, group, sym)
    s, z = init_minmax(w, scheme)
    gs = scheme.group_size_for(k)
    assert s.shape == z.shape == (rows, k // gs)
    assert (s >= SCALE_MIN).all() and (z >= 0).all() and (z <= scheme.qmax).all() and torch.equal(z, z.round())
    q = quantize_codes(w, s, z, scheme)
    # the formula, written out element by element
    s_full, z_full = s.repeat_interleave(gs, dim=1), z.repeat_interleave(gs, dim=1)
    expected_q = torch.clamp(torch.round(w / s_full) + z_full, 0, scheme.qmax)
    assert torch.equal(q.float(), expected_q)
    w_hat = dequantize_codes(q, s, z)
    assert torch.equal(w_hat, (expected_q - z_full) * s_full)
    assert torch.equal(fake_quantize(w, s, z, scheme), w_hat)
    if not sym:  # asymmetric min/max covers the range: error at most half a step
        assert ((w - w_hat).abs() <= s_full / 2 + 1e-6).all()


def test_constant_group_gets_floor_scale_and_exact_zero():
    w = torch.zeros(2, 16)
    s, z = init_minmax(w, QuantScheme(4, 8))
    assert torch.all(s == SCALE_MIN)
    assert torch.equal(fake_quantize(w, s, z, QuantScheme(4, 8)), w)


def test_ste_gradients():
    x = torch.tensor([0.3, 1.7, -2.2], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    y = torch.tensor([1e-9, 5.0], requires_grad=True)
    out = clamp_ste(y, 1e-5, 1.0)
    out.sum().backward()
    assert out[0] == torch.tensor(1e-5) and out[1] == 1.0 and torch.equal(y.grad, torch.ones(2))


def test_gradients_reach_weight_scale_and_zero():
    torch.manual_seed(0)
    w = torch.randn(4, 32, requires_grad=True)
    fq = FakeQuantizer(w, QuantScheme(3, 16))
    # the zero-point only gets a gradient where codes clip (elsewhere q - z = round(w / s));
    # halving the min/max scale makes some clip
    fq.scale.data *= 0.5
    ((fq(w) - w) ** 2).sum().backward()
    for t in (w.grad, fq.scale.grad, fq.zero.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def test_symmetric_zero_is_fixed_buffer():
    w = torch.randn(3, 16)
    fq = FakeQuantizer(w, QuantScheme(4, 16, symmetric=True))
    assert "zero" not in dict(fq.named_parameters())
    assert torch.all(fq.zero == 8)
    assert torch.equal(fq.codes(w), quantize_codes(w, fq.scale, fq.zero, fq.scheme))


def test_packed_layer_agrees_with_training_forward_for_out_of_range_scales():
    """Scales an optimizer pushed <= 0 or past the ceiling, and zero-points off the grid: the packed
    QuantLinear dequantizes to exactly the fake-quant forward (the same clamps in both)."""
    from eqat.core.qlinear import QuantLinear
    from eqat.core.quantizer import SCALE_MAX, valid_scale

    torch.manual_seed(0)
    scheme = QuantScheme(2, 16)
    w = torch.randn(6, 32)
    fq = FakeQuantizer(w, scheme)
    fq.scale.data[0] = -0.3
    fq.scale.data[1] = 0.0
    fq.scale.data[2] = 1e9
    fq.zero.data[3] = 7.6
    fq.zero.data[4] = -2.0
    layer = QuantLinear.from_weight(w, scheme, scale=fq.scale.detach(), zero=fq.zero.detach(), dtype=torch.float16)
    assert (layer.scales.float() >= SCALE_MIN).all() and (layer.scales.float() <= SCALE_MAX).all()
    fq.scale.data = valid_scale(fq.scale.data).half().float()  # what fp16 storage keeps
    torch.testing.assert_close(layer.dequantize(), fq(w), rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):  # the limits survive the storage cast exactly
        assert valid_scale(torch.tensor([-1.0, 1e9])).to(dtype).float().tolist() == [SCALE_MIN, SCALE_MAX]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quant_at_the_storage_dtype_is_the_packed_layer(dtype):
    """Trained scales are not storable values; with `storage` the training forward uses the stored
    scale, so the packed layer dequantizes to exactly what training saw (same codes too)."""
    from eqat.core.qlinear import QuantLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    scheme = QuantScheme(2, 32)
    s, z = init_minmax(w, scheme)
    s = (s * (1 + 3e-3 * torch.randn(s.shape, generator=g))).requires_grad_()
    packed = QuantLinear.from_weight(w, scheme, scale=s, zero=z, dtype=dtype)
    w_hat = fake_quantize(w, s, z, scheme, dtype)
    assert torch.equal(w_hat, packed.dequantize())
    assert not torch.equal(fake_quantize(w, s, z, scheme), packed.dequantize())
    w_hat.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0  # the cast is straight-through


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_token_fake_quant_is_the_formula(bits, symmetric):
    from eqat.core.quantizer import fake_quantize_tokens
    from eqat.core.scheme import ActScheme

    torch.manual_seed(bits)
    x = torch.randn(2, 7, 48) * torch.rand(2, 7, 1) * 4 + 0.3  # tokens of different ranges
    x[0, 3] = 0.0  # an all-zero token stays zero
    act = ActScheme(bits, symmetric)
    y = fake_quantize_tokens(x, act)
    for row, out in zip(x.reshape(-1, 48), y.reshape(-1, 48)):  # one token at a time, by hand
        if symmetric:
            s = max(row.abs().max().item() / (2 ** (bits - 1) - 1), 2.0**-16)
            expect = torch.clamp(torch.round(row / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
        else:
            lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
            s = max((hi - lo) / (2**bits - 1), 2.0**-16)
            z = round(-lo / s)
            expect = (torch.clamp(torch.round(row / s) + z, 0, 2**bits - 1) - z) * s
        assert torch.allclose(out, expect, atol=1e-6)
        assert (out - row).abs().max() <= s / 2 + 1e-6  # the range is never clipped
    assert torch.all(y[0, 3] == 0)
    xg = x.clone().requires_grad_(True)
    fake_quantize_tokens(xg, act).sum().backward()
    assert torch.all(xg.grad == 1)  # straight through
