"""The gateway's one path to the scheduler: a request's token stream that survives scheduler outages.

`SchedulerLink.stream` yields a request's tokens exactly once each, in order. When the scheduler
goes away mid-stream (restart, network), it waits for the scheduler to come back, re-submits with
`resume` and the tokens already yielded, and skips whatever the new stream repeats: the client sees
a pause, never an error, a duplicate or a gap. Both the gRPC Generate and the HTTP front use it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.rpc import ServingState, token_metadata
from fastserve.v1 import scheduler_pb2
from fastserve.v1.scheduler_pb2_grpc import SchedulerStub

log = logging.getLogger("fastserve.gateway.scheduler")

# what a scheduler that died or restarted looks like from here; anything else is the request's own fault
OUTAGE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)


class SchedulerGone(RuntimeError):
    """The scheduler stayed away longer than --scheduler-retry-timeout."""


class SchedulerLink:
    def __init__(self, channel: grpc.aio.Channel, retry_timeout: float) -> None:
        self.channel = channel
        self.stub = SchedulerStub(channel)
        self.retry_timeout = retry_timeout
        self.resumes = 0

    async def stream(
        self, submit: scheduler_pb2.SubmitRequest
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        """The job's messages; their token_ids are contiguous from the first token, across outages."""
        have: list[int] = []
        request = submit
        outage_since: float | None = None
        while True:
            call = self.stub.Submit(request, metadata=token_metadata())
            try:
                index: int | None = None if request.resume else 0
                async for reply in call:
                    if index is None:  # a resumed stream says where its tokens start
                        index = reply.first_index
                    tokens = list(reply.token_ids)
                    skip = max(0, len(have) - index)
                    new = tokens[skip:]
                    index += len(tokens)
                    have += new
                    outage_since = None
                    if new or reply.finish_reason or (reply.prompt_logprobs and len(have) == len(new)):
                        yield self._trimmed(reply, skip, first=len(have) == len(new))
                    if reply.finish_reason:
                        return
                problem = "the scheduler closed the stream before the request finished"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in OUTAGE:
                    raise
                problem = f"{exc.code().name}: {exc.details()}"
            finally:
                if not call.done():
                    call.cancel()
            now = time.monotonic()
            if outage_since is None:
                outage_since = now
                log.warning("request %s: scheduler lost (%s); re-attaching", submit.request_id, problem)
            if now - outage_since > self.retry_timeout:
                raise SchedulerGone(
                    f"scheduler unreachable for {self.retry_timeout:.0f}s (--scheduler-retry-timeout): {problem}"
                )
            await asyncio.sleep(0.2)
            request = scheduler_pb2.SubmitRequest()
            request.CopyFrom(submit)
            request.generated_token_ids.extend(have)
            request.resume = True
            self.resumes += 1

    @staticmethod
    def _trimmed(reply: scheduler_pb2.SubmitResponse, skip: int, first: bool) -> scheduler_pb2.SubmitResponse:
        """`reply` without its first `skip` tokens (and their logprobs); prompt logprobs only once."""
        if not skip and (first or not reply.prompt_logprobs):
            return reply
        out = scheduler_pb2.SubmitResponse()
        out.CopyFrom(reply)
        del out.token_ids[:skip]
        del out.logprobs[:skip]
        if not first:
            del out.prompt_logprobs[:]
        return out

    async def watch_health(self, state: ServingState, period: float = 0.5) -> None:
        """The gateway is SERVING exactly while the scheduler is."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        serving = None
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=max(period, 1.0))
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                ok = False
            if ok != serving:
                await (state.mark_serving() if ok else state.mark_not_serving())
                if serving is not None:
                    log.warning(
                        "scheduler %s: gateway %s",
                        "back" if ok else "away",
                        "SERVING" if ok else "NOT_SERVING",
                    )
                serving = ok
            await asyncio.sleep(period)
