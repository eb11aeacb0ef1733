"""Who may call an internal service, and what a malformed message gets.

Scheduler, KV manager and workers accept only callers that send the stack's shared secret
(`--internal-token`, env FASTSERVE_INTERNAL_TOKEN; `fastserve up` generates one per stack) in
the gRPC metadata key `x-fastserve-internal-token`. Only grpc.health.v1 stays open: orchestrators
(compose healthchecks, `fastserve up`'s supervisor, Kubernetes probes) hold no secret. Everything
else needs the token, read-only calls included: Info/Stats tell the model, its shapes, block counts
and load, and reflection lists what could be called (grpcurl sends the token with
`-H x-fastserve-internal-token:...`, reflection requests included).
On every server, a message that does not parse is INVALID_ARGUMENT naming the method, never
UNKNOWN with a traceback.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

log = logging.getLogger("fastserve.rpc")

METADATA_KEY = "x-fastserve-internal-token"
OPEN_METHODS = ("/grpc.health.v1.",)  # health checks need no token; everything else does


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _Malformed(exc)

    return parse


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"


def _guarded(handler: grpc.RpcMethodHandler, method: str, denied: str) -> grpc.RpcMethodHandler:
    """The same handler, but a refused caller gets UNAUTHENTICATED and a bad message INVALID_ARGUMENT."""
    kind = _kind(handler)
    behavior = getattr(handler, kind)
    bad = f"{method}: the request is not a valid protobuf message"

    async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if denied:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
        if handler.request_streaming:
            return _checked_stream(request, context, bad)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{bad} ({request.error})")
        return request

    if handler.response_streaming:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            result = behavior(await check(request, context), context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
    else:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await check(request, context), context)

    build = getattr(grpc, f"{kind}_rpc_method_handler")
    return build(
        wrapped,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


async def _checked_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, bad: str
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{bad} ({request.error})")
        yield request


class ServerGuard(grpc.aio.ServerInterceptor):
    """Internal auth (when `token` is set) and INVALID_ARGUMENT for messages that do not parse."""

    def __init__(self, token: str = "") -> None:
        self.token = token.encode()

    async def intercept_service(
        self, continuation: Callable, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        denied = ""
        if self.token:
            sent = next((v for k, v in details.invocation_metadata or () if k == METADATA_KEY), None)
            if sent is None:
                denied = f"{method} is internal: send the stack's token in metadata {METADATA_KEY!r}"
            elif not hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self.token):
                denied = f"{method} is internal: the token in {METADATA_KEY!r} is not this stack's"
            if denied:
                log.warning("refused %s: %s", method, denied)
        return _guarded(handler, method, denied)


class _AttachToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends the token with every unary call. Not with streams: an intercepted stream hands each
    message through an extra queue and task, so streaming calls pass it in their own metadata."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(METADATA_KEY, self.token)
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(details, request)


def client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """The interceptor that sends `token` with every unary call on a channel (none when it is empty)."""
    return [_AttachToken(token)] if token else []
