"""qat.convert: llama2.c models and vocabularies into transformers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qat.convert import permute_rope, read_header


def test_stories260k_greedy_matches_published_sample(stories_hf: Path, shared_data: Path) -> None:
    """Greedy decoding from BOS reproduces, token for token, the sample llama2.c's authors published."""
    expected = (shared_data / "stories260K" / "expected_greedy.txt").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(stories_hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_hf)
    expected_ids = tokenizer(expected)["input_ids"]  # BOS + the sample's tokens
    assert expected_ids[0] == tokenizer.bos_token_id == 1
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=len(expected_ids) - 1, do_sample=False)
    assert out[0].tolist() == expected_ids
    assert tokenizer.decode(out[0], skip_special_tokens=True) == expected


def test_generation_stops_at_the_end_of_the_story_like_llama2c(stories_hf: Path) -> None:
    """llama2.c models end a text with BOS: generate stops there (EOS alone would run on into a new story)."""
    config = json.loads((stories_hf / "config.json").read_text())
    generation = json.loads((stories_hf / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(stories_hf)
    assert config["eos_token_id"] == tokenizer.eos_token_id == 2 and tokenizer.eos_token == "</s>"
    assert generation["eos_token_id"] == [2, 1] and generation["bos_token_id"] == 1
    model = AutoModelForCausalLM.from_pretrained(stories_hf).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=500, do_sample=False)[0].tolist()
    assert out[-1] == 1 and 1 not in out[1:-1] and len(out) < 500  # one whole story, ended by BOS


def test_tokenizer_round_trips_unicode_through_byte_fallback(stories_hf: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stories_hf)
    text = "Lily saw a café — and said “wow” 🙂."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_permute_rope_moves_interleaved_pairs_to_halves() -> None:
    w = torch.arange(8.0).unsqueeze(1)  # one head of 8 rows: pairs (0,1) (2,3) (4,5) (6,7)
    assert permute_rope(w, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_bad_headers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too short"):
        read_header(b"\x00" * 8)
    with pytest.raises(ValueError, match="version-1"):
        read_header(struct.pack("<I", 0x616B3432) + b"\x00" * 40)
    with pytest.raises(ValueError, match="implausible"):
        read_header(struct.pack("<7i", 64, 172, 0, 8, 4, 512, 512))
