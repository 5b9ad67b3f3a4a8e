"""Vision-language models (LLaVA, Qwen2-VL) on tiny models built from their configs: eqat quantizes
the language model's blocks through the CLI, keeps the vision tower and projector in full
precision, carries the processor files, and the exports load in transformers as the original does."""

import json

import pytest
import torch

from eqat.core.qlinear import QuantLinear
from eqat.exporters import export_checkpoint
from eqat.io.checkpoint import load_quantized
from eqat.models.loading import PROCESSOR_FILES, load_model
from tests.conftest import VLM_FAMILIES
from tests.test_cli import E2E_ARGS, text_file  # noqa: F401 (a fixture)

SMALL = ["--nsamples", "6", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1", "--seqlen", "32",
         "--max-windows", "2", "-q", "--seed", "0"]
IDS = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
VISION = {"llava": ("model.vision_tower", "model.multi_modal_projector"), "qwen2_vl": ("model.visual",)}
# the names transformers' save_pretrained writes (published checkpoints), which compressed-tensors exports use
SAVED_BLOCK = {"llava": "language_model.model.layers.0.self_attn.q_proj", "qwen2_vl": "model.layers.0.self_attn.q_proj"}


def _vlm_dir(tiny_model_dir, family):
    """A tiny VLM folder with processor files beside the tokenizer (written by hand: transformers'
    image processors need torchvision, which has no build for this torch)."""
    src = tiny_model_dir(family)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                              "size": {"shortest_edge": 32}}))
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return src


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_trained_vlm_keeps_vision_in_full_precision_and_exports_load_in_transformers(
        family, cli, tiny_model_dir, tmp_path, text_file):
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    src = _vlm_dir(tiny_model_dir, family)
    out = tmp_path / "q"
    code, _, err = cli("quantize", "--model", str(src), "--method", "block-ap+e2e-qp", "--scheme", "w4g32", *SMALL,
                       *E2E_ARGS, "--e2e-data", str(text_file), "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["share"] == 1.0 and torch.isfinite(torch.tensor(report["perplexity"]["ppl"]))
    model, _, meta = load_quantized(out)
    fp, _ = load_model(src)
    for part in VISION[family]:  # vision tower and projector untouched, nothing in them quantized
        assert not any(isinstance(m, QuantLinear) for m in model.get_submodule(part).modules())
        for (name, p), (_, q) in zip(model.get_submodule(part).named_parameters(),
                                     fp.get_submodule(part).named_parameters()):
            assert torch.equal(p, q), name
    assert all(n.startswith("model.language_model.layers.") for n in meta["quantized_modules"])
    assert len(meta["quantized_modules"]) == 14
    want = _logits(model)
    for name in ("preprocessor_config.json", "chat_template.jinja"):  # the processor travels with the model
        assert (out / name).read_bytes() == (src / name).read_bytes()

    export_checkpoint(out, "compressed-tensors", tmp_path / "ct", progress=False)
    with open(tmp_path / "ct" / "config.json") as f:
        ignore = json.load(f)["quantization_config"]["ignore"]
    assert all(any(part.rpartition(".")[2] in i for i in ignore) for part in VISION[family]), ignore
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f"{SAVED_BLOCK[family]}.weight_packed" in set(f.keys())
    ct = AutoModelForImageTextToText.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(_logits(ct), want, atol=1e-3, rtol=0)
    assert [n for n in PROCESSOR_FILES if (tmp_path / "ct" / n).exists()] == ["preprocessor_config.json",
                                                                             "chat_template.jinja"]
    pytest.importorskip("optimum")
    export_checkpoint(out, "gptq", tmp_path / "gptq", progress=False)
    gptq = AutoModelForImageTextToText.from_pretrained(tmp_path / "gptq", dtype=torch.float16)
    torch.testing.assert_close(_logits(gptq), want, atol=2e-2, rtol=0)  # fp16 kernel against eqat's float32


def test_lr_qat_and_smoothquant_run_on_llava(cli, tiny_model_dir, tmp_path, text_file):
    src = _vlm_dir(tiny_model_dir, "llava")
    runs = {"lr-qat": ["--scheme", "w4g16", *E2E_ARGS, "--e2e-data", str(text_file), "--lr-qat-rank", "4"],
            "smoothquant": ["--scheme", "w8g16a8"]}
    for method, flags in runs.items():
        code, _, err = cli("quantize", "--model", str(src), "--method", method, *SMALL, *flags,
                           "--out", str(tmp_path / method))
        assert code == 0, f"{method}: {err}"
        assert torch.isfinite(_logits(load_quantized(tmp_path / method)[0])).all()


def test_vlm_whose_language_model_is_elsewhere_is_refused(cli, tiny_model_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from eqat.models.families import registered_families

    src = _vlm_dir(tiny_model_dir, "llava")
    families = registered_families()
    monkeypatch.setitem(families, "llava", replace(families["llava"], blocks="model.text_model.layers"))
    code, _, err = cli("quantize", "--model", str(src), "--method", "rtn", "--scheme", "w4g16", "--no-eval",
                       "--out", str(tmp_path / "q"))
    assert code == 2 and "language model" in err and "model.text_model.layers" in err, err
    assert not (tmp_path / "q").exists()
