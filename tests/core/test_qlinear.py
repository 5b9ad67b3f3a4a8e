import pytest
import torch

from eqat.errors import EqatInputError
from eqat.core.qlinear import QuantLinear
from eqat.core.quantizer import fake_quantize, init_minmax
from eqat.core.scheme import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [16, 48, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_forward_equals_fake_quant_with_stored_scales(bits, group, dtype):
    torch.manual_seed(bits)
    lin = torch.nn.Linear(96, 40, bias=True)
    scheme = QuantScheme(bits, group)
    q = QuantLinear.from_linear(lin, scheme, dtype=dtype)
    assert q.qweight.dtype == torch.int32 and q.scales.dtype == dtype and q.zeros.dtype == dtype
    assert q.scales.shape == (40, scheme.num_groups(96))
    w_hat = fake_quantize(lin.weight, q.scales, q.zeros, scheme)
    assert torch.equal(q.dequantize(), w_hat.float())
    x = torch.randn(2, 5, 96)
    expected = x @ w_hat.T + lin.bias.to(dtype).float()
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


def test_explicit_scale_and_zero_are_used():
    w = torch.randn(8, 32)
    scheme = QuantScheme(4, 16)
    s, z = init_minmax(w, scheme)
    q = QuantLinear.from_weight(w, scheme, scale=s * 1.1, zero=z, dtype=torch.float16)
    assert torch.equal(q.scales, (s * 1.1).half())


def test_scales_are_frozen_parameters():
    q = QuantLinear.from_linear(torch.nn.Linear(32, 8), QuantScheme(4, 32))
    params = dict(q.named_parameters())
    assert set(params) == {"scales", "zeros", "bias"} and not any(p.requires_grad for p in params.values())
    assert "qweight" in dict(q.named_buffers())


def test_bad_group_rejected():
    with pytest.raises(EqatInputError, match="does not divide"):
        QuantLinear(100, 8, QuantScheme(4, 64))


@pytest.mark.parametrize("scheme", ["w8g-1a8", "w4g32a4sym", "w4g-1a6"])
def test_activation_scheme_quantizes_the_input_then_the_packed_weight(scheme):
    from eqat.core.quantizer import fake_quantize_tokens

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    s = QuantScheme.parse(scheme)
    q = QuantLinear.from_linear(lin, s, dtype=torch.float32)
    x = torch.randn(3, 5, 64)
    expect = torch.nn.functional.linear(fake_quantize_tokens(x, s.act), q.dequantize(), q.bias)
    assert torch.allclose(q(x), expect, atol=1e-5)
    weight_only = QuantLinear.from_linear(lin, QuantScheme(s.bits, s.group_size, s.symmetric), dtype=torch.float32)
    assert not torch.allclose(q(x), weight_only(x), atol=1e-5)  # the activations were quantized
