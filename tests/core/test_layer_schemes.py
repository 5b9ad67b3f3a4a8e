import pytest

from eqat.core.layer_schemes import LayerSchemes, Override, as_layer_schemes, bits_summary, dominant, matches
from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError

NAMES = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
W2, W4, W8 = QuantScheme(2, 64), QuantScheme(4, 64), QuantScheme(8, 64)


@pytest.mark.parametrize("pattern, hits", [
    ("model.layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"]),
    ("layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"]),  # dotted suffix
    ("down_proj", [f"model.layers.{i}.mlp.down_proj" for i in range(3)]),
    ("*.1.*", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]),
    (r"re:.*\.[02]\.self_attn\.o_proj", ["model.layers.0.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]),
    ("proj", []),  # a suffix must start at a dot
    ("re:down_proj", []),  # fullmatch, not search
])
def test_patterns(pattern, hits):
    assert [n for n in NAMES if matches(pattern, n)] == hits


def test_resolve_last_override_wins_and_uniform_maps_compare_equal():
    s = LayerSchemes.resolve(W2, NAMES, [Override.parse("down_proj=w8g64"), Override.parse("layers.2.mlp.down_proj=w4g64")])
    assert s("model.layers.0.mlp.down_proj") == W8 and s("model.layers.2.mlp.down_proj") == W4
    assert s("model.layers.0.self_attn.q_proj") == W2 and s.name == "w2g64-mixed" and not s.uniform
    assert LayerSchemes.resolve(W2, NAMES, [Override.parse("down_proj=w2g64")]) == LayerSchemes(W2)
    inner = s.within("model.layers.2")
    assert inner("mlp.down_proj") == W4 and inner("self_attn.q_proj") == W2 and len(inner.layers) == 1
    assert as_layer_schemes(W2) == LayerSchemes(W2) and as_layer_schemes(s) is s


@pytest.mark.parametrize("text, fragment", [
    ("down_proj", "PATTERN=SCHEME"), ("=w8g64", "PATTERN=SCHEME"), ("down_proj=w5g64", "bits=5"),
    ("re:(=w8g64", "regular expression"),
])
def test_bad_override_text(text, fragment):
    with pytest.raises(EqatInputError, match=fragment):
        Override.parse(text)


def test_override_matching_nothing_names_an_example():
    with pytest.raises(EqatInputError, match="matches no quantizable module.*model.layers"):
        LayerSchemes.resolve(W2, NAMES, [Override.parse("layers.7.mlp.down_proj=w8g64")])


def test_check_names_the_layer_a_scheme_does_not_fit():
    s = LayerSchemes(W2, {"model.layers.0.mlp.down_proj": QuantScheme(4, 128)})
    with pytest.raises(EqatInputError, match="group_size=128 does not divide in_features=576 of layer 'model.layers.0.mlp"):
        s.check({"model.layers.0.mlp.down_proj": (64, 576)})


def test_bits_summary_counts_codes_scales_and_zero_points():
    layers = {"a": (W2, 64, 128), "b": (W8, 64, 128), "c": (QuantScheme(4, 64, symmetric=True), 32, 64)}
    got = bits_summary(layers)
    w = 64 * 128 * 2 + 32 * 64
    assert got["weights"] == w
    assert got["avg_code_bits"] == pytest.approx((64 * 128 * (2 + 8) + 32 * 64 * 4) / w)
    groups_ab, groups_c = 64 * 2, 32 * 1
    packed = groups_ab * (16 + 2) + groups_ab * (16 + 8) + groups_c * 16  # symmetric: no zero-point
    assert got["bits_per_weight"] == pytest.approx(got["avg_code_bits"] + packed / w)
    assert got["checkpoint_bits_per_weight"] == pytest.approx(got["avg_code_bits"] + (2 * groups_ab * 32 + groups_c * 16) / w)
    assert got["by_scheme"]["w8g64"] == {"layers": 1, "weights": 64 * 128}


def test_dominant_is_the_scheme_with_most_weights():
    assert dominant([W2, W8, W8], [100, 10, 10]) == W2
    assert dominant([W2, W8, W8]) == W8
    assert dominant([W8, W2], [5, 5]) == W2  # tie: fewer bits
