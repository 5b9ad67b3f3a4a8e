"""Family specs: one per model type, registered by name; unknown types and misplaced blocks are
refused with the fix."""

import pytest
from torch import nn

from tests.conftest import tiny_model
from eqat.errors import EqatInputError
from eqat.models.families import FamilySpec, family_for, register_family, registered_families


def test_every_model_type_has_one_spec_and_a_spec_is_data():
    FAMILIES = registered_families()
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"} <= set(FAMILIES)
    assert FAMILIES["gemma3_text"] is FAMILIES["gemma2"] and FAMILIES["gemma2"].norm_offset == 1.0
    assert FAMILIES["llama"].norm_offset == 0.0 and FAMILIES["olmo2"].sites == ()
    with pytest.raises(ValueError, match="declared by families llama and other"):
        register_family(FamilySpec(name="other", model_types=("llama",)))


def test_unknown_model_type_is_refused_naming_the_fix():
    model = tiny_model("llama")
    model.config.model_type = "somethingnew"
    with pytest.raises(EqatInputError, match="no family spec for model type 'somethingnew'.*eqat/models/families/"
                                             ".*docs/extending.md"):
        family_for(model)


def test_blocks_not_where_the_spec_says_are_refused():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "model_type": "llama"})()
            self.a = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(EqatInputError, match="no decoder blocks at 'model.layers'"):
        family_for(Weird())
