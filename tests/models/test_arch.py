from tests.conftest import FAMILIES, OTHER_FAMILIES, tiny_model
from eqat.models.arch import arch_for, block_linears, decoder_blocks, quantizable_linears
from eqat.models.families.llama import LLAMA

import pytest

LLAMA_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_like_families(family):
    model = tiny_model(family)
    assert arch_for(model) is LLAMA
    assert len(decoder_blocks(model)) == 2
    assert set(block_linears(decoder_blocks(model)[0])) == LLAMA_LINEARS
    lin = quantizable_linears(model)
    assert len(lin) == 14 and "lm_head" not in lin
    if family == "qwen2":
        assert lin["model.layers.0.self_attn.q_proj"].bias is not None


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_families_quantize_every_block_linear(family):
    model = tiny_model(family)
    spec = arch_for(model)
    assert model.config.model_type in spec.model_types
    names = set(block_linears(decoder_blocks(model)[0]))
    want = ({"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"} if family == "phi3"
            else LLAMA_LINEARS)
    assert names == want
    assert len(quantizable_linears(model)) == 2 * len(want)
    for site in spec.sites:  # every site the spec declares is in the block
        for name in (site.source, *site.linears):
            assert name is None or decoder_blocks(model)[0].get_submodule(name) is not None
