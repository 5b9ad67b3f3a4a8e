import pytest

from eqat.errors import EqatInputError
from eqat.core.scheme import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_json_round_trip(bits):
    s = QuantScheme(bits, 64, symmetric=bits == 4)
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert s.qmax == 2**bits - 1


@pytest.mark.parametrize("bits", [0, 1, 5, 16])
def test_unsupported_bits_named(bits):
    with pytest.raises(EqatInputError, match=f"bits={bits}"):
        QuantScheme(bits, 64)


@pytest.mark.parametrize("group", [0, -2, 7.5])
def test_invalid_group_size(group):
    with pytest.raises(EqatInputError, match="group_size"):
        QuantScheme(4, group)


def test_check_layer_names_layer_size_and_valid_groups():
    with pytest.raises(EqatInputError) as e:
        QuantScheme(4, 128).check_layer("model.layers.0.self_attn.q_proj", 576)
    msg = str(e.value)
    assert "q_proj" in msg and "576" in msg and "64" in msg and "-1" in msg and "128, " not in msg
    QuantScheme(4, 64).check_layer("x", 576)
    QuantScheme(4, -1).check_layer("x", 577)


def test_per_channel_groups():
    s = QuantScheme(2, -1)
    assert s.group_size_for(576) == 576 and s.num_groups(576) == 1
    assert QuantScheme(3, 64).num_groups(1536) == 24


@pytest.mark.parametrize("text,expected", [("w4g64", QuantScheme(4, 64)), ("w2g-1", QuantScheme(2, -1)),
                                           ("W3G128sym", QuantScheme(3, 128, True))])
def test_parse(text, expected):
    assert QuantScheme.parse(text) == expected
    assert QuantScheme.parse(expected.name) == expected


def test_parse_rejects_garbage_and_newer_versions():
    with pytest.raises(EqatInputError, match="w<bits>g<group>"):
        QuantScheme.parse("int4")
    with pytest.raises(EqatInputError, match="newer"):
        QuantScheme.from_dict({"version": 99, "bits": 4, "group_size": 64})


@pytest.mark.parametrize("text", ["w8g-1a8", "w4g64a8sym", "w4g-1syma4", "w8g64a6"])
def test_activation_schemes_round_trip_and_are_version_2(text):
    s = QuantScheme.parse(text)
    assert s.act is not None and s.name == text
    d = s.to_dict()
    assert d["version"] == 2 and d["act"] == {"bits": s.act.bits, "granularity": "token", "dynamic": True,
                                              "symmetric": s.act.symmetric}
    assert QuantScheme.from_dict(d) == s and QuantScheme.parse(s.name) == s


def test_weight_only_schemes_keep_version_1_and_old_dicts_load():
    assert QuantScheme(4, 64).to_dict() == {"version": 1, "bits": 4, "group_size": 64, "symmetric": False}
    old = {"version": 1, "bits": 3, "group_size": 64, "symmetric": True}  # as every earlier eqat wrote it
    assert QuantScheme.from_dict(old) == QuantScheme(3, 64, True) and QuantScheme.from_dict(old).act is None


@pytest.mark.parametrize("text, needle", [("w8g-1a5", "activation bits=5"), ("w8g-1a16", "activation bits=16")])
def test_bad_activation_bits_named(text, needle):
    with pytest.raises(EqatInputError, match=needle) as e:
        QuantScheme.parse(text)
    assert "w8g-1a8" in str(e.value)


def test_activation_kinds_this_eqat_cannot_run_are_refused():
    d = QuantScheme.parse("w8g-1a8").to_dict()
    with pytest.raises(EqatInputError, match="per-token dynamic"):
        QuantScheme.from_dict({**d, "act": {**d["act"], "dynamic": False}})
