"""Load an int-quantized W8A8 compressed-tensors folder (llm-compressor's) as an eqat model: each
quantized linear becomes a QuantLinear at w8g-1syma8sym (codes = int8 weight + 128, zero-point 128,
the folder's per-channel scales), everything else loads as it is, so eqat's forward evaluates it
with the same per-token activation quantization as its own W8A8 rows (benchmarks/wa_quality.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from eqat.core.packing import pack_int32
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.models.arch import replace_module

W8A8 = QuantScheme.parse("w8g-1syma8sym")


def load_int8_w8a8(base_model: Path, folder: Path) -> torch.nn.Module:
    """base_model: the unquantized model (its config); folder: the llm-compressor output."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc.get("format") != "int-quantized":
        raise SystemExit(f"{folder}: format {qc.get('format')!r}, not int-quantized W8A8")
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model), dtype=torch.float32)
    names = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    for name in names:
        lin = model.get_submodule(name)
        q = QuantLinear(lin.in_features, lin.out_features, W8A8, bias=lin.bias is not None, dtype=torch.float32)
        codes = (state.pop(f"{name}.weight").to(torch.int16) + 128).to(torch.uint8)
        q.qweight.copy_(pack_int32(codes, 8))
        q.scales.data.copy_(state.pop(f"{name}.weight_scale").float().reshape(-1, 1))
        q.zeros.data.fill_(128)
        if lin.bias is not None:
            q.bias.data.copy_(state.pop(f"{name}.bias"))
        state.pop(f"{name}.weight_zero_point", None)
        replace_module(model, name, q)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in names  # filled above
               and not m.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()
