"""One error shape for every HTTP error: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

FastAPI's own errors (unknown route, wrong method, a body that fails the request model) go
through the handlers installed here, so a client never sees `{"detail": ...}`. A message names
the field and the value the client sent; every refusal is counted in
`fastserve:request_rejected_total` by reason.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import metrics
from .admission import Overloaded
from .validation import InvalidRequest

log = logging.getLogger("fastserve.gateway.http")
ERROR_TYPES = {  # OpenAI's client raises the exception of this name for the status
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
REASONS = {  # the `reason` label of fastserve:request_rejected_total
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "overloaded",
    503: "unavailable",
}
MAX_VALUE_CHARS = 80  # how much of a sent value an error message quotes


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error response; a refusal (4xx, 503) is counted by reason."""
    if status in REASONS:
        metrics.REJECTED.labels(REASONS[status]).inc()
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def invalid(exc: InvalidRequest) -> JSONResponse:
    """400 with the shared validation message; `param` is the field it names."""
    text = str(exc)
    return error(400, text, text.split(":", 1)[0] if ":" in text else None)


def overloaded(exc: Overloaded) -> JSONResponse:
    """429 with Retry-After: the server is full (admission control)."""
    return error(429, str(exc), headers={"retry-after": str(exc.retry_after)})


def shown(value: Any) -> str:
    """A value the client sent, as a message quotes it (long ones cut)."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # FastAPI's own parse (http_limits parses first)
            return error(400, f"body: invalid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        sent = f" (sent: {shown(first['input'])})" if first.get("type") != "missing" and field else ""
        return error(400, f"{field or 'body'}: {first['msg']}{sent}", field or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); see the gateway's log")
