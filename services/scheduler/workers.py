"""The scheduler's side of the worker streams: one bidirectional Step stream per rank."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from fastserve.rpc import channel, token_metadata, wait_serving
from fastserve.v1 import worker_pb2 as pb
from fastserve.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("fastserve.scheduler.workers")


class WorkerError(RuntimeError):
    pass


class WorkerGroup:
    """Sends every step to every rank and returns the driver rank's answer.

    Steps may overlap (pipeline parallelism keeps several in flight); writes are
    serialised so every rank sees steps in the same order, and one reader per rank
    matches answers to steps by id.
    """

    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("--worker-addresses must name at least one worker")
        self.addresses = addresses
        self.infos: list[pb.WorkerInfo] = []
        self._calls: list[grpc.aio.StreamStreamCall] = []
        self._pending: dict[int, list[asyncio.Future]] = {}
        self._sent: dict[int, float] = {}  # step id -> when it was sent (monotonic), until answered
        self._write_lock = asyncio.Lock()
        self._readers: list[asyncio.Task] = []
        self._channels: list[grpc.aio.Channel] = []
        self.broken: WorkerError | None = None
        self.on_broken: Callable[[], None] = lambda: None  # called once when a rank goes away

    async def connect(self, timeout: float) -> None:
        self._channels = channels = [channel(a) for a in self.addresses]
        await asyncio.gather(
            *(wait_serving(c, a, timeout) for c, a in zip(channels, self.addresses, strict=True))
        )
        stubs = [pb_grpc.WorkerStub(c) for c in channels]
        infos = list(await asyncio.gather(*(s.Info(pb.WorkerInfoRequest()) for s in stubs)))
        if self.infos and [(i.num_gpu_blocks, i.num_host_blocks) for i in infos] != [
            (i.num_gpu_blocks, i.num_host_blocks) for i in self.infos
        ]:
            raise WorkerError(
                "the restarted worker group has a different KV pool size; restart the scheduler"
            )
        self.infos = infos
        self._check_consistent()
        self._calls = [stub.Step(metadata=token_metadata()) for stub in stubs]
        self._readers = [asyncio.create_task(self._read(rank, call)) for rank, call in enumerate(self._calls)]
        for address, info in zip(self.addresses, self.infos, strict=True):
            log.info(
                "connected to worker rank %d at %s (%s, %s, %d KV blocks%s)",
                info.rank,
                address,
                info.model,
                info.device,
                info.num_gpu_blocks,
                ", driver" if info.is_driver else "",
            )

    def _check_consistent(self) -> None:
        first = self.infos[0]
        for info in self.infos:
            if (info.model, info.block_size, info.world_size) != (
                first.model,
                first.block_size,
                first.world_size,
            ):
                raise WorkerError(
                    f"workers disagree: {info.model}/{info.block_size}/{info.world_size} vs "
                    f"{first.model}/{first.block_size}/{first.world_size}"
                )
        if len(self.infos) != first.world_size:
            raise WorkerError(
                f"{len(self.infos)} worker addresses given but the world has {first.world_size} ranks"
            )
        if sum(info.is_driver for info in self.infos) != 1:
            raise WorkerError("exactly one worker rank must be the driver (last stage, TP rank 0)")

    @property
    def driver(self) -> int:
        return next(i for i, info in enumerate(self.infos) if info.is_driver)

    @property
    def num_gpu_blocks(self) -> int:
        return min(info.num_gpu_blocks for info in self.infos)

    @property
    def num_host_blocks(self) -> int:
        return min(info.num_host_blocks for info in self.infos)

    async def _read(self, rank: int, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                futures = self._pending.get(reply.step_id)
                if futures and not futures[rank].done():
                    futures[rank].set_result(reply)
            error = WorkerError(f"worker rank {rank} closed its step stream")
        except grpc.aio.AioRpcError as exc:
            error = WorkerError(
                f"worker rank {rank} ({self.addresses[rank]}): {exc.code().name} {exc.details()}"
            )
        if call is not self._calls[rank]:
            return  # a stream of a group this scheduler already gave up on
        self._break(error, [rank])

    def _break(self, error: WorkerError, ranks: list[int]) -> None:
        """The group is down (a rank died or hung): every step waiting on `ranks` fails with `error`."""
        log.error("%s", error)
        if self.broken is None:
            self.broken = error
            self.on_broken()
        for futures in self._pending.values():
            for rank in ranks:
                if not futures[rank].done():
                    futures[rank].set_exception(error)

    async def watch_steps(self, timeout: float) -> None:
        """Liveness: a rank that neither answers a step nor dies (frozen: SIGSTOP, a stuck driver)
        is declared hung once a step waits `timeout` seconds for it; the group is then down as if
        the rank had died (NOT_SERVING, the supervisor restarts it, jobs recompute). A stop shorter
        than `timeout` costs nothing: the step's answer is simply late."""
        period = min(0.5, timeout / 4)
        while True:
            await asyncio.sleep(period)
            if self.broken is not None or not self._sent:
                continue
            step_id, sent = min(self._sent.items(), key=lambda item: item[1])
            waited = time.monotonic() - sent
            futures = self._pending.get(step_id)
            if waited < timeout or not futures:
                continue
            silent = [rank for rank, future in enumerate(futures) if not future.done()]
            names = ", ".join(f"rank {rank} ({self.addresses[rank]})" for rank in silent)
            self._break(
                WorkerError(
                    f"worker {names} hung: no answer to a step for {waited:.1f}s (--step-timeout {timeout:g}s)"
                ),
                silent,
            )

    async def reconnect(self) -> None:
        """After a rank died: drops every stream and waits (as long as it takes) for the whole group
        to be SERVING again, then opens fresh streams. Every rank's KV is gone."""
        for call in self._calls:
            call.cancel()
        for task in self._readers:
            task.cancel()
        for chan in self._channels:
            await chan.close()
        self._pending.clear()
        self._sent.clear()
        log.warning("worker group down (%s); waiting for it to come back", self.broken)
        while True:
            try:
                await self.connect(timeout=30.0)
                break
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                log.warning("worker group not back yet: %s", exc)
        self.broken = None
        log.info("worker group is back: %d ranks reconnected", len(self._calls))

    async def step(self, request: pb.StepRequest) -> pb.StepResponse:
        """Runs one step on every rank; the driver's answer, or WorkerError if any rank failed."""
        if self.broken is not None:
            raise self.broken
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in self._calls]
        self._pending[request.step_id] = futures
        self._sent[request.step_id] = time.monotonic()
        try:
            async with self._write_lock:
                for call in self._calls:
                    await call.write(request)
            replies = await asyncio.gather(*futures)
        except grpc.aio.AioRpcError as exc:
            raise WorkerError(f"sending step {request.step_id}: {exc.code().name} {exc.details()}") from exc
        except asyncio.InvalidStateError as exc:  # the stream was closed under it (a stopping scheduler)
            raise WorkerError(f"sending step {request.step_id}: {exc}") from exc
        finally:
            self._pending.pop(request.step_id, None)
            self._sent.pop(request.step_id, None)
        errors = [f"rank {i}: {r.error}" for i, r in enumerate(replies) if r.error]
        if errors:
            raise WorkerError("; ".join(errors))
        return replies[self.driver]
