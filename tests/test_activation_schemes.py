"""Schemes that quantize activations (w8g-1a8) through the CLI: RTN packs them and `eqat eval` measures
them; weight-only methods and formats refuse them before writing anything."""

from __future__ import annotations

import json

import torch

from eqat.io.checkpoint import load_quantized, quantized_modules

SMALL = ["--no-eval", "-q", "--nsamples", "4", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1"]


def test_rtn_packs_and_eval_measures_activation_quantization(cli, tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    outs = {}
    for scheme in ("w8g-1", "w8g-1a4"):
        out = outs[scheme] = tmp_path / scheme
        code, _, err = cli("quantize", "--model", str(model), "--method", "rtn", "--scheme", scheme, "--out", str(out),
                           "--no-eval", "-q")
        assert code == 0, err
    q, _, meta = load_quantized(outs["w8g-1a4"])
    assert meta["scheme"]["version"] == 2 and meta["scheme"]["act"]["bits"] == 4
    assert all(m.scheme.act is not None and m.scheme.act.bits == 4 for m in quantized_modules(q).values())
    ppl = {}
    for scheme, out in outs.items():
        code, stdout, err = cli("eval", str(out), "--max-windows", "2", "--json", "-q")
        assert code == 0, err
        ppl[scheme] = json.loads(stdout)["ppl"]
    assert ppl["w8g-1a4"] != ppl["w8g-1"]  # 4-bit activations change what the model computes
    code, stdout, _ = cli("info", str(outs["w8g-1a4"]))
    assert code == 0 and "w8g-1a4" in stdout


def test_weight_only_methods_refuse_activation_schemes(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "block-ap", "--scheme",
                       "w8g-1a8", "--out", str(out), *SMALL)
    assert code == 2 and "block-ap trains weight-only" in err and "rtn" in err
    assert not out.exists() or not any(out.iterdir())


def test_weight_only_formats_and_lr_qat_refuse_a_weight_activation_checkpoint(cli, tiny_model_dir, tmp_path):
    src = tmp_path / "wa"
    code, _, err = cli("quantize", "--model", str(tiny_model_dir("llama")), "--method", "rtn", "--scheme", "w8g-1a8",
                       "--out", str(src), "--no-eval", "-q")
    assert code == 0, err
    for fmt in ("gptq", "awq", "compressed-tensors"):  # onnx holds it (tests/exporters/test_onnx.py)
        out = tmp_path / fmt
        code, _, err = cli("export", str(src), "--format", fmt, "--out", str(out))
        if fmt == "compressed-tensors":  # holds W8A8 only: int8 symmetric weights and activations
            assert code == 2 and "int-quantized W8A8 only (w8g-1syma8sym" in err, err
        else:
            assert code == 2 and "quantizes activations" in err and "weight-only" in err and "onnx" in err, (fmt, err)
        assert not out.exists()
    out = tmp_path / "t"
    code, _, err = cli("train-e2e", str(src), "--method", "lr-qat", "--lr-qat-phi0", "bfloat16", "--e2e-nsamples", "4",
                       "--e2e-seqlen", "32", "--no-eval", "-q", "--out", str(out))
    assert code == 2 and "lr-qat trains weight-only" in err
    assert not out.exists() or not any(out.iterdir())
    # E2E-QP trains through the packed layer, activation quantization included
    code, _, err = cli("train-e2e", str(src), "--method", "e2e-qp", "--e2e-nsamples", "4", "--e2e-val-samples", "2",
                       "--e2e-seqlen", "32", "--e2e-grad-accum", "1", "--no-eval", "-q", "--out", str(tmp_path / "e"))
    assert code == 0, err
    q, _, _ = load_quantized(tmp_path / "e")
    assert all(m.scheme.act is not None for m in quantized_modules(q).values())
    assert torch.isfinite(next(iter(quantized_modules(q).values())).scales).all()
