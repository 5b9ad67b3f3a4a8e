"""Coverage: what share of the decoder blocks' weight matrices a run quantizes, and the refusal
when more than 10% would silently stay in full precision: here fused MoE experts of a family whose
spec does not declare them (eqat splits declared experts into Linears: tests/models/test_experts.py)."""

import json

import pytest
import torch

from tests.conftest import tiny_model
from tests.test_cli import E2E_ARGS, text_file  # noqa: F401 (a fixture)

EXPERTS = "model.layers.*.mlp.experts.gate_up_proj"


def tiny_mixtral(vocab: int = 320) -> torch.nn.Module:
    """2 blocks, hidden 64, 4 experts (2 per token): experts are fused 3-D parameters, not nn.Linear."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture
def mixtral_dir(tmp_path, tiny_tokenizer, monkeypatch):
    """A tiny Mixtral, with the family spec's experts left out (as for an MoE family eqat cannot split)."""
    import dataclasses

    from eqat.models.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "mixtral", dataclasses.replace(FAMILIES["mixtral"], experts=None))
    path = tmp_path / "mixtral-tiny"
    tiny_mixtral(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_coverage_counts_block_matrices_only():
    from eqat.models.arch import quantizable_linears
    from eqat.models.coverage import coverage

    model = tiny_mixtral()
    cov = coverage(model, quantizable_linears(model))
    attn = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)  # q, k, v, o of both blocks
    experts = 2 * (4 * 64 * 64 + 4 * 64 * 32)  # gate_up_proj [4, 2*32, 64] and down_proj [4, 64, 32]
    router = 2 * 4 * 64
    assert cov["quantized_params"] == attn and cov["block_matrix_params"] == attn + experts + router
    assert cov["share"] == pytest.approx(attn / (attn + experts + router)) and cov["share"] < 0.9
    groups = {g["tensors"]: g for g in cov["unquantized"]}
    assert list(groups)[0] == EXPERTS  # largest first
    assert set(groups) == {EXPERTS, "model.layers.*.mlp.experts.down_proj", "model.layers.*.mlp.gate.weight"}
    assert groups[EXPERTS]["count"] == 2 and groups[EXPERTS]["params"] == 2 * 4 * 64 * 64
    assert cov["block_vector_params"] == 2 * 2 * 64  # the two RMSNorms of each block, not counted in the share
    assert cov["outside_block_params"] == 320 * 64 + 64  # tied embedding / LM head, final norm

    llama = tiny_model("llama")
    cov = coverage(llama, quantizable_linears(llama))
    assert cov["share"] == 1.0 and cov["unquantized"] == [] and cov["quantized_modules"] == 14


def test_quantize_refuses_unquantized_experts_before_any_work(cli, mixtral_dir, tmp_path, monkeypatch):
    from eqat.engine.blockwise import BlockwiseEngine

    def never(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(BlockwiseEngine, "run", never)
    out = tmp_path / "q"
    for method in ("rtn", "block-ap"):
        code, _, err = cli("quantize", "--method", method, "--model", str(mixtral_dir), "--bits", "2", "--group-size", "32",
                           "--no-eval", "--out", str(out), "-q")
        assert code == 2, err
        assert EXPERTS in err and "model.layers.*.mlp.experts.down_proj" in err and "--allow-unquantized" in err
        assert "2 tensors" in err and "full precision" in err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_allowed_unquantized_run_records_the_share(cli, mixtral_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", "--method", "rtn", "--model", str(mixtral_dir), "--bits", "2", "--group-size", "32",
                            "--no-eval", "--out", str(out), "--allow-unquantized")
    assert code == 0, err
    assert "of the decoder blocks' weight-matrix parameters" in " ".join(stdout.split()) and EXPERTS in stdout
    cov = json.loads((out / "report.json").read_text())["coverage"]
    assert cov["share"] < 0.9 and cov["quantized_modules"] == 8
    assert cov["unquantized"][0]["tensors"] == EXPERTS and cov["unquantized"][0]["count"] == 2
    code, stdout, err = cli("info", str(out))
    assert code == 0, err
    assert f"quantized {cov['share']:.1%}" in stdout and "8 quantized modules" in stdout
    code, stdout, _ = cli("info", str(out), "--json")
    assert code == 0 and json.loads(stdout)["coverage"] == cov  # from the config alone, same numbers
    code, stdout, _ = cli("info", str(mixtral_dir))
    assert code == 0 and f"eqat would quantize {cov['share']:.1%}" in stdout


def test_llama_is_fully_covered(cli, tiny_model_dir, tmp_path, text_file):
    model = tiny_model_dir("llama")
    code, stdout, _ = cli("info", str(model))
    assert code == 0 and "eqat would quantize 100.0%" in stdout
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", "--method", "rtn", "--model", str(model), "--no-eval", "--out", str(out))
    assert code == 0, err
    assert "left in full precision" not in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["share"] == 1.0 and report["coverage"]["unquantized"] == []
    assert len(report["layer_relative_error"]) == 14
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and "quantized 100.0%" in stdout
    code, _, err = cli("train-e2e", str(out), "--out", str(tmp_path / "e2e"), "--e2e-data", str(text_file), *E2E_ARGS,
                       "--no-eval", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "e2e" / "report.json").read_text())["coverage"] == report["coverage"]
