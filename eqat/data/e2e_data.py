"""Training examples for E2E-QP: causal-LM windows or instruction pairs, as tensors.

    text sources (c4, a .txt, a .jsonl with "text", ...)  -> windows of `seqlen` tokens,
        every token predicted (labels = input_ids)
    a .jsonl with "prompt" and "response" fields          -> one example per line,
        prompt + response + EOS, loss on the response tokens only (labels = -100 elsewhere),
        right-padded to `seqlen`; `prompt_format="chat"` wraps the prompt in the tokenizer's
        chat template (a user turn plus the generation prompt) first

Examples are drawn by `seed` and split into train and held-out rows, never shared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from eqat.data.sources import calibration_windows
from eqat.errors import EqatInputError

IGNORE = -100


@dataclass
class E2EData:
    """input_ids, labels (IGNORE where no loss), attention_mask: LongTensor [n, T] each.

    For distillation a method may attach the teacher's k largest next-token logits of every
    position: `teacher_logits` float32 [n, T-1, k] and their token ids `teacher_ids` int32
    [n, T-1, k]; position t predicts token t+1, as the shifted labels do.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx) -> "E2EData":
        teacher = (None, None) if self.teacher_logits is None else (self.teacher_logits[idx], self.teacher_ids[idx])
        return E2EData(self.input_ids[idx], self.labels[idx], self.attention_mask[idx], *teacher)

    def predicted_tokens(self) -> int:
        """Tokens that carry loss (labels shifted by one, as the causal-LM loss counts them)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def is_instruction_file(source: str) -> bool:
    """True for a .jsonl whose first object has string 'prompt' and 'response' fields (and no 'text')."""
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False  # load_documents reports the bad line
                return isinstance(obj, dict) and "text" not in obj and isinstance(obj.get("prompt"), str)
    return False


def _instruction_rows(tokenizer, path: Path, seqlen: int, prompt_format: str) -> E2EData:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise EqatInputError("the tokenizer has no EOS token, needed to end each response; use a text corpus instead.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, labels, masks = [], [], []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str)):
                raise EqatInputError(f"{path}:{i} lacks string fields 'prompt' and 'response' (instruction data).")
            prompt = obj["prompt"]
            if prompt_format == "chat":
                if not getattr(tokenizer, "chat_template", None):
                    raise EqatInputError("--prompt-format chat needs a tokenizer with a chat template; use plain.")
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            p = tokenizer(prompt, add_special_tokens=prompt_format != "chat")["input_ids"]
            r = tokenizer(obj["response"], add_special_tokens=False)["input_ids"] + [eos]
            row = (p + r)[:seqlen]
            lab = ([IGNORE] * len(p) + r)[:seqlen]
            if all(t == IGNORE for t in lab[1:]):
                continue  # the prompt fills the window: nothing to learn from this line
            fill = seqlen - len(row)
            ids.append(row + [pad] * fill)
            labels.append(lab + [IGNORE] * fill)
            masks.append([1] * len(row) + [0] * fill)
    if not ids:
        raise EqatInputError(f"{path} has no example whose response fits in {seqlen} tokens; raise --e2e-seqlen.")
    return E2EData(torch.tensor(ids), torch.tensor(labels), torch.tensor(masks))


def e2e_examples(tokenizer, source: str, n_train: int, n_val: int, seqlen: int, seed: int,
                 prompt_format: str = "plain") -> tuple[E2EData, E2EData]:
    """(train, held-out) examples from `source`, drawn by `seed`."""
    if prompt_format not in ("plain", "chat"):
        raise EqatInputError(f"prompt format '{prompt_format}' is not one of plain, chat.")
    if is_instruction_file(source):
        data = _instruction_rows(tokenizer, Path(source).expanduser(), seqlen, prompt_format)
        if len(data) < n_train + n_val:
            raise EqatInputError(f"{source} has {len(data)} usable examples, fewer than {n_train} + {n_val} held out; "
                                 "lower --e2e-nsamples / --e2e-val-samples.")
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: n_train + n_val]
        data = data.rows(pick)
    else:
        ids = calibration_windows(tokenizer, source, n_train + n_val, seqlen, seed,
                                  flags=("--e2e-nsamples (+ --e2e-val-samples)", "--e2e-seqlen"))
        data = E2EData(ids, ids.clone(), torch.ones_like(ids))
    return data.rows(slice(0, n_train)), data.rows(slice(n_train, n_train + n_val))
