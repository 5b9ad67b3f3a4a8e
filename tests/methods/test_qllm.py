"""QLLM: channel disassembly + assembly is exact where it should be (a linear's and a block's output
unchanged without quantization), the merged LoRA equals the unmerged one, the packed layer equals the
training forward, the reassembly survives the checkpoint, and bad input is refused before writing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from eqat.models.arch import arch_for

from eqat.core.qlinear import QuantLinear
from eqat.core.reassembly import check_reassembly, reassemble, reassemble_weight
from eqat.core.scheme import ActScheme, QuantScheme
from eqat.errors import EqatInputError
from eqat.methods.qllm import QLLM, QLLMConfig, QLLMLinear
from eqat.methods.qllm_channels import (added_channels, build_reassembly, disassembly_counts, merge_pairs,
                                        reassembly_at, smallest_theta)
from tests.conftest import tiny_model

SMALL = ["--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1", "--no-eval", "-q",
         "--seed", "0"]


def _paired_inputs(tokens: int = 40, k: int = 32, gen: int = 0) -> torch.Tensor:
    """x [tokens, k]: channels 2m and 2m+1 equal (m < 15), channels 30 and 31 outliers (max 50, 30)."""
    g = torch.Generator().manual_seed(gen)
    half = torch.randn(tokens, 15, generator=g)
    x = torch.stack([half, half], -1).reshape(tokens, 30)
    out = torch.randn(tokens, 2, generator=g)
    out = out / out.abs().amax(0) * torch.tensor([50.0, 30.0])
    return torch.cat([x, out], 1)


def test_disassembly_counts_and_budget():
    m = torch.tensor([50.0, 30.0, 1.0, 9.0])
    assert disassembly_counts(m, 10.0).tolist() == [5, 3, 1, 1] and added_channels(m, 10.0) == 6
    theta = smallest_theta(m, 6)
    assert added_channels(m, theta) <= 6 < added_channels(m, theta * 0.99)
    assert smallest_theta(m, 0) == 50.0


def test_reassembled_linear_is_exact_when_merged_channels_are_equal():
    x = _paired_inputs()
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    theta = 10.0
    found = reassembly_at(x.abs().amax(0), (x.T @ x).double(), (w.T @ w).double(), theta)
    assert found is not None
    index, scale, added = found
    assert added == 5 + 3 - 2
    check_reassembly(index, scale, 32, "test")
    x2 = reassemble(x, index, scale)
    assert float(x2.abs().max()) <= theta + 1e-5  # no channel above the threshold any more
    merged = (index[0] != index[1]).sum().item()
    assert merged == added
    assert all((int(a) % 2 == 0 and int(b) == int(a) + 1) for a, b in index.T.tolist() if a != b)  # the equal pairs
    torch.testing.assert_close(x2 @ reassemble_weight(w, index).T, x @ w.T, rtol=1e-5, atol=1e-4)


def test_merge_pairs_are_disjoint_and_least_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 12, generator=g).double()
    x[:, 3] = x[:, 0] + 1e-3  # (0, 3) and (4, 7) nearly equal: the two cheapest merges
    x[:, 7] = x[:, 4]
    w = torch.randn(8, 12, generator=g).double()
    pairs = merge_pairs(x.T @ x, w.T @ w, torch.tensor([0, 3, 4, 7, 8, 9, 10, 11]), 2)
    assert sorted(pairs) == [(0, 3), (4, 7)]
    many = merge_pairs(x.T @ x, w.T @ w, torch.arange(12), 6)
    flat = [c for p in many for c in p]
    assert len(many) == 6 and len(set(flat)) == 12


def test_build_reassembly_places_sub_channels_in_the_freed_places():
    index, scale = build_reassembly(torch.tensor([1, 1, 3, 1, 1]), [(0, 1), (3, 4)])
    assert index.tolist() == [[0, 2, 2, 3, 2], [1, 2, 2, 4, 2]]
    torch.testing.assert_close(scale, torch.tensor([0.5, 1 / 6, 1 / 6, 0.5, 1 / 6]))
    with pytest.raises(ValueError, match="count must stay 5"):
        build_reassembly(torch.tensor([1, 1, 3, 1, 1]), [(0, 1)])


@pytest.mark.parametrize("smooth_alpha", [0.0, 0.5])
def test_block_output_unchanged_by_reassembly_without_quantization(smooth_alpha):
    model = tiny_model("llama")
    block = model.model.layers[0]
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    h = torch.stack([h[..., :32], h[..., :32]], -1).reshape(2, 16, 64)  # channels 2m, 2m+1 equal
    h[..., 62] *= 40
    h[..., 63] = h[..., 62] * 0.5
    with torch.no_grad():
        w = block.input_layernorm.weight
        w.copy_(w.reshape(32, 2)[:, :1].repeat(1, 2).reshape(64))  # equal norm weights within a pair
    emb = model.model.rotary_emb(h, torch.arange(16)[None])

    def run(b, rows):
        out = b(h, position_embeddings=emb, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        ref = run(block, None)
    data = SimpleNamespace(train=range(0, 1), run=run, loss=None, family=arch_for(model))
    cfg = QLLMConfig(theta="budget", budget=0.1, smooth_alpha=smooth_alpha)
    method = QLLM()
    facts = method.calibrate_block(block, data, QuantScheme(4, -1, act=ActScheme(4)), cfg)
    assert facts["qkv"]["added"] > 0
    q = block.self_attn.q_proj
    assert isinstance(q, QLLMLinear) and q.reassembly_index is not None and not q.quantized
    if smooth_alpha:  # SmoothQuant's migration first: the outlier channel is smaller, the function the same
        smoothed = facts["smoothing"]["qkv"]
        assert smoothed["act_max_after"] < 0.5 * smoothed["act_max_before"]
        assert set(facts["smoothing"]) == {"qkv", "o", "gate_up", "down"}
    else:  # the pairs of equal channels are the cheapest merges
        assert all((int(a) // 2 == int(b) // 2) for a, b in q.reassembly_index.T.tolist() if a != b)
    with torch.no_grad():
        got = run(block, None)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("reassembled", [False, True])
def test_merged_lora_equals_unmerged_and_packing_equals_the_training_forward(reassembled):
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(32, 24, bias=True)
    scheme = QuantScheme(4, 16, act=ActScheme(8))
    m = QLLMLinear(lin, scheme, torch.float16)
    if reassembled:
        x = _paired_inputs()
        m.set_reassembly(reassembly_at(x.abs().amax(0), (x.T @ x).double(), (lin.weight.T @ lin.weight).double().detach(),
                                       10.0)[:2])
    m.add_lora(4, g)
    with torch.no_grad():
        m.lora_b.normal_(0, 0.1, generator=g)
    x = torch.randn(3, 7, 32, generator=g)
    xr = x if not reassembled else reassemble(x, m.reassembly_index, m.reassembly_scale)
    with torch.no_grad():
        unmerged = xr @ m.weight.T + (xr @ m.lora_a.T) @ m.lora_b.T + lin.bias
        torch.testing.assert_close(m(x), unmerged, rtol=1e-5, atol=1e-5)  # full precision: the merge changes nothing
        m.quantized = True
        trained = m(x)
        packed = m.to_quant_linear(torch.float16)
    assert isinstance(packed, QuantLinear) and packed.reassembled == reassembled
    torch.testing.assert_close(packed(x), trained, rtol=1e-4, atol=1e-4)


def test_gradients_reach_lora_and_not_the_frozen_weight():
    m = QLLMLinear(torch.nn.Linear(16, 8), QuantScheme(4, -1, act=ActScheme(4)))
    a, b = m.add_lora(2, torch.Generator().manual_seed(0))
    m.quantized = True
    m(torch.randn(5, 16)).pow(2).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0 and not m.weight.requires_grad


def test_checkpoint_holds_the_reassembly_and_exporters_refuse_it(cli, tiny_model_dir, tmp_path):
    from eqat.io.checkpoint import load_quantized

    model = tiny_model_dir("llama")
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(model), "--method", "qllm", "--scheme", "w4g-1a8", "--qllm-theta",
                       "budget", *SMALL, "--out", str(out))
    assert code == 0, err
    meta = json.loads((out / "eqat_config.json").read_text())
    assert meta["format_version"] == 3
    flagged = {n for n, i in meta["quantized_modules"].items() if i.get("reassembly")}
    assert any(n.endswith("q_proj") for n in flagged) and any(n.endswith("down_proj") for n in flagged)
    assert not any(n.endswith("o_proj") for n in flagged)
    q, _, _ = load_quantized(out)
    assert {n for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.reassembled} == flagged
    report = json.loads((out / "report.json").read_text())
    assert report["qllm"]["reassembly"] is True and report["blocks"][0]["calibration"]["qkv"]["added"] > 0
    code, _, err = cli("export", str(out), "--format", "gptq", "--out", str(tmp_path / "g"))
    assert code == 2 and "cannot hold QLLM's channel reassembly" in err and "--no-qllm-reassembly" in err
    assert not (tmp_path / "g").exists()


def test_search_keeps_the_least_loss(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "qllm", "--scheme", "w8g-1a4",
                       "--qllm-rank", "0", *SMALL, "--out", str(out))
    assert code == 0, err
    for block in json.loads((out / "report.json").read_text())["blocks"]:
        assert block["steps"] == 0
        for site in block["calibration"].values():
            losses = [t["loss"] for t in site["tried"]]
            assert site["tried"][0]["theta"] is None and len(losses) >= 2
            chosen = next(t for t in site["tried"] if t["theta"] == site["theta"])
            assert chosen["loss"] == min(losses)


@pytest.mark.parametrize("flags, message", [
    (["--qllm-budget", "1.5"], "--qllm-budget must be a fraction in (0, 1)"),
    (["--qllm-budget", "0"], "--qllm-budget must be a fraction in (0, 1)"),
    (["--qllm-theta", "fixed"], "--qllm-theta must be search or budget"),
    (["--qllm-loss", "huber"], "--qllm-loss must be one of mse, relative, sink, clamp"),
    (["--qllm-candidates", "0"], "need --qllm-candidates >= 1"),
    (["--qllm-smooth-alpha", "1.5"], "--qllm-smooth-alpha must be in [0, 1]"),
    (["--scheme", "w8g-1a5"], "unsupported activation bits=5"),
])
def test_bad_input_exits_2_and_writes_nothing(flags, message, cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    args = ["--scheme", "w8g-1a8", *flags] if flags[0] != "--scheme" else flags
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "qllm", *args, *SMALL,
                       "--out", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()


def test_damaged_reassembly_is_refused():
    with pytest.raises(EqatInputError, match="outside"):
        check_reassembly(torch.tensor([[0, 5], [0, 1]], dtype=torch.int32), torch.ones(2), 2, "x")
    with pytest.raises(EqatInputError, match="finite and positive"):
        check_reassembly(torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0.5, 0.0]), 2, "x")
