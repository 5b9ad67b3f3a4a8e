"""Text sources -> token ids: evaluation streams and seeded calibration windows.

Sources (`--calib`, `--eval-data`):
    wikitext2       WikiText-2 raw test split, carried in eqat/data/corpora (test split only)
    c4              the first 1,000 documents of C4 en train, carried in eqat/data/corpora
    wikitext2-hub   WikiText-2 raw (any split) through `datasets`, when the Hub is reachable
    c4-hub          C4 en through `datasets` (streamed), when the Hub is reachable
    redpajama       RedPajama-1T-Sample through `datasets`, when the Hub is reachable
    PATH.txt        a local text file (the whole file is one document)
    PATH.jsonl      a local JSON-lines file, one object per line with a "text" field
                    (or "prompt" and "response", joined)
Licences of the carried corpora: eqat/data/corpora/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eqat.errors import EqatInputError

CORPORA = Path(__file__).parent / "corpora"
CARRIED = {"wikitext2": CORPORA / "wiki.test.raw", "c4": CORPORA / "c4_sample.jsonl"}
HUB = {
    "wikitext2-hub": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "c4-hub": ("allenai/c4", "en", "text"),
    "redpajama": ("togethercomputer/RedPajama-Data-1T-Sample", None, "text"),
}
SOURCES = (*CARRIED, *HUB)
HUB_DOC_LIMIT = 20_000


def _read_wikitext_raw(path: Path) -> list[str]:
    # The carried copy keeps only the non-empty rows of the HF test split (CRLF line ends);
    # each row gets back its trailing "\n", as in the HF dataset.
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line + "\n" for line in text.split("\n") if line.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EqatInputError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be one JSON object.") from e
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append(obj["text"])
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                docs.append(obj["prompt"] + obj["response"])
            else:
                raise EqatInputError(f"{path}:{i} has no string field 'text' (nor 'prompt' and 'response').")
    return docs


def _load_hub(source: str, split: str) -> list[str]:
    name, config, field = HUB[source]
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for row in ds:
            docs.append(row[field])
            if len(docs) >= HUB_DOC_LIMIT:
                break
        return docs
    except Exception as e:  # datasets raises many types when offline
        raise EqatInputError(
            f"cannot load '{source}' ({name}) through datasets: {type(e).__name__}: {str(e)[:200]}. "
            f"Without the Hugging Face Hub use the carried corpora ({', '.join(CARRIED)}) or a local .txt/.jsonl file."
        ) from e


def load_documents(source: str, split: str = "train") -> list[str]:
    """The documents (rows) of a source, in their original order."""
    if source == "wikitext2":
        if split != "test":
            raise EqatInputError("only the WikiText-2 *test* split is carried with eqat, and it must not be used to "
                                 "calibrate or train. Calibrate on 'c4' (or 'wikitext2-hub' when the Hub is reachable).")
        return _read_wikitext_raw(CARRIED["wikitext2"])
    if source == "c4":
        return _read_jsonl(CARRIED["c4"])
    if source in HUB:
        return _load_hub(source, split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise EqatInputError(f"data source '{source}' is neither a known corpus ({', '.join(SOURCES)}) nor a file.")
    try:
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path)
        elif path.suffix in (".txt", ".raw", ".md"):
            docs = [path.read_text(encoding="utf-8")]
        else:
            raise EqatInputError(f"{path}: unsupported file type '{path.suffix}'; use .txt or .jsonl.")
    except (OSError, UnicodeDecodeError) as e:
        raise EqatInputError(f"cannot read data file {path}: {e}. Check that it exists and is UTF-8 text.") from e
    if not any(d.strip() for d in docs):
        raise EqatInputError(f"data file {path} holds no text.")
    return docs


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    # Long texts exceed model_max_length; we window them ourselves, so silence that warning.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_token_ids(tokenizer, source: str = "wikitext2", split: str = "test") -> torch.Tensor:
    """The standard perplexity stream: the split's rows joined with "\\n\\n", tokenized. LongTensor [T]."""
    return _tokenize(tokenizer, "\n\n".join(load_documents(source, split)))


def calibration_windows(
    tokenizer, source: str = "c4", n_samples: int = 128, seqlen: int = 512, seed: int = 0, split: str = "train",
    flags: tuple[str, str] = ("--nsamples (+ --val-samples)", "--calib-seqlen"),
) -> torch.Tensor:
    """`n_samples` distinct, non-overlapping windows of `seqlen` tokens, chosen by `seed`.
    `flags` name the CLI options of (n_samples, seqlen) in error messages.

    The documents are joined with "\\n\\n" into one stream, cut into consecutive windows, and
    a seeded random subset is taken. Returns LongTensor [n_samples, seqlen].
    """
    if n_samples < 1 or seqlen < 2:
        raise EqatInputError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}.")
    ids = _tokenize(tokenizer, "\n\n".join(load_documents(source, split)))
    n_windows = ids.numel() // seqlen
    if n_windows < n_samples:
        raise EqatInputError(
            f"'{source}' has {ids.numel()} tokens: only {n_windows} windows of {seqlen}, fewer than the "
            f"{n_samples} asked for. Lower {flags[0]} or {flags[1]}, or use a larger corpus."
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:n_samples]
    return ids[: n_windows * seqlen].view(n_windows, seqlen)[pick].clone()
