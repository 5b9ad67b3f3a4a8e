"""`eqat validate`: a tiny checkpoint and its exports through every runtime installed here,
scored against eqat's own forward; skipped backends say why; thresholds decide the exit code."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from eqat.io.checkpoint import save_quantized
from eqat.errors import EqatInputError
from eqat.exporters import export_checkpoint
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn
from eqat.validate import Thresholds, validate, write_report
from eqat.validate.backends import folder_kind
from eqat.validate.metrics import agreement, greedy_agreement

SMALL = dict(windows=2, seqlen=32, new_tokens=4, progress=False)


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    return save_quantized(model, tiny_tokenizer, tmp_path / "ck")


def test_metrics():
    a = torch.randn(1, 5, 11)
    same = agreement([a], [a])
    assert same["max_abs_logit"] == 0 and same["top1_agree"] == 1 and abs(same["mean_kl"]) < 1e-6
    b = a.clone()
    b[0, 0, a[0, 0].argmax()] -= 100  # one position changes its top token
    assert agreement([b], [a])["top1_agree"] == pytest.approx(0.8) and agreement([b], [a])["mean_kl"] > 0.01
    g = greedy_agreement([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 3, 4], [1, 9, 3, 4]])
    assert g == {"greedy_prefix_agree": (1 + 0.25) / 2, "greedy_identical": 1}
    t = Thresholds()
    bf16 = {"ppl_delta_pct": 0.2, "top1_agree": 0.97, "mean_kl": 2e-3}
    assert len(t.failures(bf16)) == 2 and t.failures({**bf16, "dtype": "bfloat16"}) == []
    assert len(t.failures({**bf16, "top1_agree": 0.9, "mean_kl": 5e-3, "dtype": "bfloat16"})) == 2
    assert t.failures({"ppl_delta_pct": 0.5, "top1_agree": 0.99, "mean_kl": 1e-4}) == []
    assert len(t.failures({"ppl_delta_pct": -2.0, "top1_agree": 0.5, "mean_kl": 1.0})) == 3
    assert t.failures({"ppl_delta_pct": 0.1, "top1_agree": None, "mean_kl": None}) == []  # vLLM: perplexity only
    # NaN passes every `>` test: Gemma 3 270M's GPTQ export in float16 scored ppl nan in GPTQModel and
    # transformers, and eqat's own float16 forward too, so the delta was nan; such a row must fail
    nan = float("nan")
    why = t.failures({"ppl": nan, "reference_ppl": nan, "ppl_delta_pct": nan, "top1_agree": 1.0, "mean_kl": nan,
                      "dtype": "float16"})
    assert len(why) == 1 and why[0].startswith("ppl, reference_ppl, ppl_delta_pct, mean_kl not finite in float16"), why


def test_every_installed_runtime_agrees_with_eqat(checkpoint, tmp_path):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("compressed_tensors")
    exports = []
    for fmt in ("gptq", "onnx", "compressed-tensors"):
        export_checkpoint(checkpoint, fmt, tmp_path / fmt)
        exports.append(tmp_path / fmt)
    report = validate(checkpoint, exports, **SMALL)
    rows = {(r["name"], r["backend"]): r for r in report["rows"]}
    assert rows[("ck", "eqat-torch")]["status"] == "reference"
    ran = {k: r for k, r in rows.items() if r["status"] not in ("reference", "skipped")}
    assert set(ran) == {("gptq", "gptqmodel"), ("gptq", "transformers"), ("onnx", "onnxruntime"),
                        ("compressed-tensors", "transformers")}
    for key, r in ran.items():
        assert r["status"] == "pass", (key, r)
        assert abs(r["ppl_delta_pct"]) < 0.5 and r["top1_agree"] > 0.98 and r["tokens_per_s"] > 0
        assert 0 <= r["greedy_prefix_agree"] <= 1 and math.isfinite(r["mean_kl"])
    for key in [("onnx", "onnxruntime"), ("compressed-tensors", "transformers")]:  # float32 vs float32
        assert rows[key]["dtype"] == "float32" and rows[key]["greedy_identical"] == 4
    skipped = {k: r["reason"] for k, r in rows.items() if r["status"] == "skipped"}
    if not torch.cuda.is_available():
        assert "CUDA" in skipped[("ck", "eqat-triton")] and "CUDA" in skipped[("gptq", "bitblas")]
    assert "vLLM reads GPTQ only 4/8-bit symmetric v1" in skipped[("gptq", "vllm")]
    assert report["passed"] and report["compared"] == 4 and report["reason"].startswith("4 export comparison(s)")

    folder = write_report(report, tmp_path / "report")
    saved = json.loads((folder / "validate.json").read_text())
    assert saved["passed"] and len(saved["rows"]) == len(report["rows"]) and "environment" in saved
    assert "| gptq | gptqmodel (" in (folder / "validate.md").read_text()
    page = (folder / "validate.html").read_text()
    assert "data:image/png;base64," in page and "eqat validate: PASS" in page


def test_cli_exit_codes(cli, checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    export_checkpoint(checkpoint, "onnx", tmp_path / "onnx")
    args = ["validate", str(checkpoint), "--export", str(tmp_path / "onnx"), "--windows", "1", "--seqlen", "32",
            "--new-tokens", "2", "-q"]
    assert cli(*args, "--out", str(tmp_path / "r1"))[0] == 0
    assert json.loads((tmp_path / "r1" / "validate.json").read_text())["compared"] == 1
    code, out, _ = cli(*args, "--out", str(tmp_path / "r2"), "--max-kl", "0", "--json")
    rows = {r["backend"]: r for r in json.loads(out)["rows"]}
    assert code == 1 and rows["onnxruntime"]["status"] == "fail" and "mean KL" in rows["onnxruntime"]["failures"][0]
    assert "1 of 1 comparisons failed: onnx on onnxruntime: mean KL" in json.loads(out)["reason"]
    assert (tmp_path / "r2" / "validate.json").exists()
    code, _, err = cli("validate", str(tmp_path / "onnx"), "-q")
    assert code == 2 and "is not an eqat checkpoint" in err
    code, _, err = cli("validate", str(checkpoint), "--backends", "tensorrt", "-q")
    assert code == 2 and "unknown backend(s) ['tensorrt']" in err


def test_folder_kinds(checkpoint, tmp_path):
    assert folder_kind(checkpoint)[0] == "eqat"
    export_checkpoint(checkpoint, "awq", tmp_path / "awq")
    assert folder_kind(tmp_path / "awq")[0] == "awq"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(EqatInputError, match="neither an eqat checkpoint nor an export"):
        folder_kind(tmp_path / "plain")


FAKE_VLLM = """#!{python}
import json, sys
spec = json.load(sys.stdin)
if "{mode}" == "crash":
    print("ValueError: Failed to find a kernel that can implement the WNA16 linear layer", file=sys.stderr)
    sys.exit(1)
if "{mode}" == "silent":  # exits 0 but writes no result
    print("RuntimeError: worker died before the result was written", file=sys.stderr)
    sys.exit(0)
print("(Worker pid=1) INFO [x.py:1] Using CPUWNA16LinearKernel for CompressedTensorsWNA16", end="")  # logs on stdout too
result = {{"logprob": [[-2.0] * (len(w) - 1) for w in spec["windows"]],
           "top1": [w[1:] for w in spec["windows"]],  # the actual next token, always
           "greedy": [[1] * spec["max_new_tokens"] for _ in spec["prompts"]],
           "load_s": 1.5, "forward_s": 0.5, "quantization": "compressed-tensors"}}
json.dump(result, open(sys.argv[-1], "w"))  # argv: [worker.py, RESULT.json]
"""


@pytest.mark.parametrize("mode", ["ok", "crash", "silent"])
def test_vllm_runs_in_a_subprocess_of_another_python(checkpoint, tmp_path, mode, monkeypatch):
    """The vLLM path with a stand-in Python: perplexity from the actual tokens' log-probabilities,
    top-1 agreement and log-probability differences against eqat's own forward in vLLM's dtype,
    greedy tokens, timings; a crash becomes an `error` row carrying vLLM's message, and fails the run."""
    import sys

    from eqat.validate import backends

    monkeypatch.setattr(backends, "cpu_has_avx512", lambda: True)
    export_checkpoint(checkpoint, "compressed-tensors", tmp_path / "ct")
    # the stand-in is not vLLM: let it take the tiny model's head size, which vLLM's CPU attention refuses
    monkeypatch.setattr(backends, "VLLM_CPU_HEAD_SIZES", (backends.head_size(tmp_path / "ct"),))
    fake = tmp_path / "python"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, mode=mode))
    fake.chmod(0o755)
    report = validate(checkpoint, [tmp_path / "ct"], backends=["vllm", "eqat-torch"], vllm_python=str(fake), **SMALL)
    row = next(r for r in report["rows"] if r["backend"] == "vllm")
    if mode != "ok":
        why = "Failed to find a kernel" if mode == "crash" else "worker died before the result was written"
        assert row["status"] == "error" and why in row["reason"] and not report["passed"]
        return
    assert "ppl" in row, row.get("reason")
    assert row["ppl"] == pytest.approx(math.exp(2.0)) and row["load_s"] == 1.5 and row["tokens_per_s"] == pytest.approx(64 / 0.5)
    assert row["dtype"] == "bfloat16" and row["quantization"] == "compressed-tensors" and row["mean_kl"] is None
    assert row["kernel"] == "CPUWNA16LinearKernel"  # read from its log
    # the stand-in's "top-1" is the actual next token: agreement = how often eqat's bf16 argmax is right
    from eqat.io.checkpoint import load_quantized
    from eqat.data.sources import eval_token_ids

    model, tok, _ = load_quantized(checkpoint)
    ids = eval_token_ids(tok, "wikitext2")[: SMALL["windows"] * SMALL["seqlen"]].view(SMALL["windows"], -1)
    with torch.no_grad():
        logits = torch.cat([model.to(torch.bfloat16)(w[None]).logits[0, :-1].float() for w in ids])
    right = (logits.argmax(-1) == torch.cat([w[1:] for w in ids])).double().mean().item()
    assert row["top1_agree"] == pytest.approx(right)
    lp = logits.log_softmax(-1).gather(-1, torch.cat([w[1:] for w in ids])[:, None])[:, 0]
    assert row["mean_abs_logprob"] == pytest.approx((lp.double() + 2.0).abs().mean().item(), rel=1e-4)
    assert row["greedy_identical"] in range(5) and row["reference_ppl"] > 0
    assert row["status"] in ("pass", "fail")


def test_vllm_root_cause_skips_its_wrappers():
    from eqat.validate.runner import vllm_root_cause

    log = "\n".join([
        "(Worker pid=1) ERROR 11-23 [x.py:953] ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: ",
        "(Worker pid=1) ERROR 11-23 [x.py:953]  CPUWNA16LinearKernel cannot implement due to: Quant type (uint3) not supported",
        "RuntimeError: Engine core initialization failed. See root cause above.",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."])
    why = vllm_root_cause(log)
    assert why.startswith("ValueError: Failed to find a kernel") and "CPUWNA16LinearKernel cannot implement" in why
    assert "Engine" not in why


def test_runtimes_that_cannot_hold_a_folder_are_skipped_with_the_reason():
    from eqat.validate.backends import BACKENDS, vllm_why_not

    v1_asym = {"bits": 4, "sym": False, "checkpoint_format": "gptq", "meta": {"quantizer": ["eqat:0.1.0"]}}
    assert "asymmetric GPTQ v1 only when GPTQModel >= 0.9 wrote it" in BACKENDS["gptqmodel"].why_not("gptq", v1_asym)
    assert "4/8-bit symmetric v1" in vllm_why_not("gptq", {**v1_asym, "checkpoint_format": "gptq_v2"}, "/x/python")
    ct3 = {"config_groups": {"group_0": {"weights": {"num_bits": 3}}}}
    if not torch.cuda.is_available():
        assert "weight-only 4-bit (CPUWNA16) and int8 W8A8, not 3-bit weight-only" in vllm_why_not("compressed-tensors", ct3, "/x/python")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the AVX-512 rule is vLLM's CPU path")
def test_vllm_on_cpu_skips_head_sizes_its_attention_lacks(checkpoint, tmp_path, monkeypatch):
    """vLLM 0.32's CPU attention takes head sizes 32-512 from a fixed list; the tiny test model's
    (16) fails inside vLLM ("Unsupported CPU attention configuration"), so validate skips it with
    the reason instead of reporting an error; a listed size is run."""
    from eqat.validate import backends

    monkeypatch.setattr(backends, "cpu_has_avx512", lambda: True)
    export_checkpoint(checkpoint, "compressed-tensors", tmp_path / "ct")
    ct4 = {"config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    head = backends.head_size(tmp_path / "ct")
    assert head == 16 and head not in backends.VLLM_CPU_HEAD_SIZES
    why = backends.vllm_why_not("compressed-tensors", ct4, "/x/python", tmp_path / "ct")
    assert "head sizes 32, 64, 80" in why and "this model's is 16" in why, why
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    (tmp_path / "ct" / "config.json").write_text(json.dumps({**cfg, "head_dim": 64}))
    assert backends.vllm_why_not("compressed-tensors", ct4, "/x/python", tmp_path / "ct") is None
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    report = validate(checkpoint, [tmp_path / "ct"], backends=["vllm", "eqat-torch"], vllm_python="/x/python", **SMALL)
    row = next(r for r in report["rows"] if r["backend"] == "vllm")
    assert row["status"] == "skipped" and "this model's is 16" in row["reason"]


def test_vllm_on_a_cpu_without_avx512_is_skipped_with_the_reason(monkeypatch):
    from eqat.validate import backends

    ct4 = {"config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    monkeypatch.setattr(backends, "cpu_has_avx512", lambda: False)
    assert "no AVX-512" in backends.vllm_why_not("compressed-tensors", ct4, "/x/python")
    monkeypatch.setattr(backends, "cpu_has_avx512", lambda: True)
    assert backends.vllm_why_not("compressed-tensors", ct4, "/x/python") is None


def test_plot_has_vllm_rows_without_kl(tmp_path):
    """vLLM rows (top-1, no KL) are plotted beside full-logit rows; no such rows, no plot."""
    from eqat.validate.report import plot

    t = vars(Thresholds())
    rows = [{"name": "ct", "backend": "vllm", "dtype": "bfloat16", "status": "pass", "top1_agree": 0.97, "mean_kl": None},
            {"name": "gptq", "backend": "gptqmodel", "dtype": "float16", "status": "fail", "top1_agree": 0.9, "mean_kl": 2e-3}]
    assert plot({"rows": rows, "thresholds": t}, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000
    reference_only = [{"name": "ck", "backend": "eqat-torch", "status": "reference"}]
    assert not plot({"rows": reference_only, "thresholds": t}, tmp_path / "b.png") and not (tmp_path / "b.png").exists()


def test_a_run_that_compares_no_export_fails(cli, checkpoint, tmp_path):
    """Every export row skipped (vLLM cannot read asymmetric GPTQ v2), no selected backend that
    reads the export, or no --export at all: exit 1 with "nothing was compared" and what to pass;
    validate.json records compared = 0 and the reason."""
    export_checkpoint(checkpoint, "gptq", tmp_path / "gptq")  # asymmetric: gptq_v2, which vLLM does not read
    small = ["--windows", "1", "--seqlen", "32", "--new-tokens", "2", "-q"]
    code, _, err = cli("validate", str(checkpoint), "--export", str(tmp_path / "gptq"), "--backends", "vllm",
                       "--out", str(tmp_path / "r1"), *small)
    assert code == 1 and "nothing was compared" in err
    assert "vllm skipped (vLLM reads GPTQ only 4/8-bit symmetric v1" in err
    assert "Backends that read gptq: gptqmodel, bitblas, transformers, vllm" in err
    saved = json.loads((tmp_path / "r1" / "validate.json").read_text())
    assert saved["compared"] == 0 and not saved["passed"] and saved["reason"].startswith("nothing was compared")
    assert [r["status"] for r in saved["rows"] if r["name"] == "gptq"] == ["skipped"]
    assert "Verdict: **FAIL**: nothing was compared" in (tmp_path / "r1" / "validate.md").read_text()

    code, _, err = cli("validate", str(checkpoint), "--export", str(tmp_path / "gptq"), "--backends", "onnxruntime",
                       "--out", str(tmp_path / "r2"), *small)
    assert code == 1 and "nothing was compared" in err and "no backend in --backends onnxruntime reads gptq" in err
    code, _, err = cli("validate", str(checkpoint), "--out", str(tmp_path / "r3"), *small)
    assert code == 1 and "nothing was compared" in err and "pass --export DIR" in err
    assert json.loads((tmp_path / "r3" / "validate.json").read_text())["compared"] == 0


def test_the_checkpoint_on_another_eqat_kernel_is_no_export(checkpoint, monkeypatch):
    """The checkpoint on a second eqat kernel (eqat-triton, here stood in for by the torch kernel
    on CPU) is a real comparison that passes, yet checks no export: the run fails."""
    from eqat.validate.backends import BACKENDS, _load_eqat

    monkeypatch.setattr(BACKENDS["eqat-triton"], "why_not", lambda kind, qc: None)
    monkeypatch.setattr(BACKENDS["eqat-triton"], "load", _load_eqat("torch", "cpu", torch.float32))
    report = validate(checkpoint, [], backends=["eqat-torch", "eqat-triton"], **SMALL)
    assert [r["status"] for r in report["rows"]] == ["reference", "pass"]
    assert report["compared"] == 0 and not report["passed"] and "no --export folder was given" in report["reason"]


def test_the_checkpoint_itself_as_export_is_bad_input(cli, checkpoint, tmp_path):
    (tmp_path / "link").symlink_to(checkpoint)
    for export in (checkpoint, tmp_path / "link"):
        code, _, err = cli("validate", str(checkpoint), "--export", str(export), "--out", str(tmp_path / "r"), "-q")
        assert code == 2 and "is the checkpoint itself" in err and "eqat export" in err
    assert not (tmp_path / "r").exists()


def test_window_counts_are_checked_before_any_work(cli, checkpoint, tmp_path, monkeypatch):
    """--windows / --seqlen / --new-tokens that measure nothing (they raised ZeroDivisionError) are
    bad input, refused before the checkpoint is loaded."""
    import eqat.io.checkpoint

    monkeypatch.setattr(eqat.io.checkpoint, "load_quantized", lambda *a, **k: pytest.fail("loaded before the check"))
    for kw, flag in ((dict(windows=0), "--windows 0"), (dict(seqlen=1), "--seqlen 1"), (dict(new_tokens=0), "--new-tokens 0")):
        with pytest.raises(EqatInputError, match=flag):
            validate(checkpoint, [], **{**SMALL, **kw})
    code, _, err = cli("validate", str(checkpoint), "--windows", "0", "--out", str(tmp_path / "r"), "-q")
    assert code == 2 and "--windows 0: at least one window is needed" in err and "--windows 1 or more" in err
    code, _, err = cli("validate", str(checkpoint), "--seqlen", "0", "--out", str(tmp_path / "r"), "-q")
    assert code == 2 and "--seqlen 0" in err and "at least 2 tokens" in err
    assert not (tmp_path / "r").exists()


def test_an_unwritable_report_folder_is_refused_before_the_backends_run(cli, checkpoint, tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes. Covered for real: a report folder under
    a regular file (creation fails even as root) and a probe folder that cannot be created (here a
    patched mkdtemp; e.g. a read-only mount). The chmod-read-only checkpoint (default <MODEL>/validate)
    is covered by what os.access reports there for a non-root user, emulated by a patch when root."""
    import os

    import eqat.validate
    from eqat.validate import report as report_mod

    monkeypatch.setattr(eqat.validate, "validate", lambda *a, **k: pytest.fail("the backends ran before the check"))
    (tmp_path / "afile").write_text("")
    code, _, err = cli("validate", str(checkpoint), "--out", str(tmp_path / "afile" / "v"), "-q")
    assert code == 2 and f"cannot write the report folder {tmp_path / 'afile' / 'v'}" in err and "is a file" in err
    assert "pass --out DIR" in err
    code, _, err = cli("validate", str(checkpoint), "--out", str(tmp_path / "afile"), "-q")
    assert code == 2 and f"--out {tmp_path / 'afile'} is a file, not a folder" in err  # eqat.io.outdir.check_output

    checkpoint.chmod(0o555)
    try:
        if os.geteuid() == 0:
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == checkpoint else real(p, mode, **k))
        code, _, err = cli("validate", str(checkpoint), "-q")
    finally:
        checkpoint.chmod(0o755)
    assert code == 2 and f"cannot write the report folder {checkpoint / 'validate'}" in err and "not writable" in err
    assert "pass --out DIR" in err and not (checkpoint / "validate").exists()

    def no_room(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report_mod.tempfile, "mkdtemp", no_room)
    code, _, err = cli("validate", str(checkpoint), "--out", str(tmp_path / "r"), "-q")
    assert code == 2 and "Permission denied" in err and "pass --out DIR" in err


def test_a_writable_report_folder_passes_the_check_and_leaves_nothing(tmp_path):
    from eqat.validate.report import check_report_folder

    check_report_folder(tmp_path / "new" / "deeper" / "report")  # parents are created only when the report is written
    check_report_folder(tmp_path)  # an existing folder, replaced later
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


def test_gptqmodel_is_skipped_for_the_layouts_it_misreads(tmp_path, tiny_tokenizer):
    """Phi-3's fused gate_up_proj (GPTQModel 7.6 wants it split) and LLaVA (no GPTQModel definition):
    skipped with the reason instead of an error."""
    from eqat.validate.backends import BACKENDS

    for family, words in (("phi3", "gate_proj/up_proj"), ("llava", "no LLaVA definition")):
        model = tiny_model(family, vocab=len(tiny_tokenizer))
        quantize_rtn(model, QuantScheme(4, 32))
        ck = save_quantized(model, tiny_tokenizer, tmp_path / f"{family}-ck")
        export_checkpoint(ck, "gptq", tmp_path / family, progress=False)
        kind, qc = folder_kind(tmp_path / family)
        assert qc["model_type"] == family and words in BACKENDS["gptqmodel"].why_not(kind, qc)
