"""Limits of the HTTP front that act before any work: body size, JSON shape, slow and silent clients.

- `BodyLimit` (ASGI middleware, just inside openai_api's RequireKey, so a caller without a key is
  refused before any body is read): a body larger than --max-request-body-bytes is refused
  with 413 while it is read (at once from Content-Length, else as soon as the bytes read pass the
  limit), and never held whole; a body that takes longer than the header timeout to arrive gets 408;
  a JSON body must be UTF-8, parse, and nest at most MAX_JSON_DEPTH deep, all before FastAPI and
  pydantic see it.
- `AdmissionDoor` (ASGI middleware, between RequireKey and BodyLimit): while admission control is
  full, a generation request gets its 429 before its body is read: a flash crowd's excess costs
  the gateway no body, no JSON parse, no pydantic model, no route (nor the memory of any of them).
- `guarded_h11`: uvicorn's h11 protocol with a header-read timeout (uvicorn has none: its
  keep-alive timer restarts on every byte, so a client that sends headers a byte at a time, or a
  body it will never finish after its response, holds the connection forever).
- `BoundedStream`: a streamed response whose client stops reading is cancelled once one write has
  waited --stream-send-timeout seconds on a full send buffer (uvicorn's 64 KiB write buffer plus the
  kernel's), so its job leaves the scheduler and frees its KV instead of generating for no one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable

import h11
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .admission import Admission
from .http_errors import error, overloaded

log = logging.getLogger("fastserve.gateway.http")
SEND_BUFFER_BYTES = 64 << 10  # per connection, in uvicorn's write buffer and in the kernel
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4-5 deep (tools' JSON schemas more); 100 000 deep is an attack
ABORT = "fastserve.abort"  # scope key: drops the connection at once (set by guarded_h11)


class BodyLimit:
    """Reads a request's body under the size and time limits, checks its JSON, then hands it on."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, f"{int(declared)} bytes (Content-Length)")
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._too_large(scope, receive, send, f"more than {self.max_bytes} bytes")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            response = error(
                408,
                f"body: not received within {self.read_timeout:g} s (--http-header-timeout)",
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        refused = check_json(body) if body and is_json(scope) else None
        if refused:
            await error(400, refused)(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        # the connection stays open: uvicorn discards the rest of the body (guarded_h11 bounds how
        # long), so a client that writes its whole body before reading still gets this answer
        response = error(
            413, f"body: {what} exceeds the limit of {self.max_bytes} bytes (--max-request-body-bytes)"
        )
        await response(scope, receive, send)


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # the ones that admit


class AdmissionDoor:
    """429 + Retry-After for a generation request while admission is full, before its body is read.
    The route still admits (the door only asks): requests that pass it while it has room race fairly
    for the last places, and the loser gets the same 429 from the route."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            refused = self.admission.refusal()
            if refused is not None:
                await overloaded(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_json(scope: Scope) -> bool:
    kind = dict(scope["headers"]).get(b"content-type", b"application/json")
    return kind.split(b";")[0].strip().lower() in (b"application/json", b"")


def check_json(body: bytes) -> str | None:
    """Why the body is no acceptable JSON (invalid UTF-8, syntax, nesting), or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"body: invalid UTF-8 at byte {exc.start} ({body[exc.start : exc.start + 4]!r})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"body: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
    except RecursionError:
        return f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    if depth_exceeds(value, MAX_JSON_DEPTH):
        return f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def depth_exceeds(value: object, limit: int) -> bool:
    """Whether `value` nests lists/objects more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then the connection's own messages (disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def bound_send_buffer(transport: asyncio.Transport) -> None:
    """A connection buffers at most ~SEND_BUFFER_BYTES in uvicorn and ~2x that in the kernel (which
    doubles SO_SNDBUF); without this, loopback autotuning lets megabytes queue for a silent client."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)


def guarded_h11(header_timeout: float, on_timeout: Callable[[], None]) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    `header_timeout` seconds of being ready for one (opened, or its last response sent), or that
    still sends the body of a request answered already (a 413) after as long."""

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def _waiting(self) -> bool:
            theirs = self.conn.their_state
            return theirs is h11.IDLE or (theirs is h11.SEND_BODY and self.conn.our_state is not h11.IDLE)

        def _update_timer(self) -> None:
            if self._waiting() and not self.transport.is_closing():
                if self.header_timer is None:
                    self.header_timer = self.loop.call_later(header_timeout, self._expired)
            elif self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expired(self) -> None:
            self.header_timer = None
            if self._waiting() and not self.transport.is_closing():
                on_timeout()
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            bound_send_buffer(transport)
            self._update_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.scope is not None:  # lets a response drop a connection whose client stopped reading
                self.scope[ABORT] = self.transport.abort  # type: ignore[literal-required]

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().connection_lost(exc)

    return GuardedH11Protocol


class ClientStalled(Exception):
    """The client stopped reading its stream."""


class BoundedStream(StreamingResponse):
    """A stream cancelled when one write waits longer than `send_timeout` (the client stopped
    reading); `on_close` runs however it ends (it releases the request's admission ticket)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        send_timeout: float,
        on_close: Callable[[], None],
        on_stall: Callable[[], None],
        **kwargs,
    ) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout = send_timeout
        self.on_close = on_close
        self.on_stall = on_stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, bounded_send)
        except ClientStalled:
            self.on_stall()
            if ABORT in scope:
                scope[ABORT]()  # drops what is buffered: no one reads it
            log.warning(
                "%s %s: the client read nothing for %g s (--stream-send-timeout): stream cancelled",
                scope["method"],
                scope["path"],
                self.send_timeout,
            )
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # cancels the request's jobs
            self.on_close()
