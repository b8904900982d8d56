"""Request bodies of the OpenAI endpoints the CPU server implements, and their validation.

Unknown fields are rejected (as the OpenAI API does); known fields the server does not
implement are accepted only at their neutral value, anything else is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import invalid, unsupported

MAX_STOP_SEQUENCES = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """A field sent as JSON null takes its default, as in OpenAI's API."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_tokens"

    def stop_sequences(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"'stop' holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", "stop")
        if any(s == "" for s in stops):
            raise invalid("'stop' sequences must not be empty", "stop")
        return stops

    def check_supported(self) -> None:
        """Raise a 400 for any parameter set to a value this server does not implement."""
        if self.n != 1:
            raise unsupported("n", "this server returns exactly one choice (n=1)")
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise unsupported(name, "penalties are not implemented; use 0")
        if self.logit_bias:
            raise unsupported("logit_bias", "not implemented")
        if self.stream_options is not None and not self.stream:
            raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        self.stop_sequences()


class CompletionRequest(_Common):
    DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the rest of the context

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise unsupported("logprobs", "log probabilities are not implemented")
        if self.echo:
            raise unsupported("echo", "echoing the prompt is not implemented")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "this server returns exactly one choice (best_of=1)")
        if self.suffix:
            raise unsupported("suffix", "insertion is not implemented")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (text or token ids); a batch of several is a 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise unsupported("prompt", f"got a batch of {len(p)} prompts; send one prompt per request")
            p = p[0]
        if isinstance(p, list) and not p:
            raise invalid("'prompt' is empty", "prompt")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs is not None:
            raise unsupported("logprobs", "log probabilities are not implemented")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise unsupported(name, "tool and function calling are not implemented")
        if self.response_format not in (None, {"type": "text"}):
            raise unsupported("response_format", "only {'type': 'text'} is implemented")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise invalid("'max_tokens' and 'max_completion_tokens' disagree; send one", "max_completion_tokens")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
