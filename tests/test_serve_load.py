"""Load behaviour of the CPU server: concurrent clients all answered, a full queue is a 503, timeouts are 504."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import openai
import pytest

PROMPT = "Once upon a time"


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


async def completion_or_error(c: openai.AsyncOpenAI, **kwargs) -> str | openai.APIStatusError:
    try:
        return (await c.completions.create(model="stories", prompt=PROMPT, **kwargs)).choices[0].text
    except openai.APIStatusError as e:
        return e


def test_concurrent_requests_are_all_answered_without_crosstalk(cpu_server) -> None:
    url = cpu_server()

    async def run() -> list[str]:
        c = async_client(url)
        return await asyncio.gather(*(completion_or_error(c, max_tokens=12, seed=i) for i in range(16)))

    concurrent = asyncio.run(run())
    assert all(isinstance(t, str) and t for t in concurrent), concurrent
    sync = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for i in (0, 7, 15):
        assert sync.completions.create(model="stories", prompt=PROMPT, max_tokens=12, seed=i).choices[0].text == concurrent[i]


def test_full_queue_is_503_and_the_server_recovers(never_ending_server) -> None:
    url = never_ending_server(max_queue=1)

    async def run() -> list[str | openai.APIStatusError]:
        c = async_client(url)
        first = asyncio.create_task(completion_or_error(c, max_tokens=40))
        while not httpx.get(f"{url}/health").json()["running"]:
            await asyncio.sleep(0.01)
        return [await r for r in [first, *[asyncio.create_task(completion_or_error(c, max_tokens=40)) for _ in range(4)]]]

    results = asyncio.run(run())
    answered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    assert len(answered) == 2 and len(refused) == 3, results  # one generating, one waiting, the rest refused
    for e in refused:
        assert e.status_code == 503 and e.response.json()["error"]["code"] == "queue_full"
    r = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(
        model="stories", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.fixture
def never_ending_server(stories_rtn_ckpt, monkeypatch) -> Iterator[Callable[..., str]]:
    """``never_ending_server(max_queue=64, timeout=60) -> base URL``: a W2A2 server whose texts never end early.

    EOS is not a stop token there. Sampled stories260K text sometimes reaches EOS within
    10 tokens (0.15 s), which would finish a request before the queue fills or a timeout runs
    out; without EOS a request runs to its ``max_tokens``.
    """
    from conftest import serving
    from serve.cpu_server import build_app

    monkeypatch.setattr("serve.engine.eos_token_ids", lambda model, tokenizer: frozenset())
    with ExitStack() as stack:
        def start(max_queue: int = 64, timeout: float = 60.0) -> str:
            app = build_app(str(stories_rtn_ckpt), 2, 2, "stories", None, max_queue, timeout)
            return stack.enter_context(serving(app))

        yield start


def test_request_timeout_is_504_and_stops_generation(never_ending_server) -> None:
    url = never_ending_server(timeout=0.5)
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="stories", prompt=PROMPT, max_tokens=500)
    assert e.value.status_code == 504 and e.value.response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - start < 5
    with pytest.raises(openai.APIError, match="timeout"):
        for _ in c.completions.create(model="stories", prompt=PROMPT, max_tokens=500, stream=True):
            pass
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/health").json()["running"]:
        assert time.monotonic() < deadline, "generation went on after the timeout"
        time.sleep(0.02)
    assert c.completions.create(model="stories", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
