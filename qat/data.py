"""Plain text -> token sequences, with the training and held-out parts of a file kept apart.

A text file is cut once, at a paragraph break, into a training part (the head) and a held-out
part (the last ``heldout_fraction``): training windows come only from the head, and evaluation
with ``--data-part heldout`` reads only the tail, so the two never overlap. Calibration and
validation windows are disjoint, non-overlapping ``seq_len``-token slices of the training part.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

DATA_PARTS = ("all", "train", "heldout")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """``(train, heldout)``: the held-out tail starts at the first paragraph break after the cut point."""
    if heldout_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - heldout_fraction))
    brk = text.find("\n\n", cut)
    cut = brk + 2 if brk >= 0 else cut
    return text[:cut], text[cut:]


def text_part(text: str, part: str, heldout_fraction: float) -> str:
    """One part of a text: ``all``, ``train`` or ``heldout``."""
    if part not in DATA_PARTS:
        raise ValueError(f"data part {part!r} is unknown; choose one of {', '.join(DATA_PARTS)}")
    if part == "all":
        return text
    train, heldout = split_text(text, heldout_fraction)
    chosen = train if part == "train" else heldout
    if not chosen.strip():
        raise ValueError(f"the {part} part of the data is empty (heldout_fraction={heldout_fraction})")
    return chosen


def token_stream(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The text as one 1-D id stream: BOS (if the tokenizer has one) followed by the text's tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, n_train: int, n_val: int, seq_len: int, seed: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [n_train, seq_len], val [n_val, seq_len])``: disjoint random non-overlapping windows of ``ids``."""
    n_windows = ids.numel() // seq_len
    need = n_train + n_val
    if n_windows < need:
        raise ValueError(f"too little data: {ids.numel()} tokens make {n_windows} windows of {seq_len}, but "
                         f"{n_train} training + {n_val} validation sequences are needed; give more text "
                         "or lower --n-train / --n-val / --seq-len")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:need]
    return windows[order[n_val:]].clone(), windows[order[:n_val]].clone()
