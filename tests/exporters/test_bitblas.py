"""The bitblas exporter. Its layout is BitBLAS's own (GPTQModel's BitblasLinear builds it), which
needs CUDA: here the refusal is checked for real, and eqat's side of the hand-over (codes,
scales, zero-points, config) through a stand-in for GPTQModel's BitblasLinear."""

import json

import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import EXPORTERS, QuantizedLayer, export_checkpoint
from eqat.exporters import bitblas as exporter
from eqat.core.packing import pack_int32
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn


class FakeBitblasLinear:
    """Records what eqat hands to GPTQModel's BitblasLinear; stores codes as BitBLAS's
    `general_compress` would (low bits first, int8)."""

    made: list = []

    def __init__(self, **kw):
        self.kw = kw
        FakeBitblasLinear.made.append(self)

    def _load_bitblas_quant_state(self, intweight_out_in, scales_out_group, intzeros_group_out=None, bias=None):
        self.args = (intweight_out_in, scales_out_group, intzeros_group_out, bias)
        per = 8 // self.kw["bits"]
        w = intweight_out_in.to(torch.int64).reshape(intweight_out_in.shape[0], -1, per)
        self.qweight = sum(w[..., i] << (self.kw["bits"] * i) for i in range(per)).to(torch.uint8).view(torch.int8)
        self.scales, self.bias = scales_out_group, bias
        self.qzeros = torch.zeros(0, dtype=torch.int8) if intzeros_group_out is None else intzeros_group_out


def test_refused_where_bitblas_does_not_import():
    """No CUDA here: the refusal names the reason and the way round it (a gptq export)."""
    try:
        exporter.bitblas_linear_class()
        pytest.skip("bitblas imports on this machine")
    except ImportError:
        pass
    why = EXPORTERS["bitblas"].why_not(QuantScheme(4, 64), {"a": (64, 64)}, {})
    assert "bitblas does not import here" in why and "export gptq instead" in why


@pytest.mark.parametrize("scheme,shape,match", [
    ("w3g64", (64, 64), "2/4/8-bit codes, not 3-bit"),
    ("w4g16", (64, 64), "group sizes (-1, 32, 64, 128), not 16"),
    ("w4g32", (40, 64), "divisible by 16"),
])
def test_refusals(scheme, shape, match):
    assert match in EXPORTERS["bitblas"].why_not(QuantScheme.parse(scheme), {"a": shape}, {})


@pytest.mark.parametrize("scheme", ["w4g32", "w2g64sym", "w8g-1"])
def test_hands_eqats_codes_to_gptqmodels_packer(monkeypatch, scheme):
    s = QuantScheme.parse(scheme)
    monkeypatch.setattr(exporter, "bitblas_linear_class", lambda: FakeBitblasLinear)
    n, k = 32, 128
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << s.bits, (n, k), generator=g, dtype=torch.uint8)
    groups = s.num_groups(k)
    zeros = torch.full((n, groups), 1 << (s.bits - 1)).half() if s.symmetric else torch.randint(0, 1 << s.bits, (n, groups), generator=g).half()
    scales = torch.rand(n, groups, generator=g).half()
    t, notes = exporter.convert_layer(QuantizedLayer("l", pack_int32(codes, s.bits), scales, zeros, None, k), s, {})
    made = FakeBitblasLinear.made[-1]
    assert made.kw == dict(bits=s.bits, group_size=s.group_size, desc_act=False, sym=s.symmetric, in_features=k,
                           out_features=n, bias=False, dtype=torch.float16)
    w, sc, z, bias = made.args
    assert torch.equal(w.view(torch.uint8), codes) and torch.equal(sc, scales) and bias is None
    assert (z is None) == s.symmetric and (z is None or torch.equal(z.view(torch.uint8).long(), zeros.long().T))
    assert set(t) == {"qweight", "scales"} | (set() if s.symmetric else {"qzeros"}) and notes == {}


def test_export_writes_gptqmodels_bitblas_config(monkeypatch, tmp_path, tiny_tokenizer):
    monkeypatch.setattr(exporter, "bitblas_linear_class", lambda: FakeBitblasLinear)
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    export_checkpoint(src, "bitblas", tmp_path / "bb")
    qc = json.loads((tmp_path / "bb" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq", "bitblas", 4, 32, False, False)


def test_export_refused_before_writing_here(tmp_path, tiny_tokenizer):
    try:
        exporter.bitblas_linear_class()
        pytest.skip("bitblas imports on this machine")
    except ImportError:
        pass
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    with pytest.raises(EqatInputError, match="format 'bitblas' cannot hold this checkpoint"):
        export_checkpoint(src, "bitblas", tmp_path / "bb")
    assert not (tmp_path / "bb").exists()
