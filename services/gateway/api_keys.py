"""API keys of the public port (`--api-key`, several allowed): who may call, and who owns a request."""

from __future__ import annotations

import hashlib
import hmac

import grpc

from . import metrics


class ApiKeys:
    """No keys configured = an open server. A request's owner is a digest of its key, never the key."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k for k in keys if k]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def key_of(self, authorization: str) -> str | None:
        """The configured key that an `Authorization: Bearer KEY` value carries, if any."""
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        found = None
        for key in self.keys:
            if hmac.compare_digest(token.encode(), key.encode()):
                found = key
        return found

    def allows(self, authorization: str) -> bool:
        return not self.required or self.key_of(authorization) is not None

    def owner(self, authorization: str) -> str:
        """'' on an open server; else a digest naming the key (stored with each request it makes)."""
        key = self.key_of(authorization) if self.required else None
        return hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""


def parse_keys(text: str) -> list[str]:
    """`--api-key a,b` or FASTSERVE_API_KEY="a,b": comma-separated keys."""
    return [k.strip() for k in text.split(",") if k.strip()]


OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # health checks and reflection stay open


def authorization(metadata) -> str:
    """The `authorization` value of gRPC invocation metadata ('' when absent)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return ""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless metadata `authorization: Bearer KEY` names a configured key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        if self.keys.allows(authorization(handler_call_details.invocation_metadata)):
            return handler
        metrics.REJECTED.labels("unauthenticated").inc()
        return denied(handler)


DENIED = "invalid or missing API key: send metadata 'authorization: Bearer <key>'"


def denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""

    async def refuse(request_or_iterator, context):  # noqa: ARG001
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    async def refuse_stream(request_or_iterator, context):  # noqa: ARG001
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # an async generator, as a streaming handler must be

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)
