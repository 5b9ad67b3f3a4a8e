"""Shared fixtures: tiny random causal LMs of each supported family, with a tiny tokenizer
trained in code, so unit tests need no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # Llama-like: the family spec eqat.models.families.llama
# other family specs; Gemma 2/3 tiny models alternate sliding-window (8 tokens) and global attention
OTHER_FAMILIES = ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


def tiny_config(family: str = "llama", hidden: int = 64, layers: int = 2, vocab: int = 320, tied: bool = True,
                **overrides):
    """A tiny config of `family`; `overrides` replace any of its fields last."""
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    if family in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = hidden // 4
    if family in ("gemma2", "gemma3_text"):
        kw.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                  + ["sliding_attention"] * (layers % 2))
    if family == "gemma2":
        kw.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if family == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":  # 4 experts of width 32, 2 per token
        kw.update(intermediate_size=hidden // 2, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmoe":
        kw.update(pad_token_id=1, bos_token_id=None, eos_token_id=0)
    if family in ("qwen3_moe", "olmoe"):
        kw.update(num_experts=4, num_experts_per_tok=2, head_dim=hidden // 4)
        kw.update(moe_intermediate_size=hidden // 2, decoder_sparse_step=1, mlp_only_layers=[layers - 1]) \
            if family == "qwen3_moe" else kw.update(intermediate_size=hidden // 2)
    kw = {**kw, **overrides}
    if family in VLM_FAMILIES:  # the language model as above, a one-layer vision tower
        return _tiny_vlm_config(family, kw)
    return AutoConfig.for_model(family, **kw)


VLM_FAMILIES = ("llava", "qwen2_vl")  # vision-language: a tiny language model and vision tower


def _tiny_vlm_config(family: str, text: dict):
    from transformers import AutoConfig, CLIPVisionConfig

    tied = text.pop("tie_word_embeddings")
    image = text["vocab_size"]  # image (video, vision start) tokens after the text vocabulary: text never holds them
    text["vocab_size"] += 3
    if family == "llava":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        return AutoConfig.for_model("llava", text_config=AutoConfig.for_model("llama", **text), vision_config=vision,
                                    image_token_index=image, tie_word_embeddings=tied)
    head = text["hidden_size"] // text["num_attention_heads"]  # M-RoPE sections cover half the head
    text.update(rope_scaling={"type": "mrope", "mrope_section": [head // 4, head // 8, head // 8]},
                bos_token_id=None, eos_token_id=0, tie_word_embeddings=tied)
    vision = dict(depth=1, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    return AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision, image_token_id=image,
                                video_token_id=image + 1, vision_start_token_id=image + 2,
                                tie_word_embeddings=tied)


MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")  # tiny models with fused 3-D experts (transformers 5)


def tiny_model(family: str = "llama", seed: int = 0, split: bool = True, **kw) -> torch.nn.Module:
    """A tiny random causal LM of `family`; MoE experts split into per-expert Linears as eqat loads
    them (eqat.models.experts) unless split=False."""
    from eqat.models.arch import model_class, split_experts

    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    model = model_class(config).from_config(config, dtype=torch.float32)
    if split:
        split_experts(model)
    if family == "qwen2":  # q/k/v biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.1)
    return model.eval()


def train_tiny_tokenizer():
    """A byte-level BPE tokenizer with a 320-token vocabulary, trained on WikiText-2 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eqat.data.sources import CARRIED

    text = CARRIED["wikitext2"].read_text(encoding="utf-8")[:200_000].splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_inputs(folder: Path) -> tuple[Path, Path, object]:
    """For scripts outside pytest (benchmarks/): `folder/tiny` (tiny Llama + tokenizer) and
    `folder/calib.txt` (the first 20,000 characters of WikiText-2). Returns (model dir, calib, tokenizer)."""
    from eqat.data.sources import CARRIED

    (folder / "calib.txt").write_text(CARRIED["wikitext2"].read_text(encoding="utf-8")[:20_000])
    tok = train_tiny_tokenizer()
    tiny_model("llama", vocab=len(tok)).save_pretrained(folder / "tiny")
    tok.save_pretrained(folder / "tiny")
    return folder / "tiny", folder / "calib.txt", tok


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny tokenizer (train_tiny_tokenizer), saved and reloaded as a user's would be."""
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer().save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """Factory: save a tiny model of `family` with the tiny tokenizer, return its folder."""

    def make(family: str = "llama", name: str | None = None, **kw) -> Path:
        path = tmp_path / (name or f"tiny-{family}")
        model = tiny_model(family, vocab=len(tiny_tokenizer), split=False, **kw)  # the layout transformers saves
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path

    return make


def blockwise_killed_after(block: int):
    """A stand-in for `BlockwiseEngine._save_block` that saves, then raises KeyboardInterrupt (a kill)
    once block `block` is saved; call it before patching."""
    from eqat.engine.blockwise import BlockwiseEngine

    original = BlockwiseEngine._save_block

    def killed(self, i):
        original(self, i)
        if i == block:
            raise KeyboardInterrupt

    return killed


def e2e_killed_at(step: int):
    """A stand-in for `EndToEndEngine._step_batches` that raises KeyboardInterrupt (a kill) when
    optimizer step `step` begins; call it before patching."""
    from eqat.engine.end2end import EndToEndEngine

    original = EndToEndEngine._step_batches

    def killed(self, s, n):
        if s == step:
            raise KeyboardInterrupt
        return original(self, s, n)

    return killed


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `eqat ARGS...` in process: (exit code, stdout, stderr with whitespace collapsed)."""
    import sys

    from eqat.cli import common, main

    for console in (common.out, common.err):  # wide, so that no assertion depends on where rich wraps
        monkeypatch.setattr(console, "_width", 240)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["eqat", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, " ".join(err.split())  # rich wraps long lines

    return run


@pytest.fixture
def restore_defused(monkeypatch):
    """GPTQModel loads an MoE model through Defuser, which replaces transformers' MoE block classes
    (and checkpoint renames) of that model type for the whole process; this puts them back after
    the test, so later tests build the fused layout transformers 5 ships."""
    import importlib

    pytest.importorskip("defuser")
    from defuser.model_registry import MODEL_CONFIG, PATCH
    from transformers import conversion_mapping, modeling_utils

    for model_type in MOE_FAMILIES:
        for original, _ in MODEL_CONFIG.get(model_type, {}).get(PATCH.REPLACE_MODULE, []):
            module, _, name = original.rpartition(".")
            module = importlib.import_module(module)
            monkeypatch.setattr(module, name, getattr(module, name))
    original = conversion_mapping.get_checkpoint_conversion_mapping
    monkeypatch.setattr(conversion_mapping, "get_checkpoint_conversion_mapping", original)
    monkeypatch.setattr(modeling_utils, "get_checkpoint_conversion_mapping", original, raising=False)
