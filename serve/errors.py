"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error a client caused or must be told about; rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server understood but cannot honour."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, detail: str) -> APIError:
    """A 400 naming a parameter this server does not support."""
    return APIError(400, f"Unsupported parameter {param!r}: {detail}", param=param, code="unsupported_parameter")


def queue_full(max_queue: int) -> APIError:
    return APIError(503, f"The server is busy: {max_queue} requests are already waiting. Retry later.",
                    type="server_error", code="queue_full")


def timed_out(timeout: float) -> APIError:
    return APIError(504, f"The request did not finish within the server's timeout of {timeout:g} s.",
                    type="timeout_error", code="timeout")
