"""The scheduler's side of the KV manager: one long-lived Plan stream, answers matched in order."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import grpc

from fastserve.rpc import token_metadata
from fastserve.v1 import kvmanager_pb2 as pb
from fastserve.v1.kvmanager_pb2_grpc import KVManagerStub

log = logging.getLogger("fastserve.scheduler.kvclient")


class KVError(RuntimeError):
    pass


class KVClient:
    """Plans are awaited; frees are written and not waited for (their answers report free counts).

    The stream keeps requests in order, so a free sent before a plan is applied before it.
    """

    def __init__(
        self, stub: KVManagerStub, on_free: Callable[[int, int], None], timeout: float | None = None
    ) -> None:
        self.stub = stub
        self.on_free = on_free
        self.timeout = (
            timeout  # seconds a plan may take before the KV manager counts as hung (--step-timeout)
        )
        self._call: grpc.aio.StreamStreamCall | None = None
        self._waiting: deque[asyncio.Future | None] = deque()  # None: a free, nobody awaits it
        self._reader: asyncio.Task | None = None
        self.broken: KVError | None = None

    def start(self) -> None:
        """Opens the stream; again after a KV manager restart (the old stream is dropped)."""
        if self._call is not None:
            self._call.cancel()
        self._waiting.clear()
        self.broken = None
        self._call = self.stub.Plan(metadata=token_metadata())
        self._reader = asyncio.create_task(self._read(self._call))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                waiter = self._waiting.popleft()
                if waiter is None:
                    self.on_free(reply.free_gpu_blocks, reply.free_host_blocks)
                elif not waiter.done():
                    waiter.set_result(reply)
            error = KVError("the KV manager closed its plan stream")
        except grpc.aio.AioRpcError as exc:
            error = KVError(f"KV manager: {exc.code().name} {exc.details()}")
        if call is not self._call:
            return  # a stream this scheduler already replaced
        log.error("%s", error)
        self.broken = error
        for waiter in self._waiting:
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()

    async def plan(self, request: pb.PlanRequest) -> pb.PlanResponse:
        if self.broken is not None:
            raise self.broken
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await self._call.write(request)
        try:
            return await asyncio.wait_for(waiter, self.timeout)
        except TimeoutError:  # frozen (neither answering nor dead): down, as if it had died
            self.broken = KVError(f"KV manager hung: no plan for {self.timeout:g}s (--step-timeout)")
            log.error("%s", self.broken)
            raise self.broken from None

    async def free(self, request_ids: list[str]) -> None:
        if self.broken is not None:
            raise self.broken
        self._waiting.append(None)
        await self._call.write(pb.PlanRequest(free=request_ids))
