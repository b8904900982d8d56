"""serve.generate without HTTP: batched decoding equals one-at-a-time, sampling, detokenization and stops."""

from __future__ import annotations

import pytest
import torch

from kernels.qmodel import load_quantized
from serve.generate import Detokenizer, SamplingParams, sample_next, stream_batch

PROMPTS = ("Once upon a time", "The little dog", "Lily and Ben went to the park. They", "Tom")


@pytest.fixture(scope="module")
def stories(stories_rtn_ckpt):
    model, tokenizer, _ = load_quantized(stories_rtn_ckpt, bits=8)
    return model, tokenizer


def texts(model, tokenizer, requests, active=lambda i: True) -> dict[int, tuple[str, str | None, int]]:
    """Per request: its whole text, finish reason and token count."""
    out: dict[int, tuple[str, str | None, int]] = {}
    for i, chunk in stream_batch(model, tokenizer, requests, frozenset({tokenizer.eos_token_id}), active):
        out[i] = (out.get(i, ("", None, 0))[0] + chunk.text, chunk.finish_reason, chunk.tokens)
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_batch_of_uneven_prompts_equals_each_alone(stories, temperature) -> None:
    model, tokenizer = stories
    requests = [(tokenizer(p).input_ids, SamplingParams(20 + 7 * k, temperature, seed=k)) for k, p in enumerate(PROMPTS)]
    batched = texts(model, tokenizer, requests)
    for k, request in enumerate(requests):
        assert texts(model, tokenizer, [request])[0] == batched[k]
        assert batched[k][1:] == ("length", 20 + 7 * k)


def test_an_inactive_request_leaves_the_batch(stories) -> None:
    model, tokenizer = stories
    requests = [(tokenizer(p).input_ids, SamplingParams(30, 0.0)) for p in PROMPTS[:3]]
    steps = {1: 0}

    def active(i: int) -> bool:
        if i == 1:
            steps[1] += 1
        return i != 1 or steps[1] < 5

    out = texts(model, tokenizer, requests, active)
    assert out[1][1] is None and out[1][2] <= 5  # dropped without a finishing chunk
    for k in (0, 2):
        assert out[k] == texts(model, tokenizer, [requests[k]])[0]


def test_seeded_sampling_is_reproducible_and_seed_dependent(stories) -> None:
    model, tokenizer = stories
    ids = tokenizer(PROMPTS[0]).input_ids

    def sample(seed: int) -> str:
        return texts(model, tokenizer, [(ids, SamplingParams(24, 1.0, seed=seed))])[0][0]

    assert sample(5) == sample(5)
    assert len({sample(s) for s in range(4)}) > 1


def test_sample_next() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert sample_next(logits, 0.0, 1.0, g) == 1
    assert {sample_next(logits, 1.0, 0.01, g) for _ in range(50)} == {1}
    assert {sample_next(logits, 1.0, 0.6, g) for _ in range(200)} == {1, 2}
    assert {sample_next(logits, 5.0, 1.0, g) for _ in range(400)} == {0, 1, 2, 3}


def test_detokenizer_keeps_leading_spaces_and_multibyte_characters(stories) -> None:
    _, tokenizer = stories
    prompt = tokenizer("Once upon").input_ids
    tokens = tokenizer("Once upon a time, café!", add_special_tokens=False).input_ids[len(prompt) - 1:]
    detok = Detokenizer(tokenizer, prompt, ())
    pieces = [detok.push(t)[0] for t in tokens]
    assert "".join(pieces) + detok.flush() == " a time, café!"
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_stop_sequences(stories) -> None:
    _, tokenizer = stories
    prompt = tokenizer("Once").input_ids
    tokens = tokenizer("Once upon a time there was a cat.", add_special_tokens=False).input_ids[len(prompt) - 1:]
    detok = Detokenizer(tokenizer, prompt, ("there was", "zebra"))
    sent, stopped = [], False
    for t in tokens:
        piece, stopped = detok.push(t)
        sent.append(piece)
        if stopped:
            break
    assert stopped and "".join(sent) == " upon a time "
    held = Detokenizer(tokenizer, prompt, ("a tiger",))
    out = "".join(held.push(t)[0] for t in tokens[:4])  # " upon a time": " a" might begin the stop sequence
    assert " upon" in out and not out.endswith(" a")
    assert out + held.flush() == held.text
