"""The run configurations shipped in configs/ are accepted by `eqat quantize` (option names,
types and values), checked by running each on a tiny model with RTN: a typo in a preset would
otherwise surface only when a user runs it."""

import json
from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_runs(cli, tiny_model_dir, tmp_path, path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--config", str(path), "--model", str(tiny_model_dir()), "--method", "rtn",
                       "--no-eval", "--out", str(out), "-q")
    assert code == 0, err
    used = json.loads((out / "report.json").read_text())["options"]
    scheme = used["scheme"]
    assert f"w{scheme['bits']}g{scheme['group_size']}" == data["scheme"].removesuffix("sym")


def test_the_presets_are_shipped():
    assert {"quick-w4g64.yaml", "w2-quality.yaml"} <= {p.name for p in CONFIGS}
