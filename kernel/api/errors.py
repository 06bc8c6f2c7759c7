"""OpenAI-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}`.

Every error the API answers with on purpose is an `ApiError`; the app turns it
into a JSON response with its status.  Messages say what to change.
"""

from __future__ import annotations

from ukgpu.llama_core.errors import UkgpuError


class ApiError(UkgpuError):
    """A request the server refuses; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(max_queue: int) -> ApiError:
    return ApiError(
        429,
        f"The server's request queue is full ({max_queue} waiting); retry shortly "
        "or start the server with more slots.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def model_loading() -> ApiError:
    return ApiError(
        503,
        "The model is still loading; poll GET /health until it says ready.",
        type="server_error",
        code="model_loading",
        headers={"Retry-After": "1"},
    )


def model_failed(reason: str) -> ApiError:
    return ApiError(
        503,
        f"The model failed to load ({reason}); fix the model or backend and restart the server.",
        type="server_error",
        code="model_load_failed",
    )


def scheduler_stopped(reason: str) -> ApiError:
    return ApiError(
        503,
        f"The generation loop stopped ({reason}); GET /health says so. Restart the server.",
        type="server_error",
        code="scheduler_stopped",
    )
