"""Mixed precision through every exporter: the formats that hold per-module schemes write them
(GPTQ `dynamic`, compressed-tensors groups, ONNX per-node bits) and the real runtimes compute
eqat's weights and logits from them; the others refuse before writing and name those that can."""

import json
import os

import numpy as np
import pytest
import torch

from eqat.core.layer_schemes import LayerSchemes
from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError
from eqat.exporters import export_checkpoint
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.methods.rtn import quantize_rtn
from eqat.validate.backends import _transformers_why_not, folder_kind, split_fused, vllm_why_not
from tests.conftest import tiny_model

DOWN1, O0 = "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"
QKV0 = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


@pytest.fixture
def mixed_checkpoint(tmp_path, tiny_tokenizer):
    """Tiny llama: default `default`, down_proj of block 1 at 8 bits, o_proj of block 0 at 4, q/k/v of block 0 at 3."""
    def make(default: str = "w2g32", sym: bool = False, name: str = "ck"):
        s = "sym" if sym else ""
        layers = {DOWN1: QuantScheme.parse(f"w8g32{s}"), O0: QuantScheme.parse(f"w4g32{s}"),
                  **{n: QuantScheme.parse(f"w3g32{s}") for n in QKV0}}
        model = tiny_model("llama", vocab=len(tiny_tokenizer))
        quantize_rtn(model, LayerSchemes(QuantScheme.parse(default + s), layers))
        return save_quantized(model, tiny_tokenizer, tmp_path / name, provenance={"method": "rtn", "base_model": "tiny"})
    return make


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _ids():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_checkpoint_records_per_module_schemes(mixed_checkpoint):
    src = mixed_checkpoint()
    meta = json.loads((src / "eqat_config.json").read_text())
    assert meta["format_version"] == 2 and meta["scheme"]["bits"] == 2
    own = {n: v["scheme"]["bits"] for n, v in meta["quantized_modules"].items() if "scheme" in v}
    assert own == {DOWN1: 8, O0: 4, **{n: 3 for n in QKV0}}
    assert meta["bits"]["by_scheme"]["w8g32"] == {"layers": 1, "weights": 128 * 64}
    model, _, _ = load_quantized(src)
    assert model.get_submodule(DOWN1).scheme.bits == 8 and model.get_submodule("model.layers.0.mlp.up_proj").scheme.bits == 2


def test_gptq_dynamic_loads_in_gptqmodel_with_each_modules_bits(mixed_checkpoint, tmp_path):
    pytest.importorskip("gptqmodel")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    src = mixed_checkpoint()
    report = export_checkpoint(src, "gptq", tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["bits"] == 2
    assert qc["dynamic"][r"+:^model\.layers\.1\.mlp\.down_proj$"] == {"bits": 8, "group_size": 32, "sym": False,
                                                                      "desc_act": False}
    assert qc["dynamic"][r"+:^model\.layers\.0\.self_attn\.qkv_proj$"]["bits"] == 3  # vLLM's fused name
    assert report["bits"]["avg_code_bits"] > 2 and "Mixed precision: 5 modules" in (tmp_path / "out" / "README.md").read_text()
    ours, _, _ = load_quantized(src)
    g = GPTQModel.load(str(tmp_path / "out"), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    for name in (DOWN1, O0, QKV0[1], "model.layers.0.mlp.gate_proj"):
        theirs = g.model.get_submodule(name)
        assert theirs.bits == ours.get_submodule(name).scheme.bits, name
        torch.testing.assert_close(theirs.dequantize_weight().T.float(), ours.get_submodule(name).dequantize(),
                                   rtol=2e-3, atol=1e-4)
    want, got = _logits(ours.half(), _ids()), _logits(g.model, _ids())
    torch.testing.assert_close(got, want, rtol=0, atol=0.01 * (want.max() - want.min()).item())


def test_gptq_auto_format_is_v1_only_when_every_module_is_symmetric(mixed_checkpoint, tmp_path):
    export_checkpoint(mixed_checkpoint(sym=True), "gptq", tmp_path / "sym")
    assert json.loads((tmp_path / "sym" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"


def test_compressed_tensors_groups_target_modules_by_name_and_transformers_loads_symmetric(mixed_checkpoint, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = mixed_checkpoint(sym=True)
    export_checkpoint(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {tuple(g["targets"]): g["weights"]["num_bits"] for g in qc["config_groups"].values()}
    assert groups == {("Linear",): 2, tuple(sorted(QKV0)): 3, (O0,): 4, (DOWN1,): 8}
    kind, qc = folder_kind(tmp_path / "ct")
    assert _transformers_why_not(kind, qc) is None and split_fused(qc) is None
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=False))
    want = _logits(load_quantized(src)[0], _ids())
    torch.testing.assert_close(_logits(hf, _ids()), want, rtol=0, atol=1e-3 * want.abs().max().item())


def test_runtimes_that_cannot_read_a_mixed_folder_say_why(mixed_checkpoint, tmp_path):
    src = mixed_checkpoint()
    export_checkpoint(src, "compressed-tensors", tmp_path / "ct")
    export_checkpoint(src, "gptq", tmp_path / "gptq")
    kind, qc = folder_kind(tmp_path / "ct")
    assert "every scheme is symmetric" in _transformers_why_not(kind, qc)
    assert "2/3/4/8-bit" in vllm_why_not(kind, qc, None) or "CUDA" in vllm_why_not(kind, qc, None)
    kind, qc = folder_kind(tmp_path / "gptq")
    assert "drops GPTQ's per-module `dynamic`" in _transformers_why_not(kind, qc)
    assert "4/8-bit symmetric v1 (every module's)" in vllm_why_not(kind, qc, None)
    split = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": True}},
                               "group_1": {"targets": [QKV0[0]], "weights": {"num_bits": 8, "symmetric": True}}}}
    assert split_fused(split) == "model.layers.0.self_attn.q_proj/k_proj/v_proj"
    assert "fuses them" in vllm_why_not("compressed-tensors", split, None)


def test_onnx_nodes_carry_their_own_bits_and_onnxruntime_agrees(mixed_checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    src = mixed_checkpoint()
    export_checkpoint(src, "onnx", tmp_path / "onnx")
    nodes = [n for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes)
    assert bits == [2] * 9 + [4] * 4 + [8]  # q/k/v 3-bit widened to 4, o_proj 4, down_proj 8
    qc = json.loads((tmp_path / "onnx" / "config.json").read_text())["quantization_config"]
    assert qc["modules"][DOWN1]["bits"] == 8 and qc["modules"][QKV0[0]] == {"bits": 4, "source_bits": 3,
                                                                             "group_size": 32, "symmetric": False}
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    want = _logits(load_quantized(src)[0], ids).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["awq", "bitblas"])
def test_single_scheme_formats_refuse_before_writing(mixed_checkpoint, tmp_path, fmt):
    src = mixed_checkpoint("w4g32")
    with pytest.raises(EqatInputError, match="one scheme per model.*gptq.*compressed-tensors.*onnx"):
        export_checkpoint(src, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _mixed_wa_checkpoint(tmp_path, tiny_tokenizer):
    """Tiny llama at w4g32a8, down_proj of block 1 at w8g32a4, o_proj of block 0 weight-only w8g32."""
    layers = {DOWN1: QuantScheme.parse("w8g32a4"), O0: QuantScheme.parse("w8g32")}
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, LayerSchemes(QuantScheme.parse("w4g32a8"), layers))
    return save_quantized(model, tiny_tokenizer, tmp_path / "wa", provenance={"method": "rtn", "base_model": "tiny"})


def test_mixed_weight_activation_model_is_refused_by_compressed_tensors_before_writing(tmp_path, tiny_tokenizer):
    src = _mixed_wa_checkpoint(tmp_path, tiny_tokenizer)
    with pytest.raises(EqatInputError, match="weight-activation model at one scheme for every layer.*export to onnx"):
        export_checkpoint(src, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_mixed_weight_activation_model_runs_in_onnxruntime_layer_by_layer(tmp_path, tiny_tokenizer):
    ort = pytest.importorskip("onnxruntime")
    src = _mixed_wa_checkpoint(tmp_path, tiny_tokenizer)
    export_checkpoint(src, "onnx", tmp_path / "onnx")
    qc = json.loads((tmp_path / "onnx" / "config.json").read_text())["quantization_config"]
    assert qc["activations"]["bits"] == 8 and QKV0[0] not in qc["modules"]  # the default scheme's
    assert qc["modules"][DOWN1]["activations"]["bits"] == 4 and "activations" not in qc["modules"][O0]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    model = load_quantized(src)[0]
    want = _logits(model, ids).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # the per-layer activation bits matter: one layer's 4-bit quantization changes eqat's own logits
    model.get_submodule(DOWN1).scheme = QuantScheme.parse("w8g32a8")
    assert not np.allclose(_logits(model, ids).numpy(), want, rtol=0, atol=1e-4 * np.abs(want).max())
