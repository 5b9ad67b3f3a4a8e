"""SmoothQuant: the migration leaves every block's function unchanged (grouped-query attention, q/k/v
biases, q/k norms), shrinks the outlier channels, helps per-token activation quantization over RTN,
and refuses bad input before writing."""

from __future__ import annotations

import json

import pytest
import torch

from eqat.methods.calibration import collect_inputs, o_to_v_channels
from eqat.methods.smoothquant import smooth_site, smoothing_factors
from eqat.models.arch import arch_for
from tests.conftest import FAMILIES, OTHER_FAMILIES, tiny_model

SMALL = ["--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32", "--no-eval", "-q", "--seed", "0"]


def _block_runner(model, hidden):
    pos = torch.arange(hidden.shape[1])[None]
    types = getattr(model.config, "layer_types", None)
    emb = model.model.rotary_emb(hidden, pos, *([types[0]] if types and model.config.model_type == "gemma3_text" else []))

    def run(block, rows=None):
        out = block(hidden, position_embeddings=emb, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    return run


@pytest.mark.parametrize("family", FAMILIES + tuple(f for f in OTHER_FAMILIES if f != "olmo2"))
def test_migration_keeps_the_block_function_and_shrinks_outliers(family):
    model = tiny_model(family)
    spec = arch_for(model)
    sites = [s for s in spec.sites if s.source is not None]
    block = model.model.layers[0]
    with torch.no_grad():  # norm weights away from their init, so a wrong (1 + w) fold would show
        for name, p in block.named_parameters():
            if "layernorm" in name:
                p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    hidden[..., 5] *= 40  # an outlier channel, as real LLMs have
    run = _block_runner(model, hidden)
    with torch.no_grad():
        ref = run(block)
        stats = collect_inputs(block, [s.linears[0] for s in sites], run, range(0))
        facts = {s.name: smooth_site(block, s, stats[s.linears[0]].absmax, 0.5, spec.norm_offset) for s in sites}
        out = run(block)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert facts["qkv"]["act_max_after"] < facts["qkv"]["act_max_before"] / 3
    first = sites[0].linears[0]
    after = collect_inputs(block, [first], run, range(0))[first].absmax
    torch.testing.assert_close(after.max(), torch.tensor(facts["qkv"]["act_max_after"]), rtol=1e-4, atol=0)


def test_factors_formula_and_gqa_map():
    a, w = torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.25])
    s = smoothing_factors(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 3.0 / 0.5]))
    assert torch.equal(smoothing_factors(a, w, 1.0)[[0, 2]], torch.tensor([4.0, 9.0]))
    block = tiny_model("llama").model.layers[0]  # 4 query heads, 2 kv heads, head dim 16
    to_v = o_to_v_channels(block)
    assert to_v.shape == (64,) and to_v[:32].tolist() == list(range(16)) * 2 and to_v[32:].tolist() == list(range(16, 32)) * 2


def _outlier_model_dir(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 60  # every token carries one huge channel
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = 1.0
    model.save_pretrained(path)
    return path


def _logit_error(model_dir, quant_dir):
    from transformers import AutoModelForCausalLM

    from eqat.io.checkpoint import load_quantized

    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    fp = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    q, _, _ = load_quantized(quant_dir)
    with torch.no_grad():  # what the blocks add to the residual stream (the embedding dominates it otherwise)
        ref, got = (m(ids, output_hidden_states=True).hidden_states for m in (fp, q))
    delta = ref[-2] - ref[0]
    return float((got[-2] - ref[-2]).pow(2).mean() / delta.pow(2).mean())


def test_beats_rtn_on_per_token_activations_with_an_outlier_channel(cli, tiny_model_dir, tmp_path):
    model = _outlier_model_dir(tiny_model_dir)
    errors = {}
    for method in ("rtn", "smoothquant"):
        out = tmp_path / method
        code, _, err = cli("quantize", "--model", str(model), "--method", method, "--scheme", "w8g-1a4", *SMALL,
                           "--out", str(out))
        assert code == 0, err
        errors[method] = _logit_error(model, out)
    report = json.loads((tmp_path / "smoothquant" / "report.json").read_text())
    blocks = report["blocks"]
    assert len(blocks) == 2 and all(b["steps"] == 0 and set(b["calibration"]) == {"qkv", "o", "gate_up", "down"}
                                    for b in blocks)
    assert blocks[0]["calibration"]["qkv"]["act_max_after"] < blocks[0]["calibration"]["qkv"]["act_max_before"] / 3
    assert errors["smoothquant"] < 0.7 * errors["rtn"], errors  # measured 0.018 against 0.038


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "nan"])
def test_bad_alpha_exits_2_and_writes_nothing(alpha, cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "smoothquant",
                       "--scheme", "w8g-1a8", "--sq-alpha", alpha, *SMALL, "--out", str(out))
    assert code == 2 and "--sq-alpha must be in [0, 1]" in err
    assert not out.exists()
