"""Regression tests for the cases of the reliability review (issue 17): code execution from a
resume folder, deleting what eqat did not write, runs that exit 0 with a broken model, and
tracebacks where the promise is a clear message and exit code 2."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest

from tests.conftest import e2e_killed_at

Q = ["--nsamples", "4", "--val-samples", "2", "--calib-seqlen", "32", "--e2e-nsamples", "4", "--e2e-val-samples", "2",
     "--e2e-seqlen", "32", "--e2e-save-every", "1", "--scheme", "w4g32", "--no-eval", "-q"]


@pytest.fixture
def calib(tmp_path):
    from eqat.data.sources import CARRIED

    p = tmp_path / "calib.txt"
    p.write_text(CARRIED["wikitext2"].read_text(encoding="utf-8")[:20_000])
    return p


def q_args(model: Path, calib: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--calib-data", str(calib), "--e2e-data", str(calib), *Q, *extra]


class Payload:
    """Unpickling this creates `marker`: what an attacker plants in a resume folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def plant(path: Path, marker: Path) -> None:
    """A torch.save file for .pt names (what eqat once loaded there), raw pickle bytes elsewhere."""
    if path.suffix == ".pt":
        import torch

        torch.save({"kwargs": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_is_live(tmp_path):
    """The planted file really runs code when unpickled (what torch.load(weights_only=False) did)."""
    import torch

    marker = tmp_path / "marker"
    plant(tmp_path / "p.pt", marker)
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.read_text() == "pwned"


# ---- 1. no code runs from a resume folder -------------------------------------------------------------------

def _killed_block_ap_run(cli, monkeypatch, args: list[str], out: Path) -> None:
    from eqat.engine.blockwise import BlockwiseEngine

    from tests.conftest import blockwise_killed_after

    save_block = BlockwiseEngine._save_block
    monkeypatch.setattr(BlockwiseEngine, "_save_block", blockwise_killed_after(0))
    code, _, _ = cli("quantize", "--out", str(out), *args)
    monkeypatch.setattr(BlockwiseEngine, "_save_block", save_block)
    assert code == 130 and (out / "resume" / "block_kwargs.json").is_file()


def test_block_ap_resume_never_unpickles(cli, tiny_model_dir, calib, tmp_path, monkeypatch):
    args = q_args(tiny_model_dir(), calib, "--skip-e2e")
    out, marker = tmp_path / "run", tmp_path / "marker"
    _killed_block_ap_run(cli, monkeypatch, args, out)
    resume = out / "resume"
    assert not list(resume.glob("*.pt"))  # nothing pickled is written
    plant(resume / "block_kwargs.pt", marker)  # the old format's file: never read
    tensors = next(resume.glob("block_kwargs.*.safetensors"))
    good = tensors.read_bytes()
    plant(tensors, marker)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "damaged" in err and "--force" in err and not marker.exists()
    tensors.write_bytes(good)
    plant(resume / "state.json", marker)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "damaged" in err and not marker.exists()


def test_block_ap_resume_ignores_a_planted_legacy_file(cli, tiny_model_dir, calib, tmp_path, monkeypatch):
    args = q_args(tiny_model_dir(), calib, "--skip-e2e")
    out, marker = tmp_path / "run", tmp_path / "marker"
    _killed_block_ap_run(cli, monkeypatch, args, out)
    plant(out / "resume" / "block_kwargs.pt", marker)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 0, err
    assert not marker.exists() and json.loads((out / "report.json").read_text())["resumed"] is True


def test_e2e_resume_never_unpickles(cli, tiny_model_dir, calib, tmp_path, monkeypatch):
    from eqat.engine.end2end import EndToEndEngine

    args = q_args(tiny_model_dir(), calib, "--e2e-steps", "3")
    out, marker = tmp_path / "run", tmp_path / "marker"
    monkeypatch.setattr(EndToEndEngine, "_step_batches", e2e_killed_at(2))
    code, _, _ = cli("quantize", "--out", str(out), *args)
    monkeypatch.undo()
    state = out / "resume" / "e2e"
    assert code == 130 and (state / "e2e_state.json").is_file() and not list(state.glob("*.pt"))
    plant(state / "e2e_state.pt", marker)
    tensors = next(state.glob("e2e_state.*.safetensors"))
    plant(tensors, marker)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "damaged" in err and not marker.exists()
    # a foreign fingerprint is refused before the tensor file is opened
    doc = json.loads((state / "e2e_state.json").read_text())
    doc["fingerprint"]["methods"]["e2e-qp"]["lr"] = 123.0
    (state / "e2e_state.json").write_text(json.dumps(doc))
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "other settings" in err and not marker.exists()


# ---- 2. nothing is deleted that eqat did not write ----------------------------------------------------------

def test_force_never_replaces_the_current_folder_or_above(cli, tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir()
    work = tmp_path / "v"
    work.mkdir()
    (work / "a").write_text("precious")
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path), "/"):
        code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--out", out, "--force",
                           "--replace-foreign", "--no-eval", "-q")
        assert code == 2 and "never replaces" in err, (out, err)
    assert (work / "a").read_text() == "precious" and model.is_dir()


def test_force_never_replaces_home_or_an_input(cli, tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes").write_text("precious")
    monkeypatch.setenv("HOME", str(home))
    for out in ("~", str(model), str(model.parent)):
        code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--out", out, "--force",
                           "--replace-foreign", "--no-eval", "-q")
        assert code == 2 and "never replaces" in err, (out, err)
    assert (home / "notes").exists() and (model / "model.safetensors").exists()
    code, _, _ = cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(tmp_path / "ck"), "--no-eval", "-q")
    assert code == 0
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    code, _, err = cli("export", str(tmp_path / "ck"), "--format", "gptq", "--out", str(tmp_path / "ck"), "--force", "-q")
    assert code == 2 and "never replaces" in err
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_force_replaces_a_foreign_folder_only_with_replace_foreign(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("precious")
    base = ["quantize", "--model", str(model), "--method", "rtn", "--out", str(foreign), "--no-eval", "-q"]
    code, _, err = cli(*base, "--force")
    assert code == 2 and "eqat did not write" in err and "--replace-foreign" in err
    assert (foreign / "cat.jpg").exists()
    code, _, err = cli(*base, "--force", "--replace-foreign")
    assert code == 0, err
    assert not (foreign / "cat.jpg").exists() and (foreign / "eqat_config.json").exists()
    code, _, err = cli(*base, "--force")  # now it is eqat's own output: --force alone replaces it
    assert code == 0, err


def test_a_symlinked_out_shares_the_lock_and_saves(cli, tiny_model_dir, tmp_path):
    from eqat.io.lock import output_lock

    model = tiny_model_dir()
    real, alias = tmp_path / "conc", tmp_path / "alias"
    real.mkdir()
    alias.symlink_to(real, target_is_directory=True)
    base = ["quantize", "--model", str(model), "--method", "rtn", "--no-eval", "-q"]
    with output_lock(real, "test"):
        code, _, err = cli(*base, "--out", str(alias))
    assert code == 2 and "in use by another eqat run" in err
    code, _, err = cli(*base, "--out", str(alias))
    assert code == 0, err
    assert alias.is_symlink() and (real / "eqat_config.json").exists()
    code, _, err = cli(*base, "--out", str(alias), "--force")  # replacing through the link keeps the link
    assert code == 0, err
    assert alias.is_symlink() and (real / "eqat_config.json").exists()


def test_a_refused_run_leaves_no_empty_parents(cli, tiny_model_dir, tmp_path):
    code, _, err = cli("quantize", "--model", str(tiny_model_dir()), "--out", str(tmp_path / "new" / "deep" / "out"),
                       "--lr-quant", "0", "--no-eval", "-q")
    assert code == 2 and "--lr-quant" in err
    assert not (tmp_path / "new").exists()


# ---- 3. no run "succeeds" with a broken model ---------------------------------------------------------------

def test_exploding_learning_rates_fail_and_save_nothing(cli, tiny_model_dir, calib, tmp_path):
    out = tmp_path / "o"
    code, _, err = cli("quantize", "--out", str(out), *q_args(tiny_model_dir(), calib, "--epochs", "1", "--lr-weight",
                                                             "1e9", "--lr-quant", "1e9", "--skip-e2e", "--keep-last"))
    assert code == 1 and "Block-AP block" in err and "lower --lr-weight" in err
    assert not (out / "eqat_config.json").exists()
    # with --keep-best (the default) a block that training broke keeps its packed RTN start instead
    out = tmp_path / "best"
    code, _, err = cli("quantize", "--out", str(out), *q_args(tiny_model_dir(), calib, "--epochs", "1", "--lr-weight",
                                                             "1e9", "--lr-quant", "1e9", "--skip-e2e"))
    if code == 0:
        blocks = json.loads((out / "report.json").read_text())["blocks"]
        assert all(b["kept_epoch"] == 0 for b in blocks), blocks
    else:  # or the guard gave up first (non-finite steps), as with --keep-last: nothing saved
        assert code == 1 and "Block-AP block" in err and not (out / "eqat_config.json").exists()


def test_scales_out_of_range_are_clamped_in_packing_and_reported(cli, tiny_model_dir, calib, tmp_path):
    from safetensors.torch import load_file

    from eqat.core.quantizer import SCALE_MAX, SCALE_MIN

    out = tmp_path / "o"
    code, _, err = cli("quantize", "--out", str(out), *q_args(tiny_model_dir(), calib, "--lr-quant", "0.05", "--epochs", "2",
                                                             "--skip-e2e", "--keep-last"))
    assert code == 0, err
    scales = [t.float() for k, t in load_file(str(out / "model.safetensors")).items() if k.endswith(".scales")]
    assert all(bool(((s >= SCALE_MIN) & (s <= SCALE_MAX)).all()) for s in scales)
    report = json.loads((out / "report.json").read_text())
    for b in report["blocks"]:  # the packed block computes what training saw (was 9.6e-5 vs 1790)
        assert b["final_loss"] < 10 * max(b["train_loss_last"], b["init_loss"])
    assert sum(b["scales_at_limit"] for b in report["blocks"]) > 0
    assert any("clamp limits" in w for w in report["warnings"]) and "clamp limits" in err


@pytest.mark.parametrize("bad", [["--lr-weight", "-1"], ["--lr-quant", "-5"], ["--lr-quant", "0"], ["--e2e-lr", "-1"],
                                 ["--e2e-lr", "nan"]])
def test_bad_learning_rates_are_refused_before_any_work(cli, tiny_model_dir, calib, tmp_path, bad):
    out = tmp_path / "o"
    code, _, err = cli("quantize", "--out", str(out), *q_args(tiny_model_dir(), calib, *bad))
    assert code == 2 and bad[0] in err and "positive" in err
    assert not out.exists()


def test_e2e_with_a_huge_learning_rate_warns(cli, tiny_model_dir, calib, tmp_path):
    out = tmp_path / "o"
    code, _, err = cli("quantize", "--out", str(out), *q_args(tiny_model_dir(), calib, "--e2e-lr", "1e9"))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert any("clamp limits" in w for w in report["warnings"]) and "clamp limits" in err
    e2e = report["e2e_qp"]
    rose = e2e["val_loss_after"] > e2e["val_loss_before"]
    assert rose == any("E2E-QP raised the held-out loss" in w for w in report["warnings"])


def test_run_warnings_name_what_rose(tiny_tokenizer):
    from eqat.engine.health import run_warnings
    from eqat.core.scheme import QuantScheme
    from eqat.methods.rtn import quantize_rtn
    from tests.conftest import tiny_model

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    blocks = [{"block": 0, "init_loss": 1.0, "final_loss": 0.5}, {"block": 1, "init_loss": 1.0, "final_loss": 2.0}]
    assert run_warnings(model, {"blocks": blocks[:1], "e2e_qp": {"val_loss_before": 3.0, "val_loss_after": 2.9}}) == []
    warnings = run_warnings(model, {"blocks": blocks, "e2e_qp": {"val_loss_before": 3.0, "val_loss_after": 3.1}})
    assert len(warnings) == 2 and "1 of 2 blocks" in warnings[0] and "1 (1 -> 2)" in warnings[0]
    assert "3.0000 -> 3.1000" in warnings[1]


def test_a_model_with_nan_is_not_saved(tiny_tokenizer):
    import torch

    from tests.conftest import tiny_model

    from eqat.errors import EqatError
    from eqat.engine.health import check_finite
    from eqat.core.scheme import QuantScheme
    from eqat.methods.rtn import quantize_rtn

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    check_finite(model, "test")
    model.model.layers[1].mlp.down_proj.scales.data[0, 0] = float("inf")
    with pytest.raises(EqatError, match=r"mlp\.down_proj\.scales"):
        check_finite(model, "test")
    assert torch.isinf(model.model.layers[1].mlp.down_proj.scales).any()


def test_eval_of_a_broken_checkpoint_exits_1(cli, tiny_model_dir, tmp_path, calib):
    import torch
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    code, _, _ = cli("quantize", "--model", str(tiny_model_dir()), "--method", "rtn", "--out", str(ck), "--no-eval", "-q")
    state = load_file(str(ck / "model.safetensors"))
    name = next(k for k in state if k.endswith(".scales"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(ck / "model.safetensors"))
    code, _, err = cli("eval", str(ck), "--data", str(calib), "--seqlen", "32", "--max-windows", "2", "-q")
    assert code == 1 and "not finite" in err


# ---- 5. clear messages and exit 2 instead of tracebacks -----------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_weights_are_bad_input(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir()
    ck = tmp_path / "ck"
    assert cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(ck), "--no-eval", "-q")[0] == 0
    _truncate(model / "model.safetensors")
    code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(tmp_path / "x"), "--no-eval", "-q")
    assert code == 2 and "truncated or damaged" in err
    _truncate(ck / "model.safetensors")
    code, _, err = cli("export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g"), "-q")
    assert code == 2 and "damaged" in err and not (tmp_path / "g").exists()


def test_bad_devices_config_files_and_out_paths(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir()
    base = ["--model", str(model), "--method", "rtn", "--no-eval", "-q"]
    code, _, err = cli("quantize", *base, "--out", str(tmp_path / "o"), "--device", "tpu")
    assert code == 2 and "cpu, cuda, cuda:N or auto" in err
    code, _, err = cli("eval", str(model), "--device", "gpu", "-q")
    assert code == 2 and "cpu, cuda, cuda:N or auto" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"bits: \xff\xfe 4\n")
    code, _, err = cli("quantize", "--config", str(cfg), *base)
    assert code == 2 and "UTF-8" in err
    ck = tmp_path / "ck"
    assert cli("quantize", *base, "--out", str(ck))[0] == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli("export", str(ck), "--format", "gptq", "--out", str(afile), "--force", "-q")
    assert code == 2 and "is a file" in err and afile.read_text() == "x"
    code, _, err = cli("quantize", *base, "--out", str(afile / "sub"))  # a parent that cannot be created
    assert code == 2 and "choose a writable --out" in err


def test_a_read_only_file_system_is_bad_input(cli, tiny_model_dir, tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: the lock's create fails as on a read-only mount."""
    import eqat.io.lock

    real_open = os.open

    def read_only(path, flags, *a):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(eqat.io.lock.os, "open", read_only)
    code, _, err = cli("quantize", "--model", str(tiny_model_dir()), "--method", "rtn", "--out", str(tmp_path / "o"),
                       "--no-eval", "-q")
    assert code == 2 and "Read-only file system" in err and "writable --out" in err


@pytest.mark.parametrize("where", ["plot", "checkpoint", "export", "resume"])
def test_a_disk_that_fills_mid_write_is_bad_input(cli, tiny_model_dir, calib, tmp_path, monkeypatch, where):
    import eqat.io.checkpoint
    import eqat.exporters.base
    import eqat.io.report
    from eqat.engine.streams import ActivationStream

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    model = tiny_model_dir()
    ck = tmp_path / "ck"
    if where == "export":
        assert cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(ck), "--no-eval", "-q")[0] == 0
    target = {"plot": (eqat.io.report, "save_figure"), "checkpoint": (eqat.io.checkpoint, "save_file"),
              "export": (eqat.exporters.base, "save_file"), "resume": (ActivationStream, "save")}[where]
    monkeypatch.setattr(*target, full)
    if where == "export":
        code, _, err = cli("export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g"), "-q")
        out = tmp_path / "g"
    else:
        out = tmp_path / "o"
        method = ["--skip-e2e"] if where == "resume" else ["--method", "rtn"]
        code, _, err = cli("quantize", "--out", str(out), *q_args(model, calib, *method))
    assert code == 2 and "disk is full" in err and "re-run the same command" in err
    assert not (out / "eqat_config.json").exists() and not (out / "export_report.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_damaged_resume_state_is_bad_input(cli, tiny_model_dir, calib, tmp_path, monkeypatch):
    args = q_args(tiny_model_dir(), calib, "--skip-e2e")
    out = tmp_path / "run"
    _killed_block_ap_run(cli, monkeypatch, args, out)
    stream = next((out / "resume").glob("x_q.*.bin"))
    good = stream.read_bytes()
    _truncate(stream)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "damaged" in err and "--force" in err
    stream.write_bytes(good)
    (out / "resume" / "state.json").write_text('{"fingerprint": ')
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "damaged" in err and "--force" in err
    code, _, err = cli("quantize", "--out", str(out), *args, "--force")
    assert code == 0, err


def test_messages_name_the_right_options(cli, tiny_model_dir, calib, tmp_path):
    model = tiny_model_dir()
    code, _, err = cli("quantize", "--out", str(tmp_path / "o"), *q_args(model, calib, "--calib-seqlen", "200",
                                                                        "--nsamples", "400"))
    assert code == 2 and "--calib-seqlen" in err
    code, _, err = cli("export", str(model), "--format", "gptq", "--out", str(tmp_path / "g"), "-q")
    assert code == 2 and "not an eqat checkpoint" in err and "eqat quantize" in err and "damaged" not in err


def test_validate_never_replaces_a_foreign_folder_or_the_current_one(cli, tiny_model_dir, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    assert cli("quantize", "--model", str(tiny_model_dir()), "--method", "rtn", "--out", str(ck), "--no-eval", "-q")[0] == 0
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = cli("validate", str(ck), "--out", str(foreign), "-q")
    assert code == 2 and "eqat did not write" in err and (foreign / "thesis.tex").exists()
    monkeypatch.chdir(foreign)
    code, _, err = cli("validate", str(ck), "--out", ".", "--replace-foreign", "-q")
    assert code == 2 and "never replaces" in err and (foreign / "thesis.tex").exists()


def test_a_config_file_cannot_allow_deleting_foreign_folders(cli, tiny_model_dir, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("precious")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir()}\nmethod: rtn\nout_dir: {foreign}\nforce: true\nreplace_foreign: true\nevaluate: false\n")
    code, _, err = cli("quantize", "--config", str(cfg), "-q")
    assert code == 2 and "--replace-foreign on the command line" in err and (foreign / "cat.jpg").exists()


def test_messages_are_printed_literally_not_as_markup(cli, tmp_path):
    missing = tmp_path / "[bold]model[/bold]"
    code, _, err = cli("quantize", "--model", str(missing), "--method", "rtn", "--no-eval", "-q")
    # rich wraps long lines (the fixture collapses the break to a space), anywhere in a long tmp path
    assert code == 2 and "[bold]model[/bold]" in err.replace(" ", "")
