"""Coverage: what share of the decoder blocks' weight matrices a run quantizes, and the refusal
when more than 10% would silently stay in full precision (fused MoE experts in transformers 5)."""

import json

import pytest
import torch

from tests.conftest import tiny_model

EXPERTS = "model.layers.*.mlp.experts.gate_up_proj"


def tiny_mixtral(vocab: int = 320) -> torch.nn.Module:
    """2 blocks, hidden 64, 4 experts (2 per token): experts are fused 3-D parameters, not nn.Linear."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_coverage_counts_block_matrices_only():
    from eqat.arch import quantizable_linears
    from eqat.coverage import coverage

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
