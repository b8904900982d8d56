"""Bad input, auth and disconnects: OpenAI-style errors with the right status, and the server keeps serving."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

PROMPT = "Once upon a time"


def client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": 1}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 99_999]}, "prompt"),
    ({"prompt": "hello " * 600}, "prompt"),
])
def test_bad_completion_requests_are_400(cpu_server, kwargs, param) -> None:
    request = {"model": "stories", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(cpu_server()).completions.create(**request)
    err = error_of(e.value)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"]


def test_prompt_plus_max_tokens_beyond_the_context(cpu_server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(cpu_server()).completions.create(model="stories", prompt="hello " * 250, max_tokens=400)
    err = error_of(e.value)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hello " * 600}]}, "messages"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 3}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": None, "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_chat_requests_are_400(cpu_server, kwargs, param) -> None:
    request = {"model": "stories", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(cpu_server()).chat.completions.create(**request)
    assert error_of(e.value)["param"] == param


def test_unknown_model_is_404(cpu_server) -> None:
    c = client(cpu_server())
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert error_of(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00", b'"just a string"'])
def test_malformed_json_is_400(cpu_server, body) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(cpu_server() + path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_is_413(cpu_server) -> None:
    r = httpx.post(f"{cpu_server()}/v1/completions", content=b" " * (17 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_missing_fields_and_unknown_routes(cpu_server) -> None:
    url = cpu_server()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{url}/v1/completions", json={"model": "stories", "prompt": PROMPT, "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_null_fields_take_their_defaults(cpu_server) -> None:
    body = {"model": "stories", "prompt": PROMPT, "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "stop": None, "stream": None, "logprobs": None}
    r = httpx.post(f"{cpu_server()}/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = httpx.post(f"{cpu_server()}/v1/completions", json={**body, "model": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_server_still_serves_after_bad_input(cpu_server) -> None:
    url = cpu_server()
    for body in (b"{", b"null", b'{"model": "stories", "prompt": {"x": 1}}'):
        httpx.post(f"{url}/v1/completions", content=body)
    r = client(url).completions.create(model="stories", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_api_key(cpu_server) -> None:
    url = cpu_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "wrong").completions.create(model="stories", prompt=PROMPT, max_tokens=3)
    assert e.value.status_code == 401 and error_of(e.value)["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
        r = httpx.post(f"{url}/v1/completions", json={"model": "stories", "prompt": PROMPT}, headers=headers)
        assert r.status_code == 401, headers
    assert httpx.get(f"{url}/v1/models").status_code == 401
    r = httpx.post(f"{url}/v1/completions", content=b"{bad json", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert client(url, "s3cret").completions.create(model="stories", prompt=PROMPT, max_tokens=3).choices[0].text
    assert httpx.get(f"{url}/health").status_code == 200


def wait_idle(url: str, limit_s: float = 10.0) -> dict:
    """Poll /health until no request is generating; return it."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if not health["running"] and not health["waiting"]:
            return health
        time.sleep(0.02)
    raise AssertionError(f"the server was still generating {limit_s} s later: {health}")


def test_client_disconnect_mid_stream_stops_generation(cpu_server) -> None:
    url = cpu_server(bits=2, act_bits=2)  # W2A2 reference ops: slow enough to see where generation stops
    before = wait_idle(url)["generated_tokens"]
    body = {"model": "stories", "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        events = [next(lines) for _ in range(6)]
    assert sum(e.startswith("data: {") for e in events) >= 3
    generated = wait_idle(url)["generated_tokens"] - before
    assert generated < 100, f"generation went on for {generated} tokens after the client left"


def test_client_disconnect_while_waiting_cancels(cpu_server) -> None:
    url = cpu_server(bits=2, act_bits=2)
    before = wait_idle(url)["generated_tokens"]
    body = {"model": "stories", "prompt": PROMPT, "max_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    generated = wait_idle(url)["generated_tokens"] - before
    assert generated < 400, f"generation went on for {generated} tokens after the client left"
