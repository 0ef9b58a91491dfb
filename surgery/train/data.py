"""Training data for ``surgery train``: a text file or JSONL, tokenised into fixed-length blocks.

A ``.jsonl`` file holds one JSON object per line with a ``"text"`` string; any other file is one
UTF-8 text. Texts are tokenised, joined (each followed by the end-of-sequence token where the
tokenizer has one), and cut into blocks of ``seq_len`` tokens (the remainder is dropped). The last
tenth of the blocks (at least one) is held out for the evaluation loss; the rest is trained on, with
labels equal to the inputs (the causal-LM loss; the model shifts them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgery.errors import SurgeryError


def read_texts(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() != ".jsonl":
        return [raw]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurgeryError(f"{path}:{number}: not JSON: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SurgeryError(f"{path}:{number}: each line must be an object with a \"text\" string")
        texts.append(row["text"])
    return texts


def blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """[n, seq_len] token ids of the joined texts."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + eos
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def datasets(tokenizer, path: Path, seq_len: int) -> tuple[Blocks, Blocks]:
    """(train, held-out) blocks of `path` (see the module docstring)."""
    ids = blocks(tokenizer, read_texts(path), seq_len)
    if len(ids) < 2:
        raise SurgeryError(f"{path} gives {len(ids)} block(s) of --seq-len {seq_len} tokens; training needs at "
                           "least two (one to train on, one held out): give more text or a shorter --seq-len")
    held = max(1, len(ids) // 10)
    return Blocks(ids[:-held]), Blocks(ids[-held:])
