"""The CPU fallback's OpenAI-compatible HTTP API (FastAPI) over an :class:`~serve.engine.Engine`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import Engine, Job
from .errors import APIError, invalid
from .generate import Chunk, SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("serve")

MAX_BODY_BYTES = 16 << 20


class BearerAuth:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (else a 401)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model_name`` from ``engine``; the engine's worker runs while the app does."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="bitbybit CPU server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting,
                "generated_tokens": engine.generated_tokens}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "bitbybit",
                "max_model_len": engine.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        _check_model(body.model, model_name)
        body.check_supported()
        prompt_ids = await asyncio.to_thread(_completion_prompt, engine, body.single_prompt())
        job = engine.submit(prompt_ids, _sampling(engine, body, prompt_ids, "prompt"))
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            def chunk_body(c: Chunk) -> list[dict]:
                return [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}]
            return _sse(job, head, chunk_body, None, _include_usage(body), len(prompt_ids))
        text, last = await _collect(job, request)
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(len(prompt_ids), last.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        _check_model(body.model, model_name)
        body.check_supported()
        prompt_ids = await asyncio.to_thread(_chat_prompt, engine, body.chat())
        job = engine.submit(prompt_ids, _sampling(engine, body, prompt_ids, "messages"))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": int(time.time()), "model": model_name}
        if body.stream:
            def chunk_body(c: Chunk) -> list[dict]:
                delta = {"content": c.text} if c.text else {}
                return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}]
            first = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            return _sse(job, head, chunk_body, first, _include_usage(body), len(prompt_ids))
        text, last = await _collect(job, request)
        message = {"role": "assistant", "content": text}
        return {**head, "choices": [{"index": 0, "message": message, "logprobs": None,
                                     "finish_reason": last.finish_reason}],
                "usage": _usage(len(prompt_ids), last.tokens)}

    return app


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as ``model``; malformed JSON, a non-object, unknown fields and bad values are 400s."""
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES >> 20} MiB.", code="body_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"The model {requested!r} does not exist; this server serves {served!r}.",
                       param="model", code="model_not_found")


def _completion_prompt(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(engine.tokenizer(prompt).input_ids)
    vocab = engine.model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise invalid(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
    return prompt


def _chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    tokenizer = engine.tokenizer
    if not tokenizer.chat_template:
        raise invalid("This checkpoint's tokenizer has no chat template; use /v1/completions.", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise invalid(f"The chat template rejected these messages: {e}", "messages") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _sampling(engine: Engine, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
              prompt_param: str) -> SamplingParams:
    """Sampling parameters, with max_tokens checked against the context window."""
    ctx, n_prompt = engine.context_length, len(prompt_ids)
    if n_prompt == 0:
        raise invalid("The prompt is empty (it encodes to no tokens).", prompt_param)
    room = ctx - n_prompt
    if room <= 0:
        raise invalid(f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} tokens; "
                      "shorten the prompt.", prompt_param, "context_length_exceeded")
    max_tokens, param = body.requested_max_tokens(), body.max_tokens_param()
    if max_tokens is None:
        max_tokens = min(room, body.DEFAULT_MAX_TOKENS or room)
    elif max_tokens <= 0:
        raise invalid(f"{param!r} must be at least 1, got {max_tokens}.", param)
    elif max_tokens > room:
        raise invalid(f"This model's maximum context length is {ctx} tokens; the prompt has {n_prompt} tokens and "
                      f"{param} is {max_tokens} (at most {room} fit).", param, "context_length_exceeded")
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop_sequences()))


async def _collect(job: Job, request: Request) -> tuple[str, Chunk]:
    """Wait for a whole completion; a client that disconnects cancels it."""
    parts, last = [], None
    async for chunk in job.chunks(request.is_disconnected):
        parts.append(chunk.text)
        last = chunk
    if last is None or last.finish_reason is None:  # the client went away: nobody reads this reply
        raise APIError(499, "Client closed the request.", code="client_disconnected")
    return "".join(parts), last


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(job: Job, head: dict, choices, first: list[dict] | None, include_usage: bool,
         prompt_tokens: int) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; errors become an error event."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield event({**head, "choices": first})
            async for chunk in job.chunks():
                yield event({**head, "choices": choices(chunk)})
                if chunk.finish_reason is not None and include_usage:
                    yield event({**head, "choices": [], "usage": _usage(prompt_tokens, chunk.tokens)})
        except APIError as e:
            yield event(e.body())
        finally:
            job.cancel()  # a client that went away cancels the stream here: generation stops
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "Internal server error; see the server log.", type="server_error").response()


def _validation_error(errors: list[dict]) -> APIError:
    """The first validation problem as a 400: an unknown field, a missing one, or a bad value."""
    err = errors[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    if err.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if err.get("type") == "missing":
        return invalid(f"Missing required parameter: {param!r}.", param, "missing_required_parameter")
    return invalid(f"Invalid value for {param!r}: {err['msg']}." if param else f"Invalid request: {err['msg']}.", param)
