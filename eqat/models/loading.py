"""Load a Hugging Face causal LM (or a vision-language model eqat has a family spec for) from a local
folder, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from eqat.errors import EqatInputError

def check_model_dir(path: str | Path) -> Path:
    """Raise `EqatInputError` unless `path` is a folder holding a causal-LM `config.json`."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EqatInputError(f"model folder not found: {p}. Pass --model with a local Hugging Face model folder, "
                             "or leave it out to use the embedded default (SmolLM2-135M-Instruct).")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise EqatInputError(f"{p} has no config.json, so it is not a Hugging Face model folder. "
                             "Point --model at the folder that holds config.json and the weights.")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        raise EqatInputError(f"cannot read {cfg}: {e}. Restore the file from the original model.") from e
    if not isinstance(config, dict):
        raise EqatInputError(f"{cfg} holds a JSON {type(config).__name__}, not a model config. Restore the file from the original model.")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise EqatInputError(f"{cfg}: 'architectures' must be a list of class names, not {archs!r:.80}.")
    if archs and not any(a.endswith("ForCausalLM") for a in archs) and not _is_vlm(config):
        raise EqatInputError(f"{p} holds a {', '.join(archs)}, not a causal LM; eqat quantizes decoder-only "
                             "causal language models (…ForCausalLM) and the language model of the vision-language "
                             f"families it has specs for ({', '.join(_vlm_types())}).")
    return p


def _vlm_types() -> list[str]:
    from eqat.models.families import registered_families

    return sorted(t for t, s in registered_families().items() if s.auto_class == "image-text-to-text")


def _is_vlm(config: dict) -> bool:
    return config.get("model_type") in _vlm_types()


# what a vision-language model's processor reads beside the tokenizer (AutoProcessor.save_pretrained)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    """Copy the processor files of `src` that exist into `dst`, so that a checkpoint or export loads
    with AutoProcessor as its base model does; returns their names."""
    import shutil

    done = [name for name in PROCESSOR_FILES if (src / name).is_file()]
    for name in done:
        shutil.copyfile(src / name, dst / name)
    return done


def load_tokenizer(p: Path) -> object:
    """The tokenizer of folder `p`, or EqatInputError naming the folder and the files it needs."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p)
    # transformers raises many types here, and the tokenizers library a bare Exception for a damaged
    # tokenizer.json ("missing field `single_word`", found by tests/test_checkpoint_fuzz.py)
    except Exception as e:
        raise EqatInputError(f"cannot load the tokenizer from {p}: {str(e)[:200]}. The folder needs intact tokenizer files "
                             "(tokenizer.json or tokenizer.model with tokenizer_config.json): copy the base model's.") from e


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a local folder; the model is in eval mode on `device`."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from eqat.models.arch import model_class

    p = check_model_dir(path)
    tokenizer = load_tokenizer(p)
    try:
        model = model_class(AutoConfig.from_pretrained(p)).from_pretrained(p, dtype=dtype)
    except SafetensorError as e:
        raise EqatInputError(f"cannot read the weights in {p}: {e}. A .safetensors file is truncated or damaged; "
                             "copy the model again.") from e
    except (OSError, ValueError, KeyError) as e:
        raise EqatInputError(f"cannot load a causal LM from {p}: {str(e)[:300]}") from e
    from eqat.models.arch import split_experts

    split_experts(model)  # MoE: per-expert Linears, which every method quantizes
    return model.to(device).eval(), tokenizer


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
