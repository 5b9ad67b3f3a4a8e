"""The GPTQ exporter: lossless repacking (every bit width, v1 and v2, zero-points of 0), refusals,
the folder it writes, and loading in the real runtimes (GPTQModel, transformers)."""

import json
import os

import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import EXPORTERS, QuantizedLayer, export_checkpoint
from eqat.exporters.gptq import convert_layer, unpack_gptq
from eqat.core.packing import pack_int32
from eqat.core.quantizer import dequantize_codes
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn


def _layer(bits, n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).half()
    zeros[0, :] = 0  # zero-points of 0, which v1 cannot store as they are
    scales = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).half()
    layer = QuantizedLayer("l", pack_int32(codes, bits), scales, zeros, torch.randn(n, generator=g).half(), k)
    return layer, codes, zeros, scales


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, -1])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_repacking_is_lossless(bits, group, fmt):
    n, k = 64, 192
    scheme = QuantScheme(bits, group)
    layer, codes, zeros, scales = _layer(bits, n, k, scheme.group_size_for(k))
    t, notes = convert_layer(layer, scheme, {"checkpoint_format": fmt})
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k * bits // 32, n)
    assert t["qzeros"].shape == (scheme.num_groups(k), n * bits // 32) and t["scales"].shape == (scheme.num_groups(k), n)
    assert torch.equal(t["g_idx"], (torch.arange(k) // scheme.group_size_for(k)).int())
    got_codes, got_zeros, got_scales = unpack_gptq(t, bits, k, fmt)
    if fmt == "gptq":  # groups with z = 0 were stored as (qmax - q, qmax, -s): undo that
        flip = got_scales < 0
        assert int(flip.sum()) == notes["flipped_groups"] == int((zeros == 0).sum()) > 0
        qmax = (1 << bits) - 1
        got_codes = torch.where(flip.repeat_interleave(scheme.group_size_for(k), 1), qmax - got_codes, got_codes)
        got_zeros = torch.where(flip, qmax - got_zeros, got_zeros)
        got_scales = got_scales.abs()
    else:
        assert notes["flipped_groups"] == 0
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros.long()) and torch.equal(got_scales, scales)
    # and what a loader computes is the same weight, bit for bit
    raw_codes, raw_zeros, raw_scales = unpack_gptq(t, bits, k, fmt)
    torch.testing.assert_close(dequantize_codes(raw_codes, raw_scales, raw_zeros.float()),
                               dequantize_codes(codes, scales, zeros), rtol=0, atol=0)
    assert torch.equal(t["bias"], layer.bias)


def test_refuses_shapes_it_cannot_pack():
    why = EXPORTERS["gptq"].why_not(QuantScheme(3, 16), {"a": (48, 64)}, {"checkpoint_format": "auto"})
    assert "48 x 64" in why and "multiples of 32" in why


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    def make(scheme: str, name: str = "ck"):
        model = tiny_model("llama", vocab=len(tiny_tokenizer))
        quantize_rtn(model, QuantScheme.parse(scheme))
        return save_quantized(model, tiny_tokenizer, tmp_path / name, provenance={"method": "rtn", "base_model": "tiny"})
    return make


def test_export_writes_a_complete_folder(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("w4g32")
    out = tmp_path / "gptq"
    report = export_checkpoint(src, "gptq", out, max_shard_size="100KB")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "export_report.json",
            "model.safetensors.index.json"} <= files
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"],
                               qc["checkpoint_format"]) == ("gptq", 4, 32, False, False, "gptq_v2")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.qzeros" in index["weight_map"]
    assert report["quantized_layers"] == 14 and json.loads((out / "export_report.json").read_text())["format"] == "gptq"
    assert "4-bit quantization, group size 32" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_input_writes_nothing(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("w4g32")
    for kwargs, match in [({"fmt": "gguf"}, "unknown export format 'gguf'; available: awq, bitblas, compressed-tensors, gptq, onnx"),
                          ({"fmt": "gptq", "checkpoint_format": "v3"}, "must be auto, gptq or gptq_v2"),
                          ({"fmt": "gptq", "group": 1}, "takes no option")]:
        with pytest.raises(EqatInputError, match=match):
            export_checkpoint(src, out=tmp_path / "x", **kwargs)
        assert not (tmp_path / "x").exists()


def _logits_fp16(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("scheme,fmt", [("w4g32", "auto"), ("w3g32", "auto"), ("w2g32sym", "auto"), ("w4g32", "gptq")])
def test_loads_in_transformers_with_matching_logits(tiny_checkpoint, tmp_path, scheme, fmt):
    """transformers (optimum + gptqmodel) loads the export; its logits match eqat's own forward
    in float16 within 1% of the logits' range (two fp16 implementations, different op order)."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint(scheme)
    model, _, _ = load_quantized(src)
    if fmt == "gptq":  # force v1 with zero-points of 0 in it, stored by the sign flip
        model.model.layers[0].mlp.up_proj.zeros.data[:4] = 0
        src = save_quantized(model, load_quantized(src)[1], tmp_path / "z0", provenance={"method": "rtn"})
    report = export_checkpoint(src, "gptq", tmp_path / "out", checkpoint_format=fmt)
    if fmt == "gptq":
        assert report["notes"]["flipped_groups"] >= 4
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits_fp16(model.half(), ids)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16, device_map="cpu")
    assert hasattr(hf.model.layers[0].self_attn.q_proj, "qzeros")  # a GPTQ kernel module, not a dense Linear
    got = _logits_fp16(hf, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0.01 * (want.max() - want.min()).item())


@pytest.mark.parametrize("scheme", ["w4g32", "w2g64sym"])
def test_loads_in_gptqmodel_with_matching_weights_and_logits(tiny_checkpoint, tmp_path, scheme):
    pytest.importorskip("gptqmodel")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    src = tiny_checkpoint(scheme)
    export_checkpoint(src, "gptq", tmp_path / "out")
    model, _, _ = load_quantized(src)
    g = GPTQModel.load(str(tmp_path / "out"), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        ours = model.get_submodule(name).dequantize()
        theirs = g.model.get_submodule(name).dequantize_weight().T.float()
        torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=1e-4)  # their fp16 dequantization
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits_fp16(model.half(), ids)
    got = _logits_fp16(g.model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0.01 * (want.max() - want.min()).item())
