"""The CPU server through the real ``openai`` client: endpoints, streaming, sampling, greedy parity."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from kernels.qmodel import load_dequantized, load_quantized

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


def client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def continuation(tokenizer, prompt_ids: list[int], generated: list[int]) -> str:
    """The text ``generated`` adds after the prompt, as a reply to a completion request shows it."""
    full = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
    return full[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)):]


def hf_greedy(model, tokenizer, prompt_ids: list[int], n: int) -> str:
    """transformers' own greedy ``generate``, decoded as the continuation of the prompt."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)[0].tolist()
    return continuation(tokenizer, prompt_ids, out[len(prompt_ids):])


def test_models_lists_the_served_model(cpu_server) -> None:
    models = client(cpu_server()).models.list().data
    assert [m.id for m in models] == ["stories"]
    assert models[0].model_extra["max_model_len"] == 512


def test_completion(cpu_server) -> None:
    r = client(cpu_server()).completions.create(model="stories", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "stories"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 5
    assert r.usage.total_tokens == 17


def test_chat_uses_the_checkpoints_template(cpu_server, stories_rtn_ckpt) -> None:
    r = client(cpu_server()).chat.completions.create(model="stories", messages=CHAT, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    _, tokenizer, _ = load_quantized(stories_rtn_ckpt, bits=2)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_chat_accepts_content_parts_and_the_developer_role(cpu_server) -> None:
    c = client(cpu_server(bits=8))
    plain = c.chat.completions.create(model="stories", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}])
    parts = c.chat.completions.create(model="stories", max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_greedy_equals_transformers_generate_on_dequantized_weights(cpu_server, stories_rtn_ckpt, bits) -> None:
    """Independent path: the checkpoint's W{b} weights dequantized into a plain float HF model (W{b}A16)."""
    model, tokenizer = load_dequantized(stories_rtn_ckpt, bits=bits)
    c = client(cpu_server(bits=bits))
    for prompt in (PROMPT, "The little dog", "Lily and Ben went to the park. They"):
        got = c.completions.create(model="stories", prompt=prompt, max_tokens=48, temperature=0).choices[0].text
        assert got == hf_greedy(model, tokenizer, tokenizer(prompt).input_ids, 48), (bits, prompt)


def test_w2a2_greedy_equals_generate_on_the_quantized_model(cpu_server, stories_rtn_ckpt) -> None:
    """The server's decode loop (KV cache, argmax) against transformers' generate on the same W2A2 model."""
    model, tokenizer, _ = load_quantized(stories_rtn_ckpt, bits=2, act_bits=2)
    got = client(cpu_server(bits=2, act_bits=2)).completions.create(
        model="stories", prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    assert got == hf_greedy(model, tokenizer, tokenizer(PROMPT).input_ids, 32)


def test_stream_completion_matches_the_plain_reply(cpu_server) -> None:
    c = client(cpu_server(bits=8))
    plain = c.completions.create(model="stories", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(c.completions.create(model="stories", prompt=PROMPT, max_tokens=30, temperature=0, stream=True))
    assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_stream_chat_chunks_and_usage(cpu_server) -> None:
    c = client(cpu_server(bits=8))
    plain = c.chat.completions.create(model="stories", messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="stories", messages=CHAT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done(cpu_server) -> None:
    import httpx

    with httpx.stream("POST", f"{cpu_server()}/v1/completions", timeout=30,
                      json={"model": "stories", "prompt": PROMPT, "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_sequence_cuts_the_text(cpu_server) -> None:
    c = client(cpu_server(bits=8))
    full = c.completions.create(model="stories", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:14]
    r = c.completions.create(model="stories", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]
    streamed = c.completions.create(model="stories", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_generation_config_eos_ids_end_generation(stories_rtn_ckpt, tmp_path) -> None:
    """llama2.c models end a story with BOS (id 1): listing it in generation_config.json makes it an end token."""
    from conftest import serving
    from serve.cpu_server import build_app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(stories_rtn_ckpt, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 1]}))
    model, tokenizer = load_dequantized(ckpt, bits=8)
    ids = tokenizer(PROMPT).input_ids
    expected = model.generate(torch.tensor([ids]), max_new_tokens=500, do_sample=False)[0].tolist()[len(ids):]
    assert expected[-1] == 1 and len(expected) < 500
    with serving(build_app(str(ckpt), 8, None, "stories", None, 64, 60.0)) as url:
        r = client(url).completions.create(model="stories", prompt=PROMPT, max_tokens=500, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(expected)
    assert r.choices[0].text == continuation(tokenizer, ids, expected)


def test_seed_makes_sampling_reproducible(cpu_server) -> None:
    c = client(cpu_server(bits=8))

    def sample(seed: int, top_p: float = 1.0) -> str:
        return c.completions.create(model="stories", prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=top_p,
                                    seed=seed).choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1
    assert sample(3, top_p=0.01) == c.completions.create(model="stories", prompt=PROMPT, max_tokens=24,
                                                         temperature=0).choices[0].text


def test_token_id_prompt(cpu_server, stories_rtn_ckpt) -> None:
    c = client(cpu_server(bits=8))
    _, tokenizer, _ = load_quantized(stories_rtn_ckpt, bits=8)
    by_ids = c.completions.create(model="stories", prompt=tokenizer(PROMPT).input_ids, max_tokens=8, temperature=0)
    by_text = c.completions.create(model="stories", prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
