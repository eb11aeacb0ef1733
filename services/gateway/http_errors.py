"""The OpenAI error shape `{"error": {"message", "type", "param", "code"}}` and the app's error handlers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .validation import InvalidRequest

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES[status], "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def invalid(exc: InvalidRequest) -> JSONResponse:
    """400 with the shared validation message; `param` is the field it names."""
    text = str(exc)
    return error(400, text, text.split(":", 1)[0] if ":" in text else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        return error(400, f"{field or 'body'}: {first['msg']}", field or None)
