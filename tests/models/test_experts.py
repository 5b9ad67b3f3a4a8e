"""MoE experts split into per-expert Linears (eqat.models.experts) and quantized through the
methods, the checkpoint and the reports, on tiny Mixtral, Qwen3-MoE and OLMoE models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError
from eqat.models.arch import quantizable_linears, split_experts
from eqat.models.experts import ExpertLinears, unfuse_experts
from tests.conftest import MOE_FAMILIES, tiny_model
from tests.test_cli import E2E_ARGS, text_file  # noqa: F401 (a fixture)

SMALL = ["--nsamples", "4", "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "1", "--batch-size", "2"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_keeps_the_function_and_names_each_expert(family):
    fused = tiny_model(family, split=False)
    model = tiny_model(family, split=False)
    assert split_experts(model) and not split_experts(model)  # a second call finds nothing left to split
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)
    experts = fused.model.layers[0].mlp.experts
    split = model.model.layers[0].mlp.experts
    assert isinstance(split, ExpertLinears) and len(split) == 4
    inter = experts.gate_up_proj.shape[1] // 2
    assert torch.equal(split[2].gate_proj.weight, experts.gate_up_proj[2, :inter])
    assert torch.equal(split[2].up_proj.weight, experts.gate_up_proj[2, inter:])
    assert torch.equal(split[2].down_proj.weight, experts.down_proj[2])
    names = quantizable_linears(model)
    assert "model.layers.0.mlp.experts.3.gate_proj" in names and "model.layers.0.mlp.experts.3.down_proj" in names
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is a bare weight, kept in full precision


def test_routing_counts_tokens_per_expert():
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.counting = True
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 10)))
    assert int(experts.routed.sum()) == 10 * 2  # 2 experts per token


def test_a_layout_eqat_cannot_split_is_refused():
    model = tiny_model("mixtral", split=False)
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(EqatInputError, match=r"'model.layers.0.mlp.experts' .*is_transposed=True.*docs/extending.md"):
        unfuse_experts(model, "model.layers")


def test_experts_missing_where_the_spec_says_are_refused(monkeypatch):
    import dataclasses

    from eqat.models.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "mixtral", dataclasses.replace(FAMILIES["mixtral"], experts="mlp.moe"))
    with pytest.raises(EqatInputError, match="puts the MoE experts at 'mlp.moe'.*no block"):
        split_experts(tiny_model("mixtral", split=False))


def test_group_size_not_dividing_an_expert_names_it(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--method", "rtn", "--model", str(tiny_model_dir("mixtral")), "--group-size", "64",
                       "--no-eval", "--out", str(out))
    assert code == 2 and "in_features=32 of layer 'model.layers.0.mlp.experts.0.down_proj'" in err, err
    assert "16, 32" in err and not out.exists()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rtn_quantizes_every_expert_and_the_checkpoint_loads(family, cli, tiny_model_dir, text_file, tmp_path):
    from eqat.io.checkpoint import load_quantized, quantized_modules

    src = tiny_model_dir(family)
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", "--method", "rtn", "--model", str(src), "--bits", "4", "--group-size", "16",
                            "--no-eval", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    cov = report["coverage"]
    assert cov["share"] > 0.95 and [g["tensors"] for g in cov["unquantized"]] == ["model.layers.*.mlp.gate.weight"]
    model, _, meta = load_quantized(out)
    qmods = quantized_modules(model)
    assert "model.layers.0.mlp.experts.3.up_proj" in qmods and len(qmods) == len(meta["quantized_modules"])
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and f"quantized {cov['share']:.1%}" in stdout
    code, stdout, err = cli("eval", str(out), "--data", str(text_file), "--seqlen", "16", "--max-windows", "2", "--json")
    assert code == 0, err
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the reloaded checkpoint computes what RTN of the split model computes
        from eqat.methods.rtn import quantize_rtn

        ref = tiny_model(family)
        quantize_rtn(ref, QuantScheme.parse("w4g16"))
        want = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert json.loads(stdout)["ppl"] > 1
    if family == "mixtral":  # formats whose runtimes read no per-expert tensors refuse before writing, naming those that do
        from eqat.exporters.base import EXPORTERS

        for fmt in (n for n, e in EXPORTERS.items() if not e.holds_experts):
            code, _, err = cli("export", str(out), "--format", fmt, "--out", str(tmp_path / fmt))
            assert code == 2 and "cannot hold MoE experts" in err and "experts.0.gate_proj" in err, (fmt, err)
            able = err.partition("formats that hold them: ")[2]
            assert "gptq" in able and "compressed-tensors" in able, err
            assert not (tmp_path / fmt).exists()


def _route_away_from_0_and_1(model: nn.Module) -> None:
    """Block 0's router never picks experts 0 and 1 (their slots go to 2 and 3)."""
    def hook(_mod, _args, out):
        logits, weights, index = out
        return logits, weights, torch.where(index < 2, index + 2, index)

    model.model.layers[0].mlp.gate.register_forward_hook(hook)


def test_block_ap_trains_routed_experts_and_leaves_the_unrouted_at_rtn(tmp_path):
    from dataclasses import asdict

    from eqat.core.qlinear import QuantLinear
    from eqat.core.scheme import QuantScheme
    from eqat.engine.blockwise import BlockwiseEngine
    from eqat.engine.health import run_warnings
    from eqat.methods.base import get_method

    model = tiny_model("mixtral")
    _route_away_from_0_and_1(model)
    original = {e: model.model.layers[0].mlp.experts[e].gate_proj.weight.detach().clone() for e in range(4)}
    scheme, method = QuantScheme.parse("w4g16"), get_method("block-ap")
    engine = BlockwiseEngine(model, method, method.config(epochs=2, val_samples=2, keep_best=False), scheme,
                             tmp_path / "state", progress=False)
    records = engine.run(torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0)))
    assert records[0].routing["mlp.experts"]["never_routed"] == [0, 1]
    assert records[1].routing["mlp.experts"]["never_routed"] == [] and sum(records[1].routing["mlp.experts"]["tokens"]) > 0
    experts = model.model.layers[0].mlp.experts
    for e in range(4):
        packed = experts[e].gate_proj
        assert isinstance(packed, QuantLinear)
        rtn = QuantLinear.from_weight(original[e], scheme, dtype=packed.scales.dtype).dequantize()
        assert torch.equal(packed.dequantize(), rtn) == (e < 2), e  # only the routed experts moved
    warnings = run_warnings(model, {"blocks": [asdict(r) for r in records]})
    assert any("routed no token to 2 experts (block 0 mlp.experts [0, 1])" in w for w in warnings), warnings


@pytest.mark.parametrize("plan", ["rtn+e2e-qp", "block-ap", "lr-qat"])
def test_trained_plans_run_through_the_experts(plan, cli, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    e2e = E2E_ARGS if plan != "block-ap" else []
    code, _, err = cli("quantize", "--method", plan, "--model", str(tiny_model_dir("qwen3_moe")), "--scheme", "w4g16",
                       "--calib-data", str(text_file), "--e2e-data", str(text_file), *SMALL, *e2e, "--no-eval",
                       "--out", str(out), "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["share"] > 0.95
    if plan == "block-ap":  # block 1 is dense (mlp_only_layers): no routing to report
        assert report["blocks"][0]["routing"]["mlp.experts"]["tokens"] and report["blocks"][1]["routing"] == {}
    else:  # the end-to-end phase trained through the experts
        phase = report.get("e2e_qp") or report.get("lr_qat")
        assert phase and phase["steps"] > 0, sorted(report)


def test_weight_activation_methods_quantize_the_experts_activations_too(cli, tiny_model_dir, text_file, tmp_path):
    """QLLM (SmoothQuant takes the same sites): its sites are attention's (the MoE input also feeds
    the router); every expert is quantized with its input activations."""
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--method", "qllm", "--qllm-theta", "budget", "--model", str(tiny_model_dir("mixtral")), "--scheme",
                       "w8g16a8", "--calib-data", str(text_file), *SMALL, "--no-eval", "--out", str(out), "-q")
    assert code == 0, err
    meta = json.loads((out / "eqat_config.json").read_text())
    down = meta["quantized_modules"]["model.layers.1.mlp.experts.2.down_proj"]
    assert meta["scheme"]["act"]["bits"] == 8 and down["bias"] is False
    report = json.loads((out / "report.json").read_text())
    assert set(report["blocks"][0]["calibration"]) == {"qkv"}
