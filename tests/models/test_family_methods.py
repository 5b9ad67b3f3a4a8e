"""The methods through the CLI on tiny models of the families that are not Llama-like (Gemma,
Gemma 2/3 with sliding and global attention, Phi-3's fused projections, OLMo 2's post-norms): runs
complete, checkpoints load back and compute what the quantized model does, and methods that need
a family's norm -> linear sites refuse a family without them before writing anything."""

import json

import pytest
import torch

from eqat.io.checkpoint import load_quantized
from eqat.models.loading import load_model
from tests.conftest import OTHER_FAMILIES
from tests.test_cli import E2E_ARGS, text_file  # noqa: F401 (a fixture)

SMALL = ["--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1", "--seqlen", "32",
         "--max-windows", "2", "-q", "--seed", "0"]
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the sliding window 8


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits.float()


def _quantize(cli, src, out, method, *flags):
    code, _, err = cli("quantize", "--model", str(src), "--method", method, *SMALL, *flags, "--out", str(out))
    assert code == 0, f"{method}: {err}"
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["share"] == 1.0 and torch.isfinite(torch.tensor(report["perplexity"]["ppl"]))
    return load_quantized(out)[0]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_rtn_checkpoint_computes_nearly_the_models_logits_at_8_bits(family, cli, tiny_model_dir, tmp_path):
    src = tiny_model_dir(family)
    fp = _logits(load_model(src)[0])
    got = _logits(_quantize(cli, src, tmp_path / "q", "rtn", "--scheme", "w8g16"))
    assert (got - fp).abs().max() < 0.05 * fp.abs().max()


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_trained_and_weight_activation_methods_run(family, cli, tiny_model_dir, tmp_path, text_file):
    src = tiny_model_dir(family)
    runs = {"block-ap+e2e-qp": ["--scheme", "w4g16", *E2E_ARGS, "--e2e-data", str(text_file)],
            "lr-qat": ["--scheme", "w4g16", *E2E_ARGS, "--e2e-data", str(text_file), "--lr-qat-rank", "4"],
            "smoothquant": ["--scheme", "w8g16a8"], "qllm": ["--scheme", "w4g16a8", "--qllm-theta", "budget"]}
    for method, flags in runs.items():
        model = _quantize(cli, src, tmp_path / method, method, *flags)
        assert torch.isfinite(_logits(model)).all()
        if method == "qllm":  # reassembly at the norm-fed inputs at least (Phi-3: no fold needed for it)
            meta = json.loads((tmp_path / method / "eqat_config.json").read_text())["quantized_modules"]
            assert any(i.get("reassembly") for i in meta.values())


def test_methods_needing_sites_refuse_post_norm_blocks_before_writing(cli, tiny_model_dir, tmp_path):
    src = tiny_model_dir("olmo2")
    for method in ("smoothquant", "qllm"):
        out = tmp_path / method
        code, _, err = cli("quantize", "--model", str(src), "--method", method, *SMALL, "--scheme", "w8g16a8",
                           "--out", str(out))
        assert code == 2 and "olmo2 family spec declares none" in err and "use rtn or block-ap" in err, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{method}")]
