import torch
from torch import nn

from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.methods.fakequant import FakeQuantLinear, freeze_block, trainable_groups, wrap_block


def test_fake_quant_linear_starts_at_rtn_and_freezes_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=True)
    scheme = QuantScheme(3, 32)
    fq = FakeQuantLinear(lin, scheme)
    rtn = QuantLinear.from_linear(lin, scheme, dtype=torch.float32)
    x = torch.randn(5, 64)
    assert torch.allclose(fq(x), rtn(x), atol=1e-5)
    # a learned scale that fp16 represents exactly: the packed layer computes what was trained
    with torch.no_grad():
        fq.quantizer.scale.mul_(1.07)
        fq.quantizer.scale.copy_(fq.quantizer.scale.half().float())
        fq.weight.add_(0.01 * torch.randn_like(fq.weight))
    q = fq.to_quant_linear(torch.float16)
    assert isinstance(q, QuantLinear)
    assert torch.allclose(q.dequantize(), fq.quantizer(fq.weight).detach(), atol=1e-6)


def test_gradients_reach_weight_scale_and_zero():
    torch.manual_seed(0)
    fq = FakeQuantLinear(nn.Linear(32, 8, bias=False), QuantScheme(2, 16))
    fq(torch.randn(4, 32)).pow(2).sum().backward()
    weights, qparams = trainable_groups(nn.Sequential(fq))
    assert len(weights) == 1 and len(qparams) == 2
    for p in weights + qparams:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert weights[0].grad.abs().sum() > 0 and qparams[0].grad.abs().sum() > 0


def test_wrap_and_freeze_block_replace_every_linear():
    block = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16, bias=False)))
    wrapped = wrap_block(block, QuantScheme(4, 16))
    assert set(wrapped) == {"0", "2.0"}
    assert not any(type(m) is nn.Linear for m in block.modules())
    frozen = freeze_block(block)
    assert set(frozen) == {"0", "2.0"} and all(isinstance(block.get_submodule(k), QuantLinear) for k in frozen)
    assert frozen["0"].bias is not None and frozen["2.0"].bias is None
