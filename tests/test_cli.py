import json
import re

import pytest
import torch

from tests.conftest import blockwise_killed_after, e2e_killed_at


@pytest.fixture
def text_file(tmp_path):
    from eqat.data.sources import CARRIED

    p = tmp_path / "eval.txt"
    p.write_text(CARRIED["wikitext2"].read_text(encoding="utf-8")[:20_000])
    return p


@pytest.mark.parametrize("command", ["quantize", "eval", "info", "train-e2e", "export"])
def test_help_has_examples(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Examples" in out


def test_full_tiny_run_and_eval_agree(cli, tiny_model_dir, tmp_path, text_file):
    model = tiny_model_dir("qwen2")
    out = tmp_path / "q"
    args = ["--eval-data", str(text_file), "--seqlen", "32", "--max-windows", "3"]
    code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--scheme", "w3g32", "--out", str(out),
                       "-q", *args)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "eqat_config.json", "report.json", "run_config.json",
            "layer_error.png", "tokenizer.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["windows"] == 3 and report["fp_perplexity"]["ppl"] > 1
    assert len(report["layer_relative_error"]) == 14
    code, stdout, err = cli("eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "3",
                            "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["ppl"] == pytest.approx(report["perplexity"]["ppl"], rel=1e-6)
    code, stdout, _ = cli("info", str(out))
    assert code == 0 and "w3" in stdout.replace("'bits': 3", "w3") and "14 quantized modules" in stdout
    code, stdout, _ = cli("info", str(out), "--json")  # stdout is the JSON alone
    desc = json.loads(stdout)
    assert code == 0 and desc["eqat"]["scheme"]["bits"] == 3 and desc["eqat"]["quantized_modules"] == 14
    fits = desc["export_formats"]
    assert fits["gptq"] is None and fits["compressed-tensors"] is None and "4-bit codes only" in fits["awq"]
    assert fits["onnx"] is None  # 3-bit codes widened to 4 bits by default
    code, _, err = cli("quantize", "--model", str(model), "--out", str(out), "--no-eval", "-q")
    assert code == 2 and "--force" in err


def _assert_bad(cli, tmp_path, args, *fragments):
    out = tmp_path / "out"
    code, _, err = cli("quantize", "--out", str(out), "-q", *args)
    assert code == 2, err
    for f in fragments:
        assert f in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_bits(cli, tmp_path):
    _assert_bad(cli, tmp_path, ["--bits", "5"], "bits=5", "2, 3, 4, 6, 8")


def test_group_not_dividing(cli, tmp_path, tiny_model_dir):
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--group-size", "48"],
                "group_size=48", "in_features=64", "model.layers.0.self_attn.q_proj", "32")


def test_missing_model(cli, tmp_path):
    _assert_bad(cli, tmp_path, ["--model", str(tmp_path / "nope")], "model folder not found")


def test_not_a_causal_lm(cli, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    _assert_bad(cli, tmp_path, ["--model", str(folder)], "not a causal LM")


def test_unreadable_data(cli, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--eval-data", str(bad)], "bad.jsonl:1")


def test_unknown_method_and_dtype(cli, tmp_path, tiny_model_dir):
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--method", "magic"], "unknown method 'magic'")
    _assert_bad(cli, tmp_path, ["--model", str(tiny_model_dir()), "--dtype", "float32"], "float16 or bfloat16")


def test_usage_error_exit_2(cli):
    code, _, _ = cli("quantize", "--bits", "four")
    assert code == 2


BLOCK_AP_ARGS = ["--scheme", "w2g32", "--nsamples", "8", "--batch-size", "4", "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "2",
                 "--lr-weight", "1e-3", "--lr-quant", "1e-3", "--skip-e2e", "--no-eval", "-q"]
E2E_ARGS = ["--e2e-nsamples", "8", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-epochs", "3",
            "--e2e-batch-size", "2", "--e2e-grad-accum", "2", "--e2e-lr", "1e-2", "--e2e-save-every", "2"]


def test_block_ap_run_resumes_after_kill_and_matches(cli, tiny_model_dir, tmp_path, text_file, monkeypatch):
    from safetensors.torch import load_file

    from eqat.engine.blockwise import BlockwiseEngine

    model = tiny_model_dir("llama")
    args = ["--model", str(model), "--calib-data", str(text_file), *BLOCK_AP_ARGS]
    code, _, err = cli("quantize", "--out", str(tmp_path / "ref"), *args)
    assert code == 0, err
    ref = tmp_path / "ref"
    assert {"block_loss.png", "report.json", "eqat_config.json"} <= {p.name for p in ref.iterdir()}
    assert not (ref / "resume").exists()
    report = json.loads((ref / "report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert all(0 < b["final_loss"] < float("inf") and b["steps"] == 4 for b in report["blocks"])
    assert report["block_ap"]["peak_memory_bytes"] > 0

    save_block = BlockwiseEngine._save_block
    monkeypatch.setattr(BlockwiseEngine, "_save_block", blockwise_killed_after(1))
    out = tmp_path / "run"
    code, _, _ = cli("quantize", "--out", str(out), *args)
    assert code == 130 and not (out / "eqat_config.json").exists()
    assert json.loads((out / "resume" / "state.json").read_text())["next_block"] == 1
    monkeypatch.setattr(BlockwiseEngine, "_save_block", save_block)
    code, _, err = cli("quantize", "--out", str(out), *args[:-2], "--epochs", "3", "-q")
    assert code == 2 and "other settings" in err  # resuming with other options is refused
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["resumed"] is True
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli("quantize", "--out", str(out), *args)
    assert code == 2 and "finished eqat checkpoint" in err


def test_quantize_runs_block_ap_then_e2e(cli, tiny_model_dir, tmp_path, text_file):
    from safetensors.torch import load_file

    model = tiny_model_dir("llama")
    common = ["--model", str(model), "--calib-data", str(text_file), "--e2e-data", str(text_file), *E2E_ARGS]
    bap = [a for a in BLOCK_AP_ARGS if a != "--skip-e2e"]
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--out", str(out), *common, *bap)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    e2e = report["e2e_qp"]
    assert e2e["steps"] == 6 and len(e2e["log"]) == 6 and e2e["trainable_params"] > 0
    assert e2e["val_loss_before"] > 0 and e2e["val_loss_after"] > 0 and e2e["peak_memory"]["peak_bytes"] > 0
    assert (out / "e2e_loss.png").is_file()
    assert json.loads((out / "eqat_config.json").read_text())["provenance"]["method"] == "block-ap+e2e-qp"
    # killed during E2E-QP, then re-run: Block-AP is not redone, E2E-QP resumes, same model
    from eqat.engine.blockwise import BlockwiseEngine
    from eqat.engine.end2end import EndToEndEngine

    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EndToEndEngine, "_step_batches", e2e_killed_at(3))
        assert cli("quantize", "--out", str(run), *common, *bap)[0] == 130
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockwiseEngine, "_train", lambda *a, **k: pytest.fail("Block-AP re-trained a finished block"))
        code, _, err = cli("quantize", "--out", str(run), *common, *bap)
    assert code == 0, err
    assert json.loads((run / "report.json").read_text())["e2e_qp"]["resumed_at"] == 2
    r, o = load_file(str(run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(r[k], o[k]) for k in o)
    # the same Block-AP without E2E-QP: identical integer codes, other scales
    code, _, err = cli("quantize", "--out", str(tmp_path / "bap"), *common, *BLOCK_AP_ARGS)
    assert code == 0, err
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "bap" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(("qweight", "zeros")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("scales"))


def test_train_e2e_on_checkpoint_resumes_and_keeps_codes(cli, tiny_model_dir, tmp_path, text_file, monkeypatch):
    from safetensors.torch import load_file

    from eqat.engine.end2end import EndToEndEngine

    model = tiny_model_dir("qwen2")
    src = tmp_path / "rtn"
    code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--scheme", "w3g32", "--out", str(src),
                       "--no-eval", "-q")
    assert code == 0, err
    args = ["--e2e-data", str(text_file), *E2E_ARGS, "--eval-data", str(text_file), "--seqlen", "32",
            "--max-windows", "2", "-q"]
    code, _, err = cli("train-e2e", str(src), "--out", str(tmp_path / "ref"), *args)
    assert code == 0, err
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert report["perplexity"]["ppl"] > 1 and report["perplexity_before"]["ppl"] > 1

    original = EndToEndEngine._step_batches
    monkeypatch.setattr(EndToEndEngine, "_step_batches", e2e_killed_at(4))
    out = tmp_path / "run"
    code, _, _ = cli("train-e2e", str(src), "--out", str(out), *args)
    assert code == 130 and not (out / "eqat_config.json").exists()
    monkeypatch.setattr(EndToEndEngine, "_step_batches", original)
    code, _, err = cli("train-e2e", str(src), "--out", str(out), *args[:-1], "--e2e-lr", "1e-3", "-q")
    assert code == 2 and "other settings" in err
    code, _, err = cli("train-e2e", str(src), "--out", str(out), *args)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["e2e_qp"]["resumed_at"] == 4
    ref, got, before = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "ref", out, src))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(torch.equal(before[k], got[k]) for k in got if not k.endswith("scales"))
    meta = json.loads((out / "eqat_config.json").read_text())
    assert meta["provenance"]["method"] == "rtn+e2e-qp" and meta["provenance"]["parent_checkpoint"] == str(src)


def test_train_e2e_bad_input(cli, tiny_model_dir, tmp_path, text_file):
    model = tiny_model_dir("llama")
    code, _, err = cli("train-e2e", str(model), "--out", str(tmp_path / "o"), "-q")
    assert code == 2 and "not an eqat checkpoint" in err and not (tmp_path / "o").exists()
    src = tmp_path / "rtn"
    assert cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(src), "--no-eval", "-q")[0] == 0
    code, _, err = cli("train-e2e", str(src), "--out", str(tmp_path / "o"), "--e2e-data", str(tmp_path / "nope.txt"), "-q")
    assert code == 2 and "nope.txt" in err and not (tmp_path / "o").exists()
    code, _, err = cli("train-e2e", str(src), "--out", str(tmp_path / "o"), "--e2e-nsamples", "2", "-q")
    assert code == 2 and "--e2e-nsamples" in err and not (tmp_path / "o").exists()
    code, _, err = cli("quantize", "--model", str(model), "--out", str(tmp_path / "o"), "--e2e-data",
                       str(tmp_path / "nope.txt"), "--no-eval", "-q")
    assert code == 2 and "nope.txt" in err and not (tmp_path / "o").exists()


def test_export_command(cli, tiny_model_dir, tmp_path):
    """`eqat quantize` then `eqat export`: a GPTQ folder, a JSON report; bad input exits 2 and writes nothing."""
    src, ck = tiny_model_dir(), tmp_path / "ck"
    assert cli("quantize", "--model", str(src), "--method", "rtn", "--scheme", "w4g32", "--out", str(ck), "--no-eval",
               "-q")[0] == 0
    code, out, _ = cli("export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g"), "--json")
    assert code == 0 and json.loads(out)["notes"] == {"flipped_groups": 0}
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    code, _, err = cli("export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g"))
    assert code == 2 and "already exists; pass --force" in err
    code, _, err = cli("export", str(ck), "--format", "onnx-ish", "--out", str(tmp_path / "h"))
    assert code == 2 and "unknown export format 'onnx-ish'; available: awq, bitblas, compressed-tensors, gptq, onnx" in err
    assert not (tmp_path / "h").exists()
    code, _, err = cli("export", str(ck), "--format", "onnx", "--out", str(tmp_path / "h"), "-O", "widen_3bit=maybe")
    assert code == 2 and "option widen_3bit of format 'onnx' takes true or false, not 'maybe'" in err
    code, _, err = cli("export", str(ck), "--format", "onnx", "--out", str(tmp_path / "h"), "-O", "widen_3bit")
    assert code == 2 and "--option takes KEY=VALUE" in err and not (tmp_path / "h").exists()
    code, _, err = cli("export", str(ck), "--format", "awq", "--out", str(tmp_path / "h"), "-O", "bits=3")
    assert code == 2 and "format 'awq' takes no option ['bits']" in err
    code, _, err = cli("export", str(src), "--format", "gptq", "--out", str(tmp_path / "h"))
    assert code == 2 and "eqat_config.json" in err and not (tmp_path / "h").exists()


def test_config_file_reproduces_a_run(cli, tiny_model_dir, tmp_path):
    """--config supplies options (flags still win); every run writes the options it used, and
    that file run again gives the same checkpoint."""
    from safetensors.torch import load_file

    src = tiny_model_dir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {src}\nmethod: rtn\nscheme: w3g32\nevaluate: false\nquiet: true\n")
    assert cli("quantize", "--config", str(cfg), "--out", str(tmp_path / "a"))[0] == 0
    saved = tmp_path / "a" / "eqat_quantize.yaml"
    text = saved.read_text()
    assert "scheme: w3g32" in text and "method: rtn" in text and "quiet" not in text
    assert cli("quantize", "--config", str(saved), "--out", str(tmp_path / "b"), "-q")[0] == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "eqat_config.json").read_text())["scheme"]["bits"] == 3
    cfg.write_text("scheme: w4g32\nlearning_rate: 3\n")
    code, _, err = cli("quantize", "--config", str(cfg))
    assert code == 2 and "has no option ['learning_rate']" in err
    code, _, err = cli("quantize", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read --config" in err


def test_eval_window_options_are_checked_before_any_work(cli, tiny_model_dir, tmp_path, monkeypatch):
    """eval, quantize and train-e2e refuse --seqlen < 2 and --max-windows < 1 (eval --seqlen 0 raised
    ZeroDivisionError) with the option's name, before loading a model or writing anything."""
    import eqat.io.checkpoint
    import eqat.pipeline

    model = tiny_model_dir()
    fail = lambda *a, **k: pytest.fail("a model was loaded before the check")  # noqa: E731
    with monkeypatch.context() as mp:
        mp.setattr(eqat.pipeline, "load_any", fail)
        for args, message in ((["--seqlen", "0"], "--seqlen 0: a window of N tokens predicts N - 1"),
                              (["--max-windows", "0"], "--max-windows 0: at least one window is needed")):
            code, _, err = cli("eval", str(model), *args, "-q")
            assert code == 2 and message in err, err
    with monkeypatch.context() as mp:
        mp.setattr(eqat.pipeline, "load_model", fail)
        _assert_bad(cli, tmp_path, ["--model", str(model), "--method", "rtn", "--max-windows", "0"], "--max-windows 0")
        _assert_bad(cli, tmp_path, ["--model", str(model), "--method", "rtn", "--seqlen", "1"], "--seqlen 1")
    src = tmp_path / "rtn"
    assert cli("quantize", "--model", str(model), "--method", "rtn", "--out", str(src), "--no-eval", "-q")[0] == 0
    monkeypatch.setattr(eqat.io.checkpoint, "load_quantized", fail)
    code, _, err = cli("train-e2e", str(src), "--out", str(tmp_path / "e"), "--seqlen", "0", "-q")
    assert code == 2 and "--seqlen 0" in err and not (tmp_path / "e").exists()


def test_config_files_never_name_a_program_to_run(cli, tmp_path):
    """A --config file that sets vllm_python is refused before anything runs (the program it names is
    never started); `vllm_python: null` (older recorded configs) is accepted; recorded configs leave
    executables out."""
    import click

    from eqat.cli.config import save_config

    marker = tmp_path / "ran"
    program = tmp_path / "python"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    cfg = tmp_path / "theirs.yaml"
    cfg.write_text(f"vllm-python: {program}\nwindows: 1\n")
    code, _, err = cli("validate", str(tmp_path / "ck"), "--config", str(cfg), "-q")
    assert code == 2 and "sets vllm_python" in err
    assert "pass --vllm-python on the command line or set EQAT_VLLM_PYTHON" in err and not marker.exists()
    cfg.write_text("vllm_python: null\nwindows: 0\n")  # accepted: then --windows 0 is what gets refused
    code, _, err = cli("validate", str(tmp_path / "ck"), "--config", str(cfg), "-q")
    assert code == 2 and "--windows 0" in err and "vllm_python" not in err

    ctx = click.Context(click.Command("validate"))
    ctx.params = {"model": "ck", "windows": 2, "vllm_python": str(program), "quiet": True}
    saved = save_config(ctx, tmp_path).read_text()
    assert "windows: 2" in saved and "vllm_python" not in saved and str(program) not in saved


def test_a_second_run_on_a_folder_in_use_is_refused(cli, tiny_model_dir, tmp_path):
    """quantize and export refuse an output folder whose lock a live run holds (here: this process)."""
    from eqat.io.lock import output_lock

    src, out, ck = tiny_model_dir(), tmp_path / "busy", tmp_path / "ck"
    assert cli("quantize", "--model", str(src), "--method", "rtn", "--out", str(ck), "--no-eval", "-q")[0] == 0
    with output_lock(out, "eqat quantize"):
        code, _, err = cli("quantize", "--model", str(src), "--method", "rtn", "--out", str(out), "--no-eval", "-q")
        assert code == 2 and "is in use by another eqat run (eqat quantize, pid" in err
        code, _, err = cli("export", str(ck), "--format", "gptq", "--out", str(out))
        assert code == 2 and "in use by another eqat run" in err
    assert not out.exists()


def test_method_plans_are_checked_before_any_work(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    for plan, why in [("gptq", "unknown method 'gptq'; registered: block-ap, e2e-qp, lr-qat, lr-qat-block, qllm, rtn, smoothquant"),
                      ("lr-qat-block+block-ap", "only end-to-end methods may follow lr-qat-block, not block-ap"),
                      ("e2e-qp", "a data-free or block-wise method must come first"),
                      ("rtn+block-ap", "only end-to-end methods may follow rtn, not block-ap"),
                      ("block-ap+", "is not a plan")]:
        code, _, err = cli("quantize", "--model", str(model), "--method", plan, "--out", str(tmp_path / "o"), "-q")
        assert code == 2 and why in err, (plan, err)
        assert not (tmp_path / "o").exists()
    code, _, err = cli("train-e2e", str(model), "--method", "block-ap", "-q")
    assert code == 2
    code, _, err = cli("quantize", "--model", str(model), "--method", "lr-qat", "--skip-e2e", "--out",
                       str(tmp_path / "o"), "-q")
    assert code == 2 and "--skip-e2e would drop every phase" in err, err
    assert not (tmp_path / "o").exists()


def test_help_and_info_list_the_registered_methods(cli):
    code, out, _ = cli("quantize", "--help")
    out = re.sub(r"[│\s]+", " ", out)  # rich wraps the help inside a box
    assert code == 0 and "block-ap (block-wise)" in out and "e2e-qp (end-to-end)" in out and "rtn (data-free)" in out
    code, out, _ = cli("info", "--json")
    methods = json.loads(out)["methods"]
    assert code == 0 and {"rtn": "data-free", "block-ap": "block-wise", "e2e-qp": "end-to-end"} == {
        n: m["phase"] for n, m in methods.items() if n in ("rtn", "block-ap", "e2e-qp")}


def test_flags_of_methods_the_plan_does_not_run_are_reported(cli, tiny_model_dir, tmp_path):
    """A method flag set on the command line (or to a non-default value in --config) that no method
    of the plan reads is named in a warning and in report.json, not dropped silently; flags the
    plan reads, and a recorded config's defaults, give none."""
    import yaml

    src, out = tiny_model_dir(), tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(src), "--method", "rtn", "--scheme", "w4g16", "--no-eval",
                       "--loss", "clamp", "--e2e-lr", "1e-4", "--epochs", "3", "--out", str(out), "-q")
    assert code == 0, err
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    ignored = [w for w in warnings if "does not run: it was ignored" in w]
    assert any(w.startswith("--loss is an option of block-ap,") and "plan (rtn)" in w for w in ignored), (warnings, err)
    assert any(w.startswith("--e2e-lr is an option of e2e-qp") for w in ignored), warnings
    assert any(w.startswith("--epochs is an option of block-wise methods") for w in ignored), warnings
    assert len(ignored) == 3 and "--loss is an option of block-ap" in err
    # the recorded config (every option, mostly defaults) replays with the same three, no more
    recorded = yaml.safe_load((out / "eqat_quantize.yaml").read_text())
    assert recorded["loss"] == "clamp"
    code, _, err = cli("quantize", "--config", str(out / "eqat_quantize.yaml"), "--out", str(tmp_path / "r"), "-q")
    assert code == 0, err
    again = [w for w in json.loads((tmp_path / "r" / "report.json").read_text())["warnings"] if "ignored" in w]
    assert len(again) == 3, again
    code, _, err = cli("quantize", "--model", str(src), "--method", "block-ap", "--scheme", "w4g16", "--no-eval",
                       "--loss", "clamp", "--epochs", "1", "--nsamples", "4", "--val-samples", "2", "--calib-seqlen",
                       "32", "--out", str(tmp_path / "b"), "-q")
    assert code == 0, err
    assert not [w for w in json.loads((tmp_path / "b" / "report.json").read_text())["warnings"] if "ignored" in w]
