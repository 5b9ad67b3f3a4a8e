"""The AWQ (GEMM) exporter: interleaved 4-bit packing, lossless, read back by GPTQModel's own
AWQ unpacker, refusals, and a real load in transformers."""

import json
import os

import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import EXPORTERS, QuantizedLayer, export_checkpoint
from eqat.exporters.awq import convert_layer, pack_awq, unpack_awq
from eqat.core.packing import pack_int32
from eqat.core.quantizer import dequantize_codes
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn


def _layer(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group), generator=g).half()
    scales = (torch.rand(n, k // group, generator=g) * 0.05 + 1e-3).half()
    return QuantizedLayer("l", pack_int32(codes, 4), scales, zeros, None, k), codes, zeros, scales


def test_interleaved_order():
    """Nibble i of a word holds column [0, 2, 4, 6, 1, 3, 5, 7][i] of its block of 8."""
    word = pack_awq(torch.arange(8).view(1, 8))
    assert [(int(word) >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    v = torch.randint(0, 16, (5, 64))
    assert torch.equal(unpack_awq(pack_awq(v)), v)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_repacking_is_lossless_and_gptqmodel_reads_the_same_weight(group):
    layer, codes, zeros, scales = _layer(48, 256, group)
    t, _ = convert_layer(layer, QuantScheme(4, group), {})
    assert t["qweight"].shape == (256, 6) and t["qzeros"].shape == (256 // group, 6) and t["scales"].shape == (256 // group, 48)
    assert torch.equal(unpack_awq(t["qweight"]).T, codes.long())
    assert torch.equal(unpack_awq(t["qzeros"]).T, zeros.long()) and torch.equal(t["scales"].T, scales)
    gm = pytest.importorskip("gptqmodel.quantization.awq.utils.packing_utils")
    theirs = gm.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, group).T.float()  # their unpacker, fp16 math
    torch.testing.assert_close(theirs, dequantize_codes(codes, scales, zeros), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("scheme,shapes,match", [
    ("w3g64", {"a": (64, 64)}, "4-bit codes only, not 3-bit; for 2/3/8 bits use gptq"),
    ("w4g-1", {"a": (64, 64)}, "per-channel"),
    ("w4g32", {"a": (20, 64)}, "'a' has 20 outputs"),
])
def test_refusals(scheme, shapes, match):
    assert match in EXPORTERS["awq"].why_not(QuantScheme.parse(scheme), shapes, {})


def test_two_bit_checkpoint_is_refused_before_writing(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(2, 32))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    with pytest.raises(EqatInputError, match="format 'awq' cannot hold this checkpoint \\(w2g32\\).*gptq \\(GPTQModel") as e:
        export_checkpoint(src, "awq", tmp_path / "out")
    holders = str(e.value).split("Formats that can hold it, and who loads them: ")[1]
    assert holders.startswith("compressed-tensors (") and "gptq (" in holders and "onnx (" in holders
    assert "awq (" not in holders
    assert not (tmp_path / "out").exists()


def test_loads_in_transformers(tmp_path, tiny_tokenizer):
    """transformers (through GPTQModel's AWQ kernel, which computes in bfloat16 on CPU) loads the
    export; its logits match eqat's float16 forward within bfloat16 accuracy."""
    pytest.importorskip("gptqmodel")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    export_checkpoint(src, "awq", tmp_path / "awq")
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == ("awq", 4, 32, True, "gemm")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_quantized(src)[0].half()(ids).logits.float()
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float16, device_map="cpu")
        assert hasattr(hf.model.layers[0].self_attn.q_proj, "qzeros")
        got = hf(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * (want.max() - want.min()).item())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
