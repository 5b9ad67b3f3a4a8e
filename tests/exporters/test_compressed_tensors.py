"""The compressed-tensors (pack-quantized) exporter: dense packing identical to the
compressed-tensors package's, lossless repacking at every bit width, symmetric and asymmetric,
the package's own decompressor giving eqat's weights, and a real load in transformers."""

import json

import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import QuantizedLayer, export_checkpoint
from eqat.exporters.compressed import convert_layer, pack_dense, unpack_compressed, unpack_dense
from eqat.core.packing import pack_int32
from eqat.core.quantizer import dequantize_codes
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn


def _layer(scheme: QuantScheme, n: int, k: int, seed: int = 0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    groups = scheme.num_groups(k)
    codes = torch.randint(0, 1 << scheme.bits, (n, k), generator=g, dtype=torch.uint8)
    if scheme.symmetric:
        zeros = torch.full((n, groups), 1 << (scheme.bits - 1)).to(dtype)
    else:
        zeros = torch.randint(0, 1 << scheme.bits, (n, groups), generator=g).to(dtype)
    scales = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return QuantizedLayer("l", pack_int32(codes, scheme.bits), scales, zeros, bias, k), codes, zeros, scales


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("length", [32, 37, 576])
def test_dense_packing_is_the_packages(bits, length):
    """pack_dense == compressed_tensors.pack_to_int32 on the signed values, along either dim."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 1 << bits, (5, length), generator=torch.Generator().manual_seed(bits))
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    ours = pack_dense(codes, bits)
    assert ours.shape == (5, -(-length * bits // 32))
    assert torch.equal(ours, helpers.pack_to_int32(signed, bits))
    assert torch.equal(ours.T, helpers.pack_to_int32(signed.T.contiguous(), bits, packed_dim=0))  # zero-points: along N
    assert torch.equal(unpack_dense(ours, bits, length), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_repacking_is_lossless_and_the_package_decompresses_eqats_weight(bits, group, symmetric):
    scheme = QuantScheme(bits, group, symmetric)
    n, k = 40, 96  # 40 outputs: 3-bit zero-points straddle words along N too
    layer, codes, zeros, scales = _layer(scheme, n, k, dtype=torch.bfloat16)
    t, notes = convert_layer(layer, scheme, {})
    assert notes == {} and t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (n, -(-k * bits // 32))
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_shape"].tolist() == [n, k]
    assert ("weight_zero_point" in t) == (not symmetric)
    got_codes, got_zeros, got_scales = unpack_compressed(t, bits, symmetric)
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros.long()) and torch.equal(got_scales, scales)
    assert torch.equal(t["bias"], layer.bias)

    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if group == -1 else "group", group_size=None if group == -1 else group)
    state = {name: v for name, v in t.items() if name.startswith("weight_")}
    dense = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    assert ct and dense.shape == (n, k)
    torch.testing.assert_close(dense.float(), dequantize_codes(codes, scales.float(), zeros.float()), rtol=1e-2, atol=1e-4)


def test_symmetric_checkpoint_with_other_zero_points_is_refused():
    scheme = QuantScheme(4, 32, symmetric=True)
    layer, *_ = _layer(scheme, 8, 64)
    layer.zeros[0, 0] = 3
    with pytest.raises(EqatInputError, match="zero-points other than 8"):
        convert_layer(layer, scheme, {})


@pytest.mark.parametrize("scheme,dequantize", [("w3g32", True), ("w4g32sym", False), ("w2g32sym", True)])
def test_loads_in_transformers(tmp_path, tiny_tokenizer, scheme, dequantize):
    """transformers (through compressed-tensors) loads the export and computes eqat's logits.
    Asymmetric checkpoints load only with `dequantize=True`: the compressed path of transformers
    5.23 + compressed-tensors 0.20 allocates unpacked zero-points and refuses the packed ones that
    compressed-tensors itself writes (llm-compressor issue 1618)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme.parse(scheme))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    export_checkpoint(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], w["num_bits"], w["group_size"], w["strategy"]) == (
        "compressed-tensors", "pack-quantized", int(scheme[1]), 32, "group")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_quantized(src)[0](ids).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=dequantize))
        got = hf(ids).logits
    # compressed-tensors dequantizes in the scales' dtype (float16): weights rounded to float16
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
