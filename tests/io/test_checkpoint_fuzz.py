"""Fuzzing the checkpoint readers (hypothesis, bounded budget): whatever is done to an eqat
checkpoint's files, `load_quantized` (and the export reader) either loads it or raises
EqatInputError naming the problem: never another exception. EQAT_FUZZ_EXAMPLES sets the
budget per property (40 in CI)."""

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_model
from eqat.io.checkpoint import load_quantized, save_quantized
from eqat.errors import EqatInputError
from eqat.core.scheme import QuantScheme
from eqat.methods.rtn import quantize_rtn

FUZZ = settings(max_examples=int(os.environ.get("EQAT_FUZZ_EXAMPLES", "40")),  # CI budget; raise it to dig deeper
                deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
FIELDS = ["format", "format_version", "scheme", "scheme.bits", "scheme.group_size", "scheme.symmetric", "scheme.version",
          "storage_dtype", "quantized_modules", "quantized_modules.*", "quantized_modules.*.bias", "provenance"]
FILES = ["eqat_config.json", "config.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_tokenizer):
    model = tiny_model("llama", vocab=len(tiny_tokenizer), layers=1)
    quantize_rtn(model, QuantScheme(4, 32))
    return save_quantized(model, tiny_tokenizer, tmp_path_factory.mktemp("fuzz") / "ck")


def _copy(src, tmp_path, n=[0]):
    n[0] += 1
    dst = tmp_path / f"case{n[0]}"
    shutil.copytree(src, dst)
    return dst


def _loads_or_says_why(path):
    try:
        model, _, _ = load_quantized(path)
    except EqatInputError as e:
        assert str(path) in str(e) or "scheme" in str(e) or "bits" in str(e) or "group" in str(e), str(e)
        return "refused"
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    return "loaded"


def test_pristine_checkpoint_loads(pristine):
    assert _loads_or_says_why(pristine) == "loaded"


@FUZZ
@given(field=st.sampled_from(FIELDS), value=JSON, delete=st.booleans())
def test_mutated_eqat_config(pristine, tmp_path, field, value, delete):
    path = _copy(pristine, tmp_path)
    meta = json.loads((path / "eqat_config.json").read_text())
    node, *rest = field.split(".")
    target, key = meta, node
    for part in rest:
        target = target[key]
        key = next(iter(target)) if part == "*" else part
    if delete:
        target.pop(key, None)
    else:
        target[key] = value
    (path / "eqat_config.json").write_text(json.dumps(meta))
    _loads_or_says_why(path)


@FUZZ
@given(name=st.sampled_from(FILES), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
       truncate=st.booleans())
def test_truncated_or_corrupted_files(pristine, tmp_path, name, cut, flips, truncate):
    path = _copy(pristine, tmp_path)
    data = bytearray((path / name).read_bytes())
    if truncate:
        data = data[: int(cut * len(data))]
    for where, xor in flips:
        if data:
            data[int(where * (len(data) - 1))] ^= xor
    (path / name).write_bytes(bytes(data))
    _loads_or_says_why(path)


@pytest.mark.parametrize("name", ["eqat_config.json", "config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(pristine, tmp_path, name):
    path = _copy(pristine, tmp_path)
    (path / name).unlink()
    if name == "tokenizer.json":
        (path / "tokenizer_config.json").unlink()
    with pytest.raises(EqatInputError) as e:
        load_quantized(path)
    assert name.split(".")[0] in str(e.value) or "tokenizer" in str(e.value) or "checkpoint" in str(e.value)
