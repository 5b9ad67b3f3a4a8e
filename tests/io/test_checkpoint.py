import json

import pytest
import torch

from tests.conftest import FAMILIES, tiny_model
from eqat.io.checkpoint import EQAT_CONFIG, WEIGHTS, atomic_dir, load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", [QuantScheme(3, 32), QuantScheme(4, -1, symmetric=True)])
def test_save_load_is_exact(tmp_path, tiny_tokenizer, family, scheme):
    model = tiny_model(family, vocab=len(tiny_tokenizer), tied=family != "mistral")
    quantize_rtn(model, scheme)
    save_quantized(model, tiny_tokenizer, tmp_path / "ck", provenance={"method": "rtn"})
    loaded, tok, meta = load_quantized(tmp_path / "ck")
    assert meta["scheme"] == scheme.to_dict() and meta["provenance"]["method"] == "rtn"
    assert len(meta["quantized_modules"]) == 14
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), QuantLinear)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_refuses_to_overwrite_without_force(tmp_path, tiny_tokenizer):
    model = tiny_model(vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    out = tmp_path / "ck"
    save_quantized(model, tiny_tokenizer, out)
    with pytest.raises(EqatInputError, match="--force"):
        save_quantized(model, tiny_tokenizer, out)
    save_quantized(model, tiny_tokenizer, out, force=True)


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path, tiny_tokenizer):
    model = tiny_model(vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(2, 32))
    return save_quantized(model, tiny_tokenizer, tmp_path / "ck")


def test_newer_format_version_refused(saved):
    meta = json.loads((saved / EQAT_CONFIG).read_text())
    meta["format_version"] = 99
    (saved / EQAT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(EqatInputError, match="upgrade eqat"):
        load_quantized(saved)


def test_truncated_weights_named(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(EqatInputError, match="model.safetensors"):
        load_quantized(saved)


def test_module_list_not_matching_config(saved):
    meta = json.loads((saved / EQAT_CONFIG).read_text())
    meta["quantized_modules"]["model.layers.7.mlp.up_proj"] = {"bias": False}
    (saved / EQAT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(EqatInputError, match="layers.7"):
        load_quantized(saved)


def test_save_requires_quantized_model(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tiny_model(vocab=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "ck")


def test_a_full_disk_is_refused_before_writing(tmp_path, tiny_tokenizer, monkeypatch):
    """Checkpoint, export and disk activation streams check free space first (5% margin)."""
    import shutil
    from collections import namedtuple

    import eqat.io.checkpoint as checkpoint
    from eqat.exporters import export_checkpoint
    from eqat.engine.streams import ActivationStream

    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, QuantScheme(4, 32))
    src = checkpoint.save_quantized(model, tiny_tokenizer, tmp_path / "ck")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EqatInputError, match=r"not enough disk space for the checkpoint in .* need about [\d.]+ MiB, 1000 B free"):
        checkpoint.save_quantized(model, tiny_tokenizer, tmp_path / "ck2")
    with pytest.raises(EqatInputError, match="not enough disk space for the gptq export"):
        export_checkpoint(src, "gptq", tmp_path / "g")
    with pytest.raises(EqatInputError, match="activation stream"):
        ActivationStream.create(tmp_path / "s.bin", (4, 32, 64), torch.float32, "disk")
    assert not (tmp_path / "ck2").exists() and not (tmp_path / "g").exists() and not (tmp_path / "s.bin").exists()


def test_damaged_tokenizer_named_by_load_and_export(saved, tmp_path):
    """A renamed key in tokenizer.json makes the tokenizers library raise a bare Exception ("missing
    field `single_word`", found by the fuzz test): loading and exporting say which folder and what to do."""
    from eqat.exporters import export_checkpoint

    tok = saved / "tokenizer.json"
    assert '"single_word"' in tok.read_text()
    tok.write_text(tok.read_text().replace('"single_word"', '"single_wprd"'))
    with pytest.raises(EqatInputError, match="cannot load the tokenizer from .*ck.*intact tokenizer files"):
        load_quantized(saved)
    with pytest.raises(EqatInputError, match="cannot load the tokenizer"):
        export_checkpoint(saved, "gptq", tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_mixed_precision_round_trip_and_uniform_stays_version_1(tmp_path, tiny_tokenizer):
    from eqat.core.layer_schemes import LayerSchemes

    model = tiny_model(vocab=len(tiny_tokenizer))
    quantize_rtn(model, LayerSchemes(QuantScheme(2, 32), {"model.layers.1.mlp.down_proj": QuantScheme(8, 32, True)}))
    save_quantized(model, tiny_tokenizer, tmp_path / "mixed")
    loaded, _, meta = load_quantized(tmp_path / "mixed")
    assert meta["format_version"] == 2 and meta["bits"]["by_scheme"] == {
        "w2g32": {"layers": 13, "weights": 2 * 36864 - 8192}, "w8g32sym": {"layers": 1, "weights": 8192}}
    assert loaded.get_submodule("model.layers.1.mlp.down_proj").scheme == QuantScheme(8, 32, True)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    uniform = tiny_model(vocab=len(tiny_tokenizer))
    quantize_rtn(uniform, QuantScheme(4, 32))
    save_quantized(uniform, tiny_tokenizer, tmp_path / "uniform")
    meta = json.loads((tmp_path / "uniform" / EQAT_CONFIG).read_text())
    assert meta["format_version"] == 1 and not any("scheme" in v for v in meta["quantized_modules"].values())


def test_a_checkpoint_from_before_mixed_precision_loads(saved):
    meta = json.loads((saved / EQAT_CONFIG).read_text())
    del meta["bits"]  # what eqat wrote before per-module schemes
    (saved / EQAT_CONFIG).write_text(json.dumps(meta))
    model, _, got = load_quantized(saved)
    assert got["format_version"] == 1 and model.get_submodule("model.layers.0.mlp.up_proj").scheme == QuantScheme(2, 32)


@pytest.mark.parametrize("bad", [{"bits": 5, "group_size": 32}, "w8g32", {"group_size": 32}])
def test_damaged_module_scheme_named(saved, bad):
    meta = json.loads((saved / EQAT_CONFIG).read_text())
    meta["format_version"] = 2
    meta["quantized_modules"]["model.layers.0.mlp.up_proj"]["scheme"] = bad
    (saved / EQAT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(EqatInputError, match="up_proj|bits=5"):
        load_quantized(saved)
