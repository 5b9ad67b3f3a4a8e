"""The ONNX exporter: MatMulNBits byte packing, lossless repacking (2/4/8 bits, 3-bit widened
to 4), block sizes for any group, refusals, and the graph run by onnxruntime against eqat."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import EXPORTERS, QuantizedLayer, export_checkpoint
from eqat.exporters.onnx import block_size, convert_layer, pack_bytes, unpack_bytes, unpack_onnx
from eqat.core.packing import pack_int32
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn

WIDEN = {"widen_3bit": True}


def test_byte_packing_is_little_end_first():
    """4-bit codes [1, 2] -> byte 0x21; 2-bit [1, 2, 3, 0] -> 0b00111001; rows padded to whole bytes."""
    assert pack_bytes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack_bytes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    assert pack_bytes(torch.tensor([[5, 6, 7]]), 4).tolist() == [[0x65, 0x07]]
    for bits in (2, 4, 8):
        codes = torch.randint(0, 1 << bits, (3, 37))
        assert torch.equal(unpack_bytes(pack_bytes(codes, bits), bits, 37), codes.to(torch.uint8))


def test_block_size_is_the_largest_power_of_two_dividing_the_group():
    assert [block_size(g) for g in (16, 32, 64, 128, 576, 96, 40, 8)] == [16, 32, 64, 128, 64, 32, 0, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_repacking_is_lossless(bits, group, symmetric):
    scheme = QuantScheme(bits, group, symmetric)
    n, k = 24, 96  # per-channel: one group of 96 written as 3 blocks of 32
    groups = scheme.num_groups(k)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = (torch.full((n, groups), 1 << (bits - 1)) if symmetric else torch.randint(0, 1 << bits, (n, groups), generator=g)).half()
    scales = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).half()
    layer = QuantizedLayer("l", pack_int32(codes, bits), scales, zeros, torch.randn(n, generator=g).half(), k)
    t, notes = convert_layer(layer, scheme, WIDEN)
    stored = {3: 4, 6: 8}.get(bits, bits)
    block = 32
    assert notes == {"widened_3_to_4_bit": int(bits == 3), **({"widened_6_to_8_bit": 1} if bits == 6 else {})}
    assert t["B"].dtype == torch.uint8 and t["B"].shape == (n, k // block, block * stored // 8)
    assert t["scales"].dtype == torch.float32 and t["scales"].shape == (n * k // block,)
    assert ("zero_points" in t) == (not symmetric or bits in (3, 6))  # widened 3-bit keeps zero-point 4, not 8
    got_codes, got_zeros, got_scales = unpack_onnx(t, stored, k)
    repeat = scheme.group_size_for(k) // block
    assert torch.equal(got_codes, codes)
    assert torch.equal(got_zeros, zeros.long().repeat_interleave(repeat, 1))
    assert torch.equal(got_scales, scales.float().repeat_interleave(repeat, 1))
    assert torch.equal(t["bias"], layer.bias.float())


def test_refusals():
    why = EXPORTERS["onnx"].why_not
    assert "2, 4 and 8 bits, not 3" in why(QuantScheme(3, 32), {"a": (32, 64)}, {"widen_3bit": False})
    assert why(QuantScheme(3, 32), {"a": (32, 64)}, WIDEN) is None
    assert "power of two >= 16 dividing the group (40 inputs)" in why(QuantScheme(4, -1), {"a": (32, 40)}, WIDEN)


def _run(folder, ids, mask):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


@pytest.mark.parametrize("family,scheme", [("qwen2", "w4g32"), ("llama", "w3g32"), ("llama", "w2g64sym"), ("qwen2", "w8g-1")])
def test_onnxruntime_runs_the_export_with_eqats_logits(tmp_path, tiny_tokenizer, family, scheme):
    """onnxruntime's CPU MatMulNBits computes eqat's logits (float32, with padding in the batch);
    every quantized linear is one MatMulNBits node. qwen2 has q/k/v biases."""
    onnx = pytest.importorskip("onnx")
    model = tiny_model(family, vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme.parse(scheme))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    report = export_checkpoint(src, "onnx", tmp_path / "onnx")
    assert {"model.onnx", "config.json", "tokenizer.json", "README.md", "export_report.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}
    nodes = [n for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == report["quantized_layers"] == 14 and all(n.domain == "com.microsoft" for n in nodes)
    qc = json.loads((tmp_path / "onnx" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["source_bits"]) == ((4, 3) if scheme == "w3g32" else (int(scheme[1]),) * 2)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        want = load_quantized(src)[0].float()(input_ids=ids, attention_mask=mask).logits.numpy()
    got = _run(tmp_path / "onnx", ids, mask)
    keep = mask.bool().numpy()
    np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=1e-5 * np.abs(want).max())


def test_three_bit_without_widening_is_refused_before_writing(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(3, 32))
    src = save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    with pytest.raises(EqatInputError, match="format 'onnx' cannot hold this checkpoint \\(w3g32\\): onnxruntime's MatMulNBits"):
        export_checkpoint(src, "onnx", tmp_path / "out", widen_3bit=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, scheme", [("rtn", "w8g-1a8"), ("rtn", "w4g32a4"), ("qllm", "w4g32a8"),
                                            ("qllm", "w6g32syma6sym")])
def test_weight_activation_models_run_in_onnxruntime_as_in_eqat(method, scheme, cli, tiny_model_dir, tmp_path):
    """Per-token activation quantization (4/6/8 bits) and QLLM's reassembly as graph operations."""
    pytest.importorskip("onnxruntime")
    import json

    from eqat.validate import validate

    src, out = tmp_path / "ck", tmp_path / "onnx"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", method, "--scheme", scheme,
                       "--qllm-theta", "budget", "--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32",
                       "--epochs", "1", "--no-eval", "-q", "--out", str(src))
    assert code == 0, err
    reassembled = [n for n, i in json.loads((src / "eqat_config.json").read_text())["quantized_modules"].items()
                   if i.get("reassembly")]
    assert bool(reassembled) == (method == "qllm")
    code, _, err = cli("export", str(src), "--format", "onnx", "--out", str(out))
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activations"]["bits"] == int(scheme.rsplit("a", 1)[1].removesuffix("sym"))
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"MatMulNBits", "ReduceMax", "Round"} <= ops and (("Gather" in ops) if reassembled else True)
    result = validate(src, [out], backends=["onnxruntime"], windows=1, seqlen=32, new_tokens=4, progress=False)
    assert result["passed"], result["reason"]
    (row,) = [r for r in result["rows"] if r["backend"] == "onnxruntime"]
    assert abs(row["ppl_delta_pct"]) < 0.1 and row["top1_agree"] > 0.98, row
