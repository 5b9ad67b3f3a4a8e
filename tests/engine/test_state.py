import json
from pathlib import Path

import pytest
import torch

from eqat.errors import EqatInputError
from eqat.engine.state import load_state, save_state, storable


def _optimizer():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95))
    p.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    return p, opt, sched


def test_optimizer_and_scheduler_state_round_trip(tmp_path):
    p, opt, sched = _optimizer()
    obj = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "log": [{"loss": float("nan")}], "t": (1, None)}
    save_state(tmp_path, "s", {"lr": 1e-3}, obj)
    back = load_state(tmp_path, "s", {"lr": 1e-3}, "a test run")
    assert back["t"] == (1, None) and back["log"][0]["loss"] != back["log"][0]["loss"]  # NaN survives
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([p2], lr=5.0)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and tuple(opt2.param_groups[0]["betas"]) == (0.9, 0.95)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[p2][k], opt.state[p][k])
    assert back["scheduler"]["base_lrs"] == sched.state_dict()["base_lrs"]


def test_a_second_save_replaces_the_first_and_removes_its_tensors(tmp_path):
    save_state(tmp_path, "s", 1, {"x": torch.ones(2)})
    save_state(tmp_path, "s", 1, {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.1.safetensors", "s.json"]
    assert torch.equal(load_state(tmp_path, "s", 1, "run")["x"], torch.zeros(2))


def test_foreign_fingerprint_is_refused_before_the_tensors_are_read(tmp_path):
    save_state(tmp_path, "s", {"a": 1}, {"x": torch.ones(2)})
    (tmp_path / "s.0.safetensors").write_bytes(b"garbage")
    with pytest.raises(EqatInputError, match="other settings"):
        load_state(tmp_path, "s", {"a": 2}, "a test run")
    with pytest.raises(EqatInputError, match="damaged"):
        load_state(tmp_path, "s", {"a": 1}, "a test run")


@pytest.mark.parametrize("tensor_file", ["../../etc/passwd", "other.0.safetensors", "s.x.safetensors", 3])
def test_the_index_cannot_point_outside_its_state(tmp_path, tensor_file):
    save_state(tmp_path, "s", 1, {"x": torch.ones(2)})
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["tensor_file"] = tensor_file
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(EqatInputError, match="damaged"):
        load_state(tmp_path, "s", 1, "run")


def test_missing_state_is_none_and_unstorable_objects_are_named(tmp_path):
    assert load_state(tmp_path, "s", 1, "run") is None
    assert storable({"a": (torch.ones(1), None, 2.0)}) and not storable({"f": print})
    with pytest.raises(TypeError, match="builtin_function"):
        save_state(tmp_path, "s", 1, {"f": print})


def test_fingerprints_follow_the_fields_metadata():
    """No list of keys to forget: every field counts unless it says `result=False`."""
    import dataclasses

    from eqat.engine.state import fingerprint_of
    from eqat.methods import get_method
    from eqat.methods.block_ap import BlockAPConfig
    from eqat.methods.e2e_qp import E2EQPConfig
    from eqat.options import QuantizeOptions

    for cls in (BlockAPConfig, E2EQPConfig, QuantizeOptions):
        fp = fingerprint_of(cls())
        for f in dataclasses.fields(cls):
            assert (f.name in fp) == f.metadata.get("result", True), (cls.__name__, f.name)
    assert "offload" not in fingerprint_of(BlockAPConfig()) and "save_every" not in fingerprint_of(E2EQPConfig())

    bap, e2e = get_method("block-ap"), get_method("e2e-qp")
    opts = QuantizeOptions()
    first, both = opts.fingerprint(Path("m"), [bap]), opts.fingerprint(Path("m"), [bap, e2e])
    opts.config_for(e2e).lr = 1e-4  # a later phase's option leaves the earlier phase resumable
    assert opts.fingerprint(Path("m"), [bap]) == first and opts.fingerprint(Path("m"), [bap, e2e]) != both
    opts.config_for(bap).loss = "relative"
    assert opts.fingerprint(Path("m"), [bap]) != first
    opts.config_for(bap).offload, opts.out, opts.force = "disk", "elsewhere", True  # where, not what
    changed = opts.fingerprint(Path("m"), [bap])
    opts.config_for(bap).offload, opts.out, opts.force = "cpu", None, False
    assert opts.fingerprint(Path("m"), [bap]) == changed
    assert opts.fingerprint(Path("other"), [bap]) != changed and opts.fingerprint(Path("m"), [get_method("rtn")]) != changed


def test_a_new_option_is_in_the_fingerprint_unless_it_says_otherwise():
    from dataclasses import dataclass

    from eqat.core.options import option
    from eqat.engine.config import BlockwiseConfig
    from eqat.engine.state import check_fingerprint, fingerprint_of

    @dataclass
    class NewConfig(BlockwiseConfig):
        rank: int = option(8, "a new option")
        log_every: int = option(5, "how often to print", result=False)

    fp = fingerprint_of(NewConfig())
    assert fp["rank"] == 8 and "log_every" not in fp
    check_fingerprint(fp, fingerprint_of(NewConfig(log_every=1)), "folder", "a run")
    with pytest.raises(EqatInputError, match="other settings"):
        check_fingerprint(fp, fingerprint_of(NewConfig(rank=4)), "folder", "a run")
