"""The OpenAI-compatible HTTP front's app: it runs in the gateway process on the same event
loop as the gRPC server. This module only assembles the app: middleware, error handlers
(http_errors), routes (openai_routes)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request

from .api_keys import ApiKeys
from .generation import Generations
from .http_errors import error, install_error_handlers
from .openai_routes import routes


def create_app(
    generations: Generations,
    served_model_name: str,
    keys: ApiKeys,
    serving: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(title="FastServe", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if not keys.allows(request.headers.get("authorization", "")):
                return error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    app.include_router(routes(generations, served_model_name, keys, serving))
    return app
