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


# ---- W8A8 (int-quantized) ----------------------------------------------------------------

W8A8 = QuantScheme.parse("w8g-1syma8sym")


def test_w8a8_layer_is_int8_codes_and_the_package_decompresses_eqats_weight():
    layer, codes, zeros, scales = _layer(W8A8, 24, 96, dtype=torch.bfloat16)
    t, notes = convert_layer(layer, W8A8, {})
    assert notes == {} and set(t) == {"weight", "weight_scale", "bias"}
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (24, 96)
    assert torch.equal(t["weight"].to(torch.int16), codes.to(torch.int16) - 128)
    assert t["weight_scale"].shape == (24, 1) and torch.equal(t["weight_scale"][:, 0], scales[:, 0])
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    dense = IntQuantizationCompressor.decompress({k: v for k, v in t.items() if k.startswith("weight")},
                                                 QuantizationScheme(targets=["Linear"], weights=args,
                                                                    input_activations=acts))["weight"]
    torch.testing.assert_close(dense.float(), dequantize_codes(codes, scales.float(), zeros.float()), rtol=1e-2, atol=1e-4)


def test_w8a8_export_config_and_refusals(tmp_path, tiny_tokenizer):
    from compressed_tensors.quantization import QuantizationConfig

    from eqat.validate.backends import BACKENDS, vllm_why_not

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, W8A8)
    ck = save_quantized(model, tiny_tokenizer, tmp_path / "ck", provenance={"method": "rtn"})
    export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", progress=False)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"] == {**group["input_activations"], "num_bits": 8, "symmetric": True,
                                          "strategy": "token", "dynamic": True, "type": "int"}
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    parsed = QuantizationConfig.model_validate(qc)  # the package reads it
    assert parsed.format == "int-quantized"
    assert "runs the activations in floating point" in BACKENDS["transformers"].why_not("compressed-tensors", qc)
    reason = vllm_why_not("compressed-tensors", qc, "python")
    assert reason is None or "AVX-512" in reason  # the one thing that keeps vLLM's CPU build from running it
    # W4A8, W8A8 with asymmetric activations: not vLLM's int8 scheme
    for name in ("w4g-1syma8sym", "w8g-1syma8"):
        m = tiny_model("llama", vocab=len(tiny_tokenizer))
        quantize_rtn(m, QuantScheme.parse(name))
        src = save_quantized(m, tiny_tokenizer, tmp_path / name, provenance={"method": "rtn"})
        with pytest.raises(EqatInputError, match=f"int-quantized W8A8 only .*{name} is not that"):
            export_checkpoint(src, "compressed-tensors", tmp_path / f"{name}-ct", progress=False)
        assert not (tmp_path / f"{name}-ct").exists()
