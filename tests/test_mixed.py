"""Mixed precision in `eqat quantize`: --override and --avg-bits end to end on a tiny model, the
allocation kept for a resumed run, and bad input refused with exit code 2 before anything is written."""

import json

import pytest

from tests.test_cli import _assert_bad, text_file  # noqa: F401  (fixture)


def _run(cli, model, out, text_file, *extra):
    return cli("quantize", "--model", str(model), "--method", "rtn", "--scheme", "w2g32", "--out", str(out), "-q",
               "--calib-data", str(text_file), "--calib-seqlen", "32", "--eval-data", str(text_file), "--seqlen", "32",
               "--max-windows", "2", "--sensitivity-windows", "3", *extra)


def test_override_and_budget_give_a_checkpoint_that_states_its_bits(cli, tiny_model_dir, tmp_path, text_file):
    model = tiny_model_dir()
    out = tmp_path / "q"
    code, _, err = _run(cli, model, out, text_file, "--override", "layers.1.mlp.down_proj=w8g32", "--avg-bits", "3")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    mixed, bits = report["mixed_precision"], report["bits"]
    assert mixed["overrides"] == ["layers.1.mlp.down_proj=w8g32"] and mixed["sensitivity"] == "fisher"
    assert report["schemes"]["layers"]["model.layers.1.mlp.down_proj"] == "w8g32"
    assert "model.layers.1.mlp.down_proj" not in mixed["promoted"] and mixed["promoted"]  # the budget bought more
    assert 2 < bits["avg_code_bits"] <= 3.0 + 1e-9 and bits["bits_per_weight"] > bits["avg_code_bits"]
    assert set(mixed["per_layer"]) == set(report["layer_relative_error"])
    assert (out / "sensitivity.png").is_file()
    meta = json.loads((out / "eqat_config.json").read_text())
    assert meta["format_version"] == 2 and meta["bits"] == bits
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and "code bits per weight" in stdout


def test_a_resumed_run_reuses_its_allocation(tmp_path):
    import torch

    from eqat.core.layer_schemes import LayerSchemes
    from eqat.core.scheme import QuantScheme
    from eqat.mixed import run_schemes
    from eqat.options import QuantizeOptions
    from eqat.models.arch import quantizable_linears
    from tests.conftest import tiny_model

    model = tiny_model()
    linears = quantizable_linears(model)
    opts = QuantizeOptions(scheme=QuantScheme(2, 32), avg_bits=2.5, sensitivity_windows=2, progress=False)
    windows = lambda n: torch.randint(0, 320, (n, 16), generator=torch.Generator().manual_seed(0))  # noqa: E731
    first, section = run_schemes(opts, model, linears, LayerSchemes(opts.scheme), windows, tmp_path, False)
    assert (tmp_path / "allocation.json").is_file() and not section.get("reused")
    again, section = run_schemes(opts, model, linears, LayerSchemes(opts.scheme), lambda n: 1 / 0, tmp_path, True)
    assert again == first and section["reused"] and section["promoted"] == {n: s.name for n, s in first.layers.items()}
    opts.avg_bits = 3.0  # another budget: measured again, not reused
    _, section = run_schemes(opts, model, linears, LayerSchemes(opts.scheme), windows, tmp_path, True)
    assert not section.get("reused")


@pytest.mark.parametrize("args, fragments", [
    (["--override", "layers.9.mlp.down_proj=w8g32"], ["matches no quantizable module", "model.layers."]),
    (["--override", "down_proj:w8"], ["PATTERN=SCHEME"]),
    (["--override", "down_proj=w8g48"], ["group_size=48", "down_proj"]),
    (["--avg-bits", "1.5"], ["outside [2, 8]"]),
    (["--avg-bits", "9"], ["outside [2, 8]"]),
    (["--avg-bits", "2.5", "--override", "*.mlp.*=w4g32"], ["below the", "--override"]),
    (["--avg-bits", "2.5", "--promote", "w2g32"], ["no scheme wider"]),
    (["--avg-bits", "5", "--promote", "w4g32"], ["above the widest --promote"]),
    (["--avg-bits", "2.5", "--sensitivity", "hessian"], ["--sensitivity must be one of fisher, kl"]),
])
def test_bad_mixed_precision_input_is_refused_before_writing(cli, tmp_path, tiny_model_dir, args, fragments):
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--method", "rtn", "--scheme", "w2g32", *args],
                *fragments)
