import pytest
from torch import nn

from tests.conftest import FAMILIES, tiny_model
from eqat.models.arch import ArchSpec, arch_for, block_linears, decoder_blocks, quantizable_linears
from eqat.errors import EqatInputError


@pytest.mark.parametrize("family", FAMILIES)
def test_known_families(family):
    model = tiny_model(family)
    spec = arch_for(model)
    assert spec == ArchSpec()
    assert len(decoder_blocks(model)) == 2
    names = set(block_linears(decoder_blocks(model)[0]))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    lin = quantizable_linears(model)
    assert len(lin) == 14 and "lm_head" not in lin
    if family == "qwen2":
        assert lin["model.layers.0.self_attn.q_proj"].bias is not None


def test_unknown_family_is_discovered():
    model = tiny_model("llama")
    model.config.model_type = "somethingnew"
    assert arch_for(model).blocks == "model.layers"


def test_undiscoverable_model_is_a_clear_error():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "model_type": "weird"})()
            self.a = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(EqatInputError, match="decoder blocks"):
        arch_for(Weird())
