import pytest
import torch

from eqat.errors import EqatInputError
from eqat.kernels import BACKENDS, select_backend
from eqat.qlinear import QuantLinear
from eqat.scheme import QuantScheme


def test_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("EQAT_KERNEL", raising=False)
    assert select_backend(torch.device("cpu"), 3).name == "torch"


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "marlin")
    with pytest.raises(EqatInputError, match="marlin.*available: torch"):
        select_backend(torch.device("cpu"), 4)


def test_forced_backend_that_cannot_serve(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "torch")
    monkeypatch.setitem(BACKENDS, "torch", BACKENDS["torch"].__class__("torch", BACKENDS["torch"].fn, ("cpu",), (4,)))
    with pytest.raises(EqatInputError, match="serves bits"):
        select_backend(torch.device("cpu"), 2)


def test_forced_torch_runs(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "torch")
    q = QuantLinear.from_linear(torch.nn.Linear(32, 8), QuantScheme(2, 16))
    x = torch.randn(32, 3).t()  # non-contiguous input
    assert not x.is_contiguous()
    torch.testing.assert_close(q(x), x @ q.dequantize().T + q.bias.float())
