"""`select_backend`: automatic choice, EQAT_KERNEL overrides, and refusals that say why."""

import pytest
import torch

from eqat.errors import EqatInputError
from eqat.kernels import BACKENDS, select_backend
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme

CPU = torch.device("cpu")


def test_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("EQAT_KERNEL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never picked by itself
    assert select_backend(CPU, 3, 64, torch.float32).name == "torch"
    assert select_backend(CPU, 2, 64, torch.float16, needs_grad=True).name == "torch"


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "marlin")
    with pytest.raises(EqatInputError, match="marlin.*available: triton, bitblas, torch"):
        select_backend(CPU, 4, 64, torch.float16)


def test_torch_refuses_bits_it_cannot_unpack(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "torch")
    with pytest.raises(EqatInputError, match="EQAT_KERNEL=torch: kernel 'torch' serves bits 2/3/4/6/8, not 5"):
        select_backend(CPU, 5, 64, torch.float32)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("EQAT_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EqatInputError, match="run on CUDA; on CPU only under TRITON_INTERPRET=1"):
        select_backend(CPU, 4, 64, torch.float16)


def test_triton_refuses_group_without_power_of_two_tile(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("EQAT_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(EqatInputError, match="group size with a power-of-two divisor >= 16.*group is 24"):
        select_backend(CPU, 4, 24, torch.float16)
    with pytest.raises(EqatInputError, match="float16/bfloat16/float32 activations, not torch.float64"):
        select_backend(CPU, 4, 64, torch.float64)
    assert select_backend(CPU, 3, 576, torch.bfloat16).name == "triton"  # per-channel, 576 = 9 x 64


def test_triton_not_installed_gives_the_install_hint(monkeypatch):
    import eqat.kernels.triton_ops as ops

    monkeypatch.setattr(ops, "triton_installed", lambda: False)
    monkeypatch.setenv("EQAT_KERNEL", "triton")
    with pytest.raises(EqatInputError, match=r"pip install 'eqat\[triton\]'"):
        select_backend(torch.device("cuda"), 4, 64, torch.float16)


def test_bitblas_refusals_name_the_limit(monkeypatch):
    import eqat.kernels.bitblas_backend as bb

    monkeypatch.setenv("EQAT_KERNEL", "bitblas")
    with pytest.raises(EqatInputError, match="BitBLAS runs on CUDA only, not cpu"):
        select_backend(CPU, 4, 64, torch.float16)
    cuda = torch.device("cuda")
    monkeypatch.setattr(bb, "bitblas_installed", lambda: False)
    with pytest.raises(EqatInputError, match=r"BitBLAS is not installed: pip install 'eqat\[bitblas\]' on a CUDA machine"):
        select_backend(cuda, 4, 64, torch.float16)
    monkeypatch.setattr(bb, "bitblas_installed", lambda: True)
    with pytest.raises(EqatInputError, match="2/4-bit weights with zero-points, not 3-bit"):
        select_backend(cuda, 3, 64, torch.float16)
    with pytest.raises(EqatInputError, match="float16 activations, not torch.bfloat16"):
        select_backend(cuda, 4, 64, torch.bfloat16)
    with pytest.raises(EqatInputError, match="inference-only and has no backward"):
        select_backend(cuda, 4, 64, torch.float16, needs_grad=True)
    assert select_backend(cuda, 2, 64, torch.float16).name == "bitblas"
    monkeypatch.delenv("EQAT_KERNEL")  # never picked unless asked for
    assert select_backend(cuda, 2, 64, torch.float16).name != "bitblas"


def test_forced_torch_runs(monkeypatch):
    monkeypatch.setenv("EQAT_KERNEL", "torch")
    q = QuantLinear.from_linear(torch.nn.Linear(32, 8), QuantScheme(2, 16))
    x = torch.randn(32, 3).t()  # non-contiguous input
    assert not x.is_contiguous()
    torch.testing.assert_close(q(x), x @ q.dequantize().T + q.bias.float())

