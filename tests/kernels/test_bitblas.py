"""The BitBLAS path.

Where bitblas imports and CUDA is present, its output is checked against the torch reference.
Everywhere else a stand-in `bitblas` module (a MatmulConfig that records what eqat asks for and a
Matmul that computes its documented `zeros_mode="original"` formula in torch) checks eqat's side:
the configuration, the codes handed to `transform_weight`, the transform done once and redone
only when the weights change, chunking of large M, and bias.
"""

import importlib.util
import sys
import types

import pytest
import torch

from eqat.kernels import bitblas_backend as bb
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme


class _FakeMatmul:
    transforms = 0
    calls: list = []

    def __init__(self, config):
        self.config = config

    def transform_weight(self, weight):
        assert weight.dtype == torch.int8
        type(self).transforms += 1
        return weight.clone()

    def __call__(self, a, w, scale=None, zeros=None):
        c = self.config
        assert a.dtype == torch.float16 and a.shape[0] <= max(c.M)
        type(self).calls.append(a.shape[0])
        g = c.group_size
        wq = (w.float().view(c.N, -1, g) - zeros.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
        return (a.float() @ wq.view(c.N, c.K).T).half()


@pytest.fixture
def fake_bitblas(monkeypatch):
    mod = types.ModuleType("bitblas")
    mod.MatmulConfig = lambda **kw: types.SimpleNamespace(**kw)
    mod.Matmul = lambda config: _FakeMatmul(config)
    monkeypatch.setitem(sys.modules, "bitblas", mod)
    bb._operator.cache_clear()
    _FakeMatmul.transforms, _FakeMatmul.calls = 0, []
    yield mod
    bb._operator.cache_clear()


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 32), (4, -1)])
def test_eqat_side_of_the_bitblas_path(fake_bitblas, bits, group):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48), QuantScheme(bits, group), dtype=torch.float16)
    x = torch.randn(3, 7, 128).half()
    want = (x.float() @ layer.dequantize().T + layer.bias.float())
    got = bb.bitblas_forward(layer, x)
    assert got.shape == (3, 7, 48) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
    cfg = layer._bitblas.op.config
    assert (cfg.W_dtype, cfg.zeros_mode, cfg.with_zeros, cfg.with_scaling, cfg.layout) == \
        (f"uint{bits}", "original", True, True, "nt")
    assert (cfg.N, cfg.K, cfg.group_size, cfg.A_dtype) == (48, 128, 128 if group == -1 else group, "float16")
    assert torch.equal(layer._bitblas.weight, layer.codes().to(torch.int8))  # eqat's codes, unchanged
    bb.bitblas_forward(layer, x)
    assert _FakeMatmul.transforms == 1  # transformed once
    layer.scales.data.mul_(1.5)  # trained step sizes are read at each call, no new transform
    torch.testing.assert_close(bb.bitblas_forward(layer, x).float(), x.float() @ layer.dequantize().T + layer.bias.float(),
                               rtol=2e-3, atol=2e-3)
    assert _FakeMatmul.transforms == 1
    layer.qweight.copy_(layer.qweight.flip(0))  # new codes: transformed again
    torch.testing.assert_close(bb.bitblas_forward(layer, x).float(), x.float() @ layer.dequantize().T + layer.bias.float(),
                               rtol=2e-3, atol=2e-3)
    assert _FakeMatmul.transforms == 2


def test_large_m_is_chunked_and_prepare_transforms_at_load(fake_bitblas, monkeypatch):
    model = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), QuantScheme(4, 32)),
                                QuantLinear.from_linear(torch.nn.Linear(32, 16, bias=False), QuantScheme(3, 32)))
    # pretend CUDA; the 3-bit layer is left to the other backends
    monkeypatch.setattr(bb, "bitblas_why_not", lambda device, bits, group, dtype: None if bits != 3 else "3-bit")
    assert bb.prepare_bitblas(model) == 1 and _FakeMatmul.transforms == 1
    x = torch.randn(2500, 64).half()
    y = bb.bitblas_forward(model[0], x)
    assert _FakeMatmul.calls == [1024, 1024, 452] and _FakeMatmul.transforms == 1
    torch.testing.assert_close(y.float(), x.float() @ model[0].dequantize().T, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("bitblas")),
                    reason="needs CUDA and bitblas (pip install 'eqat[bitblas]')")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_real_bitblas_matches_reference(bits, m, monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "bitblas")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(1024, 512), QuantScheme(bits, 128), dtype=torch.float16).cuda()
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    want = x.float() @ layer.dequantize().T + layer.bias.float()
    torch.testing.assert_close(layer(x).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
