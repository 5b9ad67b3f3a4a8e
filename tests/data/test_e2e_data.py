import json

import pytest
import torch

from eqat.errors import EqatInputError
from eqat.data.e2e_data import IGNORE, e2e_examples, is_instruction_file


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_text_source_gives_disjoint_train_and_heldout_windows(tiny_tokenizer):
    train, val = e2e_examples(tiny_tokenizer, "c4", 6, 2, 32, seed=3)
    assert train.input_ids.shape == (6, 32) and val.input_ids.shape == (2, 32)
    assert torch.equal(train.labels, train.input_ids) and bool(train.attention_mask.all())
    rows = {tuple(r.tolist()) for r in train.input_ids}
    assert not rows & {tuple(r.tolist()) for r in val.input_ids}
    again, _ = e2e_examples(tiny_tokenizer, "c4", 6, 2, 32, seed=3)
    assert torch.equal(again.input_ids, train.input_ids)


def test_instruction_loss_only_on_response(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" It is {2 * i}."} for i in range(6)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert is_instruction_file(path)
    train, val = e2e_examples(tiny_tokenizer, path, 4, 2, 48, seed=0)
    eos = tiny_tokenizer.eos_token_id
    for ids, lab, mask in zip(train.input_ids, train.labels, train.attention_mask):
        n = int(mask.sum())
        text = tiny_tokenizer.decode(ids[:n])
        row = next(r for r in rows if text.startswith(r["prompt"]))
        p_len = len(tiny_tokenizer(row["prompt"])["input_ids"])
        assert (lab[:p_len] == IGNORE).all() and (lab[n:] == IGNORE).all()
        assert tiny_tokenizer.decode(lab[p_len:n]) == row["response"] + tiny_tokenizer.decode([eos])
        assert (mask[n:] == 0).all()
    assert train.predicted_tokens() == int((train.labels[:, 1:] != IGNORE).sum())


def test_instruction_prompt_longer_than_window_is_skipped(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "word " * 200, "response": "yes"}] + [{"prompt": "hi", "response": " there"}] * 3
    train, val = e2e_examples(tiny_tokenizer, write_jsonl(tmp_path / "s.jsonl", rows), 2, 1, 16, seed=0)
    assert len(train) == 2 and len(val) == 1


def test_too_few_instruction_examples(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    with pytest.raises(EqatInputError, match="3 usable examples"):
        e2e_examples(tiny_tokenizer, path, 4, 1, 16, seed=0)


def test_chat_format_needs_a_template(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    with pytest.raises(EqatInputError, match="chat template"):
        e2e_examples(tiny_tokenizer, path, 2, 1, 16, seed=0, prompt_format="chat")


def test_text_jsonl_is_not_instruction_data(tmp_path):
    assert not is_instruction_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]))
    assert not is_instruction_file(str(tmp_path / "missing.jsonl"))
