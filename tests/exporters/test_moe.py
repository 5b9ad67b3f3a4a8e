"""MoE exports: GPTQ (GPTQModel's names) and compressed-tensors (transformers' saved names) of
tiny Mixtral, Qwen3-MoE and OLMoE models, loaded in their runtimes with eqat's logits, and the
validator's rows for them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import MOE_FAMILIES, tiny_model
from eqat.core.scheme import QuantScheme
from eqat.exporters import export_checkpoint
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.methods.rtn import quantize_rtn
from eqat.validate import validate

SMALL = dict(windows=1, seqlen=32, new_tokens=2, progress=False)
# Qwen3-MoE without a dense block: GPTQModel 7.6 reads every Qwen3-MoE block as sparse (validate skips it otherwise)
ALL_SPARSE = {"qwen3_moe": {"mlp_only_layers": []}}


def _checkpoint(tmp_path, tokenizer, family: str, scheme: str, **overrides):
    model = tiny_model(family, vocab=len(tokenizer), **overrides)
    quantize_rtn(model, QuantScheme.parse(scheme))
    ck = save_quantized(model, tokenizer, tmp_path / f"{family}-{scheme}")
    ids = torch.randint(0, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ck, ids, load_quantized(ck)[0](ids).logits


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_experts_load_in_gptqmodel_with_eqats_logits(tmp_path, tiny_tokenizer, family, restore_defused):
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel

    ck, ids, want = _checkpoint(tmp_path, tiny_tokenizer, family, "w4g32", **ALL_SPARSE.get(family, {}))
    report = export_checkpoint(ck, "gptq", tmp_path / "gptq", progress=False)
    keys = _keys(tmp_path / "gptq")
    # GPTQModel's names for every family (Mixtral included); the router stays a plain full-precision weight
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any("block_sparse_moe" in k or ".w1." in k for k in keys)
    assert report["quantized_layers"] == len(json.loads((ck / "eqat_config.json").read_text())["quantized_modules"])
    model = GPTQModel.load(str(tmp_path / "gptq"), device="cpu", dtype=torch.float16).model
    with torch.no_grad():
        got = model(ids).logits.float()
    torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=0)  # fp16 kernel against eqat's float32


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_compressed_tensors_experts_load_in_transformers_with_eqats_logits(tmp_path, tiny_tokenizer, family):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ck, ids, want = _checkpoint(tmp_path, tiny_tokenizer, family, "w4g32sym")
    export_checkpoint(ck, "compressed-tensors", tmp_path / "ct", progress=False)
    keys = _keys(tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    if family == "mixtral":  # transformers' saved names, which its loader and vLLM's read
        assert "model.layers.0.block_sparse_moe.experts.2.w1.weight_packed" in keys
        assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
        assert qc["ignore"] == ["lm_head", r"re:.*\.block_sparse_moe\.gate$"]
    else:
        assert "model.layers.0.mlp.experts.2.gate_proj.weight_packed" in keys
        assert qc["ignore"] == ["lm_head", r"re:.*\.mlp\.gate$"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_validate_runs_moe_exports_where_runtimes_read_them(tmp_path, tiny_tokenizer, restore_defused):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("compressed_tensors")
    # Mixtral, GPTQ listed first: GPTQModel's Defuser would make transformers misload the compressed-tensors
    # experts (w1/w3/w2) had it loaded the GPTQ folder before them
    ck, _, _ = _checkpoint(tmp_path, tiny_tokenizer, "mixtral", "w4g32sym")
    exports = [tmp_path / "gptq", tmp_path / "ct"]
    export_checkpoint(ck, "gptq", exports[0], progress=False)
    export_checkpoint(ck, "compressed-tensors", exports[1], progress=False)
    rows = {(r["name"], r["backend"]): r for r in validate(ck, exports, **SMALL)["rows"]}
    assert rows[("gptq", "gptqmodel")]["status"] == "pass", rows[("gptq", "gptqmodel")]
    assert rows[("ct", "transformers")]["status"] == "pass", rows[("ct", "transformers")]
    # float32 against float32: misloaded experts would still pass the thresholds on a random tiny model
    assert rows[("ct", "transformers")]["max_abs_logit"] < 1e-3, rows[("ct", "transformers")]
    assert "randomly initialised" in rows[("gptq", "transformers")]["reason"]


def test_validate_skips_what_moe_runtimes_would_load_wrong(tmp_path, tiny_tokenizer):
    pytest.importorskip("compressed_tensors")
    ck, _, _ = _checkpoint(tmp_path, tiny_tokenizer, "qwen3_moe", "w4g32")  # block 1 dense, asymmetric
    exports = [tmp_path / "gptq", tmp_path / "ct"]
    export_checkpoint(ck, "gptq", exports[0], progress=False)
    export_checkpoint(ck, "compressed-tensors", exports[1], progress=False)
    rows = {(r["name"], r["backend"]): r for r in validate(ck, exports, **SMALL)["rows"]}
    assert rows[("gptq", "gptqmodel")]["status"] == "skipped" and "[1]" in rows[("gptq", "gptqmodel")]["reason"]
    assert rows[("ct", "transformers")]["status"] == "skipped"
    assert "without their zero-points" in rows[("ct", "transformers")]["reason"]
