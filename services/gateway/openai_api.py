"""The OpenAI-compatible HTTP front's app: it runs in the gateway process on the same event
loop as the gRPC server. This module only assembles the app: middleware (API keys, then
http_limits' body limit), error handlers (http_errors), routes (openai_routes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from .api_keys import ApiKeys
from .extra_routes import extra_routes
from .generation import Generations
from .http_errors import error, install_error_handlers
from .http_limits import AdmissionDoor, BodyLimit
from .openai_routes import routes


@dataclass(frozen=True)
class HttpSettings:
    max_request_body_bytes: int = 4 << 20
    header_timeout: float = 10.0  # also bounds how long a body may take to arrive
    stream_send_timeout: float = 30.0


def create_app(
    generations: Generations,
    served_model_name: str,
    keys: ApiKeys,
    serving: Callable[[], bool],
    settings: HttpSettings | None = None,
) -> FastAPI:
    settings = settings or HttpSettings()
    app = FastAPI(title="FastServe", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_request_body_bytes, read_timeout=settings.header_timeout
    )
    app.add_middleware(AdmissionDoor, admission=generations.admission)  # a full server reads no body
    app.add_middleware(RequireKey, keys=keys)  # outermost: no body is read for a caller without a key
    app.include_router(routes(generations, served_model_name, keys, serving, settings.stream_send_timeout))
    app.include_router(extra_routes(generations, served_model_name, serving, int(time.time())))
    return app


OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})  # probes and scrapers: no key


class RequireKey:
    """401 on every path but OPEN_PATHS unless `Authorization: Bearer KEY` names a configured key
    (an unknown path too: a caller without a key learns nothing of the routes)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.keys.allows(authorization):
                refusal = error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
