import json

import pytest
import torch

from eqat.data.sources import calibration_windows, eval_token_ids, load_documents
from eqat.errors import EqatInputError


def test_wikitext_test_rows():
    rows = load_documents("wikitext2", "test")
    assert len(rows) == 2891
    assert rows[0] == " = Robert Boulter = \n" and all(r.endswith("\n") and "\r" not in r for r in rows)


def test_wikitext_train_split_not_carried():
    with pytest.raises(EqatInputError, match="test"):
        load_documents("wikitext2", "train")


def test_c4_sample():
    docs = load_documents("c4")
    assert len(docs) == 1000 and docs[0].startswith("Beginners BBQ Class")


def test_calibration_is_seeded_and_distinct(tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, "c4", n_samples=8, seqlen=64, seed=3)
    b = calibration_windows(tiny_tokenizer, "c4", n_samples=8, seqlen=64, seed=3)
    c = calibration_windows(tiny_tokenizer, "c4", n_samples=8, seqlen=64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8


def test_local_files(tmp_path, tiny_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world. " * 200)
    assert load_documents(str(txt)) == ["hello world. " * 200]
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"prompt": "Q: 1+1? ", "response": "A: 2"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert load_documents(str(jl)) == ["Q: 1+1? A: 2", "x"]
    ids = eval_token_ids(tiny_tokenizer, str(txt))
    assert ids.ndim == 1 and ids.numel() > 100


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"title": "x"}', "no string field")])
def test_bad_jsonl_names_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n' + content + "\n")
    with pytest.raises(EqatInputError, match=match) as e:
        load_documents(str(p))
    assert "bad.jsonl:2" in str(e.value)


def test_unreadable_and_unknown_sources(tmp_path):
    with pytest.raises(EqatInputError, match="neither a known corpus"):
        load_documents(str(tmp_path / "missing.txt"))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(EqatInputError, match="UTF-8"):
        load_documents(str(binary))
    other = tmp_path / "data.csv"
    other.write_text("a,b")
    with pytest.raises(EqatInputError, match="unsupported file type"):
        load_documents(str(other))
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(EqatInputError, match="no text"):
        load_documents(str(empty))


def test_too_few_windows(tmp_path, tiny_tokenizer):
    p = tmp_path / "short.txt"
    p.write_text("a short text")
    with pytest.raises(EqatInputError, match="fewer than"):
        calibration_windows(tiny_tokenizer, str(p), n_samples=4, seqlen=64)
