import pytest
import torch

from eqat.core.layer_schemes import LayerSchemes, bits_summary
from eqat.core.scheme import QuantScheme
from eqat.engine.allocate import allocate, check_budget, fisher_sensitivity, fused_units, kl_sensitivity
from eqat.errors import EqatInputError
from eqat.models.arch import quantizable_linears
from tests.conftest import tiny_model

W2, W4, W8 = QuantScheme(2, 32), QuantScheme(4, 32), QuantScheme(8, 32)


def _shapes(names, n=64, k=64):
    return {name: (n, k) for name in names}


def test_greedy_takes_the_best_gain_per_bit_within_budget():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 128)}
    sens = {"a": {"w2g32": 10.0, "w8g32": 0.0}, "b": {"w2g32": 1.0, "w8g32": 0.0}, "c": {"w2g32": 12.0, "w8g32": 0.0}}
    total = sum(n * k for n, k in shapes.values())
    # room for exactly one 64x64 layer at 8 bits: a (10 per 6*4096 bits) beats c (12 per 6*8192) and b
    budget = (2 * total + 6 * 64 * 64) / total
    got = allocate(shapes, LayerSchemes(W2), set(), sens, [W8], budget, tie=False)
    assert got.layers == {"a": W8}
    # a budget for everything promotes everything; the average never exceeds the budget
    got = allocate(shapes, LayerSchemes(W2), set(), sens, [W8], 8.0, tie=False)
    assert set(got.layers) == {"a", "b", "c"}
    got = allocate(shapes, LayerSchemes(W2), set(), sens, [W8], 3.0, tie=False)
    assert bits_summary({n: (got(n), *shapes[n]) for n in shapes})["avg_code_bits"] <= 3.0 + 1e-9


def test_multi_level_upgrades_and_fixed_layers_stay():
    shapes = {"a": (64, 64), "b": (64, 64)}
    sens = {"a": {"w2g32": 10.0, "w4g32": 1.0, "w8g32": 0.0}, "b": {"w2g32": 9.0, "w4g32": 0.5, "w8g32": 0.0}}
    got = allocate(shapes, LayerSchemes(W2), set(), sens, [W4, W8], 4.0, tie=False)
    assert got.layers == {"a": W4, "b": W4}  # two 2-bit upgrades beat one 6-bit one
    start = LayerSchemes(W2, {"b": W8})
    got = allocate(shapes, start, {"b"}, sens, [W4, W8], 5.0, tie=False)
    assert got("b") == W8 and got("a") == W2  # a at 4 bits would need 6 average bits


def test_fused_siblings_move_together():
    names = [f"m.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [f"m.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    units = fused_units(names)
    assert sorted(map(len, units)) == [1, 1, 2, 3]
    sens = {n: {"w2g32": 1.0, "w8g32": 0.0} for n in names}
    sens["m.layers.0.self_attn.q_proj"]["w2g32"] = 100.0
    got = allocate(_shapes(names), LayerSchemes(W2), set(), sens, [W8], 2 + 6 * 3 / 7, tie=True)
    assert set(got.layers) == {f"m.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    assert len(fused_units(names, tie=False)) == 7


@pytest.mark.parametrize("avg, start, fragment", [(1.5, 2.0, "outside"), (9.0, 2.0, "outside"),
                                                  (2.5, 3.0, "below the 3.000 bits"), (8.0, 2.0, None)])
def test_budget_checks(avg, start, fragment):
    if fragment is None:
        check_budget(avg, start, [W8])
        return
    with pytest.raises(EqatInputError, match=fragment):
        check_budget(avg, start, [W8])


def test_budget_above_the_widest_level_is_refused():
    with pytest.raises(EqatInputError, match="above the widest --promote scheme"):
        check_budget(5.0, 2.0, [W4])


def test_fisher_estimate_and_kl_measurement_agree_on_the_layer_that_matters():
    model = tiny_model("llama", layers=2)
    target = "model.layers.0.self_attn.o_proj"
    with torch.no_grad():  # its quantization error, and v_proj's that it amplifies, now dominate the output
        model.get_submodule(target).weight.mul_(30.0)
    linears = quantizable_linears(model)
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    before = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    fisher = fisher_sensitivity(model, linears, [W2, W8], windows, progress=False)
    kl = kl_sensitivity(model, linears, [W2, W8], windows, progress=False)
    assert all(torch.equal(before[n], lin.weight) for n, lin in linears.items())  # weights restored
    assert all(not lin.weight.requires_grad or lin.weight.grad is None for lin in linears.values())
    for sens in (fisher, kl):
        assert set(sens) == set(linears)
        assert all(s["w8g32"] < s["w2g32"] and s["w8g32"] >= 0 for s in sens.values())
        top = sorted(sens, key=lambda n: -sens[n]["w2g32"])
        assert set(top[:2]) == {target, "model.layers.0.self_attn.v_proj"}
        assert sens[top[1]]["w2g32"] > 5 * sens[top[2]]["w2g32"]
