"""The checks every registered method gets by registering (the shared matrix, as in peft): quantize
the tiny model through the CLI, get killed in the middle and resume to the same tensors, export to
every format that can hold the result, and load the checkpoint and each export back in the
runtimes installed here, agreeing with eqat's forward. A method in the making (the toy of
tests/methods/toy_scales_only.py) runs the same matrix.

Each method runs in the plan that exercises it: a data-free or block-wise method alone, an
end-to-end method after RTN, or alone when it starts from full precision (lr-qat).
"""

from __future__ import annotations

import json

import pytest

from tests.test_numerics import tensors_sha256

SMALL = ["--scheme", "w4g32", "--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1",
         "--e2e-nsamples", "4", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-epochs", "2",
         "--e2e-grad-accum", "1", "--e2e-save-every", "1", "--no-eval", "-q", "--seed", "0"]


@pytest.fixture(scope="module")
def methods():
    """Every registered method, the toy included for this module only."""
    import eqat.cli  # noqa: F401  (the CLI is built before the toy registers, as for a plugin loaded late)
    from eqat.methods.base import _REGISTRY, registered_methods

    import tests.methods.toy_scales_only  # noqa: F401  (registers itself)

    _REGISTRY.setdefault("toy-scales-only", tests.methods.toy_scales_only.ScalesOnly)
    yield registered_methods()
    _REGISTRY.pop("toy-scales-only", None)


# per method: flags that make the run exercise what is its own (QLLM: a reassembly at every site, which
# its threshold search may rightly decline on a weight-only scheme)
EXTRA = {"qllm": ["--qllm-theta", "budget"]}


def plan_for(method) -> str:
    if method.phase == "end-to-end" and not method.from_full_precision:
        return f"rtn+{method.name}"
    return method.name


def interrupt(monkeypatch, method):
    """Make the run stop like Ctrl-C in the middle of `method`'s phase (once)."""
    import eqat.pipeline
    from eqat.engine.blockwise import BlockwiseEngine
    from tests.conftest import blockwise_killed_after, e2e_killed_at

    if method.phase == "block-wise":
        monkeypatch.setattr(BlockwiseEngine, "_save_block", blockwise_killed_after(0))
    elif method.phase == "end-to-end":
        from eqat.engine.end2end import EndToEndEngine

        monkeypatch.setattr(EndToEndEngine, "_step_batches", e2e_killed_at(2))
    else:
        def killed(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(eqat.pipeline, "run_data_free", killed)


@pytest.mark.parametrize("name", ["rtn", "block-ap", "e2e-qp", "lr-qat", "lr-qat-block", "smoothquant", "qllm", "toy-scales-only"])
def test_every_method_conforms(name, methods, cli, tiny_model_dir, tmp_path, monkeypatch):
    from eqat.exporters import export_checkpoint
    from eqat.exporters.base import checkpoint_formats
    from eqat.methods.base import plan_help
    from eqat.validate import validate

    assert set(methods) >= {"rtn", "block-ap", "e2e-qp", "lr-qat", "lr-qat-block", "smoothquant", "qllm", "toy-scales-only"}
    method = methods[name]
    assert name in plan_help()  # what `quantize --help` and `eqat info` list
    model = tiny_model_dir("llama")
    plan = plan_for(method)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    small = [*SMALL, *EXTRA.get(name, [])]
    code, _, err = cli("quantize", "--model", str(model), "--method", plan, *small, "--out", str(whole))
    assert code == 0, err
    report = json.loads((whole / "report.json").read_text())
    assert report["options"]["plan"] == plan.split("+")
    assert json.loads((whole / "eqat_config.json").read_text())["provenance"]["method"] == plan

    with monkeypatch.context() as mp:
        interrupt(mp, method)
        code, _, err = cli("quantize", "--model", str(model), "--method", plan, *small, "--out", str(resumed))
    assert code == 130, err
    assert not (resumed / "eqat_config.json").exists()  # never a half-written checkpoint
    code, _, err = cli("quantize", "--model", str(model), "--method", plan, *small, "--out", str(resumed))
    assert code == 0, err
    assert tensors_sha256(resumed / "model.safetensors") == tensors_sha256(whole / "model.safetensors")

    holders = [fmt for fmt, why in checkpoint_formats(whole).items() if why is None]
    # QLLM's channel reassembly (a gather on each input) fits ONNX's graph, not the weight-only formats
    expected = {"onnx"} if name == "qllm" else {"gptq", "compressed-tensors", "onnx"}
    assert expected <= set(holders) and (name != "qllm" or not {"gptq", "compressed-tensors"} & set(holders))
    exports = []
    for fmt in holders:
        exports.append(tmp_path / fmt)
        export_checkpoint(whole, fmt, exports[-1], progress=False)
    result = validate(whole, exports, backends=["eqat-torch", "gptqmodel", "transformers", "onnxruntime"],
                      windows=1, seqlen=32, new_tokens=4, progress=False)
    assert result["passed"], result["reason"]
    loaded = {r["name"] for r in result["rows"] if r["status"] == "pass"}
    assert expected <= loaded, result["rows"]
