"""gRPC plumbing every service shares: servers with health and reflection, channels, waiting for peers."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fastserve.internal_auth import METADATA_KEY, ServerGuard, client_interceptors
from fastserve.reflection import enable_reflection

log = logging.getLogger("fastserve.rpc")

# A health service name that answers SERVING as long as the process answers at all: what a liveness
# probe asks (Kubernetes `grpc: {service: liveness}`), so a service that is alive but NOT_SERVING
# (a scheduler waiting for its workers, a gateway for its scheduler) is not restarted for it, and a
# frozen one (no answer) is
LIVENESS_SERVICE = "liveness"

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # internal messages carry block tables of many jobs

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


_internal_token = ""


def use_internal_token(token: str) -> None:
    """This process's copy of the stack's shared secret (--internal-token): internal servers
    demand it, every channel() sends it. Empty = internal RPCs are open to anyone who can connect."""
    global _internal_token
    _internal_token = token


def create_server(
    max_receive_bytes: int = MAX_MESSAGE_BYTES, interceptors=None, *, public: bool = False
) -> grpc.aio.Server:
    """An internal server (callers must send the stack's token) unless `public`; never SO_REUSEPORT,
    so a busy port fails to bind instead of silently sharing it with another process."""
    if not public and not _internal_token:
        log.warning("no --internal-token: internal RPCs accept any caller that can connect")
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # accept our channels' keepalive pings on idle streams: by default a server answers
            # pings every 30 s without data with GOAWAY "too many pings" after a few minutes
            ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        interceptors=[ServerGuard("" if public else _internal_token), *(interceptors or [])],
    )


class ServingState:
    """Health and reflection for a server; mark_serving() once the service can do its job."""

    def __init__(self, server: grpc.aio.Server, service_names: list[str]) -> None:
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection([*service_names, health.SERVICE_NAME], server)
        self.service_names = service_names
        self.serving = False

    async def _set(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def mark_serving(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def mark_not_serving(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)


async def start_server(
    server: grpc.aio.Server,
    service_names: list[str],
    host: str,
    port: int,
    tls: grpc.ServerCredentials | None = None,
) -> tuple[ServingState, str]:
    """Adds health + reflection, binds (with TLS when given) and starts; NOT_SERVING until mark_serving()."""
    state = ServingState(server, service_names)
    await state.mark_not_serving()
    await state.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", tls)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot listen on {host}:{port} (--host/--port): address in use or not available")
    await server.start()
    return state, f"{host}:{bound}"


def channel(address: str) -> grpc.aio.Channel:
    """A channel whose unary calls send the stack's token; a streaming call passes
    `metadata=token_metadata()` itself (an intercepted stream hands every message through an
    extra queue and task: ~0.1 ms a round trip between two processes here)."""
    return grpc.aio.insecure_channel(
        address, options=CHANNEL_OPTIONS, interceptors=client_interceptors(_internal_token)
    )


def token_metadata() -> tuple[tuple[str, str], ...]:
    """The stack's token as call metadata, for a streaming call (see `channel`)."""
    return ((METADATA_KEY, _internal_token),) if _internal_token else ()


async def wait_serving(chan: grpc.aio.Channel, address: str, timeout: float = 300.0) -> None:
    """Waits until the peer at `address` answers SERVING on grpc.health.v1."""
    stub = health_pb2_grpc.HealthStub(chan)
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            last_error = exc.code().name
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s (last: {last_error})")


def check_serving_sync(address: str, timeout: float = 1.0, root_cert: bytes | None = None) -> bool:
    """Blocking health probe, for the launcher and tests; `root_cert` (PEM) = over TLS trusting it."""
    chan = (
        grpc.insecure_channel(address)
        if root_cert is None
        else grpc.secure_channel(address, grpc.ssl_channel_credentials(root_cert))
    )
    with chan:
        try:
            reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
